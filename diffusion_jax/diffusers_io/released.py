"""The U-Net configs of released DeepFloyd IF stages, as their `unet/config.json` holds them.

Only the fields that shape the network (or differ from `UNet2DConditionModel`'s defaults) are
kept; `unet.unet_kwargs` reads them like the full file, so `unet.param_count` gives a
released stage's size without its weights:

    kw = unet.unet_kwargs(released.IF_I_XL_UNET)     # 4,304,695,110 parameters
    kw = unet.unet_kwargs(released.IF_II_L_UNET)     # 1,243,277,190 parameters
"""
from __future__ import annotations

# DeepFloyd/IF-I-XL-v1.0, unet/config.json: text to 64 px, published as 4.3B parameters.
IF_I_XL_UNET = dict(
    _class_name='UNet2DConditionModel', sample_size=64, in_channels=3, out_channels=6,
    block_out_channels=[704, 1408, 2112, 2816], layers_per_block=3,
    down_block_types=['ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D',
                      'SimpleCrossAttnDownBlock2D', 'SimpleCrossAttnDownBlock2D'],
    up_block_types=['SimpleCrossAttnUpBlock2D', 'SimpleCrossAttnUpBlock2D',
                    'SimpleCrossAttnUpBlock2D', 'ResnetUpsampleBlock2D'],
    mid_block_type='UNetMidBlock2DSimpleCrossAttn', act_fn='gelu', attention_head_dim=64,
    cross_attention_dim=2816, cross_attention_norm='group_norm', encoder_hid_dim=4096,
    encoder_hid_dim_type='text_proj', addition_embed_type='text',
    addition_embed_type_num_heads=64, class_embed_type=None, norm_num_groups=32,
    only_cross_attention=False, resnet_time_scale_shift='scale_shift',
    resnet_skip_time_act=False, resnet_out_scale_factor=1.0, mid_block_scale_factor=1,
    time_embedding_act_fn=None, time_embedding_dim=None)

# DeepFloyd/IF-II-L-v1.0, unet/config.json: 64 px to 256 px, published as 1.2B parameters.
IF_II_L_UNET = dict(
    _class_name='UNet2DConditionModel', sample_size=256, in_channels=6, out_channels=6,
    block_out_channels=[160, 320, 640, 960, 1280], layers_per_block=[2, 2, 3, 5, 5],
    down_block_types=['ResnetDownsampleBlock2D', 'ResnetDownsampleBlock2D',
                      'ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D',
                      'SimpleCrossAttnDownBlock2D'],
    up_block_types=['SimpleCrossAttnUpBlock2D', 'SimpleCrossAttnUpBlock2D',
                    'ResnetUpsampleBlock2D', 'ResnetUpsampleBlock2D', 'ResnetUpsampleBlock2D'],
    mid_block_type='UNetMidBlock2DSimpleCrossAttn', act_fn='gelu', attention_head_dim=64,
    cross_attention_dim=1280, cross_attention_norm='group_norm', encoder_hid_dim=4096,
    encoder_hid_dim_type='text_proj', addition_embed_type='text',
    addition_embed_type_num_heads=64, class_embed_type='timestep', norm_num_groups=32,
    only_cross_attention=False, resnet_time_scale_shift='scale_shift',
    resnet_skip_time_act=True, resnet_out_scale_factor=1.4142271248762552,
    mid_block_scale_factor=1.4142271248762552, time_embedding_act_fn='gelu',
    time_embedding_dim=1280)

# Published sizes (parameters), as the model cards round them.
PUBLISHED_SIZES = {'IF-I-XL': 4.3e9, 'IF-II-L': 1.2e9}

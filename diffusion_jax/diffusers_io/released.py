"""The network configs of released DeepFloyd IF stages, Karlo and Stable Diffusion's U-Nets,
as their config.json files hold them.

Only the fields that shape the network (or differ from the diffusers class's defaults) are
kept; `unet.unet_kwargs` and `prior.prior_kwargs` read them like the full files, so a
released stage's size comes without its weights:

    kw = unet.unet_kwargs(released.IF_I_XL_UNET)     # 4,304,695,110 parameters
    kw = unet.unet_kwargs(released.IF_II_L_UNET)     # 1,243,277,190 parameters
    kw = unet.unet_kwargs(released.KARLO_DECODER,
                          text_proj_config=released.KARLO_TEXT_PROJ)   # 893,318,086
    kw = unet.unet_kwargs(released.KARLO_SUPER_RES, low_res_size=64)  # 691,579,523
    kw = prior.prior_kwargs(released.KARLO_PRIOR)   # 1,022,028,544 (+1,536: clip_mean/std)
    kw = unet.unet_kwargs(released.SD15_UNET)       # 859,520,964 parameters
    kw = unet.unet_kwargs(released.SD21_UNET)       # 865,910,724 parameters
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

# kakaobrain/karlo-v1-alpha (an UnCLIPPipeline directory), published as prior 1B, decoder
# 900M, SR 700M + 700M. prior/config.json: PriorTransformer, CLIP ViT-L/14 (768) embeddings.
KARLO_PRIOR = dict(
    _class_name='PriorTransformer', num_attention_heads=32, attention_head_dim=64, num_layers=20,
    embedding_dim=768, num_embeddings=77, additional_embeddings=4, dropout=0.0)

# decoder/config.json: text and CLIP image embedding to 64 px, with text_proj/config.json.
KARLO_DECODER = dict(
    _class_name='UNet2DConditionModel', sample_size=64, in_channels=3, out_channels=6,
    block_out_channels=[320, 640, 960, 1280], layers_per_block=3,
    down_block_types=['ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D',
                      'SimpleCrossAttnDownBlock2D', 'SimpleCrossAttnDownBlock2D'],
    up_block_types=['SimpleCrossAttnUpBlock2D', 'SimpleCrossAttnUpBlock2D',
                    'SimpleCrossAttnUpBlock2D', 'ResnetUpsampleBlock2D'],
    mid_block_type='UNetMidBlock2DSimpleCrossAttn', act_fn='silu', attention_head_dim=64,
    cross_attention_dim=1536, class_embed_type='identity', norm_num_groups=32,
    only_cross_attention=False, resnet_time_scale_shift='scale_shift', mid_block_scale_factor=1)
KARLO_TEXT_PROJ = dict(
    _class_name='UnCLIPTextProjModel', clip_embeddings_dim=768, clip_extra_context_tokens=4,
    cross_attention_dim=1536, time_embed_dim=1280)

# super_res_first/config.json: 64 px to 256 px; super_res_last is the same network (its
# config.json differs only in sample_size, null there).
KARLO_SUPER_RES = dict(
    _class_name='UNet2DModel', sample_size=256, in_channels=6, out_channels=3,
    block_out_channels=[320, 640, 960, 1280], layers_per_block=3,
    down_block_types=['ResnetDownsampleBlock2D'] * 4, up_block_types=['ResnetUpsampleBlock2D'] * 4,
    add_attention=False, act_fn='silu', norm_num_groups=32, resnet_time_scale_shift='default',
    mid_block_scale_factor=1)
KARLO_TEXT_LEN = 77  # the CLIP tokenizer's model_max_length

# Stable Diffusion v1.5, unet/config.json: text (CLIP ViT-L/14 tokens, 768 wide) to 64 px
# latents (512 px images); the model card's 860M-parameter U-Net.
SD_LEVELS = dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                      'DownBlock2D'],
    up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                    'CrossAttnUpBlock2D'])
SD15_UNET = dict(
    _class_name='UNet2DConditionModel', sample_size=64, in_channels=4, out_channels=4,
    **SD_LEVELS, act_fn='silu', attention_head_dim=8, center_input_sample=False,
    cross_attention_dim=768, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32)

# stabilityai/stable-diffusion-2-1, unet/config.json: OpenCLIP ViT-H tokens (1024 wide) to
# 96 px latents (768 px images); attention_head_dim counts the heads (64 wide at every level),
# linear projections, attention in float32; the model card's 865M-parameter U-Net.
SD21_UNET = dict(
    _class_name='UNet2DConditionModel', sample_size=96, in_channels=4, out_channels=4,
    **SD_LEVELS, act_fn='silu', attention_head_dim=[5, 10, 20, 20], center_input_sample=False,
    cross_attention_dim=1024, downsample_padding=1, dual_cross_attention=False,
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-05,
    norm_num_groups=32, num_class_embeds=None, only_cross_attention=False,
    upcast_attention=True, use_linear_projection=True)
SD_TEXT_LEN = 77  # the CLIP tokenizer's model_max_length

# Published sizes (parameters), as the model cards round them.
PUBLISHED_SIZES = {'IF-I-XL': 4.3e9, 'IF-II-L': 1.2e9, 'Karlo-prior': 1.0e9,
                   'Karlo-decoder': 9.0e8, 'Karlo-super-res': 7.0e8, 'SD-1.5': 8.6e8,
                   'SD-2.1': 8.65e8}

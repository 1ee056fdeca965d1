"""diffusers' IF U-Nets (UNet2DConditionModel) on our UNet: parity, round trips, bad input.

Tiny diffusers models with every weight randomised are saved with `save_pretrained`, loaded
by `diffusers_io.unet.load_unet`, and their outputs compared in float32 (max abs diff <= 1e-4
of the output scale); our models are exported and loaded back by diffusers.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from diffusion_jax import errors  # noqa: E402
from diffusion_jax.diffusers_io import unet as du  # noqa: E402
from diffusion_jax.models import layers  # noqa: E402
from hf_fixtures import random_params  # noqa: E402


def _types(attends):
  down = ['SimpleCrossAttnDownBlock2D' if a else 'ResnetDownsampleBlock2D' for a in attends]
  up = ['SimpleCrossAttnUpBlock2D' if a else 'ResnetUpsampleBlock2D' for a in attends[::-1]]
  return dict(down_block_types=down, up_block_types=up)


IF_OPTIONS = dict(act_fn='gelu', time_embedding_act_fn='gelu',
                  resnet_time_scale_shift='scale_shift', resnet_skip_time_act=True,
                  resnet_out_scale_factor=1.414, mid_block_type='UNetMidBlock2DSimpleCrossAttn',
                  encoder_hid_dim_type='text_proj', addition_embed_type='text')
CONFIGS = {
    # IF-I: context wider than the pixels (64 vs 32/64 channels), group-normed context.
    'if1': dict(IF_OPTIONS, sample_size=16, in_channels=3, out_channels=6,
                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                attention_head_dim=16, cross_attention_dim=96, encoder_hid_dim=40,
                addition_embed_type_num_heads=4, cross_attention_norm='group_norm',
                **_types([False, True])),
    # Odd head counts (3 and 6 heads of 16), attention at every level, context-only attention
    # at the second level and in the middle, per-level depths, diffusers' default activations
    # and additive time embedding.
    'odd_heads': dict(sample_size=16, in_channels=3, out_channels=6,
                      block_out_channels=(48, 96), layers_per_block=(1, 2), norm_num_groups=8,
                      attention_head_dim=16, cross_attention_dim=32, encoder_hid_dim=24,
                      encoder_hid_dim_type='text_proj', addition_embed_type='text',
                      addition_embed_type_num_heads=2,
                      mid_block_type='UNetMidBlock2DSimpleCrossAttn',
                      only_cross_attention=[False, True], mid_block_only_cross_attention=True,
                      **_types([True, True])),
    # IF-II: x_t with the upsampled low-res image, the noise level as a timestep class
    # embedding, three levels, only cross-attention, a time embedding of its own width.
    'if2': dict(IF_OPTIONS, sample_size=16, in_channels=6, out_channels=6,
                block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                attention_head_dim=32, cross_attention_dim=64, encoder_hid_dim=24,
                addition_embed_type_num_heads=3, cross_attention_norm='group_norm',
                class_embed_type='timestep', time_embedding_dim=72, only_cross_attention=True,
                **_types([False, False, True])),
    # IF-I with 5 heads of 12 (widths 20 and 60, no power of two), a context of 36 channels,
    # T5 tokens of 27 pooled by 3 heads of 9.
    'if1_odd_width': dict(IF_OPTIONS, sample_size=16, in_channels=3, out_channels=6,
                          block_out_channels=(20, 60), layers_per_block=1, norm_num_groups=5,
                          attention_head_dim=12, cross_attention_dim=36, encoder_hid_dim=27,
                          addition_embed_type_num_heads=3, **_types([False, True])),
    # IF-II with 1 and 3 heads of 24, a context of 40 channels, T5 tokens of 35 pooled by 5
    # heads of 7, per-level depths, attention at every level (context-only at the second)
    # and a 4x upsampling.
    'if2_odd_heads': dict(IF_OPTIONS, sample_size=16, in_channels=6, out_channels=6,
                          block_out_channels=(24, 72), layers_per_block=(1, 2),
                          norm_num_groups=6, attention_head_dim=24, cross_attention_dim=40,
                          encoder_hid_dim=35, addition_embed_type_num_heads=5,
                          class_embed_type='timestep', only_cross_attention=[False, True],
                          **_types([True, True])),
    # IF-II with diffusers' default activations and time embedding, no pooled text, a
    # group-normed context, and eps alone out (no variance).
    'if2_plain': dict(sample_size=16, in_channels=6, out_channels=3,
                      block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                      attention_head_dim=8, cross_attention_dim=32, encoder_hid_dim=20,
                      encoder_hid_dim_type='text_proj', cross_attention_norm='group_norm',
                      mid_block_type='UNetMidBlock2DSimpleCrossAttn',
                      class_embed_type='timestep', **_types([False, True])),
    # A head width per level (6 and 3 heads of 8 down, 3 and 6 heads of 16 up: diffusers' up
    # blocks read the list in down-block order), attention at both levels.
    'head_widths': dict(IF_OPTIONS, sample_size=8, in_channels=3, out_channels=6,
                        block_out_channels=(48, 48), layers_per_block=(1, 2), norm_num_groups=8,
                        attention_head_dim=[8, 16], cross_attention_dim=32, encoder_hid_dim=20,
                        addition_embed_type_num_heads=2, **_types([True, True])),
}
LOW_RES = {'if2': 8, 'if2_odd_heads': 4, 'if2_plain': 8}  # each IF-II stage's low-res side
TEXT_LEN = 5


def _randomise(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name and name.endswith('weight'):
        p.copy_(1 + 0.2 * torch.rand(p.shape, generator=gen) - 0.1)
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * (0.15 if p.ndim > 1 else 0.05))
  return model


@pytest.fixture(scope='module')
def released(tmp_path_factory):
  """name -> (diffusers model, folder) of each tiny config, every weight random."""
  out = {}
  for i, (name, cfg) in enumerate(CONFIGS.items()):
    model = _randomise(diffusers.UNet2DConditionModel(**cfg).eval(), seed=i)
    folder = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder)
    out[name] = (model, folder)
  return out


def _inputs(name, seed=0, batch=2):
  cfg = CONFIGS[name]
  rng = np.random.default_rng(seed)
  S = cfg['sample_size']
  data = dict(x=rng.standard_normal((batch, 3, S, S)).astype(np.float32),
              k=np.array([7, 913][:batch]),
              text=rng.standard_normal((batch, TEXT_LEN, cfg['encoder_hid_dim'])).astype(
                  np.float32))
  if cfg['in_channels'] == 6:
    side = LOW_RES[name]
    data['low_res'] = rng.uniform(-1, 1, (batch, 3, side, side)).astype(np.float32)
    data['noise_level'] = np.array([250, 40][:batch])
  return data


def _reference(model, data):
  x = torch.tensor(data['x'])
  kw = {}
  if 'low_res' in data:
    up = torch.nn.functional.interpolate(torch.tensor(data['low_res']), x.shape[-2:],
                                         mode='bilinear', align_corners=True)
    x = torch.cat([x, up], dim=1)
    kw['class_labels'] = torch.tensor(data['noise_level'])
  with torch.no_grad():
    out = model(x, torch.tensor(data['k']), encoder_hidden_states=torch.tensor(data['text']),
                **kw).sample
  return out.numpy().transpose(0, 2, 3, 1)


_JITTED = {}


def _ours(module, params, data):
  cond = dict(text_tokens=jnp.asarray(data['text']),
              text_mask=jnp.ones(data['text'].shape[:2], bool))
  if 'low_res' in data:
    cond['low_res'] = jnp.asarray(data['low_res'].transpose(0, 2, 3, 1))
    cond['aug_t'] = jnp.asarray((data['noise_level'] + 1) / 1000, jnp.float32)
  t = jnp.asarray((data['k'] + 1) / 1000, jnp.float32)
  apply = _JITTED.setdefault(module, jax.jit(module.apply))
  return np.asarray(apply({'params': params}, jnp.asarray(data['x'].transpose(0, 2, 3, 1)), t,
                          cond))


def _extra(name):
  return dict(low_res_size=LOW_RES[name]) if CONFIGS[name]['in_channels'] == 6 else {}


def _tolerance(ref):
  return 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.fixture(scope='module')
def loaded(released):
  return {name: du.load_unet(folder, **_extra(name)) for name, (_, folder) in released.items()}


@pytest.mark.parametrize('name', list(CONFIGS))
def test_output_equals_diffusers(released, loaded, name):
  model, _ = released[name]
  module, params = loaded[name]
  data = _inputs(name)
  ref = _reference(model, data)
  out = _ours(module, params, data)
  assert out.shape == ref.shape and out.dtype == np.float32
  diff = float(np.abs(out - ref).max())
  print(f'{name}: max abs diff {diff:.3g}, output scale {np.abs(ref).max():.3g}')
  assert diff <= _tolerance(ref), diff
  # The timestep, the text and (SR) the low-res image and noise level all reach the output.
  for key, change in [('k', lambda v: v + 5), ('text', lambda v: -v),
                      ('low_res', lambda v: -v), ('noise_level', lambda v: v + 100)]:
    if key in data:
      moved = _ours(module, params, dict(data, **{key: change(data[key])}))
      assert np.abs(moved - ref).max() > 100 * _tolerance(ref), key


def test_kwargs_of_if_config():
  kw = du.unet_kwargs(CONFIGS['if2'], low_res_size=LOW_RES['if2'])
  assert kw['in_channels'] == 3 and kw['learned_variance'] and kw['aug_cond']
  assert kw['low_res_resize'] == 'bilinear_align_corners' and kw['low_res_size'] == 8
  assert kw['channel_mult'] == (1, 2, 4) and kw['attention_resolutions'] == (4,)
  assert kw['context_only_resolutions'] == (4,) and kw['mid_context_only']
  assert kw['text_mask_keys'] is False and kw['time_embed_dim'] == 72
  odd = du.unet_kwargs(CONFIGS['odd_heads'])
  assert odd['context_only_resolutions'] == (8,) and odd['num_res_blocks'] == (1, 2)
  assert odd['act'] == 'silu' and odd['emb_act'] == 'none' and not odd['use_scale_shift_norm']
  widths = du.unet_kwargs(CONFIGS['head_widths'])
  assert widths['down_head_channels'] == (8, 16) and widths['up_head_channels'] == (16, 8)
  same = du.unet_kwargs(dict(CONFIGS['if1'], attention_head_dim=[16, 16]))
  assert same == du.unet_kwargs(CONFIGS['if1'])


def test_align_corners_resize_equals_torch():
  low = np.random.default_rng(1).standard_normal((2, 3, 5, 7)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.tensor(low), (16, 12), mode='bilinear',
                                        align_corners=True).numpy().transpose(0, 2, 3, 1)
  ours = np.asarray(layers.resize_align_corners(jnp.asarray(low.transpose(0, 2, 3, 1)), 16, 12))
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  half_pixel = jax.image.resize(jnp.asarray(low.transpose(0, 2, 3, 1)), (2, 16, 12, 3),
                                'bilinear')
  assert np.abs(np.asarray(half_pixel) - ref).max() > 1e-2  # the option matters


@pytest.mark.parametrize('name', ['if1', 'if2', 'if1_odd_width', 'if2_odd_heads', 'head_widths'])
def test_export_returns_the_released_tensors(released, loaded, name):
  model, _ = released[name]
  module, params = loaded[name]
  config, state = du.export_unet(du.unet_kwargs(CONFIGS[name], **_extra(name)), params)
  ref = {k: v.numpy() for k, v in model.state_dict().items()}
  assert sorted(state) == sorted(ref)
  for key, value in ref.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)
  # The exported config describes the same network: the same fields of ours, and diffusers
  # builds the same modules from it.
  assert du.unet_kwargs(config, **_extra(name)) == du.unet_kwargs(CONFIGS[name], **_extra(name))
  rebuilt = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items()
                                              if not k.startswith('_')})
  assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
      k: v.shape for k, v in ref.items()}


def test_exported_random_unet_loads_in_diffusers(tmp_path):
  """Ours (every parameter random) -> diffusers folder -> from_pretrained: same output."""
  kw = du.unet_kwargs(CONFIGS['if1'])
  params = random_params(du.abstract_params(kw), seed=3)
  du.save_unet(str(tmp_path), kw, params)
  model = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
  data = _inputs('if1', seed=4)
  ref = _reference(model, data)
  out = _ours(du.UNet(**kw), params, data)
  diff = float(np.abs(out - ref).max())
  print(f'exported if1: max abs diff {diff:.3g}, output scale {np.abs(ref).max():.3g}')
  assert diff <= _tolerance(ref), diff
  module, reloaded = du.load_unet(str(tmp_path))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reloaded)):
    np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize('field,value,words', [
    ('down_block_types', ['CrossAttnDownBlock2D', 'SimpleCrossAttnDownBlock2D'],
     "down_block_types 'CrossAttnDownBlock2D' is not supported"),
    ('class_embed_type', 'projection', "class_embed_type 'projection' is not supported"),
    ('flip_sin_to_cos', False, 'flip_sin_to_cos False is not supported'),
    ('up_block_types', ['ResnetUpsampleBlock2D', 'SimpleCrossAttnUpBlock2D'],
     'mirror image of down_block_types'),
    # diffusers' text pooling cannot split 40 channels into 3 heads either
    ('addition_embed_type_num_heads', 3, 'use a divisor of encoder_hid_dim 40'),
])
def test_unsupported_config_is_one_line(field, value, words):
  with pytest.raises(errors.InputError) as e:
    du.unet_kwargs(dict(CONFIGS['if1'], **{field: value}))
  message = str(e.value)
  assert '\n' not in message and message.startswith('unet/config.json: ') and words in message


def test_missing_and_unused_tensors_are_named(released):
  model, folder = released['if1']
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  state['mid_block.extra.weight'] = state.pop('conv_out.weight')
  with pytest.raises(errors.InputError) as e:
    du.convert_unet(state, du.unet_kwargs(CONFIGS['if1']))
  assert 'conv_out.weight' in str(e.value) and 'mid_block.extra.weight' in str(e.value)
  with open(os.path.join(folder, 'config.json')) as f:
    assert json.load(f)['_class_name'] == 'UNet2DConditionModel'


# ------------------------------------------------------------------------------------------
# UNet2DModel: Karlo's upsamplers (no text; the low-res image upsampled bicubically)

PLAIN_CONFIGS = {
    'karlo_sr': dict(sample_size=16, in_channels=6, out_channels=3, block_out_channels=(16, 32),
                     layers_per_block=1, norm_num_groups=8, add_attention=False,
                     resnet_time_scale_shift='scale_shift',
                     down_block_types=['ResnetDownsampleBlock2D'] * 2,
                     up_block_types=['ResnetUpsampleBlock2D'] * 2),
    'karlo_sr_deep': dict(sample_size=16, in_channels=6, out_channels=6,
                          block_out_channels=(24, 48, 72), layers_per_block=2, norm_num_groups=8,
                          add_attention=False, time_embedding_dim=40,
                          down_block_types=['ResnetDownsampleBlock2D'] * 3,
                          up_block_types=['ResnetUpsampleBlock2D'] * 3),
    'karlo_sr_scaled_mid': dict(sample_size=8, in_channels=6, out_channels=3,
                                block_out_channels=(32, 32), layers_per_block=3,
                                norm_num_groups=4, add_attention=False, mid_block_scale_factor=1.3,
                                resnet_time_scale_shift='scale_shift',
                                down_block_types=['ResnetDownsampleBlock2D'] * 2,
                                up_block_types=['ResnetUpsampleBlock2D'] * 2),
}


@pytest.mark.parametrize('name', list(PLAIN_CONFIGS))
def test_unet2dmodel_output_equals_diffusers(tmp_path, name):
  cfg = PLAIN_CONFIGS[name]
  model = _randomise(diffusers.UNet2DModel(**cfg).eval(), seed=len(name))
  model.save_pretrained(str(tmp_path))
  S, low_side = cfg['sample_size'], cfg['sample_size'] // 4
  module, params = du.load_unet(str(tmp_path))
  assert module.low_res_size == low_side and module.low_res_resize == 'bicubic'
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 3, S, S)).astype(np.float32)
  low = rng.uniform(-1, 1, (2, 3, low_side, low_side)).astype(np.float32)
  k = np.array([11, 600])
  # As diffusers' UnCLIPPipeline upsamples the decoder's image for super_res_first.
  up = torch.nn.functional.interpolate(torch.tensor(low), (S, S), mode='bicubic',
                                       align_corners=False, antialias=True)
  with torch.no_grad():
    ref = model(torch.cat([torch.tensor(x), up], 1), torch.tensor(k)).sample.numpy()
  ref = ref.transpose(0, 2, 3, 1)
  apply = jax.jit(module.apply)
  run = lambda low_, k_: np.asarray(apply(
      {'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
      jnp.asarray((k_ + 1) / 1000, jnp.float32),
      {'low_res': jnp.asarray(low_.transpose(0, 2, 3, 1))}))
  out = run(low, k)
  diff = float(np.abs(out - ref).max())
  print(f'{name}: max abs diff {diff:.3g}, output scale {np.abs(ref).max():.3g}')
  assert diff <= _tolerance(ref), diff
  assert np.abs(run(-low, k) - ref).max() > 100 * _tolerance(ref)
  assert np.abs(run(low, k + 5) - ref).max() > 100 * _tolerance(ref)
  # Round trip: the same tensors, and a config from which diffusers builds the same model.
  with open(tmp_path / 'config.json') as f:
    saved = json.load(f)
  config, state = du.export_unet(du.unet_kwargs(saved), params)
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(state.pop(key), value.numpy(), err_msg=key)
  assert not state
  assert du.unet_kwargs(config) == du.unet_kwargs(saved)
  rebuilt = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith('_')})
  assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
      k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------
# unCLIP decoder: UNet2DConditionModel(class_embed_type='identity') behind UnCLIPTextProjModel

UNCLIP = {
    'decoder': (dict(sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64),
                     layers_per_block=1, norm_num_groups=8, attention_head_dim=16,
                     cross_attention_dim=48, class_embed_type='identity',
                     resnet_time_scale_shift='scale_shift',
                     mid_block_type='UNetMidBlock2DSimpleCrossAttn', **_types([False, True])),
                dict(clip_extra_context_tokens=4, clip_embeddings_dim=24, time_embed_dim=128,
                     cross_attention_dim=48)),
    # 3 heads of 16 at the first level, 3 extra tokens, context 40 wide.
    'decoder_odd_heads': (dict(sample_size=8, in_channels=3, out_channels=6,
                               block_out_channels=(48, 96), layers_per_block=(2, 1),
                               norm_num_groups=8, attention_head_dim=16, cross_attention_dim=40,
                               class_embed_type='identity', time_embedding_dim=80,
                               mid_block_type='UNetMidBlock2DSimpleCrossAttn',
                               **_types([True, True])),
                          dict(clip_extra_context_tokens=3, clip_embeddings_dim=20,
                               time_embed_dim=80, cross_attention_dim=40)),
    'decoder_gelu': (dict(sample_size=16, in_channels=3, out_channels=3,
                          block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=4,
                          attention_head_dim=8, cross_attention_dim=32,
                          class_embed_type='identity', act_fn='gelu',
                          time_embedding_act_fn='silu', resnet_time_scale_shift='scale_shift',
                          resnet_skip_time_act=True, resnet_out_scale_factor=1.414,
                          mid_block_type='UNetMidBlock2DSimpleCrossAttn',
                          **_types([False, True, True])),
                     dict(clip_extra_context_tokens=4, clip_embeddings_dim=16, time_embed_dim=64,
                          cross_attention_dim=32)),
}


@pytest.mark.parametrize('name', list(UNCLIP))
def test_unclip_decoder_output_equals_diffusers(tmp_path, name):
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  cfg, tp_cfg = UNCLIP[name]
  decoder = _randomise(diffusers.UNet2DConditionModel(**cfg).eval(), seed=len(name))
  text_proj = _randomise(UnCLIPTextProjModel(**tp_cfg).eval(), seed=len(name) + 1)
  decoder.save_pretrained(str(tmp_path / 'decoder'))
  text_proj.save_pretrained(str(tmp_path / 'text_proj'))
  module, params = du.load_unet(str(tmp_path / 'decoder'),
                                text_proj_folder=str(tmp_path / 'text_proj'))
  rng = np.random.default_rng(6)
  S, D, L = cfg['sample_size'], tp_cfg['clip_embeddings_dim'], 6
  x = rng.standard_normal((2, 3, S, S)).astype(np.float32)
  data = dict(k=np.array([999, 31]), image=rng.standard_normal((2, D)).astype(np.float32),
              pooled=rng.standard_normal((2, D)).astype(np.float32),
              tokens=rng.standard_normal((2, L, D)).astype(np.float32),
              mask=np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool))

  def reference(d, null_image_row=None):
    image = torch.tensor(d['image'])
    if null_image_row is not None:  # diffusers' CFG branch: the learned null image embedding
      image[null_image_row] = text_proj.learned_classifier_free_guidance_embeddings.detach()
    with torch.no_grad():
      hidden, additive = text_proj(image_embeddings=image, prompt_embeds=torch.tensor(d['pooled']),
                                   text_encoder_hidden_states=torch.tensor(d['tokens']),
                                   do_classifier_free_guidance=False)
      mask = torch.nn.functional.pad(torch.tensor(d['mask']),
                                     (tp_cfg['clip_extra_context_tokens'], 0), value=True)
      out = decoder(torch.tensor(x), torch.tensor(d['k']), encoder_hidden_states=hidden,
                    class_labels=additive, attention_mask=mask).sample
    return out.numpy().transpose(0, 2, 3, 1)

  apply = jax.jit(module.apply)

  def ours(d, **extra):
    cond = dict(text_tokens=jnp.asarray(d['tokens']), text_mask=jnp.asarray(d['mask']),
                text_embed=jnp.asarray(d['pooled']), image_embed=jnp.asarray(d['image']),
                **extra)
    return np.asarray(apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                            jnp.asarray((d['k'] + 1) / 1000, jnp.float32), cond))

  ref = reference(data)
  diff = float(np.abs(ours(data) - ref).max())
  print(f'{name}: max abs diff {diff:.3g}, output scale {np.abs(ref).max():.3g}')
  assert diff <= _tolerance(ref), diff
  null_ref = reference(data, null_image_row=0)
  null_diff = float(np.abs(ours(data, drop_image=jnp.array([True, False])) - null_ref).max())
  assert null_diff <= _tolerance(null_ref), null_diff
  # Every input reaches the output; a masked padding token does not.
  for key, change in [('image', lambda v: -v), ('pooled', lambda v: -v),
                      ('tokens', lambda v: -v), ('k', lambda v: v - 7)]:
    assert np.abs(ours(dict(data, **{key: change(data[key])})) - ref).max() > (
        100 * _tolerance(ref)), key
  padded = data['tokens'].copy()
  padded[0, 4] += 3.0
  assert np.abs(ours(dict(data, tokens=padded)) - ref).max() <= _tolerance(ref)
  # Export: the same tensors for both models (the extra-token rows reordered back), and
  # folders diffusers loads.
  kw = du.unet_kwargs(dict(decoder.config), text_proj_config=dict(text_proj.config))
  decoder_state, text_proj_state = du.split_text_proj(du.export_unet(kw, params)[1])
  for exported, model in ((decoder_state, decoder), (text_proj_state, text_proj)):
    assert sorted(exported) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
      np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
  du.save_unet(str(tmp_path / 'out'), kw, params, text_proj_folder=str(tmp_path / 'out_tp'))
  decoder = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / 'out')).eval()
  text_proj = UnCLIPTextProjModel.from_pretrained(str(tmp_path / 'out_tp')).eval()
  assert np.abs(reference(data) - ref).max() == 0


def test_param_count_equals_diffusers(released):
  """`param_count` (eval_shape, nothing allocated) counts what diffusers' modules hold."""
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  for name in CONFIGS:
    model, _ = released[name]
    assert du.param_count(du.unet_kwargs(CONFIGS[name], **_extra(name))) == sum(
        p.numel() for p in model.parameters())
  cfg, tp_cfg = UNCLIP['decoder_odd_heads']
  torch_count = sum(p.numel() for m in (diffusers.UNet2DConditionModel(**cfg),
                                        UnCLIPTextProjModel(**tp_cfg)) for p in m.parameters())
  assert du.param_count(du.unet_kwargs(cfg, text_proj_config=tp_cfg)) == torch_count


def test_sharded_folder_loads_the_same(released, loaded, tmp_path):
  model, _ = released['if1']
  model.save_pretrained(str(tmp_path), max_shard_size='40KB')
  assert os.path.isfile(tmp_path / du.WEIGHTS_INDEX_NAME)
  assert not os.path.isfile(tmp_path / du.WEIGHTS_NAME)
  _, params = du.load_unet(str(tmp_path))
  for a, b in zip(jax.tree.leaves(loaded['if1'][1]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  os.remove(tmp_path / du.WEIGHTS_INDEX_NAME)
  for name in os.listdir(tmp_path):
    if name.endswith('.safetensors'):
      os.remove(tmp_path / name)
  with pytest.raises(errors.InputError, match='no diffusion_pytorch_model.safetensors'):
    du.load_unet(str(tmp_path))


def test_fp16_variant_folder_loads_as_float32(released, loaded, tmp_path):
  """A folder saved with variant='fp16' (as DeepFloyd IF publishes its U-Nets), one file or
  shards, loads as the fp16 tensors in float32; beside the float32 file, that file wins."""
  import copy
  model, _ = released['if1']
  half = copy.deepcopy(model).half()
  want = du.convert_unet({k: v.float().numpy() for k, v in half.state_dict().items()},
                         du.unet_kwargs(CONFIGS['if1']))
  for name, shard in (('single', None), ('sharded', '40KB')):
    folder = tmp_path / name
    half.save_pretrained(str(folder), variant='fp16',
                         **({'max_shard_size': shard} if shard else {}))
    assert not (folder / du.WEIGHTS_NAME).exists()
    _, params = du.load_unet(str(folder))
    jax.tree.map(np.testing.assert_array_equal, params, want)
  model.save_pretrained(str(tmp_path / 'single'))  # the float32 file beside the fp16 one
  _, params = du.load_unet(str(tmp_path / 'single'))
  jax.tree.map(np.testing.assert_array_equal, params, loaded['if1'][1])

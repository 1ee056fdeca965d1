"""Stable Diffusion's U-Net (diffusers' UNet2DConditionModel with CrossAttnDownBlock2D /
UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D levels) on our UNet: parity, round trips, refusals.

Tiny diffusers models with every weight randomised (the zero-initialised proj_out and conv_out
too) are saved with `save_pretrained`, loaded by `diffusers_io.unet.load_unet`, and their
outputs compared in float32 (max abs diff <= 1e-4 of the output scale).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from diffusion_jax import errors  # noqa: E402
from diffusion_jax.diffusers_io import unet as du  # noqa: E402
import hf_fixtures  # noqa: E402

SD1_TYPES = dict(down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
                 up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'])
CONFIGS = {
    # SD 1.x: 1x1 conv projections, attention_head_dim an int (4 heads at every level: 8 and
    # 16 wide), attention at the first level and in the middle.
    'sd1': dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
                cross_attention_dim=24, **SD1_TYPES),
    # SD 2.x: linear projections, a head count per level (4 heads of 8, then 2 of 32; up level
    # l takes down level l's), two transformer blocks per layer, upcast attention, attention
    # at both levels, two res blocks per level.
    'sd2': dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=2, norm_num_groups=8, attention_head_dim=[4, 2],
                cross_attention_dim=40, use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=2,
                down_block_types=['CrossAttnDownBlock2D'] * 2,
                up_block_types=['CrossAttnUpBlock2D'] * 2),
    # SD inpainting: [latents, mask, masked image latents] in (9 channels).
    'inpaint': dict(sample_size=16, in_channels=9, out_channels=4, block_out_channels=(32, 64),
                    layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
                    cross_attention_dim=16, **SD1_TYPES),
}
TEXT_LEN = 5


@pytest.fixture(scope='module')
def released(tmp_path_factory):
  """name -> (diffusers model, folder, (our module, params)) of each tiny config."""
  torch.manual_seed(0)
  out = {}
  for i, (name, cfg) in enumerate(CONFIGS.items()):
    model = hf_fixtures.randomise(diffusers.UNet2DConditionModel(**cfg).eval(), i, 0.1)
    folder = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder)
    out[name] = (model, folder, du.load_unet(folder))
  return out


def _inputs(name, seed=0):
  cfg = CONFIGS[name]
  rng = np.random.default_rng(seed)
  S = cfg['sample_size']
  data = dict(x=rng.standard_normal((2, 4, S, S)).astype(np.float32), k=np.array([7, 913]),
              text=rng.standard_normal((2, TEXT_LEN, cfg['cross_attention_dim'])).astype(
                  np.float32))
  if cfg['in_channels'] == 9:
    data['mask'] = (rng.uniform(size=(2, 1, S, S)) > 0.5).astype(np.float32)
    data['masked'] = rng.standard_normal((2, 4, S, S)).astype(np.float32)
  return data


def _reference(model, data):
  x = torch.tensor(data['x'])
  if 'mask' in data:  # as diffusers' inpainting pipeline concatenates them
    x = torch.cat([x, torch.tensor(data['mask']), torch.tensor(data['masked'])], dim=1)
  with torch.no_grad():
    out = model(x, torch.tensor(data['k']),
                encoder_hidden_states=torch.tensor(data['text'])).sample
  return out.numpy().transpose(0, 2, 3, 1)


_JITTED = {}


def _ours(module, params, data, text_mask=None):
  mask = np.ones(data['text'].shape[:2], bool) if text_mask is None else text_mask
  cond = dict(text_tokens=jnp.asarray(data['text']), text_mask=jnp.asarray(mask))
  if 'mask' in data:
    cond['inpaint_mask'] = jnp.asarray(data['mask'].transpose(0, 2, 3, 1))
    cond['inpaint_image'] = jnp.asarray(data['masked'].transpose(0, 2, 3, 1))
  t = jnp.asarray((data['k'] + 1) / 1000, jnp.float32)
  apply = _JITTED.setdefault(module, jax.jit(module.apply))
  return np.asarray(apply({'params': params}, jnp.asarray(data['x'].transpose(0, 2, 3, 1)), t,
                          cond))


def _tolerance(ref):
  return 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize('name', list(CONFIGS))
def test_output_equals_diffusers(released, name):
  model, _, (module, params) = released[name]
  data = _inputs(name)
  ref = _reference(model, data)
  out = _ours(module, params, data)
  assert out.shape == ref.shape and out.dtype == np.float32
  diff = float(np.abs(out - ref).max())
  print(f'{name}: max abs diff {diff:.3g}, output scale {np.abs(ref).max():.3g}')
  assert diff <= _tolerance(ref), diff
  # The timestep, the text and (inpainting) the mask and masked latents reach the output.
  for key, change in [('k', lambda v: v + 5), ('text', lambda v: -v), ('mask', lambda v: 1 - v),
                      ('masked', lambda v: -v)]:
    if key in data:
      moved = _ours(module, params, dict(data, **{key: change(data[key])}))
      assert np.abs(moved - ref).max() > 100 * _tolerance(ref), key
  # SD attends to every token (its pipelines pass no mask): the text mask changes nothing.
  partial = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
  assert np.abs(_ours(module, params, data, partial) - out).max() == 0


def test_kwargs_of_sd_configs():
  sd1 = du.unet_kwargs(CONFIGS['sd1'])
  assert sd1['attention_block'] == 'transformer' and not sd1['resblock_updown']
  assert sd1['down_head_channels'] == sd1['up_head_channels'] == (8, 16)
  assert sd1['attention_resolutions'] == (16,) and sd1['in_channels'] == 4
  assert not sd1['project_text'] and sd1['text_mask_keys'] is False
  assert not sd1['learned_null_text'] and not sd1['inpaint']
  sd2 = du.unet_kwargs(CONFIGS['sd2'])
  assert sd2['linear_projection'] and sd2['attention_upcast'] and sd2['transformer_depth'] == 2
  assert sd2['down_head_channels'] == sd2['up_head_channels'] == (8, 32)
  inpaint = du.unet_kwargs(CONFIGS['inpaint'])
  assert inpaint['inpaint'] and inpaint['inpaint_premasked'] and inpaint['in_channels'] == 4
  same_width = du.unet_kwargs(dict(CONFIGS['sd1'], attention_head_dim=[4, 8]))
  assert same_width['head_channels'] == 8 and 'down_head_channels' not in same_width


@pytest.mark.parametrize('name', list(CONFIGS))
def test_export_returns_the_released_tensors(released, name):
  model, folder, (_, params) = released[name]
  kw = du.unet_kwargs(CONFIGS[name])
  config, state = du.export_unet(kw, params)
  ref = {k: v.numpy() for k, v in model.state_dict().items()}
  assert sorted(state) == sorted(ref)
  for key, value in ref.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)
  assert du.unet_kwargs(config) == kw
  differ = {k: (v, config.get(k)) for k, v in CONFIGS[name].items()
            if (list(config.get(k)) if isinstance(v, (list, tuple)) else config.get(k)) !=
            (list(v) if isinstance(v, (list, tuple)) else v)}
  assert not differ, differ
  assert du.param_count(kw) == sum(p.numel() for p in model.parameters())


def test_exported_random_unet_loads_in_diffusers(released, tmp_path):
  """Ours (every parameter random) -> save_unet -> diffusers from_pretrained: same output."""
  kw = du.unet_kwargs(CONFIGS['sd2'])
  module = released['sd2'][2][0]
  params = hf_fixtures.random_params(du.abstract_params(kw), seed=3)
  du.save_unet(str(tmp_path), kw, params)
  model = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
  data = _inputs('sd2', seed=4)
  ref = _reference(model, data)
  diff = float(np.abs(_ours(module, params, data) - ref).max())
  print(f'exported sd2: max abs diff {diff:.3g}, output scale {np.abs(ref).max():.3g}')
  assert diff <= _tolerance(ref), diff
  _, reloaded = du.load_unet(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, reloaded)


@pytest.mark.parametrize('field,value,words', [
    ('dual_cross_attention', True, 'dual_cross_attention True is not supported'),
    ('only_cross_attention', True, 'only_cross_attention True is not supported'),
    ('class_embed_type', 'timestep', "class_embed_type 'timestep' is not supported"),
    ('addition_embed_type', 'text', "addition_embed_type 'text' is not supported"),
    ('attention_head_dim', 3, 'use divisors of block_out_channels'),
    ('in_channels', 5, 'or 9 for inpainting'),
    ('downsample_padding', 0, 'downsample_padding 0 is not supported'),
    ('transformer_layers_per_block', [[1], [1]], 'give one depth per level'),
    ('down_block_types', ['CrossAttnDownBlock2D', 'ResnetDownsampleBlock2D'],
     "down_block_types 'ResnetDownsampleBlock2D' is not supported"),
])
def test_unsupported_config_is_one_line(field, value, words):
  with pytest.raises(errors.InputError) as e:
    du.unet_kwargs(dict(CONFIGS['sd1'], **{field: value}))
  message = str(e.value)
  assert '\n' not in message and message.startswith('unet/config.json: ') and words in message


def test_learned_null_tokens_stand_for_a_dropped_caption():
  """Trained here with learned_null_text, a dropped caption's tokens become learned null
  tokens: its output ignores the caption; the combinations in which dropout would do nothing
  are refused."""
  kw = dict(du.unet_kwargs(CONFIGS['sd1']), learned_null_text=True, learned_null_tokens=True,
            text_len=TEXT_LEN)
  module = du.UNet(**kw)
  data = _inputs('sd1')
  x = jnp.asarray(data['x'].transpose(0, 2, 3, 1))
  t_B = jnp.asarray((data['k'] + 1) / 1000.0, jnp.float32)
  mask = jnp.ones(data['text'].shape[:2], bool)
  cond = lambda text, drop: dict(text_tokens=jnp.asarray(text), text_mask=mask,
                                 drop_text=jnp.asarray(drop))
  params = hf_fixtures.random_params(
      jax.eval_shape(module.init, jax.random.key(0), x, t_B, cond(data['text'], [False] * 2))[
          'params'], seed=5)
  apply = lambda text, drop: np.asarray(module.apply({'params': params}, x, t_B,
                                                     cond(text, drop)))
  other = data['text'] + 1.0
  np.testing.assert_array_equal(apply(data['text'], [True, True]), apply(other, [True, True]))
  assert np.abs(apply(data['text'], [False, False]) - apply(other, [False, False])).max() > 1e-3
  for change, words in ((dict(learned_null_tokens=False), 'learned_null_tokens=True'),
                        (dict(learned_null_tokens=False, attention_block='adm',
                              text_attention='cross'), 'text_mask_keys=False')):
    with pytest.raises(ValueError, match=words):
      du.UNet(**{**kw, **change}).init(jax.random.key(0), x, t_B, cond(data['text'], [True] * 2))

"""diffusers' AutoencoderKL on our autoencoder: parity, round trips, released sizes, bad input.

Tiny diffusers models with every weight randomised are saved with `save_pretrained`, loaded
by `diffusers_io.vae.load_vae`, and the posterior's mean and log-variance and the decoded
image compared in float32 (max abs diff <= 1e-4 of the output scale); ours are saved by
`save_vae` and loaded back by diffusers.
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

from diffusion_jax import convert, errors  # noqa: E402
from diffusion_jax.diffusers_io import vae as dv  # noqa: E402
from hf_fixtures import randomise  # noqa: E402


def _levels(n):
  return dict(down_block_types=['DownEncoderBlock2D'] * n, up_block_types=['UpDecoderBlock2D'] * n)


CONFIGS = {
    # SD's layout at two levels: 4 groups of 2 and of 4 channels.
    'sd_like': dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                    sample_size=16, **_levels(2)),
    # Three levels, two ResNet blocks per level (three in the decoder), no middle attention, a
    # 3-channel latent, a 4-channel input and an SDXL-like scale.
    'three_levels': dict(block_out_channels=(8, 16, 24), layers_per_block=2, norm_num_groups=8,
                         latent_channels=3, in_channels=4, out_channels=2, sample_size=16,
                         mid_block_add_attention=False, scaling_factor=0.13025, **_levels(3)),
    # A 16-channel latent without quant convs (as Flux's and SD3's VAEs), with a shift.
    'latent16': dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                     latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                     sample_size=16, scaling_factor=0.3611, shift_factor=0.1159, **_levels(2)),
}
SIDE = 16


@pytest.fixture(scope='module')
def released(tmp_path_factory):
  """name -> (diffusers model, folder) of each tiny config, every weight random."""
  torch.set_num_threads(1)
  out = {}
  for i, (name, cfg) in enumerate(CONFIGS.items()):
    torch.manual_seed(i)
    model = randomise(diffusers.AutoencoderKL(**cfg).eval(), seed=i, scale=0.15)
    folder = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder, safe_serialization=True)
    out[name] = (model, folder)
  return out


@pytest.fixture(scope='module')
def loaded(released):
  return {name: dv.load_vae(folder) for name, (_, folder) in released.items()}


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def _inputs(name, seed=0, height=SIDE, width=SIDE):
  cfg = CONFIGS[name]
  rng = np.random.default_rng(seed)
  factor = 2 ** (len(cfg['block_out_channels']) - 1)
  x = rng.uniform(-1, 1, (2, cfg.get('in_channels', 3), height, width)).astype(np.float32)
  z = rng.standard_normal((2, cfg.get('latent_channels', 4), SIDE // factor,
                           SIDE // factor)).astype(np.float32)
  return x, z


def _reference(model, x, z):
  with torch.no_grad():
    posterior = model.encode(torch.tensor(x)).latent_dist
    image = model.decode(torch.tensor(z)).sample
  return tuple(_nhwc(a.numpy()) for a in (posterior.mean, posterior.logvar, image))


_JITTED = {}


def _ours(module, params, x, z):
  apply = _JITTED.setdefault(module, jax.jit(module.apply, static_argnames=('method',)))
  mean, logvar = apply({'params': params}, jnp.asarray(_nhwc(x)), method='encode')
  image = apply({'params': params}, jnp.asarray(_nhwc(z)), method='decode')
  return tuple(np.asarray(a) for a in (mean, logvar, image))


def _assert_close(ours, ref, what):
  assert ours.shape == ref.shape and ours.dtype == np.float32, (what, ours.shape, ref.shape)
  diff = float(np.abs(ours - ref).max())
  scale = float(np.abs(ref).max())
  print(f'{what}: max abs diff {diff:.3g}, output scale {scale:.3g}')
  assert diff <= 1e-4 * max(1.0, scale), (what, diff)


@pytest.mark.parametrize('name', list(CONFIGS))
def test_outputs_equal_diffusers(released, loaded, name):
  model, _ = released[name]
  module, params = loaded[name]
  x, z = _inputs(name)
  ref = _reference(model, x, z)
  ours = _ours(module, params, x, z)
  for what, a, b in zip(('mean', 'logvar', 'image'), ours, ref):
    _assert_close(a, b, f'{name} {what}')
  # The posterior is not degenerate: a spread of log-variances, none at the clip bounds.
  assert np.ptp(ref[1]) > 0.5 and np.abs(ref[1]).max() < 20


def test_odd_sides_are_padded_as_diffusers(released, loaded):
  """15x13 images: the stride-2 convs pad the bottom and right by one pixel only."""
  model, _ = released['sd_like']
  module, params = loaded['sd_like']
  x, z = _inputs('sd_like', seed=1, height=15, width=13)
  ref = _reference(model, x, z)
  ours = _ours(module, params, x, z)
  assert ref[0].shape == (2, 7, 6, 4)
  for what, a, b in zip(('mean', 'logvar'), ours[:2], ref[:2]):
    _assert_close(a, b, f'odd sides {what}')


def test_fields_of_config(loaded):
  module, _ = loaded['latent16']
  assert (module.latent_channels, module.use_quant_conv, module.use_post_quant_conv) == (
      16, False, False)
  assert module.scaling_factor == 0.3611 and module.shift_factor == 0.1159
  three, _ = loaded['three_levels']
  assert three.block_out_channels == (8, 16, 24) and three.layers_per_block == 2
  assert not three.mid_block_add_attention and three.scaling_factor == 0.13025
  assert (three.in_channels, three.out_channels, three.latent_channels) == (4, 2, 3)
  sd, _ = loaded['sd_like']
  assert sd.shift_factor is None and sd.scaling_factor == 0.18215 and sd.sample_size == 16


def test_older_attention_names_are_read(released, loaded):
  """query/key/value/proj_attn (older diffusers), also as 1x1 convs, load to the same tree."""
  _, folder = released['sd_like']
  module, params = loaded['sd_like']
  state = dict(convert.read_weights(folder))
  renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  old = {}
  for key, value in state.items():
    for new, former in renames.items():
      if f'.attentions.0.{new}.' in key:
        key = key.replace(f'.{new}.', f'.{former}.')
        value = np.asarray(value)
        if key.startswith('decoder.') and value.ndim == 2:
          value = value[:, :, None, None]
    old[key] = value
  assert sum('proj_attn' in k for k in old) == 4 and not any('to_q' in k for k in old)
  kw = dv.vae_kwargs(json.load(open(os.path.join(folder, dv.CONFIG_NAME))))
  converted = dv.convert_vae(old, kw)
  same = jax.tree.map(np.array_equal, converted, jax.tree.map(np.asarray, params))
  assert all(jax.tree.leaves(same))


@pytest.mark.parametrize('name', list(CONFIGS))
def test_export_loads_in_diffusers(released, loaded, tmp_path, name):
  """save_vae writes what AutoencoderKL.from_pretrained reads: the same tensors, config and
  outputs as the model it came from."""
  model, _ = released[name]
  module, params = loaded[name]
  kw = dv.vae_kwargs(dict(model.config))
  folder = dv.save_vae(str(tmp_path / 'vae'), kw, params)
  back = diffusers.AutoencoderKL.from_pretrained(folder, local_files_only=True).eval()
  for field, value in model.config.items():
    if not field.startswith('_'):
      mine = back.config[field]
      assert (list(mine) if isinstance(mine, tuple) else mine) == (
          list(value) if isinstance(value, tuple) else value), field
  theirs, exported = model.state_dict(), back.state_dict()
  assert sorted(theirs) == sorted(exported)
  assert all(torch.equal(theirs[k], exported[k]) for k in theirs)
  x, z = _inputs(name, seed=2)
  for a, b in zip(_reference(back, x, z), _reference(model, x, z)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('config,published', [(dv.SD_CONFIG, 84e6),
                                              (dict(dv.SD_CONFIG, sample_size=768), 84e6)])
def test_released_size_equals_diffusers(config, published):
  """SD 1.x/2.x's VAE shapes (512 and 768 px; SDXL's are the same): our count equals
  diffusers' on the meta device (83,653,863) and is within 1% of the published 84M; every
  diffusers tensor has a rule."""
  kw = dv.vae_kwargs(config)
  ours = dv.param_count(kw)
  with torch.device('meta'):
    reference = diffusers.AutoencoderKL(**{k: v for k, v in config.items()
                                           if not k.startswith('_')})
  theirs = sum(p.numel() for p in reference.parameters())
  print(f'{ours:,} parameters ({100 * (ours / published - 1):+.2f}% of {published / 1e6:.0f}M)')
  assert ours == theirs == 83_653_863
  assert abs(ours - published) <= 0.01 * published
  rules, _ = dv.vae_rules(kw)
  assert {r.sources[0] for r in rules} == set(reference.state_dict())


def test_config_round_trips():
  for config in (dv.SD_CONFIG, *({**c, '_class_name': 'AutoencoderKL'}
                                 for c in CONFIGS.values())):
    back = dv.diffusers_config(dv.vae_kwargs(config))
    differ = {k: (v, back.get(k)) for k, v in config.items()
              if (list(v) if isinstance(v, tuple) else v) != back.get(k)}
    assert not differ, differ


@pytest.mark.parametrize('change,field', [
    (dict(act_fn='gelu'), 'act_fn'),
    (dict(down_block_types=['AttnDownEncoderBlock2D', 'DownEncoderBlock2D']), 'down_block_types'),
    (dict(up_block_types=['UpDecoderBlock2D']), 'up_block_types'),
    (dict(norm_num_groups=3), 'norm_num_groups'),
    (dict(_class_name='VQModel'), '_class_name'),
    (dict(num_vq_embeddings=256), 'num_vq_embeddings'),
    (dict(latents_mean=[0.1, 0.2]), 'latents_mean'),
    (dict(sample_size=[16, 32]), 'sample_size'),
    (dict(use_quant_conv='yes'), 'use_quant_conv'),
])
def test_unsupported_config_is_refused(change, field):
  config = dict(CONFIGS['sd_like'], **change)
  with pytest.raises(errors.InputError, match=field) as e:
    dv.vae_kwargs(config, where='vae/config.json')
  message = str(e.value)
  assert '\n' not in message and message.startswith('vae/config.json: ')


def test_bad_weights_are_refused(released, tmp_path):
  _, folder = released['sd_like']
  kw = dv.vae_kwargs(CONFIGS['sd_like'])
  state = dict(convert.read_weights(folder))
  missing = {k: v for k, v in state.items() if k != 'quant_conv.bias'}
  with pytest.raises(errors.InputError, match='missing keys: quant_conv.bias'):
    dv.convert_vae(missing, kw)
  extra = dict(state, **{'encoder.extra.weight': np.zeros(3, np.float32)})
  with pytest.raises(errors.InputError, match='unexpected keys: encoder.extra.weight'):
    dv.convert_vae(extra, kw)
  # A checkpoint of another size names the tensor whose shape differs.
  bigger = dv.vae_kwargs(dict(CONFIGS['sd_like'], block_out_channels=(8, 24)))
  with pytest.raises(errors.InputError, match='shape mismatch'):
    dv.convert_vae(state, bigger)
  with pytest.raises(errors.InputError, match='no such directory'):
    dv.load_vae(str(tmp_path / 'absent'))

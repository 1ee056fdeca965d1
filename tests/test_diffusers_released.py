"""The released DeepFloyd IF U-Nets at their own shapes (nothing allocated): our network built
from each `unet/config.json` has diffusers' parameter count, the published size, and exports
back to the same config."""
from __future__ import annotations

import functools

import pytest

from diffusion_jax.diffusers_io import released
from diffusion_jax.diffusers_io import unet as dunet

CONFIGS = {'IF-I-XL': released.IF_I_XL_UNET, 'IF-II-L': released.IF_II_L_UNET}


@functools.lru_cache(maxsize=None)
def _ours(name: str) -> int:
  return dunet.param_count(dunet.unet_kwargs(CONFIGS[name]))


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_released_size_is_the_published_one(name):
  """The model cards' sizes are rounded to 0.1B: ours rounds to them. IF-I-XL (4,304,695,110)
  is also within 2% of its 4.3B; IF-II-L's 1,243,277,190 is 3.6% above its rounded 1.2B."""
  ours, published = _ours(name), released.PUBLISHED_SIZES[name]
  print(f'{name}: {ours:,} parameters ({100 * (ours / published - 1):+.2f}% of {published:.1e})')
  assert round(ours, -8) == published, ours
  if name == 'IF-I-XL':
    assert abs(ours - published) <= 0.02 * published, ours


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_released_size_equals_diffusers_count(name):
  """diffusers' UNet2DConditionModel of the same config, built on the meta device, has exactly
  our parameter count."""
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  config = {k: v for k, v in CONFIGS[name].items() if not k.startswith('_')}
  with torch.device('meta'):
    reference = diffusers.UNet2DConditionModel(**config)
  theirs = sum(p.numel() for p in reference.parameters())
  assert _ours(name) == theirs, (name, _ours(name), theirs)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_released_config_round_trips(name):
  """Our fields for a released config export back to every field it holds."""
  config = CONFIGS[name]
  kw = dunet.unet_kwargs(config)
  back = dunet.diffusers_config(kw)
  differ = {k: (v, back.get(k)) for k, v in config.items()
            if (list(back.get(k)) if isinstance(v, list) else back.get(k)) != v}
  assert not differ, differ
  if name == 'IF-II-L':  # the 64 px image from stage I, noised at an augmentation level
    assert kw['low_res_size'] == 64 and kw['aug_cond']

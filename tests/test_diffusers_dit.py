"""diffusers' DiTTransformer2DModel / PixArtTransformer2DModel on our DiT: parity with the
reference at three tiny random configs each, export back to diffusers, refusals, and the
released DiT-XL/2 size."""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import errors
from diffusion_jax.diffusers_io import dit as ddit
from diffusion_jax.models.dit import DiT

import hf_fixtures

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

STEPS = np.array([0, 417, 999])  # diffusers' integer steps; ours read t = (k + 1) / 1000
DIT = {  # odd heads, patch 2, learned sigma; patch 4 without, exact GELU; one head, 3 channels
    'odd_heads': dict(num_attention_heads=3, attention_head_dim=8, in_channels=4,
                      out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                      num_embeds_ada_norm=10),
    'patch4': dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=None,
                   num_layers=2, sample_size=16, patch_size=4, num_embeds_ada_norm=5,
                   activation_fn='gelu', norm_eps=1e-6),
    'one_head': dict(num_attention_heads=1, attention_head_dim=12, in_channels=3,
                     out_channels=6, num_layers=3, sample_size=8, patch_size=2,
                     num_embeds_ada_norm=7),
}
PIXART = {  # caption width unequal to the hidden width in each
    'learned_sigma': dict(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                          out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                          cross_attention_dim=16, caption_channels=12),
    'odd_heads_patch4': dict(num_attention_heads=3, attention_head_dim=8, in_channels=4,
                             out_channels=4, num_layers=2, sample_size=16, patch_size=4,
                             cross_attention_dim=24, caption_channels=20,
                             interpolation_scale=2),
    'one_head': dict(num_attention_heads=1, attention_head_dim=16, in_channels=3,
                     out_channels=3, num_layers=3, sample_size=8, patch_size=2,
                     cross_attention_dim=16, caption_channels=10, activation_fn='gelu',
                     norm_eps=1e-5),
}


def _randomise(model, seed):
  """Every weight random; diffusers' adaLN linears and embedders live under 'norm1', which
  the shared helper would draw near 1 (as norm weights): redraw those at the same scale."""
  hf_fixtures.randomise(model, seed, 0.2)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm1.' in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  return model


@functools.lru_cache(maxsize=None)
def _saved(kind: str, name: str):
  torch.manual_seed(0)
  cls = diffusers.DiTTransformer2DModel if kind == 'dit' else diffusers.PixArtTransformer2DModel
  cfg = (DIT if kind == 'dit' else PIXART)[name]
  model = _randomise(cls(**cfg).eval(), seed=len(name))
  out = hf_fixtures.path(f'{kind}_{name}')
  model.save_pretrained(out, safe_serialization=True)
  return model, out


def _inputs(cfg, kind, seed=0):
  rng = np.random.RandomState(seed)
  S, C = cfg['sample_size'], cfg['in_channels']
  x = rng.randn(3, C, S, S).astype(np.float32)
  if kind == 'dit':
    labels = np.array([3, 0, cfg['num_embeds_ada_norm']])  # the last: the null class
    return x, {'class_labels': labels}, {'class_labels': torch.tensor(labels)}
  L = 7
  tokens = rng.randn(3, L, cfg['caption_channels']).astype(np.float32)
  mask = np.ones((3, L), bool)
  mask[1, 4:] = False
  mask[2, 2:] = False
  null_tokens = rng.randn(3, L, cfg['caption_channels']).astype(np.float32)
  null_mask = np.zeros((3, L), bool)
  null_mask[:, :1] = True
  drop = np.array([False, False, True])
  ours = dict(text_tokens=tokens, text_mask=mask, drop_text=drop, null_text_tokens=null_tokens,
              null_text_mask=null_mask)
  # diffusers reads the dropped row's empty-prompt encoding directly.
  theirs_tokens = np.where(drop[:, None, None], null_tokens, tokens)
  theirs_mask = np.where(drop[:, None], null_mask, mask)
  return x, ours, dict(encoder_hidden_states=torch.tensor(theirs_tokens),
                       encoder_attention_mask=torch.tensor(theirs_mask.astype(np.int64)))


def _compare(model, module, params, cfg, kind):
  x, ours, theirs = _inputs(cfg, kind)
  with torch.no_grad():
    ref = model(torch.tensor(x), timestep=torch.tensor(STEPS), **theirs).sample.numpy()
  ref = ref.transpose(0, 2, 3, 1)
  t = jnp.asarray((STEPS + 1) / 1000.0, jnp.float32)
  out = np.asarray(module.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)), t,
                                ours))
  assert out.shape == ref.shape
  err, scale = float(np.abs(out - ref).max()), float(np.abs(ref).max())
  print(f'max |diff| {err:.3g} at output scale {scale:.3g}')
  assert err <= 1e-4 * scale, (err, scale)


@pytest.mark.parametrize('kind,name', [('dit', n) for n in DIT] + [('pixart', n) for n in PIXART])
def test_parity(kind, name):
  model, folder = _saved(kind, name)
  module, params = ddit.load_dit(folder)
  cfg = (DIT if kind == 'dit' else PIXART)[name]
  _compare(model, module, params, cfg, kind)


def test_dit_shared_embedder_export_round_trip(tmp_path):
  """The original DiT's one shared embedder: exported with a copy per block, read by
  diffusers, compared; loaded back shared, the same parameters."""
  cfg = DIT['odd_heads']
  kw = ddit.dit_kwargs(cfg, share_condition_embed=True)
  assert not kw['block_condition_embed']
  module = DiT(**dict(kw, zero_init=False))
  x, ours, _ = _inputs(cfg, 'dit')
  params = module.init(jax.random.key(1), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                       {'class_labels': jnp.zeros((1,), jnp.int32)})['params']
  params = jax.tree.map(lambda a: np.asarray(a) + 0.1 * np.random.RandomState(a.size).randn(
      *a.shape).astype(np.float32), jax.device_get(jax.tree.map(lambda b: b.unbox() if hasattr(
          b, 'unbox') else b, params, is_leaf=lambda b: hasattr(b, 'unbox'))))
  folder = ddit.save_dit(str(tmp_path / 'dit'), kw, params)
  model = diffusers.DiTTransformer2DModel.from_pretrained(folder, local_files_only=True).eval()
  _compare(model, DiT(**kw), params, cfg, 'dit')
  back_module, back = ddit.load_dit(folder, share_condition_embed=True)
  assert not back_module.block_condition_embed
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('kind,name', [('dit', 'patch4'), ('pixart', 'odd_heads_patch4')])
def test_export_round_trip(kind, name, tmp_path):
  """Loaded, saved by us, read back by diffusers: the same network."""
  model, folder = _saved(kind, name)
  module, params = ddit.load_dit(folder)
  kw = ddit.dit_kwargs(json.load(open(os.path.join(folder, 'config.json'))))
  out = ddit.save_dit(str(tmp_path / kind), kw, params)
  cls = type(model)
  back = cls.from_pretrained(out, local_files_only=True).eval()
  for (k, a), (k2, b) in zip(sorted(model.state_dict().items()),
                             sorted(back.state_dict().items())):
    assert k == k2
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)
  cfg = (DIT if kind == 'dit' else PIXART)[name]
  _compare(back, module, params, cfg, kind)


def test_shared_embedder_needs_equal_copies():
  _, folder = _saved('dit', 'odd_heads')  # random per-block embedders
  with pytest.raises(errors.InputError, match='differs from its tied copy'):
    ddit.load_dit(folder, share_condition_embed=True)


@pytest.mark.parametrize('cls,change,field', [
    ('PixArtTransformer2DModel', dict(sample_size=128), 'use_additional_conditions'),
    ('PixArtTransformer2DModel', dict(caption_channels=None), 'caption_channels'),
    ('PixArtTransformer2DModel', dict(cross_attention_dim=8), 'cross_attention_dim'),
    ('DiTTransformer2DModel', dict(norm_elementwise_affine=True), 'norm_elementwise_affine'),
    ('DiTTransformer2DModel', dict(activation_fn='geglu'), 'activation_fn'),
    ('DiTTransformer2DModel', dict(dropout=0.1), 'dropout'),
    ('UNet2DModel', {}, '_class_name'),
])
def test_refusals(cls, change, field):
  base = PIXART['learned_sigma'] if cls.startswith('PixArt') else DIT['odd_heads']
  config = dict(base, _class_name=cls, **change)
  with pytest.raises(errors.InputError) as e:
    ddit.dit_kwargs(config, where='t/config.json')
  msg = str(e.value)
  assert '\n' not in msg and field in msg and msg.startswith('t/config.json')


def test_dit_xl_2_param_count():
  """DiT-XL/2 at its released config: diffusers' own count (its per-block embedder copies
  included), and the original's one shared embedder within 1% of the published 675M."""
  cfg = {k: v for k, v in ddit.DIT_XL_2_256.items() if not k.startswith('_')}
  with torch.device('meta'):
    model = diffusers.DiTTransformer2DModel(**cfg)
  theirs = sum(p.numel() for p in model.parameters())
  ours = ddit.param_count(ddit.dit_kwargs(ddit.DIT_XL_2_256))
  shared = ddit.param_count(ddit.dit_kwargs(ddit.DIT_XL_2_256, share_condition_embed=True))
  print(f'diffusers {theirs}, ours {ours}, shared embedder {shared}')
  assert ours == theirs
  assert abs(shared - 675e6) <= 0.01 * 675e6


def test_legacy_class_name(tmp_path):
  """Older releases name the class Transformer2DModel (diffusers picks DiT by norm_type): the
  same fields, the same network; a legacy-only option in use is refused."""
  _, folder = _saved('dit', 'odd_heads')
  config = json.load(open(os.path.join(folder, 'config.json')))
  legacy = dict(config, _class_name='Transformer2DModel', num_vector_embeds=None,
                use_linear_projection=False, only_cross_attention=False, cross_attention_dim=None)
  assert ddit.dit_kwargs(legacy) == ddit.dit_kwargs(config)
  with pytest.raises(errors.InputError, match='only_cross_attention'):
    ddit.dit_kwargs(dict(legacy, only_cross_attention=True))
  with pytest.raises(errors.InputError, match='norm_type'):
    ddit.dit_kwargs(dict(legacy, norm_type='layer_norm'))

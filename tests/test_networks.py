"""The U-Nets at `tiny` size: shapes and dtypes of every stage, and that every conditioning
pathway the config enables really reaches the output (and that CFG dropout really removes it).

Output layers start at zero, so a fresh network outputs zeros whatever its inputs; the
sensitivity tests perturb every parameter first so that each pathway is live.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import net_fixtures
from diffusion_jax import models

B = net_fixtures.B
STAGES = [('imagen', s) for s in ('base64', 'sr256', 'sr1024')] + \
         [('glide', s) for s in ('base64', 'up256', 'inpaint64', 'inpaint256')] + \
         [('unclip', s) for s in ('prior', 'decoder64', 'up256', 'up1024')]
Net, config = net_fixtures.Net, net_fixtures.config


_NETS: dict = {}


@pytest.fixture(scope='module')
def net():
  def get(family, stage):
    if (family, stage) not in _NETS:
      _NETS[(family, stage)] = Net(family, stage)
    return _NETS[(family, stage)]
  yield get
  _NETS.clear()


def _differs(a, b, tol=1e-4):
  return float(jnp.abs(a - b).max()) > tol


def _same(a, b, tol=1e-5):
  return float(jnp.abs(a - b).max()) <= tol


def _param_shapes(model_cfg):
  """The network's parameter shapes (jax.eval_shape: nothing is computed)."""
  module = models.build(model_cfg)
  x, t, cond = models.example_inputs(model_cfg, B)
  return nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x, t, cond))['params']


# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('family,stage', STAGES)
def test_output_shape_and_dtype(family, stage):
  cfg = config(family, stage)
  module = models.build(cfg.model)
  x, t, cond = models.example_inputs(cfg.model, B)
  variables = jax.eval_shape(module.init, jax.random.key(0), x, t, cond)
  out = jax.eval_shape(module.apply, nn.meta.unbox(variables), x, t, cond)
  if cfg.model.name == 'prior':
    expected = (B, cfg.model.embed_dim)
  else:
    s = cfg.model.image_size
    expected = (B, s, s, 3 * (2 if cfg.diffusion.learned_variance else 1))
  assert out.shape == expected, f'{family}/{stage}: output {out.shape}, expected {expected}'
  assert out.dtype == jnp.float32, f'{family}/{stage}: output dtype {out.dtype}, want float32'
  assert cfg.model.get('learned_variance', False) == cfg.diffusion.learned_variance, (
      f'{family}/{stage}: model and diffusion disagree on the learned variance')


def test_bfloat16_compute_keeps_float32_params_and_output():
  cfg = config('imagen', 'sr256')
  cfg.model.dtype = 'bfloat16'
  module = models.build(cfg.model)
  x, t, cond = models.example_inputs(cfg.model, B)
  variables = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x, t, cond))
  dtypes = {p.dtype for p in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}, f'params must stay float32, got {dtypes}'
  jaxpr = str(jax.make_jaxpr(module.apply)(variables, x, t, cond))
  assert 'bf16' in jaxpr, 'dtype=bfloat16 did not make the convolutions compute in bfloat16'
  out = jax.eval_shape(module.apply, variables, x, t, cond)
  assert out.dtype == jnp.float32


def test_missing_condition_raises_key_error_naming_it():
  cfg = config('imagen', 'sr256')
  module = models.build(cfg.model)
  x, t, cond = models.example_inputs(cfg.model, B)
  for key in ('text_tokens', 'low_res', 'aug_t'):
    partial = {k: v for k, v in cond.items() if k != key}
    with pytest.raises(KeyError, match=key):
      jax.eval_shape(module.init, jax.random.key(0), x, t, partial)


# --- Imagen ----------------------------------------------------------------------------

def test_imagen_base_reads_text_and_drops_it(net):
  n = net('imagen', 'base64')
  ref = n()
  assert _differs(n(t=n.t * 0.5), ref), 'output ignores the time'
  tokens = n.cond['text_tokens']
  other = tokens.at[:, 0].set(-tokens[:, 0])
  assert _differs(n(text_tokens=other), ref), 'imagen base ignores the T5 tokens'
  # padding positions (mask False) must not matter
  padded = tokens.at[:, -2:].set(7.0)
  assert _same(n(text_tokens=padded), ref), 'imagen base reads padding tokens'
  drop = jnp.ones((B,), bool)
  assert _differs(n(drop_text=drop), ref), 'drop_text does not change the output'
  assert _same(n(drop_text=drop, text_tokens=other), n(drop_text=drop)), (
      'with drop_text the output still depends on the text (no learned null)')


def test_imagen_sr_reads_low_res_aug_level_and_text(net):
  n = net('imagen', 'sr256')
  ref = n()
  assert _differs(n(low_res=-n.cond['low_res']), ref), 'SR stage ignores the low-res image'
  assert _differs(n(aug_t=1.0 - n.cond['aug_t']), ref), 'SR stage ignores the aug level'
  tokens = n.cond['text_tokens']
  assert _differs(n(text_tokens=tokens.at[:, 1].set(-tokens[:, 1])), ref), (
      'SR stage ignores the text tokens')


@pytest.mark.parametrize('stage', ['base64', 'sr256'])
@pytest.mark.parametrize('position', [False, True])
def test_text_position_embed_makes_the_token_order_matter(stage, position):
  """Without position embeddings the frozen tokens reach the U-Net as a set (attention and
  the attention pool are permutation invariant over keys): swapping two tokens changes
  nothing. With them the swap changes the output, and the padding still does not."""
  cfg = config('imagen', stage)
  cfg.model.text_position_embed = position
  module = models.build(cfg.model)
  params = net_fixtures.random_params(module, cfg.model)
  assert ('text_position_embed' in params) == position, sorted(params)
  x, t, cond = net_fixtures.random_inputs(cfg.model)
  if position:
    # At the scale of the projected tokens: at ViT's 0.02 the demo base barely grew it
    # (RMS 0.046 after 2750 steps) and read the caption as a bag of words.
    init = nn.meta.unbox(module.init(jax.random.key(0), x, t, cond))['params']
    std = float(jnp.std(init['text_position_embed']))
    assert abs(std - 1.0) < 0.1, (
        f'text_position_embed starts at std {std:.3f}, not at the tokens\' scale (1)')
  fwd = jax.jit(lambda c: module.apply({'params': params}, x, t, c))
  ref = fwd(cond)
  tokens = cond['text_tokens']
  swapped = tokens.at[:, 0].set(tokens[:, 1]).at[:, 1].set(tokens[:, 0])
  out = fwd(dict(cond, text_tokens=swapped))
  if position:
    assert _differs(out, ref), 'text_position_embed: the U-Net still ignores the token order'
  else:
    assert _same(out, ref, 1e-4), 'without position embeddings the token order matters'
  padded = tokens.at[:, -2:].set(7.0)
  assert _same(fwd(dict(cond, text_tokens=padded)), ref), 'the U-Net reads padding tokens'


def test_coord_channels_give_each_pixel_its_place():
  """coord_channels append each pixel's y and x, -1 at the top (left) edge to 1 at the
  bottom (right), as two input channels; the input convolution reads them."""
  cfg = config('imagen', 'base64')
  cfg.model.coord_channels = True
  module = models.build(cfg.model)
  x, t, cond = net_fixtures.random_inputs(cfg.model)
  inp = module.prepare_input(x, cond)
  S = cfg.model.image_size
  assert inp.shape == x.shape[:3] + (x.shape[-1] + 2,), inp.shape
  assert _same(inp[..., :-2], x), 'coord_channels changed the image channels'
  ramp = jnp.linspace(-1, 1, S)
  assert _same(inp[:, :, :, -2], jnp.broadcast_to(ramp[None, :, None], (B, S, S))), (
      'the first coordinate channel is not y (rows, top -1)')
  assert _same(inp[:, :, :, -1], jnp.broadcast_to(ramp[None, None, :], (B, S, S))), (
      'the last coordinate channel is not x (columns, left -1)')
  init = nn.meta.unbox(module.init(jax.random.key(0), x, t, cond))['params']
  assert init['in_conv']['kernel'].shape[2] == x.shape[-1] + 2, init['in_conv']['kernel'].shape
  sr = config('imagen', 'sr256')
  sr.model.coord_channels = True
  sr_module = models.build(sr.model)
  xs, ts, conds = net_fixtures.random_inputs(sr.model)
  crop = xs[:, :xs.shape[1] // 2, :xs.shape[2] // 2]
  low = conds['low_res'][:, :conds['low_res'].shape[1] // 2, :conds['low_res'].shape[2] // 2]
  with pytest.raises(ValueError, match='whole'):
    sr_module.init(jax.random.key(0), crop, ts, dict(conds, low_res=low))


def test_imagen_sr1024_has_no_self_attention_but_cross_attention():
  names = list(_param_shapes(config('imagen', 'sr1024').model))
  assert not [k for k in names if k.endswith('_attn')], f'self-attention at 1024: {names}'
  assert [k for k in names if k.endswith('_cross')], 'sr1024 lost its text cross-attention'
  sr256 = _param_shapes(config('imagen', 'sr256').model)
  assert [k for k in sr256 if k.endswith('_attn')], 'sr256 lost its self-attention'


def test_unet_attention_per_level_attends_after_each_levels_last_block():
  """attention_per='level' (imagen-pytorch's layer_attns): one attention per level and
  direction, after the last residual block; 'block' (ADM) attends after every block."""
  def attended(per):
    cfg = config('imagen', 'base64')
    cfg.model.update(num_res_blocks=2, attention_per=per)
    params = _param_shapes(cfg.model)
    return sorted(k[:-len('_attn')] for k in params if k.endswith('_attn'))
  # tiny base: levels 0 (16 px) and 1 (8 px), attention at 8 px; 2 blocks down, 3 up.
  assert attended('level') == ['down1_1', 'mid', 'up1_2'], attended('level')
  assert attended('block') == ['down1_0', 'down1_1', 'mid', 'up1_0', 'up1_1', 'up1_2'], (
      attended('block'))
  cfg = config('imagen', 'base64')
  cfg.model.attention_per = 'resolution'
  with pytest.raises(ValueError, match='attention_per'):
    _param_shapes(cfg.model)


def test_unet_text_only_resolutions_drop_self_attention_there():
  cfg = config('imagen', 'base64')
  cfg.model.update(text_attention='cross', attention_resolutions=(16, 8))
  both = _param_shapes(cfg.model)
  cfg.model.text_only_resolutions = (16,)
  params = _param_shapes(cfg.model)
  assert 'down0_0_cross' in params and 'down0_0_attn' not in params, sorted(params)
  assert 'down1_0_cross' in params and 'down1_0_attn' in params, sorted(params)
  assert set(both) - set(params) == {'down0_0_attn', 'up0_0_attn', 'up0_1_attn'}, (
      sorted(set(both) - set(params)))
  cfg.model.text_only_resolutions = (4,)
  with pytest.raises(ValueError, match='not attention_resolutions'):
    _param_shapes(cfg.model)
  cfg.model.update(text_only_resolutions=(16,), text_attention='concat_kv')
  with pytest.raises(ValueError, match="text_attention='cross'"):
    _param_shapes(cfg.model)


# --- GLIDE -----------------------------------------------------------------------------

def test_glide_base_reads_token_ids_and_drops_them(net):
  n = net('glide', 'base64')
  ref = n()
  assert ref.shape[-1] == 6, 'learned variance needs 2 x 3 output channels'
  ids = n.cond['text_ids']
  other = ids.at[:, 0].set((ids[:, 0] + 1) % n.cfg.model.vocab_size)
  assert _differs(n(text_ids=other), ref), 'GLIDE ignores the caption token ids'
  assert _same(n(text_ids=ids.at[:, -1].set(3)), ref), 'GLIDE reads padding token ids'
  drop = jnp.ones((B,), bool)
  assert _same(n(drop_text=drop, text_ids=other), n(drop_text=drop)), (
      'with drop_text the output still depends on the caption')


def test_glide_inpaint_reads_known_pixels_only(net):
  n = net('glide', 'inpaint64')
  ref = n()
  img, H = n.cond['inpaint_image'], n.cfg.model.image_size
  assert _differs(n(inpaint_image=img.at[:, : H // 2].set(0.5)), ref), (
      'inpainting model ignores the known pixels')
  assert _same(n(inpaint_image=img.at[:, H // 2:].set(0.5)), ref), (
      'inpainting model reads pixels the mask marks unknown')
  assert _differs(n(inpaint_mask=1.0 - n.cond['inpaint_mask']), ref), 'mask channel ignored'


# --- unCLIP ----------------------------------------------------------------------------

def test_unclip_decoder_reads_image_embedding_and_drops_it(net):
  n = net('unclip', 'decoder64')
  ref = n()
  emb = n.cond['image_embed']
  assert _differs(n(image_embed=-emb), ref), 'decoder ignores the CLIP image embedding'
  ids = n.cond['text_ids']
  assert _differs(n(text_ids=ids.at[:, 0].set((ids[:, 0] + 1) % n.cfg.model.vocab_size)), ref), (
      'decoder ignores the caption')
  drop = jnp.ones((B,), bool)
  assert _same(n(drop_image=drop, image_embed=-emb), n(drop_image=drop)), (
      'with drop_image the output still depends on the image embedding')
  assert _differs(n(drop_image=drop), ref), 'drop_image does not change the output'


def test_unclip_decoder_image_tokens_reach_attention(net):
  """The image embedding must act through the 4 context tokens too, not only the time emb."""
  n = net('unclip', 'decoder64')
  p = dict(n.params)
  p['image_embed_proj'] = jax.tree.map(jnp.zeros_like, p['image_embed_proj'])
  fwd = lambda emb: n._fwd(p, n.x, n.t, dict(n.cond, image_embed=emb))
  assert _differs(fwd(-n.cond['image_embed']), fwd(n.cond['image_embed'])), (
      'with the time-embedding projection zeroed, the image tokens have no effect')
  assert p['image_tokens_proj']['kernel'].shape[-1] == 4 * n.cfg.model.xf_width


def test_unclip_upsampler_reads_low_res(net):
  n = net('unclip', 'up256')
  assert _differs(n(low_res=-n.cond['low_res']), n()), 'upsampler ignores the low-res image'



def test_dropout_acts_only_in_training():
  cfg = config('unclip', 'up256')
  cfg.model.dropout = 0.3
  module = models.build(cfg.model)
  params = net_fixtures.random_params(module, cfg.model)
  x, t, cond = net_fixtures.random_inputs(cfg.model)
  train = jax.jit(lambda k: module.apply({'params': params}, x, t, cond, train=True,
                                         rngs={'dropout': k}))
  a, b = train(jax.random.key(1)), train(jax.random.key(2))
  assert _differs(a, b), 'train=True with different dropout keys gives the same output'
  assert _same(train(jax.random.key(1)), a), 'dropout is not a function of its key'
  ev = module.apply({'params': params}, x, t, cond, train=False)
  assert _differs(ev, a), 'train=True output equals the eval output: dropout inactive'


def test_unet_cross_attention_variant_reads_text():
  """text_attention='cross': self-attention, then cross-attention to the tokens, then an MLP."""
  cfg = config('imagen', 'base64')
  cfg.model.text_attention = 'cross'
  cfg.model.ff_mult = 2
  module = models.build(cfg.model)
  params = net_fixtures.random_params(module, cfg.model)
  assert any(k.endswith('_cross') for k in params) and any(k.endswith('_ff') for k in params)
  x, t, cond = net_fixtures.random_inputs(cfg.model)
  fwd = jax.jit(lambda c: module.apply({'params': params}, x, t, c))
  tokens = cond['text_tokens']
  ref = fwd(cond)
  assert _differs(fwd(dict(cond, text_tokens=tokens.at[:, 0].set(-tokens[:, 0]))), ref), (
      'cross-attention U-Net ignores the text tokens')
  drop = dict(cond, drop_text=jnp.ones((B,), bool))
  assert _same(fwd(drop), fwd(dict(drop, text_tokens=-tokens))), (
      'cross-attention U-Net still reads dropped text')


def test_bfloat16_forward_tracks_float32():
  """bf16 compute with the same float32 params stays close to the float32 forward."""
  cfg = config('glide', 'base64')
  f32 = models.build(cfg.model)
  cfg.model.dtype = 'bfloat16'
  bf16 = models.build(cfg.model)
  params = net_fixtures.random_params(f32, cfg.model)
  x, t, cond = net_fixtures.random_inputs(cfg.model)
  a = jax.jit(lambda p: f32.apply({'params': p}, x, t, cond))(params)
  b = jax.jit(lambda p: bf16.apply({'params': p}, x, t, cond))(params)
  assert b.dtype == jnp.float32
  rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
  assert 1e-6 < rel < 5e-2, f'bf16 forward differs from float32 by {rel:.2e} (relative L2)'

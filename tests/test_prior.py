"""The unCLIP prior: causal structure over [text tokens, text emb, time, noised image emb,
query], conditioning, and classifier-free-guidance dropout; GLIDE's text transformer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models
from diffusion_jax.models.text_transformer import TextTransformer
from net_fixtures import config, random_inputs, random_params


@pytest.fixture(scope='module')
def prior():
  cfg = config('unclip', 'prior')
  module = models.build(cfg.model)
  params = random_params(module, cfg.model)
  x, t, cond = random_inputs(cfg.model)
  cond['text_mask'] = jnp.ones_like(cond['text_mask'])  # every text position is a real token
  seq = jax.jit(lambda x, t, c: module.apply({'params': params}, x, t, c, return_sequence=True))
  out = jax.jit(lambda x, t, c: module.apply({'params': params}, x, t, c))
  return cfg, x, t, cond, seq, out


def _first_changed(a_BSW, b_BSW, tol=1e-6):
  changed = np.asarray(jnp.abs(a_BSW - b_BSW).max(axis=(0, 2)) > tol)
  return int(np.argmax(changed)) if changed.any() else None


def test_prior_is_causal(prior):
  cfg, x, t, cond, seq, _ = prior
  L = cfg.model.text_len
  ref = seq(x, t, cond)
  assert ref.shape == (x.shape[0], L + 4, cfg.model.width)
  # (changed input, its position): nothing before that position may move, it itself must.
  tokens = cond['text_tokens']
  cases = {
      'text token 3': (seq(x, t, dict(cond, text_tokens=tokens.at[:, 3].set(-tokens[:, 3]))), 3),
      'last text token': (seq(x, t, dict(cond, text_tokens=tokens.at[:, -1].mul(-1.0))), L - 1),
      'text embedding': (seq(x, t, dict(cond, text_embed=-cond['text_embed'])), L),
      'time': (seq(x, 1.0 - t, cond), L + 1),
      'noised image embedding': (seq(-x, t, cond), L + 2),
  }
  for what, (out, pos) in cases.items():
    first = _first_changed(ref, out)
    assert first == pos, (f'changing the {what} (position {pos}) first changed position {first}: '
                          'the causal mask is wrong' if first is not None else
                          f'changing the {what} changed nothing')


def test_prior_output_reads_every_input_and_drop_text_removes_text(prior):
  cfg, x, t, cond, _, out = prior
  ref = out(x, t, cond)
  assert ref.shape == (x.shape[0], cfg.model.embed_dim) and ref.dtype == jnp.float32
  diff = lambda o: float(jnp.abs(o - ref).max())
  assert diff(out(-x, t, cond)) > 1e-4, 'prior ignores the noised image embedding'
  assert diff(out(x, 1.0 - t, cond)) > 1e-4, 'prior ignores the time'
  assert diff(out(x, t, dict(cond, text_embed=-cond['text_embed']))) > 1e-4, (
      'prior ignores the CLIP text embedding')
  assert diff(out(x, t, dict(cond, text_tokens=-cond['text_tokens']))) > 1e-4, (
      'prior ignores the text tokens')
  padded = dict(cond, text_mask=cond['text_mask'].at[:, -2:].set(False))
  ref_pad = out(x, t, padded)
  moved = dict(padded, text_tokens=cond['text_tokens'].at[:, -2:].set(9.0))
  np.testing.assert_allclose(out(x, t, moved), ref_pad, atol=1e-5,
                             err_msg='prior reads padding text tokens')
  drop = dict(cond, drop_text=jnp.ones_like(cond['drop_text']))
  other = dict(drop, text_tokens=-cond['text_tokens'], text_embed=-cond['text_embed'])
  np.testing.assert_allclose(out(x, t, drop), out(x, t, other), atol=1e-5,
                             err_msg='with drop_text the prior still reads the text')
  assert float(jnp.abs(out(x, t, drop) - ref).max()) > 1e-4, 'drop_text changes nothing'


def test_text_transformer_masks_padding_and_returns_final_token():
  m = TextTransformer(vocab_size=50, text_len=6, width=16, num_layers=2, num_heads=2)
  ids = jnp.array([[5, 6, 7, 0, 0, 0], [8, 9, 0, 0, 0, 0]], jnp.int32)
  mask = ids > 0
  p = jax.jit(m.init)(jax.random.key(0), ids, mask)
  fwd = jax.jit(m.apply)
  tokens, final = fwd(p, ids, mask)
  assert tokens.shape == (2, 6, 16) and final.shape == (2, 16)
  np.testing.assert_allclose(final, tokens[:, -1], err_msg='final embedding is not the last state')
  tokens2, final2 = fwd(p, ids.at[:, 4].set(33), mask)  # padding ids change
  np.testing.assert_allclose(final2, final, atol=1e-6, err_msg='padding ids reach the encoder')
  _, final3 = fwd(p, ids.at[:, 0].set(33), mask)
  assert float(jnp.abs(final3 - final).max()) > 1e-4, 'caption ids do not reach the final token'
  with pytest.raises(ValueError, match='length'):
    fwd(p, ids[:, :5], mask[:, :5])

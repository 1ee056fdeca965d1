"""unCLIP (DALL-E 2): frozen CLIP text -> diffusion prior (best of K candidates by dot product
with the text embedding; prior CFG) -> decoder 64 px (CFG over image embedding and caption)
-> upsamplers; and the applications of the paper's section 3: variations, interpolations
and text diffs, all built on DDIM inversion of the decoder.

Embeddings live where the networks were trained on them: unit-normalised CLIP embeddings
scaled by sqrt(D) (`conditioning.l2_scaled`).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import conditioning, io_util
from diffusion_jax.pipelines import common


def best_of(candidates_KBD, text_embed_BD):
  """Per prompt, the candidate with the largest dot product with the text embedding.
  Returns (chosen [B, D], index [B])."""
  scores_KB = jnp.einsum('kbd,bd->kb', candidates_KBD, text_embed_BD)
  index_B = jnp.argmax(scores_KB, axis=0)
  chosen = jnp.take_along_axis(candidates_KBD, index_B[None, :, None], axis=0)[0]
  return chosen, index_B


class UnCLIPPipeline(common.Cascade):
  """`generate`, `variations`, `interpolate`, `text_diff`."""

  @property
  def prior_name(self) -> str:
    return self.order[0]

  @property
  def decoder_name(self) -> str:
    return self.order[1]

  # Text -> image embedding ----------------------------------------------------------------------

  def prior(self, prompts, rng, overrides=None, *, return_candidates: bool = False):
    """Image embeddings [N, D] for prompts: `best_of` prior samples per prompt, the one with
    the largest dot product with the prompt's CLIP text embedding."""
    overrides = overrides or {}
    stage = self.stage(self.prior_name)
    s = self.settings(self.prior_name, overrides)
    k = max(int(s.best_of), 1)
    n = len(prompts)
    n_pad = stage.padded(k * n)
    # Rows k*n + i hold candidate k of prompt i.
    rows = [p for _ in range(k) for p in prompts]
    k_cond, k_noise, k_run = jax.random.split(rng, 3)
    cond = stage.build_cond(self.text_inputs(stage, rows, n_pad), k_cond, 0.0)
    x_T = stage.noise(k_noise, n_pad)
    out = self.timed(self.prior_name, stage.sample, cond, x_T, k_run, s)
    cands = conditioning.l2_scaled(out[:k * n]).reshape(k, n, -1)
    text_embed = cond['text_embed'][:n]
    chosen, index = best_of(cands, text_embed)
    if return_candidates:
      return chosen, index, cands, text_embed
    return chosen

  def generate(self, prompts, rng, *, return_stages: bool = False, **overrides):
    prompts = common.check_prompts(prompts)
    self.check_overrides(overrides)
    k_prior, k_dec = jax.random.split(rng)
    embed = self.prior(prompts, k_prior, overrides)
    collect: dict = {}
    x = self.image_chain(self.order[1:], prompts, k_dec, overrides,
                         first_inputs={'image_embed': embed}, collect=collect)
    return common.uint8_result(x, collect, return_stages)

  # Image editing ---------------------------------------------------------------------------------

  def image_embed(self, images):
    """CLIP image embeddings (l2-scaled) of uint8 or [-1, 1] images, through the decoder's
    frozen CLIP."""
    dec = self.stage(self.decoder_name)
    x = jnp.asarray(io_util.to_float(images))
    n_pad = dec.padded(x.shape[0])
    with dec.context():
      fn = getattr(self, '_embed_fn', None)
      if fn is None:
        fn = self._embed_fn = jax.jit(dec.conditioner.image_embed)
      return fn(dec.frozen, dec.put(x, n_pad))[:x.shape[0]]

  def _decoder_cond(self, embed, captions, n_pad, rng):
    """The decoder's cond for given embeddings; captions None = the null caption."""
    dec = self.stage(self.decoder_name)
    n = embed.shape[0]
    texts = [''] * n if captions is None else list(captions)
    inputs = dict(self.text_inputs(dec, texts, n_pad))
    inputs['image_embed'] = dec.put(embed, n_pad)
    if captions is None and 'drop_text' in dec.keys:
      inputs['drop_text'] = dec.put(jnp.ones((n,), bool), n_pad)
    return dec.build_cond(inputs, rng, 0.0)

  def _decoder_settings(self, overrides, eta=None):
    # Inversion and its resampling use the conditional decoder without thresholding (neither
    # CFG nor clipping is invertible); both can be overridden.
    s = self.settings(self.decoder_name, {})
    s = s.replace(sampler='ddim', guidance_scale=1.0, threshold='none')
    s = s.replace(**{k: v for k, v in overrides.items() if k in s.__dataclass_fields__})
    per = overrides.get(self.decoder_name)
    if per:
      s = s.replace(**dict(per))
    if eta is not None:
      s = s.replace(eta=float(eta))
    return s

  def invert(self, images, captions=None, **overrides):
    """(embed [N, D], x_T [N, h, w, 3]): the decoder's DDIM inversion of the images at its
    resolution, conditioned on their own CLIP image embeddings."""
    dec = self.stage(self.decoder_name)
    x = jnp.asarray(io_util.to_float(images))
    n = x.shape[0]
    n_pad = dec.padded(n)
    embed = self.image_embed(x)
    cond = self._decoder_cond(embed, captions, n_pad, jax.random.PRNGKey(0))
    s = self._decoder_settings(overrides)
    x0 = common.resize(x, dec.config.model.image_size)
    x_T = self.timed(self.decoder_name + ' (inversion)', dec.invert, cond, dec.put(x0, n_pad),
                     int(s.num_steps))
    return embed, x_T[:n]

  def decode(self, embed, x_T, rng, *, captions=None, eta: float = 0.0,
             return_stages: bool = False, **overrides):
    """Decoder from a fixed x_T (DDIM with `eta`) then the upsamplers: uint8 images."""
    dec = self.stage(self.decoder_name)
    n = embed.shape[0]
    n_pad = dec.padded(n)
    k_dec, k_up = jax.random.split(rng)
    cond = self._decoder_cond(embed, captions, n_pad, k_dec)
    s = self._decoder_settings(overrides, eta)
    out = self.timed(self.decoder_name, dec.sample, cond, dec.put(x_T, n_pad), k_dec, s)
    x = out[:n]
    collect = {self.decoder_name: x}
    prompts = [''] * n if captions is None else list(captions)
    x = self.image_chain(self.order[2:], prompts, k_up, overrides, first_low_res=x,
                         collect=collect)
    return common.uint8_result(x, collect, return_stages)

  def variations(self, images, rng, eta: float = 1.0, *, return_stages: bool = False,
                 **overrides):
    """Variations (sec. 3.1): the images' CLIP embeddings and DDIM-inverted decoder latents,
    resampled with DDIM at `eta` (0 reconstructs the input; > 0 varies the details)."""
    self.check_overrides(overrides)
    embed, x_T = self.invert(images, **overrides)
    return self.decode(embed, x_T, rng, eta=eta, return_stages=return_stages, **overrides)

  def interpolate(self, image_a, image_b, num: int, rng, *, return_stages: bool = False,
                  **overrides):
    """Interpolations (sec. 3.2): `num` images along the slerp between the two images' CLIP
    embeddings, decoded (DDIM, eta 0) from the slerp of their inverted latents; the
    endpoints reproduce the two inputs' reconstructions."""
    self.check_overrides(overrides)
    pair = np.concatenate([io_util.to_float(_batch1(image_a)), io_util.to_float(_batch1(image_b))])
    embed, x_T = self.invert(pair, **overrides)
    w = jnp.linspace(0.0, 1.0, int(num))
    embeds = common.slerp(jnp.broadcast_to(embed[0], (num,) + embed.shape[1:]),
                          jnp.broadcast_to(embed[1], (num,) + embed.shape[1:]), w)
    latents = common.slerp_flat(jnp.broadcast_to(x_T[0], (num,) + x_T.shape[1:]),
                                jnp.broadcast_to(x_T[1], (num,) + x_T.shape[1:]), w)
    return self.decode(embeds, latents, rng, eta=0.0, return_stages=return_stages, **overrides)

  def text_diff(self, image, caption: str, new_caption: str, etas: Sequence[float], rng, *,
                return_stages: bool = False, **overrides):
    """Text diffs (sec. 3.3): z_d = normalise(text_emb(new_caption) - text_emb(caption)); for
    each weight in `etas` (in [0, 1]) decode slerp(z_i, z_d, weight) from the image's
    inverted latent, held fixed (DDIM, eta 0)."""
    self.check_overrides(overrides)
    embed, x_T = self.invert(_batch1(image), **overrides)
    embeds = self.text_diff_embeddings(embed[0], caption, new_caption, etas)
    latents = jnp.broadcast_to(x_T[0], (len(embeds),) + x_T.shape[1:])
    return self.decode(embeds, latents, rng, eta=0.0, return_stages=return_stages, **overrides)

  def text_diff_embeddings(self, image_embed_D, caption: str, new_caption: str, etas):
    """[len(etas), D]: slerp(image_embed, z_d, w) for each weight w in `etas`."""
    z_d = self.text_direction(caption, new_caption)
    etas = jnp.asarray(list(etas), jnp.float32)
    num = etas.shape[0]
    return common.slerp(jnp.broadcast_to(image_embed_D, (num,) + image_embed_D.shape),
                        jnp.broadcast_to(z_d, (num,) + z_d.shape), etas)

  def text_embed(self, captions):
    """CLIP text embeddings (l2-scaled) through the prior's frozen CLIP."""
    prior = self.stage(self.prior_name)
    n = len(captions)
    n_pad = prior.padded(n)
    cond = prior.build_cond(self.text_inputs(prior, list(captions), n_pad),
                            jax.random.PRNGKey(0), 0.0)
    return cond['text_embed'][:n]

  def text_direction(self, caption: str, new_caption: str):
    """normalise(text_emb(new) - text_emb(old)), scaled by sqrt(D) like the embeddings."""
    e = self.text_embed([caption, new_caption])
    return conditioning.l2_scaled((e[1] - e[0])[None])[0]


def _batch1(image):
  image = np.asarray(image)
  return image[None] if image.ndim == 3 else image

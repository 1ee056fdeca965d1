"""Contrastive objectives: CLIP's symmetric InfoNCE, GLIDE's noised-CLIP training loss and
the same loss on clean images (unCLIP's own CLIP when no pretrained one is at hand).

GLIDE guides sampling with a CLIP whose image tower reads noised images x_t and their time
t; it is trained like CLIP, on images noised with the diffusion's own schedule, so that its
gradient with respect to x_t is meaningful at every noise level.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import schedules

# CLIP clamps the learned temperature at 100 to keep training stable.
MAX_LOG_SCALE = 4.6052


def _normalize(x_BD):
  x_BD = x_BD.astype(jnp.float32)
  return x_BD * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x_BD), -1, keepdims=True), 1e-12))


def contrastive_logits(img_emb_BD, txt_emb_BD, logit_scale):
  """Image-to-text logits [B_img, B_txt]: exp(scale) * cosine similarity."""
  scale = jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), MAX_LOG_SCALE))
  return scale * (_normalize(img_emb_BD) @ _normalize(txt_emb_BD).T)


def clip_contrastive_loss(img_emb_BD, txt_emb_BD, logit_scale):
  """Symmetric InfoNCE: mean of image->text and text->image cross-entropies, where the i-th
  image and the i-th caption are the positive pair. Embeddings need not be normalised;
  `logit_scale` is the log temperature (CLIP's learned parameter)."""
  logits = contrastive_logits(img_emb_BD, txt_emb_BD, logit_scale)
  labels = jnp.arange(logits.shape[0])
  lp_i2t = jax.nn.log_softmax(logits, axis=1)
  lp_t2i = jax.nn.log_softmax(logits, axis=0)
  i2t = -jnp.mean(jnp.take_along_axis(lp_i2t, labels[:, None], axis=1))
  t2i = -jnp.mean(jnp.take_along_axis(lp_t2i, labels[None, :], axis=0))
  return 0.5 * (i2t + t2i)


def noised_clip_loss(apply_fn: Callable, params, batch, rng,
                     cfg) -> tuple[jax.Array, dict[str, Any]]:
  """Contrastive loss of a time-conditioned CLIP on images noised at t ~ U[0, 1].

  Args:
    apply_fn: (params, x_t, t_B, cond, rng) -> (image_emb_BD, text_emb_BD, logit_scale), the
      same calling convention as the diffusion loss (e.g. a `NoisedCLIP` apply).
    params: the network parameters.
    batch: {'x0': clean images [B, H, W, C] in [-1, 1], 'cond': {'text_ids', 'text_mask'}}.
    rng: PRNG key (times, noise, model).
    cfg: the `diffusion` config section naming the schedule (`schedules.from_config`), so
      the classifier sees exactly the x_t distribution the sampler produces.

  Returns:
    (loss, aux) with the loss, image->text top-1 accuracy, the temperature and the mean t.
  """
  schedule = schedules.from_config(cfg)
  x0 = batch['x0'].astype(jnp.float32)
  rng_t, rng_noise, rng_model = jax.random.split(rng, 3)
  t_B = schedule.sample_t(rng_t, (x0.shape[0],))
  alpha_B, sigma_B = schedule.alpha_sigma(t_B)
  bshape = (-1,) + (1,) * (x0.ndim - 1)
  noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
  x_t = alpha_B.reshape(bshape) * x0 + sigma_B.reshape(bshape) * noise
  return _contrastive_forward(apply_fn, params, x_t, t_B, batch.get('cond', {}), rng_model)


def clip_loss(apply_fn: Callable, params, batch, rng, cfg) -> tuple[jax.Array, dict[str, Any]]:
  """CLIP's own objective on clean images (unCLIP's stage 1, a CLIP trained from scratch):
  the noised-CLIP loss at noise level zero, i.e. x0 itself with t = 0.

  Same arguments and results as `noised_clip_loss`; `cfg` (the schedule) is not used.
  """
  del cfg
  x0 = batch['x0'].astype(jnp.float32)
  t_B = jnp.zeros((x0.shape[0],), jnp.float32)
  return _contrastive_forward(apply_fn, params, x0, t_B, batch.get('cond', {}), rng)


def _contrastive_forward(apply_fn, params, x, t_B, cond, rng):
  img, txt, logit_scale = apply_fn(params, x, t_B, cond, rng)
  loss = clip_contrastive_loss(img, txt, logit_scale)
  logits = contrastive_logits(img, txt, logit_scale)
  acc = jnp.mean((jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])).astype(jnp.float32))
  aux = {'loss': loss, 'accuracy': acc, 'temperature': jnp.exp(jnp.asarray(logit_scale)),
         't_mean': jnp.mean(t_B)}
  return loss, aux

"""unCLIP (DALL-E 2): frozen CLIP text -> diffusion prior (best of K candidates by dot product
with the text embedding; prior CFG) -> decoder 64 px (CFG over image embedding and caption)
-> upsamplers; and the applications of the paper's section 3: variations, interpolations
and text diffs, all built on DDIM inversion of the decoder.

Embeddings live where the networks were trained on them: unit-normalised CLIP embeddings
scaled by sqrt(D) (`conditioning.l2_scaled`). `KarloPipeline` runs a diffusers unCLIP
directory (Karlo, `diffusers_io.karlo`) as its reference pipeline does: raw CLIP embeddings,
no best-of, the prior's sample de-normalised by its clip_mean / clip_std.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import conditioning, errors, io_util, models, parallel
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
    self.check_embedding_spaces()
    k_prior, k_dec = jax.random.split(rng)
    embed = self.prior(prompts, k_prior, overrides)
    collect: dict = {}
    x = self.image_chain(self.order[1:], prompts, k_dec, overrides,
                         first_inputs={'image_embed': embed}, collect=collect)
    return common.uint8_result(x, collect, return_stages)

  def check_embedding_spaces(self):
    """The prior samples the embeddings the decoder reads: both raw (Karlo's) or both
    l2-scaled (`text_encoder.raw_embeddings`)."""
    prior, dec = self.stage(self.prior_name), self.stage(self.decoder_name)
    if prior.conditioner.raw_embeddings != dec.conditioner.raw_embeddings:
      raw = lambda s: 'raw' if s.conditioner.raw_embeddings else 'l2-scaled'
      raise errors.InputError(
          f'stage {self.prior_name!r} samples {raw(prior)} CLIP embeddings but '
          f'{self.decoder_name!r} reads {raw(dec)} ones (text_encoder.raw_embeddings); pair '
          'a decoder with a prior trained in its embedding space')

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
    after = self.order[self.order.index(self.decoder_name) + 1:]
    x = self.image_chain(after, prompts, k_up, overrides, first_low_res=x, collect=collect)
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


# Karlo: a diffusers unCLIP directory (`diffusers_io.karlo`) -------------------------------------

class KarloCLIP:
  """The pipeline's CLIP towers behind the frozen-encoder interface the stages use:
  `tokenize`, `text_forward` (last hidden state with padding kept, projected pooled output;
  the tower runs without the attention mask, as the reference does) and `image_forward`."""

  def __init__(self, towers):
    self.text = towers['text']
    self.image = towers.get('image')
    self.tokenizer = self.text.tokenizer
    self.params = {'text': self.text.params,
                   'image': None if self.image is None else self.image.params}

  def tokenize(self, prompts):
    return self.tokenizer(list(prompts))

  def text_forward(self, params, ids_BL, mask_BL):
    del mask_BL  # the tokenizer's mask goes to the networks, not to the encoder
    out = self.text.module.apply({'params': params['text']}, jnp.asarray(ids_BL))
    return (out['last_hidden_state'].astype(jnp.float32),
            out['text_embeds'].astype(jnp.float32))

  def image_forward(self, params, images, uint8: bool = False):
    """Projected CLIP image embeddings [B, D] of float images in [-1, 1] (uint8 with
    `uint8`): center-cropped, resized (bicubic, antialiased) and normalised."""
    if self.image is None:
      raise errors.InputError('this Karlo directory has no image encoder; variations, '
                              'interpolations and text diffs need an '
                              'UnCLIPImageVariationPipeline directory (image_encoder/)')
    x = images.astype(jnp.float32)
    x = x / 255.0 if uint8 else (x + 1.0) / 2.0
    b, h, w, c = x.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, top:top + side, left:left + side]
    size = self.image.module.vision['image_size']
    if side != size:
      x = jax.image.resize(x, (b, size, size, c), 'bicubic', antialias=True)
    mean = jnp.asarray(self.image.image_mean, jnp.float32).reshape(1, 1, 1, -1)
    std = jnp.asarray(self.image.image_std, jnp.float32).reshape(1, 1, 1, -1)
    pixels = (jnp.clip(x, 0.0, 1.0) - mean) / std
    out = self.image.module.apply({'params': params['image']}, pixels)
    return out['image_embeds'].astype(jnp.float32)


class KarloStage(common.Stage):
  """A stage of a Karlo directory: its network and weights mapped by `diffusers_io.karlo`,
  the pipeline's CLIP as frozen encoder. The prior keeps its `clip_mean` / `clip_std`;
  super_res, when super_res_last differs from super_res_first, holds params {'first',
  'final'} and runs 'final' at the schedule's step 0 (the reference's last step)."""

  def __init__(self, name, entry, root, progress, *, trained, clip, extras):
    self._clip = clip
    stats = {k: extras.get(k) for k in ('clip_mean', 'clip_std')}
    self.clip_mean = None if stats['clip_mean'] is None else jnp.asarray(stats['clip_mean'])
    self.clip_std = None if stats['clip_std'] is None else jnp.asarray(stats['clip_std'])
    self.has_final = extras.get('final_params') is not None
    super().__init__(name, entry, root, progress, {}, pretrained=True, trained=trained)
    if self.has_final:
      self._apply_jit = jax.jit(self._apply_by_step)

  def _frozen_encoder(self, config, encoders):
    return self._clip

  def _tokenizer(self, config):
    return self._clip.tokenizer

  def _final_time(self) -> float:
    return 1.5 / self.schedule.num_timesteps  # between step 0 (1/T) and step 1 (2/T)

  def _apply_by_step(self, params, x, t_B, cond):
    """Each row through the network of its step; both run only when the rows' steps mix."""
    run = lambda p: self.model.apply({'params': p}, x, t_B, cond, train=False)
    last_B = t_B <= self._final_time()

    def mixed():
      return jnp.where(last_B.reshape((-1,) + (1,) * (x.ndim - 1)), run(params['final']),
                       run(params['first']))
    return jax.lax.cond(jnp.all(last_B), lambda: run(params['final']),
                        lambda: jax.lax.cond(jnp.any(last_B), mixed,
                                             lambda: run(params['first'])))

  def denoise_fn(self, params, report: bool):
    if not self.has_final:
      return super().denoise_fn(params, report)
    model, final_time = self.model, self._final_time()

    def denoise(x_t, t_B, cond):
      run = lambda p: model.apply({'params': p}, x_t, t_B, cond, train=False)
      return jax.lax.cond(t_B[0] <= final_time, lambda: run(params['final']),
                          lambda: run(params['first']))
    return denoise


def _pad_rows(x, n_pad: int, axis: int):
  x = jnp.asarray(x, jnp.float32)
  extra = n_pad - x.shape[axis]
  if extra <= 0:
    return x
  last = jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
  return jnp.concatenate([x, jnp.repeat(last, extra, axis=axis)], axis=axis)


class KarloPipeline(UnCLIPPipeline):
  """A diffusers `UnCLIPPipeline` (or `UnCLIPImageVariationPipeline`) directory sampled as
  the reference does: prior (no best-of; its sample de-normalised by clip_mean/clip_std)
  -> decoder -> super_res. `generate` takes `latents` and `step_noise` ({stage: array}) to
  replay a reference run's initial and per-step noise."""

  def __init__(self, config, path: str, stage_configs):
    super().__init__(config, path, pretrained=True)
    self.path = path
    self._stage_configs = dict(stage_configs)
    self._clip = None

  @property
  def prior_name(self) -> str:
    if 'prior' not in self.order:
      raise errors.InputError(f'{self.path} is an image-variation pipeline: it has no prior '
                              '(use variations, interpolate or text_diff)')
    return 'prior'

  @property
  def decoder_name(self) -> str:
    return 'decoder'

  def clip(self) -> KarloCLIP:
    if self._clip is None:
      from diffusion_jax.diffusers_io import karlo  # noqa: PLC0415
      self._clip = KarloCLIP(karlo.load_encoders(self.path))
    return self._clip

  def stage(self, name: str) -> common.Stage:
    if name not in self._stages:
      from diffusion_jax.diffusers_io import karlo  # noqa: PLC0415
      entry = self._entry(name)
      raw = self._stage_configs[name]
      config = conditioning.config_from_saved(raw)
      model = models.build(config.model)
      mesh = parallel.create_mesh(config.mesh)
      rules = parallel.logical_rules(config.mesh)
      abstract = conditioning.abstract_params(config, model, mesh, rules)
      host, extras = karlo.load_stage(self.path, name, raw['model'])
      put = lambda tree: jax.tree.map(
          lambda a, spec: jax.device_put(np.asarray(a, spec.dtype), spec.sharding), tree,
          abstract)
      params = put(host)
      if extras.get('final_params') is not None:
        params = {'first': params, 'final': put(extras['final_params'])}
      trained = conditioning.TrainedStage(config, 0, model, mesh, rules, params)
      self._stages[name] = KarloStage(name, entry, self.root, self.progress, trained=trained,
                                      clip=self.clip(), extras=extras)
    return self._stages[name]

  def _run(self, name, inputs, n, rng, overrides, latents, step_noise):
    stage = self.stage(name)
    s = self.settings(name, overrides)
    n_pad = stage.padded(n)
    k_cond, k_noise, k_run = jax.random.split(rng, 3)
    cond = stage.build_cond(inputs, k_cond, s.aug_level, s.blur_sigma)
    x_T = stage.initial_noise(k_noise, n, n_pad, s, latents)
    noise = None
    if step_noise is not None and name in step_noise:
      noise = _pad_rows(step_noise[name], n_pad, axis=1)
    return self.timed(name, stage.sample, cond, x_T, k_run, s, step_noise=noise)[:n]

  def prior(self, prompts, rng, overrides=None, *, latents=None, step_noise=None):
    """CLIP image embeddings [N, D] of the prompts: the prior's sample, de-normalised."""
    stage = self.stage(self.prior_name)
    if int(self.settings(self.prior_name, overrides or {}).best_of) > 1:
      raise errors.InputError('best_of > 1: Karlo samples one prior embedding per prompt; '
                              'leave best_of at 1')
    n = len(prompts)
    inputs = self.text_inputs(stage, prompts, stage.padded(n))
    out = self._run(self.prior_name, inputs, n, rng, overrides or {}, latents, step_noise)
    return out * stage.clip_std[None] + stage.clip_mean[None]

  def generate(self, prompts, rng, *, return_stages: bool = False, latents=None,
               step_noise=None, **overrides):
    """uint8 images of the prompts; `latents` / `step_noise`: {stage: x_T} and {stage:
    [num_steps, N, ...]} replacing the initial and the per-step noise."""
    prompts = common.check_prompts(prompts)
    self.check_overrides(overrides)
    common.check_latents(latents, self.order)
    common.check_latents(step_noise, self.order)
    k_prior, k_dec = jax.random.split(rng)
    embed = self.prior(prompts, k_prior, overrides, latents=latents, step_noise=step_noise)
    return self._decode_chain(prompts, embed, k_dec, overrides, latents, step_noise,
                              {self.prior_name: embed}, return_stages)

  def image_variations(self, images, rng, *, return_stages: bool = False, latents=None,
                       step_noise=None, **overrides):
    """The reference UnCLIPImageVariationPipeline: the images' CLIP image embeddings
    decoded from fresh noise with the empty prompt (`variations` is the paper's DDIM
    inversion instead)."""
    self.check_overrides(overrides)
    common.check_latents(latents, self.order)
    common.check_latents(step_noise, self.order)
    embed = self.image_embed(images)
    prompts = [''] * embed.shape[0]
    return self._decode_chain(prompts, embed, rng, overrides, latents, step_noise,
                              {'image_embed': embed}, return_stages)

  def _decode_chain(self, prompts, embed, k_dec, overrides, latents, step_noise, collect,
                    return_stages):
    n = len(prompts)
    x = None
    for name in self.order[self.order.index(self.decoder_name):]:
      stage = self.stage(name)
      n_pad = stage.padded(n)
      k_dec, k_stage = jax.random.split(k_dec)
      inputs = dict(self.text_inputs(stage, prompts, n_pad))
      if 'image_embed' in stage.keys:
        inputs['image_embed'] = stage.put(embed, n_pad)
      if 'low_res' in stage.keys:
        inputs['low_res'] = stage.put(x, n_pad)
      x = self._run(name, inputs, n, k_stage, overrides, latents, step_noise)
      collect[name] = x
    images = io_util.to_uint8(jax.device_get(x))
    if not return_stages:
      return images
    return images, {k: np.asarray(jax.device_get(v)) if v.ndim == 2 else
                    io_util.to_uint8(jax.device_get(v)) for k, v in collect.items()}

  def text_embed(self, captions):
    """Raw projected CLIP text embeddings, through the decoder's conditioning."""
    dec = self.stage(self.decoder_name)
    n = len(captions)
    n_pad = dec.padded(n)
    inputs = dict(self.text_inputs(dec, list(captions), n_pad))
    inputs['image_embed'] = dec.put(jnp.zeros((n, dec.config.model.image_embed_dim)), n_pad)
    return dec.build_cond(inputs, jax.random.PRNGKey(0), 0.0)['text_embed'][:n]

  def text_diff_embeddings(self, image_embed_D, caption: str, new_caption: str, etas):
    """slerp(image_embed, z_d, w) with the text direction z_d at the image embedding's norm
    (the embeddings are raw CLIP embeddings here, not sqrt(D)-scaled)."""
    e = self.text_embed([caption, new_caption])
    d = e[1] - e[0]
    z_d = d / jnp.maximum(jnp.linalg.norm(d), 1e-12) * jnp.linalg.norm(image_embed_D)
    etas = jnp.asarray(list(etas), jnp.float32)
    num = etas.shape[0]
    return common.slerp(jnp.broadcast_to(image_embed_D, (num,) + image_embed_D.shape),
                        jnp.broadcast_to(z_d, (num,) + z_d.shape), etas)

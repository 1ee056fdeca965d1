"""Latent diffusion: text (or DiT's class labels) -> a sampler in an autoencoder's latent
space -> `Codec.decode` -> uint8 images. Read from a diffusers directory
(`diffusers_io.latent_pipeline`: Stable Diffusion 1.x / 2.x and its inpainting model, DiT,
PixArt-alpha) by `pipelines.from_pretrained`.

    pipe = pipelines.from_pretrained('stable-diffusion-v1-5')
    images_NHW3 = pipe.generate(['a red cube'], jax.random.PRNGKey(0), num_steps=25)
    edited = pipe.img2img(['a blue cube'], images_NHW3, 0.6, jax.random.PRNGKey(1))
    filled = pipe.inpaint(['a cat'], images_NHW3, masks_NHW, jax.random.PRNGKey(2))
    dit.generate(['golden retriever', 207], jax.random.PRNGKey(0))   # names or labels

Stages trained here (configs/latent.py) sample through `LatentCascade`, the pipeline
`pipelines.load` gives the `latent` family: the stage's network, encoder, tokenizer and
conditioner come from its checkpoint like any other stage's (`common.Stage`), and its frozen
autoencoder is the one it trained on (`conditioning.build_codec`).

    pipe = pipelines.load(configs.latent.get_config('stage=cascade,size=tiny'), ROOT)
    images_NHW3 = pipe.generate(['a red circle'], jax.random.PRNGKey(0))

Guidance is classifier-free (`guidance.classifier_free`) against the empty prompt's
encoding (SD, PixArt) or the null class (DiT). `img2img` encodes the image, noises it to
the `strength`'s step of the sampler's grid and runs the remaining steps, as diffusers'
StableDiffusionImg2ImgPipeline. `inpaint` (mask 1 = repaint) feeds an inpainting U-Net the
mask at latent size and the masked image's latents (StableDiffusionInpaintPipeline); with an
ordinary network it resets the known region to the image's latents, noised to the step's
level, after every step (diffusers' blending for a 4-channel U-Net). Images in: uint8 or
float in [-1, 1], [N, H, W, 3]; out: uint8.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import conditioning, errors, io_util
from diffusion_jax.diffusers_io import encoders as dio_encoders
from diffusion_jax.diffusion import guidance, samplers, schedules
from diffusion_jax.models import autoencoder
from diffusion_jax.pipelines import common


class LatentPipeline:
  """`generate(prompts, rng, **overrides) -> uint8 [N, H, W, 3]`; overrides are sampler
  settings (`num_steps`, `guidance_scale`, `sampler`, `spacing`, `eta`)."""

  def __init__(self, parts):
    self.parts = parts
    self.module, self.params, self.codec = parts.module, parts.params, parts.codec
    sampler = dict(parts.sampler)
    self.settings = common.Settings(
        sampler=str(sampler.get('name', 'ddim')), num_steps=int(sampler['num_steps']),
        eta=float(sampler.get('eta', 0.0)), guidance_scale=float(sampler['guidance_scale']),
        threshold=str(sampler.get('threshold', 'none')),
        percentile=float(sampler.get('percentile', 99.5)),
        threshold_max=float(sampler.get('threshold_max', 0.0)),
        spacing=str(sampler.get('spacing', '')))
    self.schedule = schedules.from_config(parts.diffusion)
    self.parameterization = parts.diffusion.get('parameterization', 'eps')
    self.learned_variance = bool(parts.diffusion.get('learned_variance', False))
    self.uncond_flags = ('drop_class',) if parts.text_kind is None else ('drop_text',)
    # SD's inpainting U-Net: channels [x, mask (1 = repaint), masked image's latents].
    self.inpaint_channels = bool(getattr(self.module, 'inpaint', False))
    if self.inpaint_channels and not getattr(self.module, 'inpaint_premasked', False):
      raise errors.InputError('an inpainting network here reads the masked image\'s latents '
                              '(inpaint_premasked=True), as diffusers\' inpainting U-Net')
    self._sample_jit = jax.jit(self._sample_program, static_argnames=(
        'sampler', 'num_steps', 'spacing', 'threshold', 'percentile', 'threshold_max',
        'use_cfg'))
    self._chain_jit = jax.jit(self._chain_program, static_argnames=(
        'sampler', 'threshold', 'percentile', 'threshold_max', 'use_cfg', 'blend'))
    self._decode_jit = jax.jit(self.codec.decode)
    self._encode_jit = jax.jit(functools.partial(self.codec.module.apply, method='encode'))

  # Settings and shapes -----------------------------------------------------------------------

  def settings_for(self, overrides) -> common.Settings:
    unknown = sorted(set(overrides) - set(common.SETTINGS))
    if unknown:
      raise errors.InputError(f'unknown override(s) {unknown}; pass sampler settings '
                              f'{common.SETTINGS}')
    s = self.settings.replace(**overrides)
    if s.sampler not in samplers.SAMPLERS:
      raise errors.InputError(f'sampler={s.sampler!r}: choose one of {samplers.SAMPLERS}')
    return s

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """[h, w, C] of one latent x_t."""
    size = int(self.module.image_size)
    return (size, size, int(self.codec.latent_channels))

  @property
  def image_size(self) -> int:
    return self.latent_shape[0] * self.codec.downsample_factor

  # Conditioning ------------------------------------------------------------------------------

  def class_labels(self, classes) -> np.ndarray:
    """DiT: class names (model_index's id2label) or integer labels -> int32 [N]."""
    labels = self.parts.labels or {}
    out = []
    for c in classes:
      if isinstance(c, (int, np.integer)):
        label = int(c)
      elif str(c) in labels:
        label = labels[str(c)]
      else:
        known = ', '.join(sorted(labels)[:5]) or 'none (the directory has no id2label)'
        raise errors.InputError(f'class {c!r} is unknown; give an integer label in '
                                f'[0, {self.parts.num_classes}) or a name ({known}, ...)')
      if not 0 <= label < self.parts.num_classes:
        raise errors.InputError(f'class label {label} is out of range [0, '
                                f'{self.parts.num_classes})')
      out.append(label)
    return np.asarray(out, np.int32)

  def cond(self, prompts) -> tuple[dict[str, Any], int]:
    """The network's cond for prompts (or DiT's classes) with the guidance's null entries."""
    if isinstance(prompts, (str, int, np.integer)):
      prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
      raise errors.InputError('no prompts given')
    n = len(prompts)
    if self.parts.text_kind is None:
      return dict(class_labels=self.class_labels(prompts),
                  drop_class=np.zeros((n,), bool)), n
    encoder = self.parts.text_encoder
    texts = [str(p) for p in prompts]
    text = dio_encoders.encode_prompts(encoder, texts)
    null = dio_encoders.encode_prompts(encoder, [''] * n)
    mask, null_mask = text['text_mask'], null['text_mask']
    if self.parts.text_kind == 'clip':  # SD's U-Net attends to every token, padding too
      mask, null_mask = np.ones_like(mask), np.ones_like(null_mask)
    return dict(text_tokens=text['text_tokens'], text_mask=mask,
                null_text_tokens=null['text_tokens'], null_text_mask=null_mask,
                drop_text=np.zeros((n,), bool)), n

  # Programs ---------------------------------------------------------------------------------

  def _denoiser(self, params, scale, use_cfg):
    module = self.module

    def denoise(x_t, t_B, cond):
      cond = {k: v for k, v in cond.items() if not k.startswith('_')}
      return module.apply({'params': params}, x_t, t_B, cond, train=False)
    if not use_cfg:
      return denoise
    return guidance.classifier_free(denoise, scale, learned_variance=self.learned_variance,
                                    uncond_flags=self.uncond_flags)

  def _sample_program(self, params, cond, x_T, rng, scale, eta, *, sampler, num_steps,
                      spacing, threshold, percentile, threshold_max, use_cfg):
    return samplers.sample(
        self._denoiser(params, scale, use_cfg), x_T, rng, schedule=self.schedule,
        sampler=sampler, num_steps=num_steps, spacing=spacing or None, eta=eta, cond=cond,
        parameterization=self.parameterization, learned_variance=self.learned_variance,
        threshold=threshold, percentile=percentile, threshold_max=threshold_max)

  def _chain_program(self, params, cond, x_t, times, rng, scale, eta, known, *, sampler,
                     threshold, percentile, threshold_max, use_cfg, blend):
    """The reverse chain over `times` (decreasing, ending at 0) from x_t at times[0]; with
    `blend`, known = (z0, mask, noise): after each step the region mask == 0 is z0 noised
    to the step's time with `noise` (z0 itself at t = 0)."""
    denoise = self._denoiser(params, scale, use_cfg)
    threshold_fn = guidance.get_threshold_fn(threshold, percentile, threshold_max)
    schedule, batch = self.schedule, x_t.shape[0]

    def step(carry, inputs):
      x, x0_prev, t_prev = carry
      index, t, s, key = inputs
      t_B, s_B = jnp.full((batch,), t), jnp.full((batch,), s)
      x0_hat, eps_hat, variance_raw = samplers.denoise(
          denoise, x, t_B, cond, schedule=schedule, parameterization=self.parameterization,
          learned_variance=self.learned_variance, threshold_fn=threshold_fn)
      noise = jax.random.normal(key, x.shape, jnp.float32)
      if sampler == 'ddpm':
        x_s = samplers.ddpm_step(x, x0_hat, variance_raw, s_B, t_B, noise, schedule=schedule,
                                 variance='learned' if self.learned_variance else 'small')
      elif sampler == 'ddim':
        x_s = samplers.ddim_step(x, x0_hat, eps_hat, s_B, t_B, noise, schedule=schedule,
                                 eta=eta)
      else:
        x_s = samplers.dpmpp_2m_step(x, x0_hat, x0_prev, s_B, t_B, jnp.full((batch,), t_prev),
                                     index > 0, schedule=schedule)
      x_s = jnp.where(s <= 0.0, x0_hat, x_s)
      if blend:
        z0, mask, z_noise = known
        alpha, sigma = schedule.alpha_sigma(s_B)
        noised = alpha[:, None, None, None] * z0 + sigma[:, None, None, None] * z_noise
        x_s = mask * x_s + (1.0 - mask) * jnp.where(s <= 0.0, z0, noised)
      return (x_s, x0_hat, t), None

    n = times.shape[0] - 1
    inputs = (jnp.arange(n), times[:-1], times[1:], jax.random.split(rng, n))
    (x_0, _, _), _ = jax.lax.scan(step, (x_t.astype(jnp.float32), jnp.zeros_like(x_t),
                                         times[0]), inputs)
    return x_0

  def _use_cfg(self, s: common.Settings) -> bool:
    return float(s.guidance_scale) != 1.0

  def sample(self, cond, x_T, rng, s: common.Settings):
    """x_0 latents from x_T over the whole grid (one jitted `samplers.sample`)."""
    return self._sample_jit(
        self.params, jax.tree.map(jnp.asarray, cond), jnp.asarray(x_T, jnp.float32), rng,
        jnp.float32(s.guidance_scale), jnp.float32(s.eta), sampler=s.sampler,
        num_steps=int(s.num_steps), spacing=str(s.spacing), threshold=s.threshold,
        percentile=float(s.percentile), threshold_max=float(s.threshold_max),
        use_cfg=self._use_cfg(s))

  def grid(self, s: common.Settings) -> np.ndarray:
    """The sampler's times, decreasing from its first model call to 0."""
    spacing = str(s.spacing) or ('logsnr' if s.sampler == 'dpmpp_2m' else 'time')
    try:
      return np.asarray(self.schedule.timesteps(int(s.num_steps), spacing), np.float32)
    except ValueError as e:
      raise errors.InputError(f'num_steps={s.num_steps}, spacing={spacing!r}: {e}') from None

  def chain(self, cond, x_t, times, rng, s: common.Settings, known=None):
    return self._chain_jit(
        self.params, jax.tree.map(jnp.asarray, cond), jnp.asarray(x_t, jnp.float32),
        jnp.asarray(times, jnp.float32), rng, jnp.float32(s.guidance_scale),
        jnp.float32(s.eta), known, sampler=s.sampler, threshold=s.threshold,
        percentile=float(s.percentile), threshold_max=float(s.threshold_max),
        use_cfg=self._use_cfg(s), blend=known is not None)

  # Latents <-> images -----------------------------------------------------------------------

  def decode(self, z_BhwC) -> np.ndarray:
    """Latents -> float images in [-1, 1] (not clipped)."""
    return np.asarray(self._decode_jit(self.codec.params, jnp.asarray(z_BhwC, jnp.float32)))

  def encode(self, images_BHWC, rng, posterior_noise=None) -> jax.Array:
    """Images in [-1, 1] -> scaled latents, a posterior sample (noise from `rng`, or the
    caller's N(0, I) `posterior_noise` of the latents' shape)."""
    mean, logvar = self._encode_jit({'params': self.codec.params},
                                    jnp.asarray(images_BHWC, jnp.float32))
    if posterior_noise is None:
      noise = jax.random.normal(rng, mean.shape, jnp.float32)
    else:
      noise = jnp.asarray(self._check_noise(posterior_noise, mean.shape[0],
                                            'posterior_noise'))
    return self.codec.space.scale(autoencoder.posterior_sample(mean, logvar, noise))

  def _check_noise(self, x, n: int, what: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.shape != (n,) + self.latent_shape:
      raise errors.InputError(f'{what} has shape {x.shape}; give N(0, I) of the latents\' '
                              f'shape {(n,) + self.latent_shape}')
    return x

  def _images(self, images, n: int) -> np.ndarray:
    x = np.asarray(images)
    size = self.image_size
    if x.ndim != 4 or x.shape != (n, size, size, 3):
      raise errors.InputError(f'images of shape {x.shape}: give [{n}, {size}, {size}, 3] (one '
                              'per prompt, uint8 or float in [-1, 1])')
    return io_util.to_float(x)

  def _masks(self, masks, n: int) -> np.ndarray:
    """Masks [N, H, W(, 1)] in [0, 1] (1 = repaint), binarised at 0.5 as diffusers does."""
    m = np.asarray(masks, np.float32)
    if m.ndim == 4 and m.shape[-1] == 1:
      m = m[..., 0]
    size = self.image_size
    if m.shape != (n, size, size):
      raise errors.InputError(f'masks of shape {np.shape(masks)}: give [{n}, {size}, {size}] '
                              'in [0, 1], 1 where the image is repainted')
    return (m >= 0.5).astype(np.float32)[..., None]

  def _start(self, x_T, rng, n: int, what: str = 'latents'):
    if x_T is None:
      return jax.random.normal(rng, (n,) + self.latent_shape, jnp.float32)
    return jnp.asarray(self._check_noise(x_T, n, what))

  # Entry points -----------------------------------------------------------------------------

  def generate(self, prompts, rng, *, latents=None, return_latents: bool = False, **overrides):
    """Text (DiT: class names or labels) -> uint8 [N, H, W, 3]. `latents`: x_T [N, h, w, C]
    (as diffusers' `latents=`); with `return_latents`, also the final latents."""
    s = self.settings_for(overrides)
    cond, n = self.cond(prompts)
    k_noise, k_run = jax.random.split(rng)
    z = self.sample(cond, self._start(latents, k_noise, n), k_run, s)
    images = io_util.to_uint8(self.decode(z))
    return (images, np.asarray(z)) if return_latents else images

  def img2img(self, prompts, images, strength: float, rng, *, noise=None,
              posterior_noise=None, return_latents: bool = False, **overrides):
    """Edits `images` towards `prompts`: the image's latents noised to the step
    `int(num_steps * strength)` from the end of the grid, then those steps run. `noise`,
    `posterior_noise`: the caller's N(0, I) draws (latent shape) for the noising and the
    autoencoder's posterior sample."""
    if not 0.0 <= float(strength) <= 1.0:
      raise errors.InputError(f'strength={strength}: give a value in [0, 1]')
    s = self.settings_for(overrides)
    cond, n = self.cond(prompts)
    x = self._images(images, n)
    k_post, k_noise, k_run = jax.random.split(rng, 3)
    z0 = self.encode(x, k_post, posterior_noise)
    times = self.grid(s)
    steps = len(times) - 1
    keep = min(int(steps * float(strength)), steps)
    if keep == 0:
      z = z0
    else:
      times = times[steps - keep:]
      eps = self._start(noise, k_noise, n, 'noise')
      alpha, sigma = self.schedule.alpha_sigma(jnp.full((n,), times[0]))
      x_t = alpha[:, None, None, None] * z0 + sigma[:, None, None, None] * eps
      z = self.chain(cond, x_t, times, k_run, s)
    out = io_util.to_uint8(self.decode(z))
    return (out, np.asarray(z)) if return_latents else out

  def inpaint(self, prompts, images, masks, rng, *, latents=None, posterior_noise=None,
              return_latents: bool = False, **overrides):
    """Repaints where `masks` is 1 ([N, H, W] in [0, 1]). An inpainting U-Net reads the
    mask at latent size and the latents of image * (mask < 0.5); another network keeps the
    known region at the image's latents, noised to each step's level with the initial noise
    `latents`. `posterior_noise`: N(0, I) for the encoded image's posterior sample."""
    s = self.settings_for(overrides)
    cond, n = self.cond(prompts)
    x = self._images(images, n)
    mask_BHW1 = self._masks(masks, n)
    f = self.codec.downsample_factor
    mask_lat = jnp.asarray(mask_BHW1[:, ::f, ::f])  # nearest, as torch's interpolate
    k_post, k_noise, k_run = jax.random.split(rng, 3)
    x_T = self._start(latents, k_noise, n)
    if self.inpaint_channels:
      masked = x * (1.0 - mask_BHW1)
      cond = dict(cond, inpaint_image=self.encode(masked, k_post, posterior_noise),
                  inpaint_mask=mask_lat)
      z = self.sample(cond, x_T, k_run, s)
    else:
      z0 = self.encode(x, k_post, posterior_noise)
      z = self.chain(cond, x_T, self.grid(s), k_run, s, known=(z0, mask_lat, x_T))
    out = io_util.to_uint8(self.decode(z))
    return (out, np.asarray(z)) if return_latents else out


class LatentStage(common.Stage):
  """A trained latent stage: it samples latents, which the frozen autoencoder it trained on
  decodes (`decode`)."""

  def _conditioner(self, config):
    self.codec = conditioning.build_codec(config, self.dir, self.mesh)
    self._decode_jit = jax.jit(self.codec.decode)
    return conditioning.Conditioner(config, self.encoder, self.codec)

  def decode(self, z_BhwC):
    """Latents -> float images in [-1, 1] (not clipped)."""
    with self.context():
      return self._decode_jit(self.codec.params, z_BhwC)


class LatentCascade(common.Cascade):
  """`generate(prompts, rng, **overrides) -> uint8 [N, H, W, 3]` of a trained latent stage
  (`config.order`: its one stage)."""

  def stage(self, name: str) -> LatentStage:
    if name not in self._stages:
      self._stages[name] = LatentStage(name, self._entry(name), self.root, self.progress,
                                       self._encoders, pretrained=self.pretrained)
    return self._stages[name]

  def generate(self, prompts, rng, *, latents=None, return_stages: bool = False,
               **overrides):
    """Samples the stage's latents and decodes them. overrides: sampler settings
    (`num_steps=8`, `guidance_scale=3.0`, or `<stage>={...}`); `latents`: {stage: x_T} for
    the initial noise (latent shape) the caller gives; with `return_stages`, also
    {stage: uint8}."""
    prompts = common.check_prompts(prompts)
    self.check_overrides(overrides)
    if len(self.order) != 1:
      raise errors.InputError(f'a latent cascade samples one stage; order={self.order}')
    common.check_latents(latents, self.order)
    z = self.image_chain(self.order, prompts, rng, overrides, latents=latents)
    x = self.stage(self.order[0]).decode(z)
    return common.uint8_result(x, {self.order[0]: x}, return_stages)


def from_directory(path: str) -> LatentPipeline:
  """The pipeline of a diffusers latent pipeline directory (`diffusers_io.latent_pipeline`)."""
  from diffusion_jax.diffusers_io import latent_pipeline  # noqa: PLC0415
  return LatentPipeline(latent_pipeline.load(path))


__all__ = ['LatentCascade', 'LatentPipeline', 'LatentStage', 'from_directory']

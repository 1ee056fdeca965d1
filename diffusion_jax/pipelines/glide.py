"""GLIDE: text transformer inside each U-Net -> base 64 px -> upsampler 256, with
classifier-free guidance; CLIP guidance with the noised CLIP; inpainting with the inpainting
models."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors, io_util
from diffusion_jax.diffusion import process
from diffusion_jax.pipelines import common


def known_region_output(x_t, t_B, image, mask, output, *, schedule, parameterization,
                        learned_variance):
  """The model output with its known region replaced so that x0_hat = image there."""
  channels = x_t.shape[-1]
  mean = output[..., :channels] if learned_variance else output
  alpha, sigma = schedule.alpha_sigma(t_B)
  if parameterization == 'eps':
    target = process.eps_from_x0(x_t, image, alpha, sigma)
  elif parameterization == 'x0':
    target = image
  else:
    target = process.v_from_x0_eps(image, process.eps_from_x0(x_t, image, alpha, sigma),
                                   alpha, sigma)
  mean = mask * target + (1.0 - mask) * mean
  if learned_variance:
    return jnp.concatenate([mean, output[..., channels:]], axis=-1)
  return mean


def _inpaint_extra(stage, denoise, args):
  """Inpainting as glide-text2im's released sampler does it: the network sees the image and
  mask as conditioning, and its prediction of x0 in the known region is replaced by the
  original (its `denoised_fn`), so the known pixels survive to t = 0."""
  image, mask = args

  def wrapped(x_t, t_B, cond):
    out = denoise(x_t, t_B, cond)
    return known_region_output(x_t, t_B, image, mask, out, schedule=stage.schedule,
                               parameterization=stage.parameterization,
                               learned_variance=stage.learned_variance)
  return wrapped, None


def _clip_guidance_extra(clip_module, stage, denoise, args):
  """CLIP guidance (GLIDE sec. 2.4): grad_x of the noised CLIP's logit, exp(logit_scale) times
  the image-text cosine at (x_t, t), scaled by the guidance weight, as glide-text2im's
  `cond_fn`; an ancestral sampler shifts the step's mean by its variance times it
  (`samplers.sample(guide_mean=True)`), DDIM shifts eps by -sigma times it."""
  del stage
  params, ids, mask, scale = args
  text = clip_module.apply({'params': params}, ids, mask, method='encode_text')
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  logit_scale = jnp.exp(params['clip']['logit_scale'].astype(jnp.float32))

  def grad_fn(x_t, t_B, cond):
    del cond

    def score(x):
      img = clip_module.apply({'params': params}, x, t_B, method='encode_image')
      img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
      return logit_scale * jnp.sum(img * text)
    return scale * jax.grad(score)(x_t)
  return denoise, grad_fn


class GlidePipeline(common.Cascade):
  """`generate(prompts, rng, **overrides)`; `inpaint(image, mask, prompt, rng)`."""

  def __init__(self, config, workdir: str, *, pretrained: bool = False):
    super().__init__(config, workdir, pretrained=pretrained)
    self._clip_extra = None

  def generate(self, prompts, rng, *, clip_guidance_scale: float = 0.0, latents=None,
               return_stages: bool = False, **overrides):
    """Text -> images. With `clip_guidance_scale` > 0 the base stage is guided by the noised
    CLIP (the cascade's `clip_stage`) instead of classifier-free guidance. `latents`:
    {stage: x_T} for the stages whose initial noise the caller gives."""
    prompts = common.check_prompts(prompts)
    self.check_overrides(overrides)
    common.check_latents(latents, self.order)
    collect: dict = {}
    names = self.order
    if clip_guidance_scale > 0:
      x = self._clip_guided_base(prompts, rng, clip_guidance_scale, overrides, latents)
      collect[names[0]] = x
      rng = jax.random.fold_in(rng, 1)
      x = self.image_chain(names[1:], prompts, rng, overrides, first_low_res=x, collect=collect,
                           latents=latents)
    else:
      x = self.image_chain(names, prompts, rng, overrides, collect=collect, latents=latents)
    return common.uint8_result(x, collect, return_stages)

  def _clip_guided_base(self, prompts, rng, scale, overrides, latents=None):
    base = self.stage(self.order[0])
    if not self.config.clip_stage or self.config.clip_stage not in self.config.extra:
      raise errors.InputError('CLIP guidance needs the cascade\'s noised CLIP stage, which it '
                              'does not have; convert both CLIP towers or train noised_clip')
    clip = self.stage(self.config.clip_stage)
    if self._clip_extra is None:
      self._clip_extra = functools.partial(_clip_guidance_extra, clip.model)
    n = len(prompts)
    n_pad = base.padded(n)
    k_cond, k_noise, k_run = jax.random.split(rng, 3)
    cond = base.build_cond(self.text_inputs(base, prompts, n_pad), k_cond, 0.0)
    ids, mask = clip.tokenize(prompts)
    clip_text = clip.put({'ids': ids, 'mask': mask}, n_pad)
    # CLIP guidance replaces classifier-free guidance (GLIDE compares the two).
    s = self.settings(self.order[0], overrides).replace(guidance_scale=1.0)
    x_T = base.initial_noise(k_noise, n, n_pad, s, latents)
    args = (clip.params, clip_text['ids'], clip_text['mask'], jnp.float32(scale))
    out = self.timed(self.order[0], base.sample, cond, x_T, k_run, s, extra=self._clip_extra,
                     extra_args=args)
    return out[:n]

  def inpaint(self, image, mask, prompt, rng, *, latents=None, return_stages: bool = False,
              **overrides):
    """Fills the unknown region of `image` (uint8 or [-1, 1] float, [N, H, W, 3] or [H, W, 3])
    where `mask` ([N, H, W], [N, H, W, 1] or [H, W]) is 0; pixels where it is 1 are kept.

    Runs the cascade's `inpaint_stages` (e.g. `inpaint64`, then `inpaint256`), each at its
    own resolution, the second conditioned on the first's output as its low-res input.
    `latents`: {stage: x_T}. Returns uint8 images at the last stage's resolution.
    """
    self.check_overrides(overrides)
    # The inpainting chain, as far as the cascade has its stages (config.extra).
    names = tuple(n for n in self.config.inpaint_stages if n in self.config.extra)
    if not names:
      raise errors.InputError('the cascade has no inpainting stage (its inpaint_stages '
                              f'{tuple(self.config.inpaint_stages)} are not in its extra '
                              'stages); convert or train one')
    common.check_latents(latents, names)
    image = io_util.to_float(image)
    if image.ndim == 3:
      image = image[None]
    mask = np.asarray(mask, np.float32)
    if mask.ndim == 2:
      mask = mask[None]
    if mask.ndim == 3:
      mask = mask[..., None]
    mask = np.broadcast_to(mask, image.shape[:3] + (1,))
    n = image.shape[0]
    prompts = [prompt] * n if isinstance(prompt, str) else common.check_prompts(prompt)
    if len(prompts) != n:
      raise ValueError(f'{len(prompts)} prompts for {n} images')
    collect: dict = {}
    x = None
    for name in names:
      stage = self.stage(name)
      s = self.settings(name, overrides)
      size = stage.config.model.image_size
      n_pad = stage.padded(n)
      rng, k_cond, k_noise, k_run = jax.random.split(rng, 4)
      img = common.resize(jnp.asarray(image), size)
      # Nearest resize keeps the mask binary.
      msk = jax.image.resize(jnp.asarray(mask), (n, size, size, 1), 'nearest')
      inputs = dict(self.text_inputs(stage, prompts, n_pad))
      inputs.update(stage.put({'inpaint_image': img * msk, 'inpaint_mask': msk}, n_pad))
      if 'low_res' in stage.keys:
        inputs['low_res'] = stage.put(x, n_pad)
      cond = stage.build_cond(inputs, k_cond, s.aug_level, s.blur_sigma)
      x_T = stage.initial_noise(k_noise, n, n_pad, s, latents)
      args = (stage.put(img, n_pad), stage.put(msk, n_pad))
      out = self.timed(name, stage.sample, cond, x_T, k_run, s, extra=_inpaint_extra,
                       extra_args=args)
      x = out[:n]
      collect[name] = x
    return common.uint8_result(x, collect, return_stages)

"""What every cascade shares: loading a trained stage from the config saved in its checkpoint
(`conditioning.restore_stage`), building its conditioning exactly as training does
(`conditioning.Conditioner`), and running its sampling loop as one jitted `samplers.sample`
call with the batch sharded over all devices.

A stage's sampling program is compiled once per (shapes, sampler, steps, thresholding, CFG
on/off); the guidance scale, eta and the augmentation level are traced, so changing them
does not recompile. Progress reaches the host from inside the loop through an unordered
`jax.debug.callback` in the denoiser (ordered effects are refused on more than one device).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import conditioning, config_util, errors, io_util, models, parallel
from diffusion_jax import validation
from diffusion_jax.diffusion import guidance, samplers, schedules

log = logging.getLogger(__name__)


class MissingCheckpointError(errors.InputError, FileNotFoundError):
  """A stage of the cascade has no checkpoint under ROOT."""


class UnknownStageError(errors.InputError):
  """A stage name that the cascade config does not define."""


# Arrays -----------------------------------------------------------------------------------------

def resize(x_BHWC, size: int):
  """Resizes square images to `size` (antialiased bicubic down, bicubic up), clipped to [-1, 1]."""
  b, h, w, c = x_BHWC.shape
  if h == size and w == size:
    return x_BHWC
  out = jax.image.resize(x_BHWC, (b, size, size, c), 'bicubic', antialias=True)
  return jnp.clip(out, -1.0, 1.0)


def slerp(a, b, w):
  """Spherical interpolation along the last axis, w in [0, 1] broadcast over the leading axes.

  Between vectors of equal norm every point keeps that norm (the norm is interpolated
  linearly otherwise); nearly parallel vectors fall back to linear interpolation.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  w = jnp.asarray(w, jnp.float32)[..., None]
  na = jnp.linalg.norm(a, axis=-1, keepdims=True)
  nb = jnp.linalg.norm(b, axis=-1, keepdims=True)
  ua, ub = a / jnp.maximum(na, 1e-12), b / jnp.maximum(nb, 1e-12)
  cos = jnp.clip(jnp.sum(ua * ub, -1, keepdims=True), -1.0, 1.0)
  omega = jnp.arccos(cos)
  so = jnp.sin(omega)
  safe = so > 1e-6
  so_ = jnp.where(safe, so, 1.0)
  ca = jnp.where(safe, jnp.sin((1.0 - w) * omega) / so_, 1.0 - w)
  cb = jnp.where(safe, jnp.sin(w * omega) / so_, w)
  direction = ca * ua + cb * ub
  direction = direction / jnp.maximum(jnp.linalg.norm(direction, axis=-1, keepdims=True), 1e-12)
  return direction * ((1.0 - w) * na + w * nb)


def slerp_flat(a, b, w):
  """`slerp` over everything but the leading axis (e.g. the inverted latents x_T)."""
  shape = a.shape
  out = slerp(a.reshape(shape[0], -1), b.reshape(shape[0], -1), w)
  return out.reshape(shape)


# Progress ---------------------------------------------------------------------------------------

class Progress:
  """Host-side receiver of the in-loop callbacks; `listener(stage, step, num_steps)`.

  One object per pipeline, so the callback a compiled program holds never changes; what it
  reports to is swapped on the host.
  """

  def __init__(self):
    self.listener: Callable | None = None
    self.stage = ''
    self.num_steps = 0
    self.count = 0
    self._lock = threading.Lock()

  def start(self, stage: str, num_steps: int):
    self.stage, self.num_steps, self.count = stage, num_steps, 0

  def __call__(self, t):
    del t
    with self._lock:
      self.count += 1
      count = self.count
    if self.listener is not None:
      self.listener(self.stage, min(count, self.num_steps), self.num_steps)


# Stages -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
  """How a stage samples (the cascade config's per-stage entry, with call-time overrides)."""
  sampler: str = 'ddim'
  num_steps: int = 16
  eta: float = 0.0
  guidance_scale: float = 1.0
  threshold: str = 'none'
  percentile: float = 99.5
  threshold_max: float = 0.0  # > 0: static's clip range / dynamic's cap on s (guidance)
  aug_level: float = 0.0
  blur_sigma: float = 0.0
  best_of: int = 1
  contrast_scale: float = 0.0
  spacing: str = ''          # the time grid (schedules.Schedule.timesteps); '': the sampler's
  noise_scale: float = 1.0   # x_T = noise_scale * N(0, I) (glide-text2im's upsample_temp)

  @classmethod
  def from_entry(cls, entry) -> 'Settings':
    return cls(**{k: entry[k] for k in SETTINGS if k in entry})

  def replace(self, **kw) -> 'Settings':
    unknown = sorted(set(kw) - set(SETTINGS))
    if unknown:
      raise errors.InputError(f'unknown sampler setting(s) {unknown}; known: {SETTINGS}')
    validation.check_settings(kw)
    return dataclasses.replace(self, **kw)


SETTINGS = tuple(f.name for f in dataclasses.fields(Settings))


def train_command(entry, stage_dir: str) -> str:
  return (f'python -m diffusion_jax.train --config={entry.config_file}:{entry.config_arg} '
          f'--workdir={stage_dir}')


def _entry_config(entry):
  """The stage config the cascade entry names, to compare with the saved one (None when it
  cannot be built here: the comparison is then skipped)."""
  try:
    return config_util.load_config(entry.config_file, entry.config_arg)
  except Exception as e:  # noqa: BLE001 - only a warning's reference is lost.
    log.warning('cannot build %s:%s (%s); the stage is sampled with its saved config, '
                'unchecked', entry.config_file, entry.config_arg, e)
    return None


def check_checkpoint(name: str, entry, stage_dir: str) -> str:
  """The stage's checkpoint directory, or a MissingCheckpointError with the train command."""
  ckpt_dir = os.path.join(stage_dir, 'checkpoints')
  steps = []
  if os.path.isdir(ckpt_dir):
    steps = [d for d in os.listdir(ckpt_dir) if d.isdigit()]
  if not steps:
    raise MissingCheckpointError(
        f'stage {name!r}: no checkpoint in {ckpt_dir}; train it first: '
        f'{train_command(entry, stage_dir)}')
  return ckpt_dir


class Stage:
  """One trained or pretrained stage: network, EMA (or raw) parameters, frozen encoder,
  tokenizer, conditioner, schedule and its jitted sampling program.

  A cascade root's stage is restored from its newest checkpoint; with `pretrained` the stage
  directory holds config.json + model.safetensors (`diffusion_jax.pretrained`).
  """

  def __init__(self, name: str, entry, root: str, progress: Progress, encoders: dict,
               *, pretrained: bool = False, trained=None):
    self.name = name
    self.entry = entry
    self.dir = os.path.join(root, entry.dir)
    if trained is not None:  # built by the caller (a whole-cascade pipeline directory)
      pass
    elif pretrained:
      trained = conditioning.load_pretrained_stage(self.dir)
    else:
      check_checkpoint(name, entry, self.dir)
      # What was trained is what samples: network, encoder, tokenizer and schedule come from
      # the config saved with the checkpoint; the cascade entry gives only sampler settings.
      trained = conditioning.restore_stage(
          self.dir, use_ema=bool(config_util.get(entry, 'use_ema', True)),
          expected=_entry_config(entry), name=name)
    config = self.config = trained.config
    self.step, self.model, self.params = trained.step, trained.model, trained.params
    self.mesh, self.rules = trained.mesh, trained.rules
    self.encoder = self._frozen_encoder(config, encoders)
    # The tokenizer the stage was trained with (ROOT/<stage>/tokenizer when built offline).
    self.tokenizer = self._tokenizer(config) if _reads_text(config) else None
    self.settings = Settings.from_entry(entry)
    self.schedule = schedules.from_config(config.diffusion)
    self.parameterization = config_util.get(config.diffusion, 'parameterization', 'eps')
    self.learned_variance = bool(config_util.get(config.diffusion, 'learned_variance', False))
    self.objective = config_util.get(config, 'objective', 'diffusion')
    if self.objective == 'diffusion':
      self.conditioner = self._conditioner(config)
      self.keys = self.conditioner.keys
    else:
      self.conditioner, self.keys = None, frozenset()
    self.progress = progress
    self.frozen = None if self.encoder is None else self.encoder.params
    self._sample_jit = jax.jit(self._sample_program, static_argnames=(
        'sampler', 'num_steps', 'spacing', 'threshold', 'percentile', 'threshold_max',
        'use_cfg', 'report', 'extra'))
    self._apply_jit = jax.jit(lambda params, x, t, cond: self.model.apply(
        {'params': params}, x, t, cond, train=False))
    self._invert_jit = jax.jit(self._invert_program, static_argnames=('num_steps', 'report'))
    self._cond_jit = jax.jit(self._cond_program, static_argnames=('aug_level', 'blur_sigma'))

  # Frozen encoder, tokenizer and conditioner (overridden by stages read from other layouts)

  def _frozen_encoder(self, config, encoders: dict):
    """Stages with identical encoder sections share one frozen encoder (T5/CLIP built once);
    directories are compared by content, so two copies of one T5 are one encoder."""
    te = config_util.get(config, 'text_encoder')
    key = None
    if te is not None and config_util.get(te, 'name'):
      items = dict(te.items())
      for k in ('path', 'tokenizer_path', 'image_path'):
        if items.get(k) and os.path.isdir(items[k]):
          items[k] = io_util.folder_fingerprint(items[k])
      key = repr(sorted(items.items()))
    if key is not None and key not in encoders:
      encoders[key] = conditioning.build_encoder(config, self.mesh, self.rules)
    return encoders.get(key)

  def _tokenizer(self, config):
    return conditioning.build_tokenizer(config, self.encoder, self.dir)

  def _conditioner(self, config):
    return conditioning.Conditioner(config, self.encoder)

  # Inputs --------------------------------------------------------------------------------------

  @property
  def shards(self) -> int:
    return parallel._mesh_axes_size(self.mesh, parallel.BATCH_AXES)

  def padded(self, n: int) -> int:
    return -(-n // self.shards) * self.shards

  def put(self, tree, n_pad: int):
    """Pads the leading axis to n_pad rows (repeating the last) and shards it over the batch."""
    def one(x):
      x = jnp.asarray(x)
      if x.shape[0] != n_pad:
        reps = jnp.repeat(x[-1:], n_pad - x.shape[0], axis=0)
        x = jnp.concatenate([x, reps], axis=0)
      return jax.device_put(x, parallel.batch_sharding(self.mesh, x.ndim))
    return jax.tree.map(one, tree)

  def tokenize(self, prompts):
    if self.tokenizer is None:
      raise ValueError(f'stage {self.name!r} has no tokenizer')
    return self.tokenizer(list(prompts))

  def context(self):
    return _Context(self.mesh, self.rules)

  # Conditioning ---------------------------------------------------------------------------------

  def _cond_program(self, frozen, inputs, rng, aug_level, blur_sigma):
    """cond for sampling from host inputs: text, low_res (+ fixed blur and augmentation), image
    embedding, inpainting; no dropout (guidance sets the drop flags itself)."""
    cond: dict[str, Any] = {}
    if 'text_ids' in inputs:
      cond.update(self.conditioner.text_cond(frozen, inputs['text_ids'], inputs['text_mask']))
    if 'low_res' in self.keys:
      cond.update(self._low_res_cond(inputs['low_res'], rng, aug_level, blur_sigma,
                                     inputs.get('aug_noise')))
    if 'image_embed' in self.keys:
      cond['image_embed'] = inputs['image_embed']
    for k in ('inpaint_image', 'inpaint_mask'):
      if k in self.keys:
        cond[k] = inputs[k]
    for flag in ('drop_text', 'drop_image'):
      if flag in self.keys:
        n = jax.tree.leaves(inputs)[0].shape[0]
        cond[flag] = inputs.get(flag, jnp.zeros((n,), bool))
    return cond

  @property
  def noise_aug_upsampled(self) -> bool:
    """Whether the low-res input is upsampled to the output size before its noise
    augmentation (DeepFloyd IF stage II) rather than noised at its own size."""
    return bool(config_util.get(self.config.model, 'low_res_upsampled', False))

  def aug_noise_shape(self, n: int) -> tuple[int, ...] | None:
    """The shape of the noise that augments n low-res inputs (None: the stage adds none)."""
    if 'low_res' not in self.keys or not config_util.get(self.config.diffusion, 'noise_aug',
                                                         False):
      return None
    h, w, c = self.output_shape
    if not self.noise_aug_upsampled:
      h = w = int(self.config.model.low_res_size)
    return (n, h, w, c)

  def _low_res_cond(self, low_res, rng, aug_level, blur_sigma, aug_noise):
    """cond['low_res'] (and 'aug_t') at a fixed augmentation level (0: clean); `aug_noise`,
    when given, is the augmentation's standard normal noise."""
    if not self.noise_aug_upsampled:
      low_res = resize(low_res, self.config.model.low_res_size)
    return self.conditioner.low_res_cond(low_res, rng, aug_level, blur_sigma, aug_noise)

  def build_cond(self, inputs: Mapping[str, Any], rng, aug_level: float | None = None,
                 blur_sigma: float | None = None):
    """Host inputs (already padded and sharded) -> the network's cond dict."""
    level = float(self.settings.aug_level if aug_level is None else aug_level)
    blur = float(self.settings.blur_sigma if blur_sigma is None else blur_sigma)
    with self.context():
      return self._cond_jit(self.frozen, dict(inputs), rng, aug_level=level, blur_sigma=blur)

  # Sampling ------------------------------------------------------------------------------------

  def denoise_fn(self, params, report: bool):
    model = self.model

    def denoise(x_t, t_B, cond):
      return model.apply({'params': params}, x_t, t_B, cond, train=False)
    return denoise

  def guided_denoise_fn(self, params, scale, use_cfg: bool = True):
    """The denoiser the sampler sees: classifier-free guidance over every drop flag the
    network has, cond and uncond rows in one batched forward pass."""
    denoise = self.denoise_fn(params, False)
    if not use_cfg:
      return denoise
    return guidance.classifier_free(denoise, scale, learned_variance=self.learned_variance,
                                    uncond_flags=self.uncond_flags())

  def _reporting(self, fn, report: bool):
    if not report:
      return fn
    progress = self.progress

    def wrapped(x_t, t_B, cond):
      jax.debug.callback(progress, t_B[0], ordered=False)
      return fn(x_t, t_B, cond)
    return wrapped

  def uncond_flags(self):
    return tuple(f for f in guidance.DEFAULT_UNCOND_FLAGS if f in self.keys)

  def _sample_program(self, params, cond, x_T, rng, scale, eta, extra_args, step_noise=None, *,
                      sampler, num_steps, spacing, threshold, percentile, threshold_max, use_cfg,
                      report, extra):
    denoise = self.guided_denoise_fn(params, scale, use_cfg)
    grad_fn = None
    if extra is not None:
      denoise, grad_fn = extra(self, denoise, extra_args)
    denoise = self._reporting(denoise, report)
    return samplers.sample(
        denoise, x_T, rng, schedule=self.schedule, sampler=sampler, num_steps=num_steps,
        spacing=spacing or None, eta=eta, cond=cond, parameterization=self.parameterization,
        learned_variance=self.learned_variance, threshold=threshold, percentile=percentile,
        threshold_max=threshold_max, grad_guidance_fn=grad_fn, guide_mean=grad_fn is not None and sampler == 'ddpm',
        step_noise=step_noise)

  def sample(self, cond, x_T, rng, settings: Settings | None = None, *,
             extra: Callable | None = None, extra_args=None, step_noise=None):
    """One jitted sampling loop. `extra(stage, denoise, extra_args) -> (denoise, grad_fn)`
    composes further guidance (inpainting, CLIP guidance); it must be a stable callable.
    `step_noise` [num_steps, *x_T.shape]: the steps' normal draws (replaying a reference's)."""
    s = settings or self.settings
    timesteps = self.schedule.num_timesteps
    num_steps = self.num_steps(s)
    if timesteps and num_steps > timesteps:
      raise errors.InputError(f'--config.stages.{self.name}.num_steps={s.num_steps}: must be at '
                              f'most the {timesteps} timesteps of the stage\'s schedule')
    use_cfg = bool(self.uncond_flags()) and float(s.guidance_scale) != 1.0
    report = self.progress.listener is not None
    self.progress.start(self.name, num_steps)
    with self.context():
      out = self._sample_jit(
          self.params, cond, x_T, rng, jnp.float32(s.guidance_scale), jnp.float32(s.eta),
          extra_args, step_noise, sampler=s.sampler, num_steps=num_steps, spacing=str(s.spacing),
          threshold=s.threshold, percentile=float(s.percentile),
          threshold_max=float(s.threshold_max), use_cfg=use_cfg,
          report=report, extra=extra)
      out = jax.block_until_ready(out)
    if report:
      jax.effects_barrier()
    return out

  def num_steps(self, s: Settings) -> int:
    """Model calls of a run: a glide-text2im respacing string ('100', 'fast27', 'ddim25')
    fixes them; otherwise `num_steps`."""
    spacing, steps = str(s.spacing), self.schedule.num_timesteps
    if steps and schedules.is_glide_spacing(spacing):
      try:
        return len(schedules.glide_timesteps(steps, spacing))
      except ValueError as e:
        raise errors.InputError(f'stage {self.name!r}: spacing={spacing}: {e}') from None
    return int(s.num_steps)

  def _invert_program(self, params, cond, x0, *, num_steps, report):
    denoise = self._reporting(self.denoise_fn(params, report), report)
    return samplers.ddim_invert(denoise, x0, schedule=self.schedule, num_steps=num_steps,
                                cond=cond, parameterization=self.parameterization,
                                learned_variance=self.learned_variance)

  def invert(self, cond, x0, num_steps: int):
    """DDIM inversion x_0 -> x_T with the conditional model (no guidance, no thresholding:
    neither is invertible)."""
    report = self.progress.listener is not None
    self.progress.start(self.name + ' (inversion)', int(num_steps))
    with self.context():
      out = jax.block_until_ready(self._invert_jit(self.params, cond, x0,
                                                   num_steps=int(num_steps), report=report))
    if report:
      jax.effects_barrier()
    return out

  @property
  def output_shape(self) -> tuple[int, ...]:
    """[H, W, C] of one x_t."""
    x, _, _ = _example_x(self.config.model)
    return tuple(x.shape[1:])

  def noise(self, rng, n_pad: int, scale: float = 1.0):
    """x_T of this stage's output shape (scale * N(0, I)), sharded over the batch."""
    shape = (n_pad,) + self.output_shape
    sharding = parallel.batch_sharding(self.mesh, len(shape))
    return jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32) * scale,
                   out_shardings=sharding)(rng)

  def initial_noise(self, rng, n: int, n_pad: int, settings: Settings, latents=None):
    """x_T: the caller's `latents` of this stage ([n, H, W, C]) when given, else noise."""
    if latents is None or self.name not in latents:
      return self.noise(rng, n_pad, float(settings.noise_scale))
    x_T = np.asarray(latents[self.name], np.float32)
    if x_T.shape != (n,) + self.output_shape:
      raise errors.InputError(f'latents[{self.name!r}] has shape {x_T.shape}; stage '
                              f'{self.name!r} takes x_T of shape {(n,) + self.output_shape}')
    return self.put(x_T, n_pad)

  def check_aug_noise(self, aug_noise, n: int, what: str) -> np.ndarray:
    """The caller's low-res augmentation noise as float32 of `aug_noise_shape(n)`."""
    shape = self.aug_noise_shape(n)
    if shape is None:
      raise errors.InputError(f'{what}: stage {self.name!r} does not noise-augment a low-res '
                              'input; give augmentation noise only for one that does')
    noise = np.asarray(aug_noise, np.float32)
    if noise.shape != shape:
      raise errors.InputError(f'{what} has shape {noise.shape}; stage {self.name!r} noises its '
                              f'low-res input with noise of shape {shape}')
    return noise

  # Comparing implementations -------------------------------------------------------------------

  def model_output(self, x_t, t, prompts=None, *, aug_noise=None, **cond):
    """The network's raw output (NHWC float32, no guidance) for `x_t` [N, H, W, C] at
    timesteps `t` [N] (or one for all): for a discrete schedule of T steps the reference's
    integer steps 0..T-1 (step k is our time (k + 1) / T), else times in [0, 1].

    `prompts` are tokenized as the stage's training (and the reference) does; `cond` gives
    the other inputs by name: `low_res` (an upsampler's input, NHWC in [-1, 1]),
    `inpaint_image` (NHWC in [-1, 1]), `inpaint_mask` (NHW or NHW1, 1 = known pixel) and
    `image_embed` (a decoder's CLIP image embedding, [N, D]); a prior's x_t is [N, D].
    A stage that noise-augments its low-res input at sampling does so here too, at its
    `aug_level`, with `aug_noise` (N(0, I) of `aug_noise_shape(N)`) when given.
    """
    if self.objective != 'diffusion':
      raise errors.InputError(f'stage {self.name!r} is not a diffusion network')
    x = np.asarray(x_t, np.float32)
    if x.ndim != 1 + len(self.output_shape) or x.shape[1:] != self.output_shape:
      raise errors.InputError(f'x_t has shape {x.shape}; stage {self.name!r} takes '
                              f'[N, {", ".join(map(str, self.output_shape))}]')
    n = x.shape[0]
    t_B = np.broadcast_to(np.asarray(t), (n,))
    steps = self.schedule.num_timesteps
    if steps:
      if not np.all(np.equal(np.mod(t_B, 1), 0)) or t_B.min() < 0 or t_B.max() >= steps:
        raise errors.InputError(f't must be integer steps in [0, {steps}), got {t_B.tolist()}')
      t_B = (t_B.astype(np.float64) + 1.0) / steps
    n_pad = self.padded(n)
    inputs: dict[str, Any] = {}
    if _TEXT_KEYS & self.keys:
      if prompts is None:
        raise errors.InputError(f'stage {self.name!r} reads a prompt: pass prompts')
      prompts = check_prompts(prompts)
      if len(prompts) == 1 and n > 1:
        prompts = prompts * n
      if len(prompts) != n:
        raise errors.InputError(f'{len(prompts)} prompts for {n} inputs')
      ids, mask = self.tokenize(prompts)
      inputs.update(self.put({'text_ids': ids, 'text_mask': mask}, n_pad))
    known = {'low_res', 'inpaint_image', 'inpaint_mask', 'image_embed'} & self.keys
    unknown = sorted(set(cond) - known)
    if unknown:
      raise errors.InputError(f'stage {self.name!r} takes no {unknown}; its inputs: '
                              f'{sorted(known) or "none beside x_t, t and prompts"}')
    missing = sorted(known - set(cond))
    if missing:
      raise errors.InputError(f'stage {self.name!r} needs {missing}')
    for key, value in cond.items():
      value = np.asarray(value, np.float32)
      if key == 'inpaint_mask' and value.ndim == 3:
        value = value[..., None]
      inputs[key] = self.put(value, n_pad)
    if aug_noise is not None:
      inputs['aug_noise'] = self.put(self.check_aug_noise(aug_noise, n, 'aug_noise'), n_pad)
    level = float(self.settings.aug_level) if 'low_res' in self.keys else 0.0
    cond_tree = self.build_cond(inputs, jax.random.PRNGKey(0), level, 0.0)
    with self.context():
      out = self._apply_jit(self.params, self.put(x, n_pad),
                            self.put(t_B.astype(np.float32), n_pad), cond_tree)
    return np.asarray(jax.device_get(out))[:n]


# The cond entries through which a network reads the prompt.
_TEXT_KEYS = frozenset({'text_ids', 'text_tokens', 'text_embed'})


def _reads_text(config) -> bool:
  if config_util.get(config, 'objective', 'diffusion') != 'diffusion':
    return True  # the noised CLIP's text tower
  _, _, cond = _example_x(config.model)
  return bool(_TEXT_KEYS & set(cond))


def _example_x(model_cfg):
  return models.example_inputs(model_cfg, 1)


class _Context:
  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules
    self._stack = []

  def __enter__(self):
    a, b = jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules)
    a.__enter__()
    b.__enter__()
    self._stack = [b, a]
    return self

  def __exit__(self, *exc):
    for cm in self._stack:
      cm.__exit__(*exc)


# Cascades ---------------------------------------------------------------------------------------

class Cascade:
  """Base of the three pipelines: stages loaded lazily by name from the cascade config."""

  def __init__(self, config, workdir: str, *, pretrained: bool = False):
    self.config = config
    self.root = workdir
    self.pretrained = pretrained
    self.progress = Progress()
    self._encoders: dict = {}
    self._stages: dict[str, Stage] = {}
    self.timings: dict[str, float] = {}
    self.order = tuple(config.order)
    # Fail fast, with every missing stage named, before anything is built.
    for name in self.order if not pretrained else ():
      check_checkpoint(name, self._entry(name), os.path.join(workdir, self._entry(name).dir))

  @property
  def stages(self) -> 'StageMap':
    """name -> Stage for every stage of the cascade (its order, then the extra ones), each
    loaded when first asked for."""
    return StageMap(self)

  def _entry(self, name: str):
    if name not in self.config.stages:
      raise UnknownStageError(f'unknown stage {name!r} in the {self.config.family} cascade; '
                              f'known: {", ".join(self.config.stages.keys())}')
    return self.config.stages[name]

  def stage(self, name: str) -> Stage:
    if name not in self._stages:
      self._stages[name] = Stage(name, self._entry(name), self.root, self.progress,
                                 self._encoders, pretrained=self.pretrained)
    return self._stages[name]

  def settings(self, name: str, overrides: Mapping[str, Any]) -> Settings:
    """A stage's settings with overrides: `key=value` for every stage, `<stage>={...}` for one."""
    s = self.stage(name).settings
    common = {k: v for k, v in overrides.items() if k in SETTINGS}
    s = s.replace(**common)
    per = overrides.get(name)
    if per:
      s = s.replace(**dict(per))
    return s

  def check_overrides(self, overrides: Mapping[str, Any], allowed=()):
    known = set(SETTINGS) | set(self.config.stages.keys()) | set(allowed)
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise errors.InputError(f'unknown override(s) {unknown}; pass sampler settings '
                              f'{SETTINGS} or a stage name with a dict of them')

  def timed(self, name: str, fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
    return out

  def text_inputs(self, stage: Stage, prompts, n_pad: int):
    if not _TEXT_KEYS & stage.keys:
      return {}
    ids, mask = stage.tokenize(prompts)
    return stage.put({'text_ids': ids, 'text_mask': mask}, n_pad)

  def contrast_args(self, stage: Stage, contrasts, n: int, n_pad: int, rng, s: Settings):
    """`_contrast_extra`'s arguments for a stage's prompt pairs (`contrasts`: one list of
    (positive, negative) prompts per prompt), or None when no prompt has a pair or the
    stage's contrast_scale is 0."""
    if contrasts is None or not float(s.contrast_scale):
      return None
    contrasts = [list(pairs) for pairs in contrasts]
    if len(contrasts) != n:
      raise ValueError(f'contrasts: {len(contrasts)} lists of prompt pairs for {n} prompts; '
                       'pass one list per prompt ([] where it has none)')
    if not _TEXT_KEYS & stage.keys or 'low_res' in stage.keys:
      raise ValueError(f'contrasts guide a text-to-image stage; {stage.name!r} is not one')
    k = max(len(pairs) for pairs in contrasts)
    if k == 0:
      return None
    pad = next(str(pairs[0][0]) for pairs in contrasts if pairs)  # padding rows: weight 0
    texts, weights_BK = [], np.zeros((n_pad, k), np.float32)
    for b in range(n_pad):
      pairs = contrasts[b] if b < n else []
      for j in range(k):
        if j < len(pairs):
          if len(pairs[j]) != 2:
            raise ValueError(f'contrasts[{b}][{j}]: {pairs[j]!r} is not a (positive, '
                             'negative) pair of prompts')
          texts += [str(pairs[j][0]), str(pairs[j][1])]
          weights_BK[b, j] = 1.0
        else:
          texts += [pad, pad]
    pair_cond = stage.build_cond(self.text_inputs(stage, texts, n_pad * 2 * k), rng,
                                 s.aug_level, s.blur_sigma)
    return (stage.params, pair_cond, stage.put(weights_BK, n_pad),
            jnp.float32(s.contrast_scale))

  def image_chain(self, names, prompts, rng, overrides, *, first_low_res=None,
                  first_inputs=None, collect=None, contrasts=None, latents=None,
                  aug_noise=None):
    """Runs image stages in order; each output (resized, blurred by the stage's blur_sigma
    and noise-augmented at its aug_level) is the next stage's low_res. `contrasts` (one
    list of (positive, negative) prompt pairs per prompt) guide the first stage at its
    contrast_scale (`guidance.prompt_contrast`). `latents`: {stage: x_T} for the stages
    whose initial noise the caller gives; `aug_noise`: {stage: N(0, I)} for the stages whose
    low-res augmentation noise the caller gives (`Stage.aug_noise_shape`). Returns float
    images [N, H, W, 3] in [-1, 1]."""
    n = len(prompts)
    x = first_low_res
    for i, name in enumerate(names):
      stage = self.stage(name)
      s = self.settings(name, overrides)
      n_pad = stage.padded(n)
      rng, k_cond, k_noise, k_run = jax.random.split(rng, 4)
      inputs = dict(self.text_inputs(stage, prompts, n_pad))
      if i == 0 and first_inputs:
        inputs.update(stage.put(first_inputs, n_pad))
      if 'low_res' in stage.keys:
        if x is None:
          raise ValueError(f'stage {name!r} needs a low-resolution input')
        inputs['low_res'] = stage.put(x, n_pad)
      if aug_noise is not None and name in aug_noise:
        inputs['aug_noise'] = stage.put(
            stage.check_aug_noise(aug_noise[name], n, f'aug_noise[{name!r}]'), n_pad)
      cond = stage.build_cond(inputs, k_cond, s.aug_level, s.blur_sigma)
      x_T = stage.initial_noise(k_noise, n, n_pad, s, latents)
      contrast = self.contrast_args(stage, contrasts, n, n_pad, k_cond, s) if i == 0 else None
      out = self.timed(name, stage.sample, cond, x_T, k_run, s,
                       extra=None if contrast is None else _contrast_extra,
                       extra_args=contrast)
      x = out[:n]
      if collect is not None:
        collect[name] = x
    return x


def _contrast_extra(stage: Stage, denoise, args):
  """Contrastive prompt guidance (`Cascade.contrast_args`) around the guided denoiser."""
  params, pair_cond, weights_BK, scale = args
  return guidance.prompt_contrast(denoise, stage.denoise_fn(params, False), pair_cond,
                                  weights_BK, scale,
                                  learned_variance=stage.learned_variance), None


def check_prompts(prompts) -> list[str]:
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = [str(p) for p in prompts]
  if not prompts:
    raise ValueError('no prompts given')
  return prompts


def uint8_result(x, collect, return_stages: bool):
  images = io_util.to_uint8(jax.device_get(x))
  if not return_stages:
    return images
  return images, {k: io_util.to_uint8(jax.device_get(v)) for k, v in collect.items()}


class StageMap(collections.abc.Mapping):
  """A cascade's stages by name, in order, each built on first access."""

  def __init__(self, cascade: Cascade):
    self._cascade = cascade
    config = cascade.config
    self._names = tuple(config.order) + tuple(n for n in config_util.get(config, 'extra', ())
                                              if n not in config.order)

  def __getitem__(self, name: str) -> Stage:
    if name not in self._names:
      raise KeyError(f'no stage {name!r}; the cascade has {", ".join(self._names)}')
    return self._cascade.stage(name)

  def __iter__(self):
    return iter(self._names)

  def __len__(self):
    return len(self._names)


def check_latents(latents, stage_names, what: str = 'latents', value: str = 'x_T') -> None:
  """`latents` (or another per-stage argument, `what`) is None or a dict naming stages of
  the run."""
  if latents is None:
    return
  if not isinstance(latents, Mapping):
    raise errors.InputError(f'{what}: pass a dict {{stage name: {value}}}')
  unknown = sorted(set(latents) - set(stage_names))
  if unknown:
    raise errors.InputError(f'{what} names {unknown}, not stages this call runs: '
                            f'{", ".join(stage_names)}')

"""Noise schedules as functions of continuous time t in [0, 1].

Every schedule is described by its log signal-to-noise ratio `logsnr(t)`, decreasing from
`logsnr_max` at t = 0 (clean data) to `logsnr_min` at t = 1 (pure noise); the variance-
preserving process then has alpha^2 = sigmoid(logsnr) and sigma^2 = sigmoid(-logsnr).
Clipping log-SNR at both ends keeps alpha and sigma strictly positive, so no sampler or loss
divides by zero.

Discrete schedules (DDPM's linear betas, improved DDPM's `squaredcos_cap_v2`) are the special
case whose training times live on the grid t = i / T, i = 1..T; `logsnr` interpolates
linearly between grid points and `sample_t` draws grid points only.

Schedules are frozen dataclasses of Python scalars and tuples, so they are hashable and can be
static arguments of `jax.jit`.

Released discrete models need exact numbers at their integer timesteps (glide-text2im's step k
is our t = (k + 1) / T): the default clipping to [-15, 15] moves improved DDPM's cosine at both
ends (log-SNR -19.8 at its last step, +inf at the clean end), so converted configs pass
`logsnr_min=-WIDE_LOGSNR, logsnr_max=WIDE_LOGSNR`, which clip no released step and keep every
float32 quantity finite (sigmoid(-40) = 4e-18, exp(40) = 2e17).

Sampling grids (`Schedule.timesteps`): 'time' and 'logsnr' for any schedule; discrete schedules
also take the released models' integer-timestep spacings (see `integer_timesteps`).
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

LOGSNR_MIN = -15.0
LOGSNR_MAX = 15.0
LOGSNR_SPACING_CLIP = 10.0
# log-SNR bound that clips no step of a released discrete schedule, float32-safe.
WIDE_LOGSNR = 40.0
# Spacings that pick integer timesteps of a discrete schedule (besides glide-text2im's strings).
DIFFUSERS_SPACINGS = ('leading', 'trailing', 'linspace')
# Schedule names (get_schedule); the discrete ones have a grid of num_timesteps (default 1000).
SCHEDULES = ('cosine', 'shifted_cosine', 'linear_logsnr', 'linear', 'scaled_linear',
             'squaredcos_cap_v2')
DISCRETE_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
DEFAULT_NUM_TIMESTEPS = 1000


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Base class: subclasses implement `logsnr(t)`."""

  def logsnr(self, t):
    raise NotImplementedError

  @property
  def num_timesteps(self) -> int | None:
    """T for discrete schedules, None for continuous ones."""
    return None

  def alpha_sigma(self, t):
    """(alpha_t, sigma_t) with alpha^2 + sigma^2 = 1, float32."""
    logsnr = self.logsnr(t)
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))

  def sample_t(self, rng, shape):
    """Training times: uniform on (0, 1], or uniform on the grid {1/T, ..., 1}."""
    if self.num_timesteps is None:
      # Avoid t == 0 exactly: there the target of eps-prediction is pure noise with no signal.
      return jax.random.uniform(rng, shape, minval=1e-5, maxval=1.0)
    steps = jax.random.randint(rng, shape, 1, self.num_timesteps + 1)
    return steps.astype(jnp.float32) / self.num_timesteps

  def timesteps(self, num_steps: int | None, spacing: str = 'time') -> np.ndarray:
    """Sampling grid of `num_steps + 1` decreasing times from 1 to 0 (respacing).

    spacing='time': evenly spaced in t ("trailing" spacing: the chain starts at t = 1 and
      its last model call is at t = 1 / num_steps).
    spacing='logsnr': model calls evenly spaced in log-SNR (the spacing DPM-Solver
      recommends: equal steps in lambda keep multistep solvers stable), then t = 0.
    Discrete schedules snap the grid to multiples of 1 / T (distinct points), so
    num_steps == T visits every step of the original chain. They also take the integer
    spacings of `integer_timesteps` (glide-text2im's respacing strings, which fix the step
    count themselves, so num_steps may be None; diffusers' 'leading' / 'leading+N' /
    'trailing' / 'linspace'): the chain calls the model at t = (k + 1) / T for the chosen
    steps k, highest first, then ends at t = 0.
    """
    T = self.num_timesteps
    if spacing not in ('time', 'logsnr'):
      if not is_integer_spacing(spacing):
        raise ValueError(f"unknown spacing {spacing!r}; choose 'time', 'logsnr', "
                         "'leading', 'leading+N', 'trailing', 'linspace', 'dpm_linspace', "
                         "'dpm_leading[+N]' or a glide-text2im respacing ('100', "
                         "'10,10,3,2,2', 'fast27', 'ddim25')")
      if T is None:
        raise ValueError(f'spacing {spacing!r} picks integer timesteps of a discrete '
                         f"schedule; {type(self).__name__} is continuous: use 'time' or 'logsnr'")
      steps = integer_timesteps(T, num_steps, spacing)
      return np.concatenate([(steps[::-1] + 1) / T, [0.0]])
    if num_steps is None or num_steps < 1:
      raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    if T is not None and num_steps > T:
      raise ValueError(f'num_steps={num_steps} exceeds the schedule\'s {T} timesteps')
    if spacing == 'time':
      times = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)
    else:
      # Invert the decreasing log-SNR on a dense grid. The model points span log-SNR
      # [-LOGSNR_SPACING_CLIP, +LOGSNR_SPACING_CLIP] (within the schedule's range): steps
      # spent deeper in pure noise or in already-clean data change nothing.
      dense_t = np.linspace(0.0, 1.0, 100_001) if T is None else np.arange(1, T + 1) / T
      with jax.ensure_compile_time_eval():  # timesteps() is also called while tracing.
        dense_l = np.asarray(self.logsnr(jnp.asarray(dense_t, jnp.float32)), np.float64)
      lo = max(dense_l[-1], -LOGSNR_SPACING_CLIP)
      hi = min(dense_l[0], LOGSNR_SPACING_CLIP)
      times = np.interp(np.linspace(lo, hi, num_steps), dense_l[::-1], dense_t[::-1])
      times[0] = 1.0
      times = np.concatenate([times, [0.0]])
    if T is None:
      return times
    steps = np.round(times[:-1] * T).astype(np.int64)
    # Snap to distinct grid points, keeping exactly num_steps model calls.
    for k in range(1, num_steps):
      steps[k] = min(steps[k], steps[k - 1] - 1)
    for k in range(num_steps - 1, -1, -1):
      steps[k] = max(steps[k], num_steps - k)
    return np.concatenate([steps / T, [0.0]])


_GLIDE_SPACING = re.compile(r'\d+(,\d+)*|fast27|ddim\d+')
_LEADING = re.compile(r'leading(\+\d+)?')
# diffusers' DPMSolverMultistepScheduler takes n + 1 'linspace' or 'leading' points and drops
# the lowest (its 'trailing' is the usual one): 'dpm_linspace', 'dpm_leading', 'dpm_leading+N'.
_DPM = re.compile(r'dpm_(linspace|leading(\+\d+)?)')


def is_glide_spacing(spacing) -> bool:
  """Whether `spacing` is a glide-text2im respacing string (it fixes the number of steps)."""
  return isinstance(spacing, str) and bool(_GLIDE_SPACING.fullmatch(spacing))


def is_integer_spacing(spacing) -> bool:
  """Whether `spacing` is a glide-text2im respacing string or a diffusers spacing."""
  return isinstance(spacing, str) and bool(
      _GLIDE_SPACING.fullmatch(spacing) or _LEADING.fullmatch(spacing) or
      _DPM.fullmatch(spacing) or spacing in DIFFUSERS_SPACINGS)


def glide_timesteps(num_timesteps: int, respacing: str) -> np.ndarray:
  """The 0-based integer timesteps, ascending, that a glide-text2im respacing string keeps.

  'a,b,c': the T steps cut into len equal sections (the first T % len one step longer), each
  strided to its count from its first to its last step (rounded half to even, as Python's
  round); 'ddimN': the smallest integer stride giving exactly N steps from 0; 'fast27':
  '10,10,3,2,2' with its noisiest step T - 1 moved to T - 3.
  """
  T = int(num_timesteps)
  if respacing.startswith('ddim'):
    count = int(respacing[len('ddim'):])
    for stride in range(1, T):
      if -(-T // stride) == count:  # len(range(0, T, stride))
        return np.arange(0, T, stride, dtype=np.int64)
    raise ValueError(f'respacing {respacing!r}: no integer stride gives exactly {count} of '
                     f'{T} steps')
  if respacing == 'fast27':
    steps = set(glide_timesteps(T, '10,10,3,2,2').tolist())
    steps.discard(T - 1)  # the noisiest step gives DDIM artifacts (glide-text2im's note)
    steps.add(T - 3)
    return np.array(sorted(steps), np.int64)
  counts = [int(c) for c in respacing.split(',')]
  sizes = [T // len(counts) + (1 if i < T % len(counts) else 0) for i in range(len(counts))]
  steps, start = set(), 0
  for size, count in zip(sizes, counts):
    if count > size:
      raise ValueError(f'respacing {respacing!r}: a section of {size} steps cannot hold '
                       f'{count}')
    stride = (size - 1) / (count - 1) if count > 1 else 1.0
    # A running sum of the stride, rounded half to even: the reference's exact positions.
    offsets = np.concatenate([[0.0], np.cumsum(np.full(max(count - 1, 0), stride))])
    steps.update(int(start + o) for o in np.round(offsets[:count]))
    start += size
  return np.array(sorted(steps), np.int64)


def diffusers_timesteps(num_timesteps: int, num_steps: int, spacing: str,
                        steps_offset: int = 0, *, drop_lowest_of_more: bool = False
                        ) -> np.ndarray:
  """The 0-based integer timesteps, ascending, of diffusers' `timestep_spacing`.

  'linspace': round(linspace(0, T - 1, n)); 'leading': multiples of T // n plus
  `steps_offset` (the config's; Stable Diffusion's is 1); 'trailing': round(T - i T / n) - 1,
  i < n, so the chain starts at the last step T - 1. (diffusers' DDIMScheduler steps from k to
  k - T // n, which is the next chosen step for 'leading' only, and to alphas_cumprod[0]
  after the last one unless set_alpha_to_one; its DDPMScheduler, like our chain, goes to the
  next chosen step and then to clean data.) `drop_lowest_of_more`: 'linspace' and 'leading'
  over n + 1 points, the lowest dropped (DPMSolverMultistepScheduler's grids).
  """
  T, n = int(num_timesteps), int(num_steps)
  if drop_lowest_of_more and spacing in ('linspace', 'leading'):
    steps = diffusers_timesteps(T, n + 1, spacing, steps_offset)[1:]
  elif spacing == 'linspace':
    steps = np.round(np.linspace(0, T - 1, n)).astype(np.int64)
  elif spacing == 'leading':
    steps = np.arange(n, dtype=np.int64) * (T // n) + int(steps_offset)
  elif spacing == 'trailing':
    # np.arange's own float steps (ties at .5 fall as diffusers' do); its n + 1-th point, which
    # float error sometimes adds, would be step -1.
    steps = np.round(np.arange(T, 0, -T / n))[:n].astype(np.int64) - 1
  else:
    raise ValueError(f'unknown diffusers spacing {spacing!r}; choose one of {DIFFUSERS_SPACINGS}')
  if steps.min() < 0 or steps.max() >= T:
    raise ValueError(f'spacing {spacing!r} with {n} steps and steps_offset {steps_offset} '
                     f'leaves the {T} timesteps')
  return np.sort(steps)


def integer_timesteps(num_timesteps: int, num_steps: int | None, spacing: str) -> np.ndarray:
  """The 0-based integer timesteps, ascending, an integer spacing picks from T steps.

  glide-text2im's respacing strings ('100', '10,10,3,2,2', 'fast27', 'ddim25') fix the count
  themselves: `num_steps` must be None or equal it. diffusers' spacings ('leading',
  'leading+N' for steps_offset N, 'trailing', 'linspace') take 1 <= num_steps <= T.
  """
  T = int(num_timesteps)
  if _GLIDE_SPACING.fullmatch(spacing):
    steps = glide_timesteps(T, spacing)
    if num_steps is not None and int(num_steps) != len(steps):
      raise ValueError(f'spacing {spacing!r} gives {len(steps)} steps of {T}, but '
                       f'num_steps={num_steps}: pass num_steps={len(steps)} or None')
    if not len(steps):
      raise ValueError(f'spacing {spacing!r} keeps no step')
    return steps
  if num_steps is None or not 1 <= int(num_steps) <= T:
    raise ValueError(f'spacing {spacing!r} needs 1 <= num_steps <= {T}, got {num_steps}')
  dpm = _DPM.fullmatch(spacing)
  if dpm:
    spacing = dpm.group(1)
  leading = _LEADING.fullmatch(spacing)
  if leading:
    offset = int(leading.group(1) or 0)
    return diffusers_timesteps(T, num_steps, 'leading', offset, drop_lowest_of_more=bool(dpm))
  return diffusers_timesteps(T, num_steps, spacing, drop_lowest_of_more=bool(dpm))


def _clip_logsnr(logsnr, logsnr_min, logsnr_max):
  return jnp.clip(logsnr, logsnr_min, logsnr_max)


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
  """Continuous cosine schedule (Nichol & Dhariwal; Imagen), alpha = cos(pi/2 * u).

  logsnr(t) = -2 log tan(a t + b), with a, b chosen so that t = 0 and t = 1 land exactly on
  `logsnr_max` and `logsnr_min` (the clipping of VDM / simple diffusion). `shift` > 1 lowers
  the log-SNR by 2 log(shift) at every t, as simple diffusion's shifted cosine for resolution
  `shift` times the base one.
  """
  logsnr_min: float = LOGSNR_MIN
  logsnr_max: float = LOGSNR_MAX
  shift: float = 1.0

  def logsnr(self, t):
    t = jnp.asarray(t, jnp.float32)
    shift_term = 2.0 * math.log(self.shift)
    lo, hi = self.logsnr_min + shift_term, self.logsnr_max + shift_term
    b = math.atan(math.exp(-0.5 * hi))
    a = math.atan(math.exp(-0.5 * lo)) - b
    logsnr = -2.0 * jnp.log(jnp.tan(a * t + b)) - shift_term
    return _clip_logsnr(logsnr, self.logsnr_min, self.logsnr_max)


@dataclasses.dataclass(frozen=True)
class LinearLogSNRSchedule(Schedule):
  """log-SNR linear in t, occasionally useful for ablations and tests."""
  logsnr_min: float = LOGSNR_MIN
  logsnr_max: float = LOGSNR_MAX

  def logsnr(self, t):
    t = jnp.asarray(t, jnp.float32)
    return self.logsnr_max + (self.logsnr_min - self.logsnr_max) * t


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule(Schedule):
  """A DDPM-style schedule given by its betas (index i = 1..T)."""
  betas: tuple[float, ...] = ()
  logsnr_min: float = LOGSNR_MIN
  logsnr_max: float = LOGSNR_MAX

  @property
  def num_timesteps(self) -> int:
    return len(self.betas)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(1.0 - np.asarray(self.betas, np.float64))

  def logsnr_grid(self) -> np.ndarray:
    """log-SNR at i = 0..T (i = 0 is clean data: clipped to logsnr_max)."""
    abar = self.alphas_cumprod
    grid = np.log(abar) - np.log1p(-abar)
    grid = np.concatenate([[np.inf], grid])
    return np.clip(grid, self.logsnr_min, self.logsnr_max)

  def logsnr(self, t):
    t = jnp.asarray(t, jnp.float32)
    grid = jnp.asarray(self.logsnr_grid(), jnp.float32)
    u = jnp.clip(t, 0.0, 1.0) * self.num_timesteps
    # (k + 1) / T in float32 times T can land just below k + 1: snap it onto the grid point.
    u = jnp.where(jnp.abs(u - jnp.round(u)) < 1e-3, jnp.round(u), u)
    lo = jnp.clip(jnp.floor(u), 0, self.num_timesteps - 1).astype(jnp.int32)
    frac = u - lo
    return grid[lo] * (1.0 - frac) + grid[lo + 1] * frac


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
  """DDPM (Ho et al. 2020): betas linear from 1e-4 to 0.02, rescaled for T != 1000."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012):
  """Latent diffusion's (Stable Diffusion's) betas: sqrt(beta) linear from sqrt(beta_start)."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64)**2


def squaredcos_cap_v2_betas(num_timesteps: int = 1000, max_beta: float = 0.999, s: float = 0.008):
  """Improved DDPM's cosine schedule (GLIDE, unCLIP): alpha_bar(t) = cos((t+s)/(1+s) pi/2)^2."""
  def alpha_bar(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([
      min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
      for i in range(num_timesteps)
  ], dtype=np.float64)


def get_schedule(name: str, **kw) -> Schedule:
  """Schedules by name.

  - 'cosine': continuous cosine log-SNR (Imagen). kw: logsnr_min, logsnr_max.
  - 'shifted_cosine': cosine shifted by 2 log(shift) (higher resolutions). kw: shift.
  - 'linear_logsnr': log-SNR linear in t.
  - 'linear': discrete DDPM betas 1e-4..0.02. kw: num_timesteps (1000), beta_start, beta_end.
  - 'scaled_linear': discrete, sqrt(beta) linear (Stable Diffusion). kw: as 'linear'
    (default 0.00085..0.012, not rescaled with T).
  - 'squaredcos_cap_v2': discrete improved-DDPM cosine (GLIDE). kw: num_timesteps (1000).
  """
  clip_kw = {k: float(kw.pop(k)) for k in ('logsnr_min', 'logsnr_max') if k in kw}
  if name in DISCRETE_SCHEDULES and int(kw.get('num_timesteps', 1)) < 1:
    raise ValueError(f'schedule {name!r} needs num_timesteps >= 1, got {kw["num_timesteps"]}')
  if name == 'cosine':
    sched = CosineSchedule(**clip_kw)
  elif name == 'shifted_cosine':
    shift = float(kw.pop('shift', 1.0))
    if shift <= 0:
      raise ValueError(f'shifted_cosine needs shift > 0, got {shift}')
    sched = CosineSchedule(shift=shift, **clip_kw)
  elif name == 'linear_logsnr':
    sched = LinearLogSNRSchedule(**clip_kw)
  elif name == 'linear':
    betas = linear_betas(int(kw.pop('num_timesteps', DEFAULT_NUM_TIMESTEPS)),
                         float(kw.pop('beta_start', 1e-4)),
                         float(kw.pop('beta_end', 0.02)))
    sched = DiscreteSchedule(betas=tuple(float(b) for b in betas), **clip_kw)
  elif name == 'scaled_linear':
    betas = scaled_linear_betas(int(kw.pop('num_timesteps', DEFAULT_NUM_TIMESTEPS)),
                                float(kw.pop('beta_start', 0.00085)),
                                float(kw.pop('beta_end', 0.012)))
    sched = DiscreteSchedule(betas=tuple(float(b) for b in betas), **clip_kw)
  elif name == 'squaredcos_cap_v2':
    betas = squaredcos_cap_v2_betas(int(kw.pop('num_timesteps', DEFAULT_NUM_TIMESTEPS)))
    sched = DiscreteSchedule(betas=tuple(float(b) for b in betas), **clip_kw)
  else:
    raise ValueError(f'unknown schedule {name!r}; choose one of {", ".join(SCHEDULES)}')
  if kw:
    raise ValueError(f'schedule {name!r} got unknown arguments {sorted(kw)}')
  return sched


_SCHEDULE_FIELDS = ('num_timesteps', 'shift', 'logsnr_min', 'logsnr_max', 'beta_start', 'beta_end')


def from_config(diffusion_cfg) -> Schedule:
  """The schedule named by a config's `diffusion` section (fields it has are passed on).
  `num_timesteps` 0 (a continuous-time config's) gives a discrete schedule its default 1000."""
  kw = {k: diffusion_cfg[k] for k in _SCHEDULE_FIELDS
        if k in diffusion_cfg and diffusion_cfg[k] is not None}
  name = diffusion_cfg['schedule']
  if name not in DISCRETE_SCHEDULES or not kw.get('num_timesteps'):
    kw.pop('num_timesteps', None)  # continuous: the field counts the VLB's steps only
  if name != 'shifted_cosine':
    kw.pop('shift', None)
  if name not in ('linear', 'scaled_linear'):
    kw.pop('beta_start', None)
    kw.pop('beta_end', None)
  return get_schedule(name, **kw)

"""Checks of a config as it is loaded, before anything is built or compiled.

    check_stage_config(config, num_devices=jax.device_count())   # a stage that trains
    check_cascade_config(config)                                  # stage=cascade: sampling

Each raises `errors.InputError` whose one-line message names the field as the command line
spells it, the bad value, what is allowed and how to fix it, e.g.

    --config.input.image_size=17: must be a multiple of 2 (the network downsamples once);
    e.g. 16 or 18

Every field a user sets has a rule (a type and a range, or a set of choices: `STAGE_RULES`,
`SETTING_RULES`); the checks after them relate fields to each other (sizes the network
can halve, the low-res input, crops, attention heads, text lengths, the schedule, the
registered dataset, the mesh and the batch against the devices). The command lines run them
right after their config flag is parsed (`cli`), `pipelines.load` and the trainer on entry.

This module imports neither jax nor TensorFlow. The names below are those the library's
modules define (the test of this module checks that they agree); they are copied here so
that checking a config builds nothing.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, Mapping

from diffusion_jax import errors

# The library's names, as diffusion/, models/, data/, encoders.py, train/step.py define them.
SCHEDULES = ('cosine', 'shifted_cosine', 'linear_logsnr', 'linear', 'scaled_linear',
             'squaredcos_cap_v2')
DISCRETE_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
DEFAULT_NUM_TIMESTEPS = 1000
SAMPLERS = ('ddpm', 'ddim', 'dpmpp_2m')
THRESHOLDS = ('none', 'static', 'dynamic')
PARAMETERIZATIONS = ('eps', 'x0', 'v')
LOSS_WEIGHTINGS = ('none', 'min_snr', 'p2')
MODELS = ('unet', 'efficient_unet', 'prior', 'noised_clip', 'clip', 'dit', 'autoencoder')
IMAGE_MODELS = ('unet', 'efficient_unet')
ENCODER_PRESETS = {
    't5': ('tiny', 'small', 't5_v1_1_small', 't5_v1_1_base', 't5_v1_1_large', 't5_v1_1_xl',
           'xxl'),
    'clip': ('tiny', 'small', 'vit_l14', 'vit_h14', 'vit_h16_256'),
}
DTYPES = ('float32', 'bfloat16')
REMAT_POLICIES = ('none', 'full', 'nothing_saveable', 'everything_saveable', 'dots_saveable',
                  'dots_with_no_batch_dims_saveable', 'checkpoint_dots',
                  'checkpoint_dots_with_no_batch_dims')
DEGRADATIONS = ('none', 'blur', 'bsr')
OBJECTIVES = ('diffusion', 'noised_clip', 'clip', 'autoencoder')
PARALLELISMS = ('gspmd', 'shard_map')
OPTIMIZERS = ('adamw', 'adafactor')
LR_DECAYS = ('constant', 'cosine')
MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


# Rules: what one field may hold -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """A field's type ('int', 'number', 'bool', 'str', 'choice') and range or choices.
  `low`/`high` are inclusive bounds, `above`/`below` exclusive ones; `optional`: unset (None)
  is allowed; `note`: what the field is."""
  kind: str
  low: float | None = None
  high: float | None = None
  above: float | None = None
  below: float | None = None
  choices: tuple[str, ...] = ()
  optional: bool = False
  note: str = ''

  def allowed(self) -> str:
    """What the field may hold, in words."""
    if self.kind == 'bool':
      return 'true or false'
    if self.kind == 'str':
      return 'a string'
    if self.kind == 'choice':
      return f'one of {", ".join(self.choices)}'
    noun = 'an integer' if self.kind == 'int' else 'a number'
    lo, lo_open = (self.low, False) if self.low is not None else (self.above, True)
    hi, hi_open = (self.high, False) if self.high is not None else (self.below, True)
    if lo is not None and hi is not None:
      return f'{noun} in {"(" if lo_open else "["}{lo:g}, {hi:g}{")" if hi_open else "]"}'
    if lo is not None:
      return f'{noun} {">" if lo_open else ">="} {lo:g}'
    if hi is not None:
      return f'{noun} {"<" if hi_open else "<="} {hi:g}'
    return noun

  def accepts(self, value) -> bool:
    if value is None:
      return self.optional
    if self.kind == 'bool':
      return isinstance(value, bool)
    if self.kind in ('str', 'choice'):
      return isinstance(value, str) and (self.kind == 'str' or value in self.choices)
    if isinstance(value, bool) or not isinstance(
        value, numbers.Integral if self.kind == 'int' else numbers.Real):
      return False
    return math.isfinite(value) and not (
        (self.low is not None and value < self.low) or
        (self.high is not None and value > self.high) or
        (self.above is not None and value <= self.above) or
        (self.below is not None and value >= self.below))


def integer(low=None, high=None, *, optional=False, note='') -> Rule:
  return Rule('int', low=low, high=high, optional=optional, note=note)


def number(low=None, high=None, *, above=None, below=None, note='') -> Rule:
  return Rule('number', low=low, high=high, above=above, below=below, note=note)


def choice(names, *, optional=False, note='') -> Rule:
  return Rule('choice', choices=tuple(names), optional=optional, note=note)


def flag(note='') -> Rule:
  return Rule('bool', note=note)


def text(*, optional=False, note='') -> Rule:
  return Rule('str', optional=optional, note=note)


# How a stage samples: the stage config's `sampler` section and a cascade's stage entries.
SETTING_RULES = (
    ('num_steps', integer(1, note='sampler steps')),
    ('eta', number(0, note='DDIM eta; 1: ancestral')),
    ('guidance_scale', number(0, note='classifier-free guidance; 1: none, 0: unconditional')),
    ('threshold', choice(THRESHOLDS)),
    ('percentile', number(50, 100, note='dynamic thresholding, in percent: 99.5, not 0.995')),
    ('threshold_max', number(0, note='static: the clip range (0: 1); dynamic: the cap on s '
                                     '(>= 1; 0: none)')),
    ('aug_level', number(0, 1, note="noise-augmentation level of an SR stage's input")),
    ('blur_sigma', number(0)),
    ('best_of', integer(1)),
    ('contrast_scale', number(0)),
    ('spacing', text(note="the time grid: '' (the sampler's), time, logsnr, leading, trailing, "
                          "linspace, or glide-text2im's respacing such as 100, fast27, ddim25")),
    ('noise_scale', number(above=0, note='x_T = noise_scale * N(0, I)')),
)

STAGE_RULES = (
    ('seed', integer(0, note='random seed')),
    ('total_steps', integer(1, note='train steps')),
    ('ckpt_steps', integer(1, note='steps between checkpoints')),
    ('log_steps', integer(1, note='steps between logged metrics')),
    ('sample_steps', integer(0, note='steps between sample grids; 0: never')),
    ('keep_checkpoints', integer(1)),
    ('keep_every_steps', integer(0)),
    ('max_nonfinite_steps', integer(1)),
    ('parallelism', choice(PARALLELISMS)),
    ('init_from', text(optional=True, note='a pretrained stage directory (config.json + '
                       'model.safetensors) or a trained ROOT/<stage>')),
    ('objective', choice(OBJECTIVES)),
    ('target', choice(('image', 'image_embed'))),
    ('mesh.data', integer(-1, note='-1 fills')),
    ('mesh.fsdp', integer(-1, note='-1 fills')),
    ('mesh.tensor', integer(-1, note='-1 fills')),
    ('input.batch_size', integer(1, note='global batch, over every process and device')),
    ('input.image_size', integer(1)),
    ('input.low_res_size', integer(1, optional=True, note="an SR stage's input side")),
    ('input.dataset', text(optional=True)),
    ('input.data_dir', text(optional=True)),
    ('input.split', text()),
    ('input.folder_name', text()),
    ('input.low_res_degradation', choice(DEGRADATIONS)),
    ('input.text_max_len', integer(2, note='token ids per caption')),
    ('input.shuffle', flag()),
    ('input.num_epochs', integer(1, optional=True)),
    ('input.random_crop', flag()),
    ('input.train_crop_size', integer(1, optional=True)),
    ('input.caption_choice', choice(('random', 'first'))),
    ('input.caption_rewrite', text(optional=True)),
    ('input.max_image_pixels', integer(1, optional=True)),
    ('input.num_threads', integer(1)),
    ('input.prefetch_buffer_size', integer(0)),
    ('input.text_cache', text(optional=True, note="a directory written by python -m "
                              "diffusion_jax.tools.cache_text; '': off")),
    ('text_encoder.name', choice(ENCODER_PRESETS, optional=True)),
    ('text_encoder.preset', text(optional=True)),
    ('text_encoder.path', text(optional=True)),
    ('text_encoder.tokenizer_path', text(optional=True)),
    ('text_encoder.image_path', text(optional=True, note='a CLIP image tower beside a text-only '
                                     'CLIP path')),
    ('text_encoder.raw_embeddings', flag(note="CLIP embeddings as they are (Karlo's), not "
                                         'l2-scaled')),
    ('text_encoder.tokenizer_style', choice(('t5', 'clip'), optional=True)),
    ('text_encoder.max_length', integer(2, optional=True)),
    ('text_encoder.dtype', choice(DTYPES)),
    ('text_encoder.seed', integer(0)),
    ('diffusion.schedule', choice(SCHEDULES)),
    ('diffusion.shift', number(above=0)),
    ('diffusion.num_timesteps', integer(0, note='0: continuous time (discrete schedules: 1000)')),
    ('diffusion.parameterization', choice(PARAMETERIZATIONS)),
    ('diffusion.learned_variance', flag()),
    ('diffusion.vlb_weight', number(0)),
    ('diffusion.loss_weighting', choice(LOSS_WEIGHTINGS)),
    ('diffusion.min_snr_gamma', number(above=0)),
    ('diffusion.min_snr_offset', number(0)),
    ('diffusion.p2_gamma', number(0)),
    ('diffusion.p2_k', number(above=0)),
    ('diffusion.cond_drop_text', number(0, 1, note='probability')),
    ('diffusion.cond_drop_image', number(0, 1, note='probability')),
    ('diffusion.noise_aug', flag()),
    ('diffusion.noise_aug_max', number(0, 1)),
    ('diffusion.low_res_blur_max', number(0)),
    ('diffusion.beta_start', number(above=0, below=1)),
    ('diffusion.beta_end', number(above=0, below=1)),
    ('diffusion.logsnr_min', number()),
    ('diffusion.logsnr_max', number()),
    ('sampler.name', choice(SAMPLERS)),
    *((f'sampler.{key}', rule) for key, rule in SETTING_RULES),
    ('optimizer.name', choice(OPTIMIZERS)),
    ('optimizer.lr', number(above=0, note='learning rate')),
    ('optimizer.warmup_steps', integer(0)),
    ('optimizer.b1', number(0, below=1)),
    ('optimizer.b2', number(0, below=1)),
    ('optimizer.eps', number(above=0)),
    ('optimizer.weight_decay', number(0)),
    ('optimizer.grad_clip', number(0, note='global-norm clipping; 0: none')),
    ('optimizer.ema_decay', number(0, 1)),
    ('optimizer.ema_warmup', flag()),
    ('optimizer.ema_start_step', integer(0)),
    ('optimizer.decay', choice(LR_DECAYS)),
    ('optimizer.final_lr_frac', number(0, 1)),
    ('loss.reconstruction', choice(('l1', 'l2'), note="the autoencoder's per-pixel error")),
    ('loss.kl_weight', number(0, note="weight of the autoencoder posterior's KL")),
    ('autoencoder.path', text(optional=True, note='a diffusers AutoencoderKL folder, a pipeline '
                          'directory with vae/, or a trained ROOT/autoencoder')),
    ('autoencoder.sample_posterior', flag(note='train on posterior samples, not the mean')),
    ('model.name', choice(MODELS)),
    ('model.image_size', integer(1)),
    ('model.in_channels', integer(1)),
    ('model.out_channels', integer(1)),
    ('model.model_channels', integer(1)),
    ('model.num_heads', integer(1)),
    ('model.norm_groups', integer(1)),
    ('model.dropout', number(0, below=1)),
    ('model.low_res_size', integer(0, note='0: no low-res input')),
    ('model.low_res_upsampled', flag()),
    ('model.learned_variance', flag()),
    ('model.text_len', integer(0)),
    ('model.text_dim', integer(0)),
    ('model.vocab_size', integer(0)),
    ('model.xf_width', integer(0)),
    ('model.xf_layers', integer(0)),
    ('model.xf_heads', integer(0)),
    ('model.image_embed_dim', integer(0)),
    ('model.image_embed_tokens', integer(1)),
    ('model.text_source', choice(('none', 'tokens', 'transformer'))),
    ('model.text_pool', choice(('none', 'attention', 'attention_query_key', 'embed'))),
    ('model.text_attention', choice(('concat_kv', 'cross'))),
    ('model.attention_per', choice(('block', 'level'))),
    ('model.dtype', choice(DTYPES)),
    ('model.param_dtype', choice(DTYPES)),
    ('model.remat_policy', choice(REMAT_POLICIES)),
    ('model.embed_dim', integer(1)),
    ('model.width', integer(1)),
    ('model.num_layers', integer(1)),
    ('model.mlp_ratio', integer(1)),
)

# A cascade's stage entry: its sampler settings, and where the stage is.
ENTRY_RULES = (
    ('sampler', choice(SAMPLERS)),
    *SETTING_RULES,
    ('use_ema', flag(note='sample the EMA weights')),
    ('dir', text(note="the stage's directory under --workdir")),
    ('config_file', text()),
    ('config_arg', text()),
)


# Reading fields and saying what is wrong ----------------------------------------------------

def _leaf(cfg, path: str) -> tuple[bool, Any]:
  """(True, value) of a dotted field; (False, None) where the config lacks it."""
  node = cfg
  for key in path.split('.'):
    try:
      node = node[key]
    except (KeyError, AttributeError, TypeError, IndexError):
      return False, None
  return True, node


def _shown(value) -> str:
  return 'None' if value is None else str(value) if isinstance(value, str) else repr(value)


def _flag(path: str, value, prefix: str = '--config.') -> str:
  return f'{prefix}{path}={_shown(value)}'


def _fail(path: str, value, problem: str, prefix: str = '--config.'):
  raise errors.InputError(f'{_flag(path, value, prefix)}: {problem}')


def check_rules(cfg, rules, *, path_prefix: str = '', prefix: str = '--config.') -> None:
  """Every field of `rules` that `cfg` has holds what its rule allows. `path_prefix`: where
  `cfg` sits in the config ('stages.base64.'); `prefix`: how the field is spelled before
  its path ('--config.' on a command line, '' for keyword arguments)."""
  for path, rule in rules:
    present, value = _leaf(cfg, path)
    if present and not rule.accepts(value):
      note = f' ({rule.note})' if rule.note else ''
      _fail(path_prefix + path, value, f'must be {rule.allowed()}{note}', prefix)


def check_settings(overrides: Mapping[str, Any]) -> None:
  """Sampler settings given as keyword arguments (`generate(guidance_scale=3.0)`)."""
  check_rules(overrides, (('sampler', choice(SAMPLERS)),) + SETTING_RULES, prefix='')


# Stage configs --------------------------------------------------------------------------------

def check_stage_config(config, *, num_devices: int | None = None) -> None:
  """A stage config (configs/<family>.py:stage=STAGE) is one that trains: every field in its
  range, the fields consistent with each other, the dataset registered. `num_devices`: the
  devices it trains on (jax.device_count(), after a multi-host run's
  jax.distributed.initialize); None skips the mesh and batch checks that need it."""
  if _leaf(config, 'stage')[1] == 'cascade':
    raise errors.InputError('--config: stage=cascade is the sampling chain; this takes a '
                            'stage config, e.g. --config=configs/imagen.py:stage=base64,size=tiny')
  check_rules(config, STAGE_RULES)
  _check_mesh(config)
  _check_network(config)
  _check_low_res(config)
  _check_text(config)
  _check_autoencoder(config)
  _check_text_cache(config)
  _check_schedule(config)
  _check_dataset(config)
  if num_devices is not None:
    _check_devices(config, int(num_devices))


def _get(config, path: str, default=None):
  present, value = _leaf(config, path)
  return default if not present or value is None else value


def _check_mesh(config) -> None:
  sizes = {axis: _get(config, f'mesh.{axis}', 1) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0:
      _fail(f'mesh.{axis}', size, 'must be -1 (fill) or a device count >= 1')
  if list(sizes.values()).count(-1) > 1:
    filled = ', '.join(f'mesh.{a}' for a, s in sizes.items() if s == -1)
    raise errors.InputError(f'--config.mesh: {filled} are all -1; at most one axis fills the '
                            'devices, give the others sizes')
  if _get(config, 'parallelism') == 'shard_map' and sizes['tensor'] != 1:
    _fail('mesh.tensor', sizes['tensor'], "must be 1 with parallelism='shard_map' (pure data "
          'parallelism)')


def _levels(model) -> int:
  return len(tuple(_get(model, 'channel_mult', ())))


def _downsampling(model) -> tuple[int, str]:
  """(the factor an image side must be a multiple of, how often the network halves it)."""
  times = max(_levels(model) - 1, 0)
  said = {0: 'never', 1: 'once', 2: 'twice'}.get(times, f'{times} times')
  return 2**times, said


def _multiple_of(path: str, value: int, unit: int, said: str) -> None:
  if value % unit:
    lo, hi = value // unit * unit, (value // unit + 1) * unit
    examples = f'{lo} or {hi}' if lo else f'{hi}'
    _fail(path, value, f'must be a multiple of {unit} (the network downsamples {said}); '
          f'e.g. {examples}')


def _check_network(config) -> None:
  """The image network's levels, sizes, heads and output against the input and diffusion."""
  model = _get(config, 'model')
  name = _get(model, 'name')
  image_size = _get(config, 'input.image_size')
  if name in ('clip', 'noised_clip'):
    side = _get(model, 'vision.image_size')
    if side and image_size and side != image_size:
      _fail('input.image_size', image_size, f"must be the CLIP's vision input, "
            f'model.vision.image_size={side}')
    return
  if name not in IMAGE_MODELS:
    return
  if _get(config, 'autoencoder') is not None and _get(config, 'objective') != 'autoencoder':
    image_size = None  # a latent stage: the trainer checks the latents against the network
  mults = tuple(_get(model, 'channel_mult', ()))
  if not mults or not all(isinstance(m, int) and m >= 1 for m in mults):
    _fail('model.channel_mult', mults, 'must be a tuple of channel multipliers >= 1, one per '
          'level, e.g. (1, 2)')
  levels = len(mults)
  blocks = _get(model, 'num_res_blocks', 1)
  if isinstance(blocks, (tuple, list)) and len(blocks) != levels:
    _fail('model.num_res_blocks', tuple(blocks), f'must have one entry per level ({levels}: '
          'model.channel_mult), or be one integer')
  for key in ('self_attention', 'cross_attention'):
    flags = _get(model, key)
    if flags is not None and len(tuple(flags)) != levels:
      _fail(f'model.{key}', tuple(flags), f'must have one entry per level ({levels}: '
            'model.channel_mult)')
  unit, said = _downsampling(model)
  if image_size:
    _multiple_of('input.image_size', image_size, unit, said)
  model_size = _get(model, 'image_size')
  if model_size:
    _multiple_of('model.image_size', model_size, unit, said)
  if image_size and model_size and image_size != model_size:
    _fail('input.image_size', image_size, f'differs from --config.model.image_size={model_size}'
          ': the network is built for the training resolution; set both')
  _check_heads(model, mults)
  learned = _leaf(config, 'diffusion.learned_variance')
  model_learned = _get(model, 'learned_variance')
  if learned[0] and model_learned is not None and bool(learned[1]) != bool(model_learned):
    _fail('diffusion.learned_variance', learned[1], 'differs from --config.model.'
          f'learned_variance={model_learned}: the network outputs the variance the loss '
          'learns; set both')


def _attending_levels(model, mults) -> list[int]:
  """The levels whose layers attend (and the lowest one, where the middle block attends)."""
  levels = len(mults)
  if _get(model, 'name') == 'efficient_unet':
    self_at = tuple(_get(model, 'self_attention', (False,) * levels))
    cross_at = tuple(_get(model, 'cross_attention', (False,) * levels))
    return [i for i in range(levels) if self_at[i] or cross_at[i] or i == levels - 1]
  side = _get(model, 'image_size', 0)
  resolutions = tuple(_get(model, 'attention_resolutions', ()))
  found = [i for i in range(levels) if side and side >> i in resolutions]
  if _get(model, 'mid_attention', True) and levels - 1 not in found:
    found.append(levels - 1)
  return found


def _check_heads(model, mults) -> None:
  base = _get(model, 'model_channels', 0)
  widths = sorted({mults[i] * base for i in _attending_levels(model, mults)})
  if not widths:
    return
  head_channels = _get(model, 'head_channels', -1)
  common = math.gcd(*widths)
  listed = ', '.join(map(str, widths))
  if head_channels and head_channels > 0:
    if common % head_channels:
      _fail('model.head_channels', head_channels, f'must divide the attention layers\' '
            f'channels ({listed}); e.g. {_divisor_near(common, head_channels)}, or -1 (heads '
            'from model.num_heads)')
    return
  heads = _get(model, 'num_heads', 1)
  if common % heads:
    _fail('model.num_heads', heads, f"must divide the attention layers' channels ({listed}); "
          f'e.g. {_divisor_near(common, heads)}')


def _divisor_near(n: int, want: int) -> int:
  """The divisor of n closest to `want`."""
  return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - want), d))


def _check_low_res(config) -> None:
  """An SR stage's low-res input, its network's and its training crops."""
  image_size = _get(config, 'input.image_size')
  low = _get(config, 'input.low_res_size')
  model = _get(config, 'model')
  model_low = _get(model, 'low_res_size') if _get(model, 'name') in IMAGE_MODELS else None
  if model_low is not None and (low or 0) != model_low:
    _fail('input.low_res_size', low, f'differs from --config.model.low_res_size={model_low} '
          '(0: none): the network reads the low-res input the data gives; set both')
  if low and image_size and low >= image_size:
    _fail('input.low_res_size', low, f"must be smaller than the stage's output, "
          f'input.image_size={image_size}')
  crop = _get(config, 'input.train_crop_size')
  if not crop:
    return
  if not low:
    _fail('input.train_crop_size', crop, 'only super-resolution stages (with '
          'input.low_res_size) train on crops; a base stage learns whole scenes. Unset '
          'input.train_crop_size')
  if image_size and crop > image_size:
    _fail('input.train_crop_size', crop, f'must be at most input.image_size={image_size}')
  if _get(model, 'name') in IMAGE_MODELS:
    unit, said = _downsampling(model)
    _multiple_of('input.train_crop_size', crop, unit, said)
  if image_size and (crop * low) % image_size:
    _fail('input.train_crop_size', crop, f'its low-res window ({crop} x {low} / {image_size} '
          'px) must be whole pixels; pick a crop that the ratio of input.image_size to '
          'input.low_res_size divides')


def _check_text(config) -> None:
  """Token lengths the network reads, the encoder's preset and the directories named."""
  model = _get(config, 'model')
  if _get(model, 'text_source') == 'transformer':
    text_len, max_len = _get(model, 'text_len'), _get(config, 'input.text_max_len')
    if text_len and max_len and text_len != max_len:
      _fail('input.text_max_len', max_len, f'differs from --config.model.text_len={text_len}: '
            'the text transformer reads that many token ids; set both')
  name = _get(config, 'text_encoder.name')
  preset = _get(config, 'text_encoder.preset')
  if name and preset and not _get(config, 'text_encoder.path'):
    if preset not in ENCODER_PRESETS[name]:
      _fail('text_encoder.preset', preset, f'is no {name} preset; choose one of '
            f'{", ".join(ENCODER_PRESETS[name])}, or set --config.text_encoder.path=DIR')
  for key in ('text_encoder.path', 'text_encoder.tokenizer_path', 'text_encoder.image_path'):
    path = _get(config, key)
    if path and '://' not in path and not os.path.isdir(path):
      _fail(key, path, 'no such directory (a local transformers-layout directory)')


def _check_autoencoder(config) -> None:
  """A latent stage's autoencoder directory exists (unset: ROOT/autoencoder, checked later)."""
  path = _get(config, 'autoencoder.path')
  if path and not os.path.isdir(path):
    _fail('autoencoder.path', path, 'no such directory; give a diffusers AutoencoderKL folder, '
          'a pipeline directory with vae/, or a trained autoencoder stage ROOT/autoencoder')


def _check_text_cache(config) -> None:
  """input.text_cache replaces a frozen text encoder that the stage runs on text only."""
  cache = _get(config, 'input.text_cache')
  if not cache:
    return
  if not _get(config, 'text_encoder.name') or _get(config, 'model.text_source') == 'transformer':
    _fail('input.text_cache', cache, 'the stage has no frozen text encoder to cache (its '
          'network reads token ids); unset input.text_cache')
  if _get(config, 'target') == 'image_embed' or _get(config, 'model.image_embed_dim', 0):
    _fail('input.text_cache', cache, "the stage runs its frozen encoder on images every step "
          '(CLIP image embeddings), which a text cache cannot replace; unset input.text_cache')


def _check_schedule(config) -> None:
  schedule = _get(config, 'diffusion.schedule')
  lo, hi = _get(config, 'diffusion.logsnr_min'), _get(config, 'diffusion.logsnr_max')
  if lo is not None and hi is not None and lo >= hi:
    _fail('diffusion.logsnr_min', lo, f'must be below diffusion.logsnr_max={hi}')
  start, end = _get(config, 'diffusion.beta_start'), _get(config, 'diffusion.beta_end')
  if (schedule in ('linear', 'scaled_linear') and start is not None and end is not None
      and start > end):
    _fail('diffusion.beta_start', start, f'must be at most diffusion.beta_end={end}')
  if schedule in DISCRETE_SCHEDULES:
    steps = _get(config, 'diffusion.num_timesteps') or DEFAULT_NUM_TIMESTEPS
    num_steps = _get(config, 'sampler.num_steps')
    if num_steps and num_steps > steps:
      _fail('sampler.num_steps', num_steps, f'must be at most the {steps} timesteps of the '
            f'{schedule} schedule')


def _check_dataset(config) -> None:
  """The dataset and caption rewrite are registered (after input.modules are imported)."""
  from diffusion_jax.data import datasets, registry  # noqa: F401 - registers the library's
  registry.import_modules(_get(config, 'input.modules', ()))
  present, dataset = _leaf(config, 'input.dataset')
  if present and not dataset:
    _fail('input.dataset', dataset, 'must name a registered dataset: '
          f'{", ".join(registry.datasets())}')
  hint = 'a project registers its own in a module listed in --config.input.modules'
  if dataset and dataset not in registry.datasets():
    _fail('input.dataset', dataset, f'is not registered (registered: '
          f'{", ".join(registry.datasets())}); {hint}')
  rewrite = _get(config, 'input.caption_rewrite')
  if rewrite and rewrite not in registry.caption_rewrites():
    _fail('input.caption_rewrite', rewrite, f'is not registered (registered: '
          f'{", ".join(registry.caption_rewrites()) or "none"}); {hint}')


def _check_devices(config, num_devices: int) -> None:
  """The mesh fills the devices and the batch splits evenly over its batch axes."""
  sizes = {axis: int(_get(config, f'mesh.{axis}', 1)) for axis in MESH_AXES}
  known = math.prod(s for s in sizes.values() if s != -1)
  spelled = ', '.join(f'{axis}={s}' for axis, s in sizes.items())
  if -1 in sizes.values():
    if num_devices % known:
      raise errors.InputError(f'--config.mesh ({spelled}): the fixed axes ({known} devices) '
                              f'do not divide the {num_devices} devices')
    sizes[next(a for a, s in sizes.items() if s == -1)] = num_devices // known
  elif known != num_devices:
    raise errors.InputError(f'--config.mesh ({spelled}): needs {known} devices, '
                            f'{num_devices} are available; set one axis to -1 to fill')
  shards = math.prod(sizes[a] for a in BATCH_AXES)
  batch = _get(config, 'input.batch_size')
  if batch and batch % shards:
    lo, hi = batch // shards * shards, (batch // shards + 1) * shards
    _fail('input.batch_size', batch, f'must be a multiple of the {shards} devices the batch '
          f'is split over (mesh.data x mesh.fsdp); e.g. {f"{lo} or {hi}" if lo else hi}')


# Cascade configs ------------------------------------------------------------------------------

def check_cascade_config(config) -> None:
  """A cascade config (stage=cascade): its order names its stages, each stage's sampler
  settings are in range."""
  stage = _get(config, 'stage')
  if stage != 'cascade':
    raise errors.InputError(f'--config: stage={stage} is a stage that trains; this takes the '
                            'cascade (stage=cascade), e.g. '
                            '--config=configs/imagen.py:stage=cascade,size=tiny')
  check_rules(config, (('seed', integer(0, note='random seed')),))
  stages = _get(config, 'stages', {})
  known = ', '.join(stages.keys())
  order = tuple(_get(config, 'order', ()))
  if not order:
    _fail('order', order, f'must name the stages to sample, in order, from {known}')
  for key in ('order', 'extra'):
    for name in tuple(_get(config, key, ())):
      if name not in stages:
        _fail(key, tuple(_get(config, key)), f'names no stage {name!r}; the '
              f'{_get(config, "family", "")} cascade has {known}')
  for name in stages.keys():
    check_rules(stages[name], ENTRY_RULES, path_prefix=f'stages.{name}.')
    if not stages[name].get('dir', name):
      _fail(f'stages.{name}.dir', '', "must name the stage's directory under --workdir")


# Paths ----------------------------------------------------------------------------------------

def check_writable_dir(path: str, flag_name: str) -> None:
  """`path` is a directory this process can write, or can be created as one. `flag_name`:
  the flag that named it ('--out')."""
  if not path:
    raise errors.InputError(f'{flag_name} is empty: name a directory')
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise errors.InputError(f'{flag_name}={path}: is a file, not a directory; name a '
                              'directory')
    if not os.access(path, os.W_OK | os.X_OK):
      raise errors.InputError(f'{flag_name}={path}: the directory is not writable; name one '
                              'you can write')
    return
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise errors.InputError(f'{flag_name}={path}: {parent} is a file, not a directory')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise errors.InputError(f'{flag_name}={path}: cannot be created ({parent} is not '
                            'writable); name a directory you can write')

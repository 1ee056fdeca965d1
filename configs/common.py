"""Shared config helpers: argument parsing, the common fields, mesh and logical-axis presets.

Every family config (`configs/imagen.py`, `configs/glide.py`, `configs/unclip.py`,
`configs/latent.py`) exposes
`get_config(arg)` where `arg` is a string such as "stage=base64,size=tiny".
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from diffusion_jax.errors import InputError
from diffusion_jax.data import INPUT_DEFAULTS
from diffusion_jax.parallel import DEFAULT_LOGICAL_RULES

SIZES = ('tiny', 'paper')


def _convert(key: str, raw: str, default):
  if isinstance(default, bool):
    if raw.lower() in ('1', 'true', 'yes'):
      return True
    if raw.lower() in ('0', 'false', 'no'):
      return False
    raise InputError(f'config arg {key}={raw!r}: expected a boolean (true/false)')
  kind = type(default) if isinstance(default, (int, float)) else str
  try:
    return kind(raw)
  except ValueError:
    raise InputError(f'config arg {key}={raw!r}: expected {kind.__name__} '
                     f'(e.g. {key}={default!r})') from None


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """Parses "k1=v1,k2=v2" into a ConfigDict, typed and defaulted by `spec`.

  Unknown keys are refused (InputError) so that a typo (`stgae=base64`) cannot silently fall
  back to a default. Values take the type of their default (bool, int, float or str).
  """
  result = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return result
  for item in arg.split(','):
    item = item.strip()
    if not item:
      continue
    if '=' not in item:
      raise InputError(f'config arg {item!r} must look like key=value '
                       '(e.g. "stage=base64,size=tiny")')
    key, raw = (s.strip() for s in item.split('=', 1))
    if key not in spec:
      raise InputError(f'unknown config arg {key!r}; known: {", ".join(sorted(spec))}')
    result[key] = _convert(key, raw, spec[key])
  return result


def check_choice(name: str, value: str, choices) -> str:
  """`value`, or an InputError naming the choices."""
  if value not in choices:
    raise InputError(f'{name}={value!r} is not one of {", ".join(choices)}')
  return value


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1, rules=DEFAULT_LOGICAL_RULES):
  """The `mesh` field: sizes of the ('data', 'fsdp', 'tensor') axes; -1 fills."""
  cfg = ml_collections.ConfigDict()
  cfg.data = data
  cfg.fsdp = fsdp
  cfg.tensor = tensor
  cfg.rules = tuple(rules)
  return cfg


def model_numerics(m: ml_collections.ConfigDict, size: str, *, unet: bool = True):
  """Sets the numeric fields model configs share (dtypes, remat, scan) and, for the U-Nets
  (`unet`), the attention chunks and how conv weight gradients are computed.

  Below paper size everything is float32, nothing is rematerialised and the U-Nets use the
  CPU-tuned kernels (measured in benchmarks/README.md); at paper size the activations are
  bfloat16, only matmul outputs without batch dimensions are saved, and the accelerators
  keep XLA's and the library's fused kernels.
  """
  paper = size == 'paper'
  m.dtype = 'bfloat16' if paper else 'float32'
  m.param_dtype = 'float32'
  m.remat_policy = 'dots_with_no_batch_dims_saveable' if paper else 'none'
  m.scan_layers = True
  if unet:
    m.cpu_kernels = not paper


def optimizer_config(*, name: str, lr: float, paper: bool, b2: float = 0.999,
                     weight_decay: float = 0.0) -> ml_collections.ConfigDict:
  """The `optimizer` field: schedule, Adam moments, clipping and the EMA of the weights."""
  o = ml_collections.ConfigDict()
  o.name = name
  o.lr = lr
  o.warmup_steps = 10_000 if paper else 100
  o.b1 = 0.9
  o.b2 = b2
  o.eps = 1e-8  # Adam's epsilon (optax's default)
  o.weight_decay = weight_decay
  o.grad_clip = 1.0
  o.ema_decay = 0.9999 if paper else 0.995
  o.ema_warmup = True  # decay min(ema_decay, (1+n)/(10+n)); False: constant
  o.ema_start_step = 0
  return o


def base_config() -> ml_collections.ConfigDict:
  """Fields every stage config has; family configs fill in the rest."""
  c = ml_collections.ConfigDict()
  c.family = ''
  c.stage = ''
  c.size = ''
  c.seed = 0
  c.total_steps = 1000
  c.ckpt_steps = 500
  c.log_steps = 50
  c.sample_steps = 0          # write a sample grid every N steps (0: never)
  c.keep_checkpoints = 3      # the last N checkpoints are kept ...
  c.keep_every_steps = 0      # ... plus every K-th step (0: none)
  c.max_nonfinite_steps = 20  # stop after this many consecutive non-finite steps
  c.parallelism = 'gspmd'     # or 'shard_map' (pure data parallelism, explicit psum)
  c.init_from = None          # a fresh run starts from this stage dir's weights (train/loop.py)
  c.mesh = mesh_config()
  return c


# The type of each field that may be unset (None): placeholders of these types can be set
# from the command line (`--config.text_encoder.path=DIR`); None is the one spelling of unset.
OPTIONAL_FIELDS = {
    'dataset': str, 'data_dir': str, 'low_res_size': int, 'num_epochs': int,
    'train_crop_size': int, 'caption_rewrite': str, 'name': str, 'preset': str, 'path': str,
    'tokenizer_path': str, 'tokenizer_style': str, 'max_length': int, 'eos_token_id': int,
    'init_from': str, 'image_path': str, 'scaling_factor': float, 'shift_factor': float,
}


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Completes a stage config: every input field present (the input pipeline's
  INPUT_DEFAULTS, so each can be set with --config.input.<field>), and every unset field a
  typed placeholder. A None field of an undeclared type is refused."""
  if 'input' in c:
    for key, value in INPUT_DEFAULTS.items():
      if key not in c.input:
        c.input[key] = value

  def walk(cfg, prefix):
    for key in list(cfg.keys()):
      value = cfg[key]
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f'{prefix}{key}.')
      elif value is None:
        if key not in OPTIONAL_FIELDS:
          raise ValueError(f'config field {prefix}{key} is None but has no declared type '
                           '(configs.common.OPTIONAL_FIELDS)')
        cfg[key] = config_dict.placeholder(OPTIONAL_FIELDS[key])
  walk(c, '')
  return c


def cascade_stage(config_file: str, stage: str, arg: str, stage_config) -> ml_collections.ConfigDict:
  """A cascade entry: where the stage trains (ROOT/<dir>), the config it is trained from
  (`config_file:config_arg`, for the train command and to check the checkpoint's saved
  config against), whether EMA weights are sampled, and its sampler settings."""
  s = stage_config.sampler
  e = ml_collections.ConfigDict()
  e.config_file = config_file
  e.config_arg = arg
  e.dir = stage
  e.use_ema = True
  e.sampler = s.name
  e.num_steps = int(s.num_steps)
  e.eta = float(s.get('eta', 0.0))
  e.guidance_scale = float(s.get('guidance_scale', 1.0))
  e.threshold = s.get('threshold', 'none') or 'none'
  e.percentile = float(s.get('percentile', 99.5))
  e.threshold_max = float(s.get('threshold_max', 0.0))
  e.aug_level = float(s.get('aug_level', 0.0))
  e.blur_sigma = float(s.get('blur_sigma', 0.0))
  e.best_of = int(s.get('best_of', 1))
  e.contrast_scale = float(s.get('contrast_scale', 0.0))
  e.spacing = str(s.get('spacing', '') or '')
  e.noise_scale = float(s.get('noise_scale', 1.0))
  return e


def cascade_config(family: str, config_file: str, size: str, get_config, order, extra=(),
                   *, inpaint=(), clip: str = '', seed: int = 0) -> ml_collections.ConfigDict:
  """The `stage=cascade` config: `order` is the text-to-image chain, `extra` the stages
  loaded on demand (GLIDE inpainting, the noised CLIP). Sampling reads each stage's network,
  encoder, tokenizer and schedule from the config saved in its checkpoint; this config says
  only where the stages are and how they sample (`--config.stages.<stage>.num_steps=32`)."""
  c = ml_collections.ConfigDict()
  c.family = family
  c.stage = 'cascade'
  c.size = size
  c.seed = seed
  c.order = tuple(order)
  c.extra = tuple(extra)
  c.inpaint_stages = tuple(inpaint)  # GLIDE's inpainting chain, in order
  c.clip_stage = clip  # GLIDE's noised CLIP, for CLIP guidance
  c.stages = ml_collections.ConfigDict()
  for name in tuple(order) + tuple(extra):
    arg = f'stage={name},size={size}'
    c.stages[name] = cascade_stage(config_file, name, arg, get_config(arg))
  return c

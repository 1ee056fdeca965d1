r"""The embedded default: train a small text-to-image cascade on Shapes on a CPU, sample it
for held-out captions and measure with the Shapes oracle what it learned.

  python -m projects.shapes.demo --workdir=/tmp/demo              # Imagen: base 32 px + SR 64 px
  python -m projects.shapes.demo --workdir=/tmp/demo_glide --family=glide
  python -m projects.shapes.demo --workdir=/tmp/demo_unclip --family=unclip

The stages train from the project's configs (`projects/shapes/configs/<family>.py`, the
`shapes` size), with the demo's budget, data size and seed set in code (`stage_config`).

No download and no pretrained weight: Imagen's frozen T5 (`small` preset) is randomly
initialised and frozen, so its token states are a fixed random embedding of the caption
words; `--text_encoder_path=DIR` points it at a converted transformers T5 directory instead
(its own tokenizer is used then). GLIDE trains its text transformer jointly. unCLIP first
trains its own small CLIP on Shapes (stage `clip`, CLIP's contrastive loss), exports it to
WORKDIR/clip/export (transformers layout) and trains the prior and the decoder on its frozen
embeddings; only prior -> decoder is sampled.

The demo's own process samples on one CPU device per core (`--cpu_devices`), the batch
sharded over them; of the stages that train at once, each in its own process, the longest
trains on one device per core too and the others on one (`worker_cpu_devices`).

WORKDIR holds one directory per stage (the layout `diffusion_jax.sample`,
`diffusion_jax.evaluate` and `projects.shapes.evaluate` read):

  WORKDIR/<stage>/checkpoints/   orbax checkpoints; a killed run resumes from the last one
  WORKDIR/samples/*.png          one cascade sample per held-out caption (guided)
  WORKDIR/samples/captions.json  file name -> caption
  WORKDIR/samples/grid.png       the samples with their captions
  WORKDIR/alignment.json         oracle rates per caption kind, with and without guidance
  WORKDIR/demo_cache/*.npz       sampled images per setting (re-running reuses them)

Imagen's stages read each relation caption said with "to the left of" or "above" only
(`Plan.caption_rewrite`, `--caption_rewrite`; `shapes.canonical_caption`), in training and
sampling alike. Its guided samples of two objects of different shapes are also pushed towards
each object's shape by prompt pairs made from the caption (`Plan.contrast_scale`,
`--contrast_scale`; `shapes.binding_contrasts`); the unguided ones see the caption alone.

Captions are scored by `projects.shapes.shapes.score`: an object is right when its colour
and shape are, `all` when every object (and the relation, if any) is. Multi-object captions
(conjunctions, relations) are drawn from those the training set (`--train_examples` scenes)
never shows, even rewritten; the 24 single-object captions (6 colours x 4 shapes) and the
48 counted ones are all in any training set of useful size, so for them only the layouts
are new.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

from absl import flags
import numpy as np

from diffusion_jax import cli, errors, io_util, validation
from projects.shapes import shapes

log = logging.getLogger(__name__)

KINDS = ('single', 'count', 'conjunction', 'relation')
# What the stages' input.modules list: the Shapes dataset and caption rewrite, by name.
MODULES = ('projects.shapes.data',)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the demo trains and how it samples (all of it goes into the cache keys)."""
  family: str
  stages: tuple[tuple[str, int], ...]   # (stage, train steps), in training order
  order: tuple[str, ...]                # the cascade's sampling chain
  size: str = 'shapes'                  # the project's configs ('tiny': the library's)
  train_examples: int = 5000
  batch_size: int = 16
  lr: float | None = None  # None: each stage config's own learning rate and schedule
  per_kind: dict = dataclasses.field(default_factory=lambda: {
      'single': 24, 'count': 12, 'conjunction': 12, 'relation': 24})
  # Ancestral DDPM corrects the errors of a briefly trained model that DDIM's deterministic
  # steps accumulate (cleaner backgrounds at the same guidance).
  sampler: str = 'ddpm'
  sample_steps: int = 40
  # Super-resolution stages follow their low-res input: 20 steps score as well as 40 on
  # rendered 32 px inputs (0.85 vs 0.81 all-correct, 48 captions) in half the time.
  sr_sample_steps: int = 20
  guidance_scale: float = 4.0  # per family: GUIDANCE_SCALE
  seed: int = 0
  text_encoder_path: str | None = None
  caption_rewrite: str | None = None  # every stage's input.caption_rewrite; per family: below
  # Weight of the guided samples' shape pairs (shapes.binding_contrasts); per family: below.
  contrast_scale: float = 0.0


# Steps per stage on a 2-core CPU. Imagen, alone on the host: base and SR side by side, the
# SR on 32 px crops (its config) at 3.35 steps/s for 600 steps (246 s), the base at ~2.2
# steps/s beside it and ~3.3 after; with sampling, 2750 base steps took 18.0 min in all
# (16.3 min now, after the CPU numerics of benchmarks/README.md: base 852 s, SR 251 s).
# With the learning rate held at 1e-3, 3000 steps took 19.0 min (cascade single-object
# all-correct 0.80 on 96 samples at guidance 3, against 0.68 after 2750); the cosine decay
# reaches 0.80 at 2750. 2850 steps took 19.7 min on a slower day of the same host: too close
# to the budget. On a slower 2-core host (AVX2, no AVX-512) the defaults took 26 min.
# The base is short of steps, not of a trick:
# scored alone at 32 px (96 single-object samples, guidance 4), it reaches 0.66 all-correct
# after 2250 and 2625 steps and 0.74 after 3000, where the former base (self-attention at
# 16x16 too, 1.4x the step time) reached 0.37 in its 1500. At 400 whole-image steps the SR
# stage left speckle that cost the cascade a third of its all-correct samples; at 600 (whole
# or cropped) it scores 0.99 on rendered 32 px inputs. unCLIP, measured at batch 16 beside
# another job:
# clip 8.7-9.8 steps/s, prior 6.0-8.9, decoder64 2.2-2.9, ~2 min compiling and ~2.3 min
# sampling: 18-21 min. The CLIP's held-out contrastive loss barely moves after 600 steps
# (0.66 -> 0.65 at 800).
DEFAULT_STEPS = {
    'imagen': (('base64', 2750), ('sr256', 600)),
    'glide': (('base64', 2000), ('up256', 400)),
    'unclip': (('clip', 600), ('prior', 1000), ('decoder64', 1500)),
}
# Guidance of the samples where not 4. Imagen demo cascade, single-object all-correct on 96
# samples with the same seeds: 0.68 at scale 2, 0.72 at 3, 0.62 at 4 (2250 base steps);
# 0.74 at 1, 0.78 at 2, 0.80 at 3 (3000 base steps at lr 1e-3 held constant). Those were
# sampled with dynamic thresholding; with static clipping (the configs' choice now) the
# default cascade scored 0.94 at 3 and 0.86 at 5.
GUIDANCE_SCALE = {'imagen': 3.0}
# Imagen's stages read relation captions said with "to the left of" and "above" only
# (shapes.canonical_caption), in training and sampling alike. Without it the base does not
# learn in the budget that "right of" flips which object goes left: relations 0.04-0.08
# all-correct at 32 px after 2750 steps, the order at chance; with it 0.42, the first-named
# object on the named side in 37 of 38 samples (docs/demo/HISTORY.md here). GLIDE and
# unCLIP were measured without it.
CAPTION_REWRITE = {'imagen': 'shapes_canonical'}
# Imagen's guided samples push each object of a two-object caption towards its own shape:
# the caption's noun phrases said alone against the same with the other object's shape
# (shapes.binding_contrasts, guidance.prompt_contrast). Its bases bind one object's colour
# to its shape but draw two objects' shapes alike in about half the pairs of different
# shapes. Scored at 32 px on 96 held-out relation captions at guidance 3, three bases (seeds
# 0, 2, 3) went from 0.229, 0.229, 0.188 all-correct to 0.323, 0.292, 0.302 at weight 1.5
# (0.281, 0.271, 0.292 at 1; 0.333, 0.240, 0.312 at 2, colours lost; docs/demo/HISTORY.md here).
CONTRAST_SCALE = {'imagen': 1.5}
# The sampled chain where it is not every trained stage (unCLIP's CLIP is an encoder).
CASCADE_ORDER = {'unclip': ('prior', 'decoder64')}


def default_plan(family: str = 'imagen', **overrides) -> Plan:
  if family not in DEFAULT_STEPS:
    raise ValueError(f'--family={family!r}: choose one of {", ".join(DEFAULT_STEPS)}')
  if overrides.get('contrast_scale') and family != 'imagen':
    raise ValueError(f'--contrast_scale guides the imagen demo; {family} samples without it')
  stages = DEFAULT_STEPS[family]
  plan = Plan(family=family, stages=stages,
              order=CASCADE_ORDER.get(family, tuple(s for s, _ in stages)),
              guidance_scale=GUIDANCE_SCALE.get(family, 4.0),
              caption_rewrite=CAPTION_REWRITE.get(family),
              contrast_scale=CONTRAST_SCALE.get(family, 0.0))
  return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})


# Captions ---------------------------------------------------------------------------------------

def caption_kind(caption: str) -> str:
  scene = shapes.parse(caption)
  if scene.relation is not None:
    return 'relation'
  if len(scene.groups) > 1:
    return 'conjunction'
  return 'count' if scene.groups[0].count > 1 else 'single'


def closed_captions(kind: str) -> list[str]:
  """Every caption of a small kind: 'single' (6 colours x 4 shapes) or 'count' (x 2, 3)."""
  counts = (1,) if kind == 'single' else (2, 3)
  return [shapes.caption_of(shapes.Scene((shapes.Group(n, c, s),)))
          for n in counts for c in shapes.COLORS for s in shapes.SHAPES]


def eval_captions(per_kind: dict, *, train_seed: int, train_examples: int,
                  seed: int = 1234, rewrite: Callable[[str], str] | None = None) -> list[str]:
  """The fixed evaluation captions, grouped by kind in KINDS order.

  single, count: the 24 (48) captions of the kind, cycled; any training set of useful size
  shows them all, so only their layouts are new. conjunction, relation: distinct captions
  that no training example shows, also once rewritten by the stages' caption rewrite (so
  no training caption says the same scene in other words).
  """
  from projects.shapes import alignment
  said = rewrite or (lambda c: c)
  seen = alignment.training_captions(train_seed, train_examples, rewrite)
  out = []
  for kind in ('single', 'count'):
    every = closed_captions(kind)
    order = np.random.default_rng([int(seed), KINDS.index(kind)]).permutation(len(every))
    out += [every[order[i % len(every)]] for i in range(int(per_kind.get(kind, 0)))]
  rng = np.random.default_rng([int(seed), 0xDE30])
  for kind in ('conjunction', 'relation'):
    want = int(per_kind.get(kind, 0))
    picked: list[str] = []
    picked_said: set[str] = set()
    for _ in range(200_000):
      if len(picked) == want:
        break
      c = shapes.random_caption(rng)
      if caption_kind(c) != kind:
        continue
      scene = said(c)
      if scene not in seen and scene not in picked_said:
        picked.append(c)
        picked_said.add(scene)
    if len(picked) < want:
      raise ValueError(f'only {len(picked)} held-out {kind} captions for {train_examples} '
                       'training examples: lower --train_examples')
    out += picked
  return out


def plan_eval_captions(plan: Plan, per_kind: dict | None = None) -> list[str]:
  """`eval_captions` held out from the plan's training set, as its stages read captions."""
  from diffusion_jax.data import pipeline as data_pipeline
  return eval_captions(plan.per_kind if per_kind is None else per_kind, train_seed=plan.seed,
                       train_examples=plan.train_examples,
                       rewrite=data_pipeline.caption_rewrite(
                           {'caption_rewrite': plan.caption_rewrite, 'modules': MODULES}))


def rates_by_kind(images_NHWC, captions: Sequence[str]) -> dict[str, Any]:
  """Oracle rates overall and per caption kind (each with the verdicts' counts)."""
  from projects.shapes import alignment
  verdicts = alignment.score_pairs(images_NHWC, captions)
  out = {'overall': _no_nan(alignment.rates(verdicts))}
  for kind in KINDS:
    mine = [v for v, c in zip(verdicts, captions) if caption_kind(c) == kind]
    if mine:
      out[kind] = _no_nan(alignment.rates(mine))
  return out


def _no_nan(rates: dict) -> dict:
  # A rate over no pairs (relation on single objects) is None: strict JSON has no NaN.
  return {k: None if isinstance(v, float) and v != v else v for k, v in rates.items()}


# Outputs ----------------------------------------------------------------------------------------

def captioned_grid(images_NHWC, captions: Sequence[str], *, columns: int = 8,
                   scale: int = 2) -> np.ndarray:
  """uint8 grid: each image enlarged `scale` times (nearest) above its wrapped caption."""
  from PIL import Image, ImageDraw, ImageFont
  images = np.asarray(images_NHWC)
  n, h, w, _ = images.shape
  cw, ch = w * scale, h * scale
  font = ImageFont.load_default()
  line_h = 11
  chars = max(8, cw // 6)
  wrapped = [_wrap(c, chars) for c in captions]
  text_h = line_h * max(len(lines) for lines in wrapped) + 4
  columns = min(columns, n)
  rows = -(-n // columns)
  pad = 4
  canvas = Image.new('RGB', (columns * (cw + pad) + pad, rows * (ch + text_h + pad) + pad),
                     (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (image, lines) in enumerate(zip(images, wrapped)):
    r, c = divmod(i, columns)
    x, y = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
    canvas.paste(Image.fromarray(image).resize((cw, ch), Image.NEAREST), (x, y))
    draw.rectangle([x - 1, y - 1, x + cw, y + ch], outline=(200, 200, 200))
    for k, line in enumerate(lines):
      draw.text((x, y + ch + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
  return np.asarray(canvas)


def _wrap(text: str, width: int) -> list[str]:
  lines, line = [], ''
  for word in text.split():
    if line and len(line) + 1 + len(word) > width:
      lines.append(line)
      line = word
    else:
      line = f'{line} {word}'.strip()
  return lines + [line] if line else lines


def write_samples(out_dir: str, images_NHWC, captions: Sequence[str]) -> None:
  from PIL import Image
  os.makedirs(out_dir, exist_ok=True)
  names = {}
  for i, (image, caption) in enumerate(zip(np.asarray(images_NHWC), captions)):
    name = f'{i:04d}.png'
    Image.fromarray(image).save(os.path.join(out_dir, name))
    names[name] = caption
  with open(os.path.join(out_dir, 'captions.json'), 'w') as f:
    json.dump(names, f, indent=1)
  Image.fromarray(captioned_grid(images_NHWC, captions)).save(os.path.join(out_dir, 'grid.png'))


def _hash(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_json(path: str, obj) -> None:
  io_util.write_json(path, obj, indent=1, sort_keys=False, allow_nan=False)


# The run ----------------------------------------------------------------------------------------

def own_clip_dir(plan: Plan, root: str | None) -> str | None:
  """ROOT/clip/export, where the plan's own trained CLIP is exported; None without one."""
  if 'clip' not in dict(plan.stages):
    return None
  if root is None:
    raise ValueError('this plan trains its own CLIP: give the root it is exported under')
  return os.path.join(os.path.abspath(root), 'clip', 'export')


def _uses_clip(config) -> bool:
  return 'text_encoder' in config and config.text_encoder.get('name') == 'clip'


def config_module(plan: Plan):
  """The module whose `get_config` makes the plan's stage and cascade configs: the project's
  `projects/shapes/configs/<family>.py` at size `shapes`, else `configs/<family>.py` (the
  library's, whose `tiny` size also trains on Shapes: the tests' plans)."""
  import importlib
  if plan.size == 'shapes':
    return importlib.import_module(f'projects.shapes.configs.{plan.family}')
  return importlib.import_module(f'configs.{plan.family}')


def stage_config(plan: Plan, stage: str, steps: int, root: str | None = None):
  """The stage's config (`config_module`) with the demo's training budget and data. Stages
  with a frozen CLIP read the plan's own one (`own_clip_dir(plan, root)`) when it trains
  one."""
  c = config_module(plan).get_config(f'stage={stage},size={plan.size}')
  c.total_steps = int(steps)
  c.ckpt_steps = max(50, int(steps) // 8)
  c.log_steps = 50
  c.keep_checkpoints = 2
  c.seed = plan.seed
  c.input.batch_size = plan.batch_size
  c.input.shapes_num_examples = plan.train_examples
  c.input.shapes_seed = plan.seed
  c.input.caption_rewrite = plan.caption_rewrite
  if plan.lr is not None:
    c.optimizer.lr = plan.lr
  c.optimizer.warmup_steps = min(int(c.optimizer.warmup_steps), max(1, int(steps) // 10))
  if plan.text_encoder_path and 'text_encoder' in c and c.text_encoder.name == 't5':
    c.text_encoder.path = plan.text_encoder_path
  if 'clip' in dict(plan.stages) and _uses_clip(c):
    c.text_encoder.path = own_clip_dir(plan, root)
  return c


def cascade_config(plan: Plan, root: str | None = None):
  """The family's `stage=cascade` config (`config_module`) with the demo's sampler settings
  (and the plan's own CLIP for the stages that read one, as they were trained)."""
  module = config_module(plan)
  c = module.get_config(f'stage=cascade,size={plan.size}')
  c.order = plan.order
  for name in plan.order:
    e = c.stages[name]
    e.sampler = plan.sampler
    stage_cfg = module.get_config(e.config_arg)
    sr = bool(stage_cfg.input.get('low_res_size'))
    e.num_steps = plan.sr_sample_steps if sr else plan.sample_steps
    e.eta = 1.0 if plan.sampler == 'ddpm' else 0.0
    if not sr:  # recorded with the sampler settings; the guided samples pass their pairs
      e.contrast_scale = plan.contrast_scale
  # Each stage samples with the encoder it trained with (the config saved in its checkpoint).
  return c


def sampling_settings(cascade) -> dict[str, dict[str, Any]]:
  """Each sampled stage's sampler settings (`cascade_config(...)`): with the plan and the
  weights, what the samples depend on, so a change to a stage config's sampler section
  invalidates a finished run and its cached samples. The guidance scale is left out: the
  demo sets it for each setting it samples."""
  from diffusion_jax.pipelines import common as pipelines_common
  return {name: {k: cascade.stages[name][k] for k in pipelines_common.SETTINGS
                 if k != 'guidance_scale'}
          for name in cascade.order}


def export_own_clip(config, root: str) -> None:
  """After the clip stage: its EMA parameters as a transformers CLIP in ROOT/clip/export
  (nothing is written when that checkpoint is exported already)."""
  from diffusion_jax.tools import export_clip
  out = os.path.join(root, 'clip', 'export')
  info = export_clip.export_stage(os.path.join(root, "clip"), out)
  print(f'    CLIP of step {info["step"]} ({info["params"]} params) -> {out}', flush=True)


def stage_waves(plan: Plan) -> list[tuple[tuple[str, int], ...]]:
  """The stages in groups that can train at once: a stage that reads the plan's own CLIP
  waits for the clip stage; the others depend on nothing (each SR stage trains on
  ground-truth low-res images, not on the stage before)."""
  clip = tuple(s for s in plan.stages if s[0] == 'clip')
  rest = tuple(s for s in plan.stages if s[0] != 'clip')
  return [wave for wave in (clip, rest) if wave]


def worker_cpu_devices(wave: Sequence[tuple[str, int]], batch_size: int,
                       cores: int | None = None) -> dict[str, int]:
  """CPU devices per stage of a wave trained in parallel processes: the longest stage (most
  steps) gets one per core, its batch sharded over them, when they divide the batch; the
  others one each. The longest stage trains alone once the others finish, and one device
  leaves much of a second core idle inside its step: the demo's base (batch 16, 32 px)
  steps in 334 ms on two devices against 420 on one, alone on a 2-core host, and in 562
  against 594 beside the SR stage."""
  cores = int(cores or os.cpu_count() or 1)
  longest = max(wave, key=lambda s: s[1])[0]
  split = cores if batch_size % cores == 0 else 1
  return {stage: split if stage == longest else 1 for stage, _ in wave}


def train_stages(plan: Plan, root: str, parallel: int = 2) -> dict[str, float]:
  """Trains (or resumes, or skips when finished) every stage; returns seconds per stage.

  Up to `parallel` independent stages train at once, each in its own process: one small
  train step leaves much of a 2-core CPU idle (two processes run 1.5 steps/s each where one
  alone runs 2.4), and the results are the same as one after another. CPU devices per
  process: `worker_cpu_devices`.
  """
  seconds, n = {}, len(plan.stages)
  index = {stage: i for i, (stage, _) in enumerate(plan.stages)}
  verbose = logging.getLogger().isEnabledFor(logging.INFO)
  for wave in stage_waves(plan):
    configs = {}
    for stage, steps in wave:
      configs[stage] = stage_config(plan, stage, steps, root)
      crop = configs[stage].input.get('train_crop_size')
      print(f'[{index[stage] + 1}/{n}] {plan.family} {stage}: {steps} steps, batch '
            f'{plan.batch_size}, {configs[stage].input.image_size} px'
            f'{f" ({crop} px crops)" if crop else ""} -> {os.path.join(root, stage)}',
            flush=True)
    if parallel > 1 and len(wave) > 1:
      import concurrent.futures
      import multiprocessing
      devices = worker_cpu_devices(wave, plan.batch_size)
      with concurrent.futures.ProcessPoolExecutor(
          min(parallel, len(wave)), mp_context=multiprocessing.get_context('spawn')) as pool:
        futures = [pool.submit(_train_stage, configs[stage], stage, steps, root, verbose,
                               devices[stage])
                   for stage, steps in wave]
        for (stage, _), future in zip(wave, futures):
          seconds[stage] = future.result()
    else:
      for stage, steps in wave:
        seconds[stage] = _train_stage(configs[stage], stage, steps, root)
  return seconds


def _train_stage(config, stage: str, steps: int, root: str,
                 verbose: bool | None = None, cpu_devices: int | None = None) -> float:
  """One stage's `stage_config` to its last step (in a worker process when `verbose` is
  given, on `cpu_devices` CPU devices); seconds."""
  if verbose is not None:  # before the imports below, which log as they load
    configure_logging(verbose)
  if cpu_devices is not None:  # before JAX starts in this worker
    from diffusion_jax import parallel
    parallel.use_cpu_devices(cpu_devices)
  from diffusion_jax.train import loop
  start = time.perf_counter()
  metrics = loop.train(config, os.path.join(root, stage), hooks=(_Printer(stage, steps),))
  took = time.perf_counter() - start
  loss = metrics.get('loss')
  print(f'    {stage} done at step {metrics.get("step")}'
        + (f', loss {loss:.4f}' if loss is not None else '') + f' ({took:.0f} s)', flush=True)
  if stage == 'clip':
    export_own_clip(config, root)
  return took


class _Printer:
  """Progress on stdout: steps/s, ETA and the loss, every 50 steps."""

  def __init__(self, stage: str, total: int, every: int = 50):
    self.stage, self.total, self.every = stage, total, every
    self.first = None

  def __call__(self, step, state, trainer, metrics):
    del state, trainer
    now = time.perf_counter()
    if self.first is None:
      self.first = (step, now)  # the first step includes compilation: rates start after it
      return
    if step % self.every and step != self.total:
      return
    done = step - self.first[0]
    rate = done / max(now - self.first[1], 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    loss = f'  loss {float(metrics["loss"]):.4f}' if 'loss' in metrics else ''
    print(f'    {self.stage} step {step}/{self.total}  {rate:.2f} steps/s  '
          f'ETA {eta / 60:.1f} min{loss}', flush=True)


def sample_setting(pipe, plan: Plan, settings: dict, captions: Sequence[str], guidance: float,
                   cache_dir: str, batch: int = 48) -> np.ndarray:
  """One cascade sample per caption at a guidance scale, with the plan's shape pairs when
  guided; cached per (plan, sampler `settings` from `sampling_settings`, scale, captions)."""
  import jax
  key = _hash({'plan': dataclasses.asdict(plan), 'sampling': settings,
               'captions': list(captions), 'g': guidance})
  path = os.path.join(cache_dir, f'samples_g{guidance:g}_{key}.npz')
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      return f['images']
  os.makedirs(cache_dir, exist_ok=True)
  out = []
  rng = jax.random.PRNGKey(plan.seed + 1)
  start = time.perf_counter()
  for i, lo in enumerate(range(0, len(captions), batch)):
    part = list(captions[lo:lo + batch])
    contrast = {}
    if plan.contrast_scale and guidance != 1.0:
      contrast = dict(contrasts=[shapes.binding_contrasts(c) for c in part],
                      contrast_scale=plan.contrast_scale)
    out.append(pipe.generate(part, jax.random.fold_in(rng, i), guidance_scale=guidance,
                             **contrast))
    done = lo + len(part)
    rate = done / (time.perf_counter() - start)
    print(f'    guidance {guidance:g}: {done}/{len(captions)} images  '
          f'({rate:.2f} images/s)', flush=True)
  images = np.concatenate(out)
  io_util.replace_atomically(path, lambda tmp: np.savez(tmp, images=images))
  return images


def run(root: str, plan: Plan, parallel: int = 2) -> dict[str, Any]:
  """The whole demo; returns what it writes to ROOT/alignment.json. `parallel`: how many
  independent stages train at once (1: one after another, in this process)."""
  validation.check_writable_dir(root, '--workdir')
  check_plan(plan, root)
  root = os.path.abspath(root)
  os.makedirs(root, exist_ok=True)
  result_path = os.path.join(root, 'alignment.json')
  cascade = cascade_config(plan, root)
  settings = sampling_settings(cascade)
  plan_hash = _hash({'plan': dataclasses.asdict(plan), 'sampling': settings})
  if os.path.exists(result_path):
    with open(result_path) as f:
      previous = json.load(f)
    if previous.get('plan_hash') == plan_hash and os.path.exists(
        os.path.join(root, 'samples', 'captions.json')):
      print(f'already finished (plan {plan_hash}): {result_path}')
      print_summary(previous)
      return previous
  started = time.perf_counter()
  train_seconds = train_stages(plan, root, parallel)

  captions = plan_eval_captions(plan)
  print(f'sampling {len(captions)} held-out captions through {" -> ".join(plan.order)} '
        f'({plan.sampler}, {plan.sample_steps} steps, {plan.sr_sample_steps} per SR stage), '
        'with and without guidance',
        flush=True)
  from diffusion_jax import pipelines
  pipe = pipelines.load(cascade, root)
  cache = os.path.join(root, 'demo_cache')
  scales = (1.0, float(plan.guidance_scale))
  results = {}
  sample_seconds = {}
  guided = None
  for scale in scales:
    start = time.perf_counter()
    images = sample_setting(pipe, plan, settings, captions, scale, cache)
    sample_seconds[f'{scale:g}'] = time.perf_counter() - start
    results[f'guidance_{scale:g}'] = rates_by_kind(images, captions)
    guided = images
  write_samples(os.path.join(root, 'samples'), guided, captions)
  result = {
      'family': plan.family,
      'cascade': list(plan.order),
      'image_size': int(guided.shape[1]),
      'guidance_scales': list(scales),
      'samples_guidance_scale': float(plan.guidance_scale),
      'rates': results,
      'goal': {'single_all': 0.8, 'relation_all': 0.5},
      'plan': dataclasses.asdict(plan),
      'sampling': settings,
      'plan_hash': plan_hash,
      'seconds': {'train': train_seconds, 'sample': sample_seconds,
                  'total_this_run': time.perf_counter() - started},
      'text_encoder': text_encoder_note(plan),
  }
  _atomic_json(result_path, result)
  result = json.loads(json.dumps(result))  # as a re-run reads it back (lists, not tuples)
  print_summary(result)
  print(f'wrote {os.path.join(root, "samples")}/ (*.png, captions.json, grid.png) and '
        f'{result_path}')
  return result


def text_encoder_note(plan: Plan) -> str:
  if plan.family == 'imagen':
    return plan.text_encoder_path or 'random init, frozen (no pretrained weights offline)'
  if 'clip' in dict(plan.stages):
    return 'CLIP trained on Shapes by the clip stage, frozen (clip/export)'
  return 'trained jointly'


def print_summary(result: dict) -> None:
  cols = ('color', 'shape', 'count', 'relation', 'all')
  print(f'Shapes oracle on {result["family"]} samples ({" -> ".join(result["cascade"])}, '
        f'{result["image_size"]} px):')
  print(f'  {"guidance":>8}  {"kind":<12} {"n":>4}  ' + '  '.join(f'{c:>8}' for c in cols))
  for setting, by_kind in result['rates'].items():
    for kind in KINDS + ('overall',):
      if kind not in by_kind:
        continue
      r = by_kind[kind]
      vals = '  '.join('     n/a' if r[c] is None else f'{r[c]:8.3f}' for c in cols)
      print(f'  {setting.split("_")[1]:>8}  {kind:<12} {r["n"]:>4}  {vals}')


# CLI ----------------------------------------------------------------------------------------------

def parse_steps(spec: str) -> dict[str, int]:
  """'clip:600,prior:1500' -> {'clip': 600, 'prior': 1500}."""
  out = {}
  for item in filter(None, (p.strip() for p in spec.split(','))):
    name, _, n = item.partition(':')
    if not name or not n.isdigit() or int(n) < 1:
      raise ValueError(f'--steps: {item!r} is not STAGE:N with N >= 1')
    out[name] = int(n)
  return out


def check_plan(plan: Plan, root: str) -> None:
  """Every stage config and the cascade config the plan makes are valid
  (`diffusion_jax.validation`), and its counts and scales in range: errors.InputError
  before anything trains."""
  for name, value in (('--train_examples', plan.train_examples),
                      ('--sample_steps', plan.sample_steps),
                      ('--sr_sample_steps', plan.sr_sample_steps),
                      ('--per_kind', min(plan.per_kind.values()))):
    if not value >= 1:
      raise errors.InputError(f'{name}={value}: must be at least 1')
  for name, value in (('--guidance_scale', plan.guidance_scale),
                      ('--contrast_scale', plan.contrast_scale)):
    if not value >= 0:
      raise errors.InputError(f'{name}={value}: must be >= 0')
  for stage, steps in plan.stages:
    if steps < 1:
      raise errors.InputError(f'{stage} train steps={steps}: must be at least 1 '
                              '(--base_steps, --sr_steps, --steps=STAGE:N)')
    config = stage_config(plan, stage, steps, root)
    if 'clip' in dict(plan.stages) and _uses_clip(config):
      config.text_encoder.path = None  # the plan's own CLIP: exported once its stage trains
    validation.check_stage_config(config)
  validation.check_cascade_config(cascade_config(plan, root))


def with_steps(plan: Plan, base: int | None, sr: int | None, steps: dict[str, int]) -> Plan:
  """The plan with train steps overridden: --base_steps/--sr_steps for a two-stage (base +
  super-resolution) family, --steps=stage:N for any stage."""
  names = [s for s, _ in plan.stages]
  for flag_name, value in (('--base_steps', base), ('--sr_steps', sr)):
    if value is not None and value < 1:
      raise ValueError(f'{flag_name}={value}: must be at least 1')
  new = dict(plan.stages)
  if base is not None or sr is not None:
    if len(names) != 2:
      raise ValueError(f'--base_steps/--sr_steps name the two stages of imagen/glide; for '
                       f'{plan.family} use --steps={",".join(f"{n}:N" for n in names)}')
    new.update({k: v for k, v in zip(names, (base, sr)) if v is not None})
  unknown = sorted(set(steps) - set(names))
  if unknown:
    raise ValueError(f'--steps: {plan.family} has no stage {", ".join(unknown)} '
                     f'(its stages: {", ".join(names)})')
  new.update(steps)
  return dataclasses.replace(plan, stages=tuple((n, new[n]) for n in names))


def configure_logging(verbose: bool) -> None:
  """The demo CLIs' logging: our progress lines only, or every library's logs (`-v`)."""
  logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                      format='%(asctime)s %(name)s: %(message)s')
  for noisy in ('absl', 'orbax', 'jax', 'tensorflow'):
    logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


VERBOSE_ALIASES = {'-v': '--verbose'}  # absl's own -v is --verbosity


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """The CLI's flags: defined when the demo runs as a program (tests and `claims` import this
  module for its functions)."""
  del sys_argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('workdir', None, 'root of the run (one dir per stage)', required=True,
                      **fv)
  flags.DEFINE_enum('family', 'imagen', sorted(DEFAULT_STEPS), 'the cascade to train', **fv)
  flags.DEFINE_integer('base_steps', None, 'train steps of the base stage', **fv)
  flags.DEFINE_integer('sr_steps', None, 'train steps of the super-resolution stage', **fv)
  flags.DEFINE_string('steps', None,
                      'train steps per stage, e.g. clip:600,prior:1000,decoder64:1500', **fv)
  flags.DEFINE_integer('train_examples', None, 'Shapes training-set size', **fv)
  flags.DEFINE_integer('sample_steps', None, 'sampler steps of the first stage (and of any '
                       'that is not an SR stage)', **fv)
  flags.DEFINE_integer('sr_sample_steps', None, 'sampler steps of each SR stage', **fv)
  flags.DEFINE_float('guidance_scale', None, 'classifier-free guidance scale', **fv)
  flags.DEFINE_float('contrast_scale', None,
                     "weight of the guided samples' shape pairs, each object's noun phrase "
                     "against it with the other object's shape (default: 1.5 for imagen; 0: "
                     'none)', **fv)
  flags.DEFINE_integer('per_kind', None, 'evaluation captions per kind (single, count, '
                       'conjunction, relation)', **fv)
  flags.DEFINE_string('text_encoder_path', None, 'a converted transformers T5 directory', **fv)
  flags.DEFINE_integer('seed', None, 'seed of the training sets, the stages and the samples',
                       **fv)
  flags.DEFINE_string('caption_rewrite', None,
                      'how the stages read captions (input.caption_rewrite): none or a '
                      'registered rewrite (shapes_canonical; default: shapes_canonical for '
                      'imagen, none for glide and unclip)', **fv)
  flags.DEFINE_integer('parallel_stages', 2, 'independent stages trained at once, each in its '
                       'own process (1: one after another)', **fv)
  flags.DEFINE_integer('cpu_devices', None, 'CPU devices this process samples on, the batch '
                       'sharded over them (default: one per core)', **fv)
  flags.DEFINE_bool('verbose', False, 'library logs too (-v)', **fv)


def plan_from_flags(F) -> Plan:
  """The plan the command line asks for; ValueError for a bad combination."""
  overrides: dict[str, Any] = dict(train_examples=F.train_examples,
                                   sample_steps=F.sample_steps,
                                   sr_sample_steps=F.sr_sample_steps,
                                   guidance_scale=F.guidance_scale,
                                   contrast_scale=F.contrast_scale, seed=F.seed,
                                   text_encoder_path=F.text_encoder_path)
  plan = default_plan(F.family, **overrides)
  plan = with_steps(plan, F.base_steps, F.sr_steps, parse_steps(F.steps or ''))
  if F.per_kind:
    plan = dataclasses.replace(plan, per_kind={k: F.per_kind for k in KINDS})
  if F.caption_rewrite:
    from diffusion_jax.data import registry  # noqa: PLC0415
    registry.import_modules(MODULES)
    known = ('none', *registry.caption_rewrites())
    if F.caption_rewrite not in known:
      raise ValueError(f'--caption_rewrite={F.caption_rewrite}: choose one of '
                       f'{", ".join(known)}')
    plan = dataclasses.replace(
        plan, caption_rewrite=None if F.caption_rewrite == 'none' else F.caption_rewrite)
  return plan


def main(argv, F: flags.FlagValues = flags.FLAGS) -> None:
  del argv
  configure_logging(F.verbose)
  from diffusion_jax import parallel
  try:
    parallel.use_cpu_devices(F.cpu_devices)
    plan = plan_from_flags(F)
  except ValueError as e:
    raise cli.CLIError(e) from None
  try:
    run(F.workdir, plan, max(1, F.parallel_stages))
  except (ValueError, FileNotFoundError) as e:
    raise cli.CLIError(e) from None


if __name__ == '__main__':
  from diffusion_jax import hugepages
  hugepages.reexec_with_huge_pages()
  define_flags()
  cli.run(main, aliases=VERBOSE_ALIASES)

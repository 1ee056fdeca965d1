"""Zero-shot COCO FID-30K, as in the Imagen, GLIDE and DALL·E 2 tables (DESIGN.md section 7).

    result = protocol.run(generate_fn, workdir=..., inception_path=..., config=ProtocolConfig(),
                          sampling={'guidance': 3.0, 'sampler': 'ddim', 'steps': 250})

1. Captions: every caption of the COCO 2014 validation images (TFDS `coco_captions`, whose
   Karpathy splits val + test + restval are exactly the 40,504 val2014 images), flattened in
   source order; `num_samples` of them drawn without replacement by a numpy Generator seeded
   with `caption_seed`. The list and its sha256 are written to the workdir.
2. Reference statistics: the same images, shorter side resized to 256 (PIL bicubic) and
   center-cropped to 256x256, uint8 -> Inception pool3 -> float64 mean/covariance; cached as
   .npz next to a key of everything that changes them (splits, count, size, weights hash).
3. Samples: `generate_fn(prompts, rng) -> uint8 [N, H, W, 3]`, one image per caption, in
   shards of `shard_size` captions written atomically as .npz (uint8 images + caption
   indices). Shard i always uses the key fold_in(PRNGKey(sample_seed), i) and batch j inside
   it fold_in(that, j), so a killed run continues from the shards on disk and produces the
   same images as an uninterrupted one.
4. FID in float64 (`fid.frechet_distance`), and optionally the CLIP score of the same
   pairs; `result.json` records N, guidance, sampler, steps, resize, the Inception weights'
   sha256 and the reference statistics' hash beside the number.

Multi-process: every process calls `generate_fn` with the same prompts and keys (it is
expected to shard the batch over all devices itself); process 0 writes shards and results;
the workdir must be shared. Feature extraction splits each batch over processes and merges
the statistics.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from diffusion_jax import io_util
from diffusion_jax.eval import fid

COCO2014_VAL_SPLITS = ('val', 'test', 'restval')
FID_RESIZE = ('bilinear to 299x299 as pytorch-fid (torch interpolate, align_corners=False, '
              'no antialias), inputs uint8/255 scaled to [-1, 1]')
REFERENCE_PREPROCESS = 'shorter side to {size} px (PIL bicubic), center crop {size}x{size}, uint8'


@dataclasses.dataclass
class ProtocolConfig:
  num_samples: int = 30_000
  caption_seed: int = 0
  sample_seed: int = 0
  image_size: int = 256              # generated and reference images, pixels
  shard_size: int = 1000             # captions per saved shard
  batch_size: int = 50               # prompts per generate_fn call
  feature_batch_size: int = 100      # images per Inception step (all devices)
  splits: tuple[str, ...] = COCO2014_VAL_SPLITS
  reference_images: int | None = None  # None: every image of the splits
  data_dir: str | None = None        # TFDS data dir (None: $TFDS_DATA_DIR)


# ----------------------------------------------------------------------------- data


def _records(cfg: ProtocolConfig) -> Iterator[dict]:
  from diffusion_jax.data import datasets  # noqa: PLC0415 - TFDS is heavy
  for split in cfg.splits:
    source = datasets.get_source('coco_captions', data_dir=cfg.data_dir, split=split)
    for i in range(len(source)):
      yield source[i]


def coco_captions(cfg: ProtocolConfig) -> list[str]:
  """Every caption of the configured splits, in source order."""
  return [c for rec in _records(cfg) for c in rec['captions']]


def sample_captions(captions: Sequence[str], n: int, seed: int) -> list[str]:
  """`n` captions drawn without replacement (with, only if n exceeds the pool)."""
  if not captions:
    raise ValueError('no captions to draw from')
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(captions), size=n, replace=n > len(captions))
  return [captions[int(i)] for i in idx]


def _sha256_json(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def center_crop_resize(image, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: shorter side to `size` (PIL bicubic), then a center crop. Bytes
  and arrays are decoded as training images are (`io_util`)."""
  from PIL import Image  # noqa: PLC0415
  if isinstance(image, (bytes, bytearray, np.bytes_)):
    im = Image.fromarray(io_util.decode_image_bytes(image))
  else:
    im = Image.fromarray(io_util.image_array_to_rgb8(np.squeeze(image)))
  w, h = im.size
  s = size / min(w, h)
  im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
  w, h = im.size
  left, top = (w - size) // 2, (h - size) // 2
  return np.asarray(im.crop((left, top, left + size, top + size)), np.uint8)


def _process_slice(batch: Sequence, process: int, count: int) -> Sequence:
  per = -(-len(batch) // count)
  return batch[process * per:(process + 1) * per]


def reference_statistics(extractor: fid.InceptionFeatures, cfg: ProtocolConfig, *,
                         weights_sha256: str, cache_dir: str) -> dict:
  """COCO reference statistics, from the cache when its key matches, else computed."""
  key = {'splits': list(cfg.splits), 'reference_images': cfg.reference_images,
         'image_size': cfg.image_size, 'weights_sha256': weights_sha256,
         'preprocess': REFERENCE_PREPROCESS.format(size=cfg.image_size), 'resize': FID_RESIZE}
  path = os.path.join(cache_dir, f'coco_ref_{_sha256_json(key)[:16]}.npz')
  if os.path.isfile(path):
    return fid.load_stats(path)
  limit = cfg.reference_images

  def batches() -> Iterable[np.ndarray]:
    buf, seen = [], 0
    for rec in _records(cfg):
      if limit is not None and seen >= limit:
        break
      buf.append(rec['image'])
      seen += 1
      if len(buf) == extractor.batch_size:
        yield _decode(buf)
        buf = []
    if buf:
      yield _decode(buf)

  def _decode(raw):
    mine = _process_slice(raw, jax.process_index(), jax.process_count())
    if not mine:
      return np.zeros((0, cfg.image_size, cfg.image_size, 3), np.uint8)
    return np.stack([center_crop_resize(r, cfg.image_size) for r in mine])

  stats = extractor.statistics(batches())
  if jax.process_index() == 0:
    fid.save_stats(path, stats.mu, stats.sigma, n=stats.n, key=json.dumps(key, sort_keys=True))
  _barrier('reference_stats')
  return fid.load_stats(path)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- generation


def shard_path(out_dir: str, i: int) -> str:
  return os.path.join(out_dir, f'shard_{i:05d}.npz')


def _valid_shard(path: str, indices: np.ndarray, size: int) -> bool:
  try:
    with np.load(path, allow_pickle=False) as f:
      images, idx = f['images'], f['indices']
      return (images.dtype == np.uint8 and images.shape[1:] == (size, size, 3)
              and np.array_equal(idx, indices) and len(images) == len(indices))
  except Exception:  # noqa: BLE001 - a truncated or foreign file is simply redone
    return False


def generate_samples(generate_fn: Callable, captions: Sequence[str], out_dir: str, *,
                     seed: int, shard_size: int, batch_size: int, image_size: int,
                     log: Callable[[str], None] = print) -> dict[str, int]:
  """Writes every missing or invalid shard; returns {'done_before', 'generated'} shard counts."""
  os.makedirs(out_dir, exist_ok=True)
  n_shards = -(-len(captions) // shard_size)
  base = jax.random.PRNGKey(seed)
  # Decided once, from the files, so that every process skips the same shards.
  todo = [i for i in range(n_shards)
          if not _valid_shard(shard_path(out_dir, i),
                              np.arange(i * shard_size, min((i + 1) * shard_size, len(captions))),
                              image_size)]
  done_before = n_shards - len(todo)
  if done_before:
    log(f'FID samples: {done_before} of {n_shards} shards already in {out_dir}; resuming')
  for i in todo:
    lo, hi = i * shard_size, min((i + 1) * shard_size, len(captions))
    key = jax.random.fold_in(base, i)
    images = []
    for j, s in enumerate(range(lo, hi, batch_size)):
      prompts = list(captions[s:min(s + batch_size, hi)])
      out = np.asarray(generate_fn(prompts, jax.random.fold_in(key, j)))
      if out.dtype != np.uint8 or out.shape != (len(prompts), image_size, image_size, 3):
        raise ValueError(f'generate_fn returned {out.dtype} {out.shape}; expected uint8 '
                         f'{(len(prompts), image_size, image_size, 3)}')
      images.append(out)
    if jax.process_index() == 0:
      # A killed write leaves no shard that looks finished.
      io_util.replace_atomically(shard_path(out_dir, i), lambda tmp: np.savez(
          tmp, images=np.concatenate(images), indices=np.arange(lo, hi)))
    log(f'FID samples: shard {i + 1}/{n_shards} written')
  _barrier('fid_samples')
  return {'done_before': done_before, 'generated': len(todo)}


def iter_shards(out_dir: str, n_shards: int) -> Iterator[np.ndarray]:
  for i in range(n_shards):
    with np.load(shard_path(out_dir, i), allow_pickle=False) as f:
      yield np.asarray(f['images'])


# ----------------------------------------------------------------------------- the run


def run(generate_fn: Callable, *, workdir: str, inception_path: str,
        config: ProtocolConfig | None = None, sampling: dict[str, Any] | None = None,
        clip_encoder=None, inception_overrides: dict | None = None, mesh=None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) the protocol in `workdir`; writes and returns `result.json`'s content.

  sampling: what produced the samples, recorded verbatim; must include `guidance`, `sampler`
  and `steps` (e.g. {'guidance': 3.0, 'sampler': 'ddim', 'steps': 250, 'cascade': ...}).
  """
  from diffusion_jax import convert  # noqa: PLC0415
  cfg = config or ProtocolConfig()
  sampling = dict(sampling or {})
  missing = [k for k in ('guidance', 'sampler', 'steps') if sampling.get(k) is None]
  if missing:
    raise ValueError(f'sampling must record {missing} (they change the number)')
  start = time.time()
  # First, so a missing or bad weights file is reported before any caption scan or sampling.
  module, params = convert.load_inception(inception_path, **(inception_overrides or {}))
  weights_sha = convert.file_sha256(inception_path)
  os.makedirs(workdir, exist_ok=True)

  all_captions = coco_captions(cfg)
  captions = sample_captions(all_captions, cfg.num_samples, cfg.caption_seed)
  captions_sha = _sha256_json(captions)
  cap_path = os.path.join(workdir, 'captions.json')
  if os.path.isfile(cap_path):  # A resumed run must continue the same caption list.
    with open(cap_path) as f:
      if json.load(f).get('sha256') != captions_sha:
        raise ValueError(f'{cap_path} holds a different caption list (other seed, N or data): '
                         'use a fresh workdir')
  elif jax.process_index() == 0:
    with open(cap_path, 'w') as f:
      json.dump({'sha256': captions_sha, 'seed': cfg.caption_seed, 'splits': list(cfg.splits),
                 'pool': len(all_captions), 'captions': captions}, f)

  extractor = fid.InceptionFeatures(module, params, mesh=mesh,
                                    batch_size=cfg.feature_batch_size)
  ref = reference_statistics(extractor, cfg, weights_sha256=weights_sha,
                             cache_dir=os.path.join(workdir, 'reference'))

  sample_dir = os.path.join(workdir, 'samples')
  progress = generate_samples(generate_fn, captions, sample_dir, seed=cfg.sample_seed,
                              shard_size=cfg.shard_size, batch_size=cfg.batch_size,
                              image_size=cfg.image_size, log=log)
  n_shards = -(-len(captions) // cfg.shard_size)

  def sample_batches():
    for images in iter_shards(sample_dir, n_shards):
      for s in range(0, len(images), extractor.batch_size):
        chunk = images[s:s + extractor.batch_size]
        yield chunk[_local_range(len(chunk))]

  stats = extractor.statistics(sample_batches())
  value = fid.frechet_distance(stats.mu, stats.sigma, ref['mu'], ref['sigma'])
  sample_stats_path = os.path.join(workdir, 'sample_stats.npz')
  result: dict[str, Any] = {
      'metric': 'FID',
      'fid': value,
      'num_samples': stats.n,
      'num_reference': ref['n'],
      'guidance': sampling['guidance'],
      'sampler': sampling['sampler'],
      'steps': sampling['steps'],
      'sampling': sampling,
      'image_size': cfg.image_size,
      'resize': FID_RESIZE,
      'reference_preprocess': REFERENCE_PREPROCESS.format(size=cfg.image_size),
      'reference_splits': list(cfg.splits),
      'inception_weights_sha256': weights_sha,
      'reference_stats_sha256': ref['sha256'],
      'caption_seed': cfg.caption_seed,
      'captions_sha256': captions_sha,
      'caption_pool': len(all_captions),
      'sample_seed': cfg.sample_seed,
      'shards': n_shards,
      'shards_resumed': progress['done_before'],
      'processes': jax.process_count(),
      'devices': jax.device_count(),
      'jax_version': jax.__version__,
      'seconds': round(time.time() - start, 3),
  }
  if clip_encoder is not None:
    from diffusion_jax.eval import clip_score  # noqa: PLC0415
    acc = clip_score.ClipScoreAccumulator(clip_encoder)
    for i, images in enumerate(iter_shards(sample_dir, n_shards)):
      acc.update(images, captions[i * cfg.shard_size:i * cfg.shard_size + len(images)])
    result.update({k: v for k, v in acc.result().items() if k != 'n'})
    result['clip_model'] = clip_score.encoder_info(clip_encoder)
  if jax.process_index() == 0:
    result['sample_stats_sha256'] = fid.save_stats(sample_stats_path, stats.mu, stats.sigma,
                                                   n=stats.n)
    path = io_util.write_json(os.path.join(workdir, 'result.json'), result)
    log(f'FID-{stats.n} {value:.4f} -> {path}')
  return result


def _local_range(n: int) -> slice:
  per = -(-n // jax.process_count())
  p = jax.process_index()
  return slice(p * per, (p + 1) * per)


# ----------------------------------------------------------------------------- comparisons

COMPARE_COLUMNS = ('name', 'guidance', 'sampler', 'steps', 'num_samples', 'fid', 'clip_score',
                   'alignment_all')


def _cell(v) -> str:
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return '–'
  if isinstance(v, float):
    return f'{v:.3f}'
  if isinstance(v, dict):
    return ', '.join(f'{k}={_cell(x)}' for k, x in v.items())
  return str(v)


def compare_table(results: Sequence[dict], columns: Sequence[str] = COMPARE_COLUMNS) -> str:
  """A markdown table of result dicts (one row each, in the given order); absent fields: –."""
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in results:
    lines.append('| ' + ' | '.join(_cell(r.get(c)) for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


def plot_tradeoff(results: Sequence[dict], path: str, *, x: str = 'guidance',
                  ys: Sequence[str] = ('fid', 'alignment_all'), size=(640, 400)) -> str:
  """A PNG line plot of each metric in `ys` against `x` (one panel per metric, own scale).

  Drawn with PIL (no plotting library needed); points are sorted by `x`.
  """
  from PIL import Image, ImageDraw  # noqa: PLC0415
  w, h = size
  im = Image.new('RGB', (w, h * len(ys)), 'white')
  draw = ImageDraw.Draw(im)
  colors = [(200, 40, 40), (40, 90, 200), (30, 150, 60), (150, 60, 170)]
  for k, metric in enumerate(ys):
    pts = sorted((float(r[x]), float(r[metric])) for r in results
                 if r.get(x) is not None and r.get(metric) is not None
                 and np.isfinite(float(r[metric])))
    top, left, right, bottom = k * h + 30, 70, w - 20, (k + 1) * h - 40
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, top - 22), f'{metric} vs {x}', fill=(0, 0, 0))
    if not pts:
      draw.text((left + 10, top + 10), 'no data', fill=(0, 0, 0))
      continue
    xs, vs = np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts])
    x0, x1 = xs.min(), xs.max() if xs.max() > xs.min() else xs.min() + 1.0
    y0, y1 = vs.min(), vs.max() if vs.max() > vs.min() else vs.min() + 1.0
    px = left + 10 + (xs - x0) / (x1 - x0) * (right - left - 20)
    py = bottom - 10 - (vs - y0) / (y1 - y0) * (bottom - top - 20)
    color = colors[k % len(colors)]
    draw.line(list(zip(px.tolist(), py.tolist())), fill=color, width=2)
    for a, b, xv, yv in zip(px, py, xs, vs):
      draw.ellipse([a - 4, b - 4, a + 4, b + 4], fill=color)
      draw.text((a + 5, b - 14), f'{yv:.3g}', fill=(0, 0, 0))
      draw.text((a - 8, bottom + 4), f'{xv:g}', fill=(0, 0, 0))
  im.save(path, format='PNG')
  return path

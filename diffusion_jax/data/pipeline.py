"""grain input pipeline: deterministic, sharded, resumable batches of captioned images.

`make_train_iterator(input_cfg, tokenizer=..., seed=...)` returns a `TrainIterator` whose
`next()` yields this process's share of the global batch as numpy:

  image      float32 [B, H, W, 3] in [-1, 1]
  low_res    float32 [B, h, w, 3] in [-1, 1]   (only when input.low_res_size is set)
  text_ids   int32   [B, L]
  text_mask  bool    [B, L]

or, with `input.text_cache` (the frozen encoder's outputs read from a `data.text_cache`
store instead of being computed in the train step), in place of text_ids:

  text_tokens  float32 [B, L, D]  the encoder's token states
  text_pooled  float32 [B, Dp]    its pooled embedding
  text_mask    bool    [B, L]

Captions never go to devices; `iterator.last_captions` holds the last batch's captions for
logging. Turn a batch into global jax.Arrays with `diffusion_jax.parallel.shard_batch`.

Order. Indices 0..N-1 of the source are shuffled with `seed` (grain's index shuffle; every
epoch gets a new permutation), repeated for `num_epochs` (forever by default) and numbered
by their global stream position `pos`. With local batch b, process p of P takes positions
[k*P*b + p*b, k*P*b + (p+1)*b) of global batch k (`block` = b); so
the processes' examples are disjoint and together cover every epoch, and the global batch k
holds stream positions [k*B, (k+1)*B) in that order whatever P is (so a multi-host run sees
the very batches of a single-host one). Every random
choice for an example (crop, caption, degradation) is seeded by (seed, pos), so a batch is
a pure function of (seed, position) and does not depend on threads or timing.

Fault tolerance. An example whose image does not decode, is empty, is larger than
`max_image_pixels` (read from its header, before decoding), or has no caption is skipped and
counted (`iterator.skipped`, by reason in `iterator.skip_reasons`); the batch
is filled from the next examples. A source with no examples, or one where a whole epoch's
worth of consecutive examples fails, raises `DatasetEmptyError` naming the source.

Checkpointing. `iterator.get_state()` / `set_state()` is a small JSON-able dict (grain's
position plus the counters). For orbax, save it as the item `data` next to the train state:

  mngr.save(step, args=ocp.args.Composite(state=..., data=pipeline.save_args(it)))
  mngr.restore(step, args=ocp.args.Composite(state=..., data=pipeline.restore_args(it)))

(grain's checkpoint handler: one JSON file per process, `process_<i>-of-<n>.json`). After
a restore, the next batch is exactly the one an uninterrupted run would have produced.

Fields of `input_cfg` (a ConfigDict or dict; defaults in brackets):
  dataset              a name registered in `data.registry`: the library's 'coco_captions'
                       and 'folder' (`data.datasets`), or a project's
  modules              modules imported before `dataset` and `caption_rewrite` are looked
                       up: a project's registrations, e.g. ('projects.shapes.data',) [()]
  data_dir             TFDS data dir [None: $TFDS_DATA_DIR]
  split                ['train']
  folder_name          config name of a prepared folder ['default']
                       (these three, and the fields a project's dataset adds, are read by the
                       dataset's source_fn: `data.datasets`)
  batch_size           global batch size; divided evenly among processes
  image_size           output side H = W
  low_res_size         side of the SR conditioning input [None: no low_res]
  low_res_degradation  'none' | 'blur' (unCLIP 64->256) | 'bsr' (unCLIP 256->1024) ['none']
  text_max_len         L: token ids are padded / truncated to this length [64]
  shuffle              [True]; grain shuffles indices globally, so there is no shuffle buffer
  num_epochs           [None: repeat forever; finite epochs drop the last partial batch and,
                       with several processes, may end one batch apart: train with None]
  random_crop          random instead of center crop after resizing the short side [False]
  train_crop_size      SR stages: train on random train_crop_size^2 windows of the image
                       and the aligned window of low_res (Imagen's and unCLIP's last
                       upsamplers train on crops; the convolutional U-Net then samples
                       whole images) [None: whole images]
  caption_choice       'random' | 'first' among an example's captions ['random']
  max_image_pixels     images with more pixels (W x H in the file's header) are skipped and
                       counted as too_large without being decoded [io_util.MAX_IMAGE_PIXELS:
                       8192 x 8192]
  caption_rewrite      name of a meaning-preserving rewrite of every caption before it is
                       tokenized, in training and in sampling alike (registered in
                       `data.registry`; the trainer's and the pipelines' tokenizer applies
                       it) [None]
  text_cache           a `data.text_cache` directory (tools/cache_text): batches carry the
                       frozen encoder's cached outputs instead of token ids [''; off]
  num_threads          grain reader threads [4]
  prefetch_buffer_size grain prefetch buffer, in examples [256]
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
from typing import Any, Callable, Mapping

import grain
import numpy as np
from PIL import Image, ImageFilter

from diffusion_jax import io_util
from diffusion_jax.data import datasets, field, registry
from diffusion_jax.data import text_cache as text_cache_lib
from diffusion_jax.data.datasets import DatasetEmptyError

# tokenizer(texts) -> (ids [B, L] int, mask [B, L] bool), injected by the caller.
Tokenizer = Callable[[list], tuple]
DEGRADATIONS = ('none', 'blur', 'bsr')



def caption_rewrite(input_cfg) -> Callable[[str], str] | None:
  """The rewrite `input_cfg.caption_rewrite` names (None: none), looked up in `data.registry`
  after importing `input_cfg.modules`."""
  registry.import_modules(field(input_cfg, 'modules'))
  return registry.caption_rewrite(field(input_cfg, 'caption_rewrite'))


# ----------------------------------------------------------------------------- images


class BadExample(Exception):
  """An example that cannot be used; `reason` is the counter it is skipped under."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason


def decode_image(image, max_pixels: int = io_util.MAX_IMAGE_PIXELS) -> np.ndarray:
  """uint8 [H, W, 3] from encoded bytes (`io_util.decode_image_bytes`: EXIF orientation,
  16-bit, transparency over white, first frame; over `max_pixels` skipped as too_large before
  decoding) or an already decoded array (`io_util.image_array_to_rgb8`); raises BadExample
  under the decoder's reason."""
  try:
    if isinstance(image, (bytes, bytearray, np.bytes_)):
      return io_util.decode_image_bytes(image, max_pixels=max_pixels)
    return io_util.image_array_to_rgb8(image)
  except io_util.ImageDecodeError as e:
    raise BadExample(e.reason, e.detail) from None


def resize_and_crop(image_HW3: np.ndarray, size: int, rng: np.random.Generator | None
                    ) -> np.ndarray:
  """Short side to `size` (antialiased), then a center (rng None) or random square crop."""
  h, w = image_HW3.shape[:2]
  if (h, w) == (size, size):
    return image_HW3
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  # PIL's resampling filters widen with the downscale factor, i.e. they antialias.
  im = Image.fromarray(image_HW3).resize((nw, nh), Image.BICUBIC, reducing_gap=None)
  if rng is None:
    top, left = (nh - size) // 2, (nw - size) // 2
  else:
    top, left = int(rng.integers(nh - size + 1)), int(rng.integers(nw - size + 1))
  return np.asarray(im.crop((left, top, left + size, top + size)))


def _resize(image_HW3: np.ndarray, size: int, resample=Image.BICUBIC) -> np.ndarray:
  return np.asarray(Image.fromarray(image_HW3).resize((size, size), resample))


def _gaussian_blur(image_HW3: np.ndarray, sigma: float) -> np.ndarray:
  return np.asarray(Image.fromarray(image_HW3).filter(ImageFilter.GaussianBlur(sigma)))


def _anisotropic_blur(image_HW3: np.ndarray, sx: float, sy: float, angle: float
                      ) -> np.ndarray:
  """Convolves with a rotated anisotropic Gaussian (BSR's blur kernels)."""
  from scipy import ndimage  # noqa: PLC0415
  radius = int(np.ceil(3 * max(sx, sy)))
  yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1].astype(np.float32)
  c, s = np.cos(angle), np.sin(angle)
  u, v = c * xx + s * yy, -s * xx + c * yy
  kernel = np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
  kernel /= kernel.sum()
  out = np.stack([ndimage.convolve(image_HW3[..., i].astype(np.float32), kernel,
                                   mode='reflect') for i in range(3)], -1)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def degrade(image_HW3: np.ndarray, low_res_size: int, kind: str,
            rng: np.random.Generator) -> np.ndarray:
  """The low-resolution conditioning input of an SR stage (uint8 [h, w, 3]).

  none: antialiased bicubic downsampling (Imagen, GLIDE).
  blur: Gaussian blur then downsampling (unCLIP's 64->256 upsampler).
  bsr:  a BSR-style degradation (unCLIP's 256->1024 upsampler, after Zhang et al. 2021):
        random isotropic/anisotropic blur, downsampling with a random filter, Gaussian
        noise and JPEG compression.
  """
  factor = image_HW3.shape[0] / low_res_size
  if kind == 'none':
    return _resize(image_HW3, low_res_size)
  if kind == 'blur':
    sigma = rng.uniform(0.4, 0.6) * factor  # a mild blur: ~half a low-res pixel
    return _resize(_gaussian_blur(image_HW3, sigma), low_res_size)
  if kind == 'bsr':
    x = image_HW3
    if rng.random() < 0.5:
      x = _gaussian_blur(x, rng.uniform(0.1, 1.0) * factor)
    else:
      sx, sy = rng.uniform(0.1, 1.0, size=2) * factor
      x = _anisotropic_blur(x, sx, sy, rng.uniform(0, np.pi))
    resample = (Image.NEAREST, Image.BILINEAR, Image.BICUBIC, Image.BOX)[rng.integers(4)]
    x = _resize(x, low_res_size, resample)
    noise = rng.normal(0.0, rng.uniform(1.0, 25.0), size=x.shape)
    x = np.clip(np.round(x + noise), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format='JPEG', quality=int(rng.integers(30, 96)))
    buf.seek(0)
    with Image.open(buf) as im:
      return np.asarray(im.convert('RGB'))
  raise ValueError(f'low_res_degradation={kind!r} is not one of {", ".join(DEGRADATIONS)}')


def to_float(image_HW3: np.ndarray) -> np.ndarray:
  return image_HW3.astype(np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------- examples


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  image_size: int
  low_res_size: int | None = None
  low_res_degradation: str = 'none'
  random_crop: bool = False
  caption_choice: str = 'random'
  train_crop_size: int | None = None
  max_image_pixels: int = io_util.MAX_IMAGE_PIXELS

  def __post_init__(self):
    crop = self.train_crop_size
    if crop is None:
      return
    if not 0 < crop <= self.image_size:
      raise ValueError(f'input.train_crop_size={crop} must be in [1, image_size='
                       f'{self.image_size}]')
    if self.low_res_size and (self.image_size % self.low_res_size
                              or crop % (self.image_size // self.low_res_size)):
      raise ValueError(f'input.train_crop_size={crop} must be a multiple of image_size / '
                       f'low_res_size = {self.image_size}/{self.low_res_size}, so that the '
                       'low-res window is aligned with the image window')


def process_example(record: Mapping[str, Any], spec: ExampleSpec,
                    rng: np.random.Generator) -> dict[str, Any]:
  """Raw record -> {'image', 'low_res'?, 'caption'}; raises BadExample."""
  captions = [c for c in record.get('captions') or [] if isinstance(c, str) and c.strip()]
  if not captions:
    raise BadExample('missing_caption')
  # Draw in a fixed order so every choice depends only on the example's seed.
  pick = int(rng.integers(len(captions))) if spec.caption_choice == 'random' else 0
  caption = captions[pick]
  crop_rng = rng.spawn(1)[0] if spec.random_crop else None
  degrade_rng = rng.spawn(1)[0]
  image = resize_and_crop(decode_image(record.get('image', b''), spec.max_image_pixels),
                          spec.image_size, crop_rng)
  low_res = (degrade(image, spec.low_res_size, spec.low_res_degradation, degrade_rng)
             if spec.low_res_size else None)
  if spec.train_crop_size:
    image, low_res = _aligned_window(image, low_res, spec.train_crop_size, rng.spawn(1)[0])
  out = {'image': to_float(image), 'caption': caption}
  if low_res is not None:
    out['low_res'] = to_float(low_res)
  return out


def _aligned_window(image_HW3: np.ndarray, low_res_hw3: np.ndarray | None, crop: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
  """A random crop x crop window of the image and the same region of its low-res input
  (the low-res image is degraded from the whole image first, as at sampling time)."""
  size = image_HW3.shape[0]
  factor = size // low_res_hw3.shape[0] if low_res_hw3 is not None else 1
  # Windows start on the low-res grid: top, left are multiples of the downscale factor.
  top, left = (int(rng.integers((size - crop) // factor + 1)) * factor for _ in range(2))
  image_HW3 = image_HW3[top:top + crop, left:left + crop]
  if low_res_hw3 is not None:
    t, l, c = top // factor, left // factor, crop // factor
    low_res_hw3 = low_res_hw3[t:t + c, l:l + c]
  return image_HW3, low_res_hw3


class _Processor:
  """(pos, index) -> processed example, or {'skip': reason, 'key': ...} for a bad one."""

  def __init__(self, source, spec: ExampleSpec, seed: int):
    self.source, self.spec, self.seed = source, spec, int(seed)

  def __call__(self, pos_index: tuple[int, int]) -> dict[str, Any]:
    pos, index = pos_index
    key = f'#{index}'
    try:
      record = self.source[index]
      key = str(record.get('key', key))
      out = process_example(record, self.spec, np.random.default_rng([self.seed, pos]))
    except BadExample as e:
      return {'skip': e.reason, 'key': key, 'detail': str(e)}
    except Exception as e:  # noqa: BLE001 - a bad record must never stop training.
      return {'skip': 'error', 'key': key, 'detail': f'{type(e).__name__}: {e}'}
    out['key'] = key
    return out


# ----------------------------------------------------------------------------- iterator


class TrainIterator:
  """This process's batches; resumable through get_state()/set_state()."""

  def __init__(self, dataset: grain.IterDataset, *, local_batch_size: int, tokenizer,
               text_max_len: int, source_name: str, epoch_length: int,
               text_cache: text_cache_lib.TextCache | None = None):
    self._dataset = dataset
    self.text_cache = text_cache
    self._it = iter(dataset)
    self.local_batch_size = int(local_batch_size)
    self.tokenizer = tokenizer
    self.text_max_len = int(text_max_len)
    self.source_name = source_name
    # All-bad data fails after an epoch of skips, or 1000 in a row on a large dataset.
    self._max_consecutive_skips = max(1, min(int(epoch_length), 1000))
    self.skipped = 0
    self.skip_reasons: collections.Counter = collections.Counter()
    self.examples = 0  # good examples delivered
    self.batches = 0
    self.last_captions: list[str] = []
    self.last_keys: list[str] = []

  def __iter__(self):
    return self

  def _next_example(self) -> dict[str, Any]:
    consecutive = 0
    while True:
      try:
        ex = next(self._it)
      except StopIteration:
        if self.examples == 0:
          raise DatasetEmptyError(f'{self.source_name} yielded no usable example') from None
        raise
      if 'skip' not in ex:
        return ex
      self.skipped += 1
      self.skip_reasons[ex['skip']] += 1
      consecutive += 1
      if self.skipped <= 10:
        logging.warning('skipping example %s of %s: %s', ex['key'], self.source_name,
                        ex['detail'])
      if consecutive >= self._max_consecutive_skips:
        raise DatasetEmptyError(
            f'{self.source_name}: {consecutive} consecutive examples unusable '
            f'({dict(self.skip_reasons)}); nothing to train on')

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    while len(examples) < self.local_batch_size:
      try:
        examples.append(self._next_example())
      except StopIteration:
        if not examples:
          raise
        raise StopIteration from None  # drop the incomplete last batch (finite epochs)
    captions = [ex['caption'] for ex in examples]
    batch = {'image': np.stack([ex['image'] for ex in examples])}
    if 'low_res' in examples[0]:
      batch['low_res'] = np.stack([ex['low_res'] for ex in examples])
    ids, mask = tokenize(self.tokenizer, captions, self.text_max_len)
    if self.text_cache is None:
      batch['text_ids'], batch['text_mask'] = ids, mask
    else:  # the encoder's outputs, read instead of computed (the ids must be the cached ones)
      batch.update(self.text_cache.lookup(captions, ids))
    self.examples += len(examples)
    self.batches += 1
    self.last_captions = captions
    self.last_keys = [ex['key'] for ex in examples]
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-able state taken between batches: restoring it replays the next batch."""
    return {
        'grain': self._it.get_state(),
        'skipped': self.skipped,
        'skip_reasons': dict(self.skip_reasons),
        'examples': self.examples,
        'batches': self.batches,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._it.set_state(state['grain'])
    self.skipped = int(state.get('skipped', 0))
    self.skip_reasons = collections.Counter(state.get('skip_reasons', {}))
    self.examples = int(state.get('examples', 0))
    self.batches = int(state.get('batches', 0))
    self.last_captions, self.last_keys = [], []

  def close(self) -> None:
    """Stops grain's reader threads."""
    self._it.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def metrics(self) -> dict[str, float]:
    """Counters for the trainer's logs: examples, skipped, and skipped by reason."""
    return {'data/skipped': float(self.skipped), 'data/examples': float(self.examples),
            **{f'data/skipped/{reason}': float(n) for reason, n in self.skip_reasons.items()}}


def tokenize(tokenizer: Tokenizer, captions: list[str], max_len: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Calls the injected tokenizer and pads/truncates to [B, max_len] (fixed shapes)."""
  ids, mask = tokenizer(list(captions))
  ids_BL = np.asarray(ids).astype(np.int32)
  mask_BL = np.asarray(mask).astype(bool)
  if ids_BL.ndim != 2 or ids_BL.shape != mask_BL.shape or ids_BL.shape[0] != len(captions):
    raise ValueError(f'tokenizer returned ids {ids_BL.shape} and mask {mask_BL.shape} for '
                     f'{len(captions)} texts; expected two [B, L] arrays')
  length = ids_BL.shape[1]
  if length >= max_len:
    return ids_BL[:, :max_len], mask_BL[:, :max_len]
  pad = ((0, 0), (0, max_len - length))
  return np.pad(ids_BL, pad), np.pad(mask_BL, pad)


# ----------------------------------------------------------------------------- building


def _process_index_and_count(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # noqa: PLC0415 - only needed when not told
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} outside [0, {process_count})')
  return int(process_index), int(process_count)


def batch_shapes(input_cfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Name -> (shape, dtype) of the arrays of one global training batch: what the train step
  is compiled for (an SR stage's images and low-res inputs at its training crop size; token
  ids, not the entries of an `input.text_cache`)."""
  b, size = int(field(input_cfg, 'batch_size')), int(field(input_cfg, 'image_size'))
  length = int(field(input_cfg, 'text_max_len'))
  crop = int(field(input_cfg, 'train_crop_size') or 0) or size
  shapes = {'image': ((b, crop, crop, 3), np.dtype(np.float32)),
            'text_ids': ((b, length), np.dtype(np.int32)),
            'text_mask': ((b, length), np.dtype(bool))}
  low_res = field(input_cfg, 'low_res_size')
  if low_res:
    r = int(low_res) * crop // size
    shapes['low_res'] = ((b, r, r, 3), np.dtype(np.float32))
  return shapes


def source_from_config(input_cfg):
  """The source `input_cfg.dataset` names (`datasets.source_from_config`)."""
  return datasets.source_from_config(input_cfg)


def make_dataset(source, spec: ExampleSpec, *, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int = 0,
                 process_count: int = 1, block: int = 1) -> grain.MapDataset:
  """The per-process stream of processed (or skip-marked) examples as a grain MapDataset."""
  if len(source) == 0:
    raise DatasetEmptyError(f'{source!r} has no examples')
  ds = grain.MapDataset.range(len(source))
  if shuffle:
    ds = ds.shuffle(seed=int(seed) % 2**32)
  ds = ds.repeat(num_epochs)  # reseeds the shuffle every epoch
  ds = ds.map_with_index(lambda pos, index: (pos, index))
  if process_count > 1:
    # Process p reads rows [p*b, (p+1)*b) of every global batch of P*b positions, so the
    # global array assembled from the processes' local batches has the single-process order.
    full, span = ds, block * process_count
    ds = grain.MapDataset.range(len(full) // span * block).map(
        lambda i: full[(i // block) * span + process_index * block + i % block])
  return ds.map(_Processor(source, spec, seed))


def make_train_iterator(input_cfg, *, tokenizer: Tokenizer, seed: int,
                        process_index: int | None = None, process_count: int | None = None,
                        source=None, text_cache: text_cache_lib.TextCache | None = None
                        ) -> TrainIterator:
  """Builds this process's iterator from the `input` config (fields in the module doc).

  tokenizer: `tokenizer(texts) -> (ids [B, L] int, mask [B, L] bool)`.
  source: overrides the config's dataset (any object with __len__/__getitem__ returning raw
  records, see diffusion_jax.data.datasets).
  text_cache: the opened `input.text_cache` (opened here when the config names one); a cache
  built from another dataset is refused (`text_cache.TextCacheError`).
  """
  process_index, process_count = _process_index_and_count(process_index, process_count)
  global_batch = int(field(input_cfg, 'batch_size'))
  if global_batch % process_count:
    raise ValueError(f'input.batch_size={global_batch} is not divisible by the '
                     f'{process_count} processes')
  degradation = field(input_cfg, 'low_res_degradation')
  if degradation not in DEGRADATIONS:
    raise ValueError(f'input.low_res_degradation={degradation!r} is not one of '
                     f'{", ".join(DEGRADATIONS)}')
  caption_choice = field(input_cfg, 'caption_choice')
  if caption_choice not in ('random', 'first'):
    raise ValueError(f'input.caption_choice={caption_choice!r} is not random or first')
  low_res = field(input_cfg, 'low_res_size')
  spec = ExampleSpec(
      image_size=int(field(input_cfg, 'image_size')),
      low_res_size=int(low_res) if low_res else None,
      low_res_degradation=degradation,
      random_crop=bool(field(input_cfg, 'random_crop')),
      caption_choice=caption_choice,
      train_crop_size=int(field(input_cfg, 'train_crop_size') or 0) or None,
      max_image_pixels=int(field(input_cfg, 'max_image_pixels')))
  source = source_from_config(input_cfg) if source is None else source
  if text_cache is None and field(input_cfg, 'text_cache'):
    text_cache = text_cache_lib.open_cache(field(input_cfg, 'text_cache'))
  if text_cache is not None:
    text_cache.check({'dataset': text_cache_lib.dataset_identity(input_cfg, source)})
  num_epochs = field(input_cfg, 'num_epochs')
  ds = make_dataset(source, spec, seed=seed, shuffle=bool(field(input_cfg, 'shuffle')),
                    num_epochs=int(num_epochs) if num_epochs else None,
                    process_index=process_index, process_count=process_count,
                    block=global_batch // process_count)
  read_options = grain.ReadOptions(
      num_threads=int(field(input_cfg, 'num_threads')),
      prefetch_buffer_size=int(field(input_cfg, 'prefetch_buffer_size')))
  return TrainIterator(
      ds.to_iter_dataset(read_options), local_batch_size=global_batch // process_count,
      tokenizer=tokenizer, text_max_len=int(field(input_cfg, 'text_max_len')),
      source_name=repr(source), epoch_length=len(source), text_cache=text_cache)


# ----------------------------------------------------------------------------- orbax


class _GrainCheckpointable:
  """Adapts a TrainIterator to grain's orbax handler (bytes state, start_prefetch).

  The state is captured when the save args are made, so an asynchronous checkpoint that is
  written while training goes on still holds the position at the save step.
  """

  def __init__(self, iterator: TrainIterator, snapshot: bool):
    self.iterator = iterator
    self._state = iterator.get_state() if snapshot else None

  def get_state(self) -> bytes:
    state = self.iterator.get_state() if self._state is None else self._state
    return json.dumps(state, indent=1, sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    pass


def save_args(iterator: TrainIterator):
  """orbax args saving the iterator's current state (use under the item name `data`)."""
  return grain.checkpoint.CheckpointSave(_GrainCheckpointable(iterator, snapshot=True))


def restore_args(iterator: TrainIterator):
  """orbax args restoring the state into `iterator` in place (item name `data`)."""
  return grain.checkpoint.CheckpointRestore(_GrainCheckpointable(iterator, snapshot=False))

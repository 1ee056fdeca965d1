"""Random-access sources of captioned images: TFDS-prepared (array_record) and procedural.

Every source here has `__len__` and `__getitem__(index)` (grain's RandomAccessDataSource
protocol) and returns *raw records* in one format, whatever the dataset:

  {'image': bytes (an encoded image file) or uint8 [H, W, 3|1] array,
   'captions': list[str] (possibly empty),
   'key': str (identifies the example in warnings)}

Decoding, caption checks and everything that may fail on bad data happen later in the
pipeline, where a bad record is skipped and counted instead of crashing a run.

- `coco_captions`: the TFDS catalog builder (COCO 2014, Karpathy splits). Prepare it once
  with `tfds build coco_captions --file_format=array_record --data_dir=...` (downloads
  ~20 GB; grain reads array_record by index); this module only reads what is in the data
  dir and never downloads.
- `captioned_folder`: a builder for a local folder of images with captions, either a
  `captions.jsonl` ({"file": ..., "caption": ...} or {"file": ..., "captions": [...]}) or
  one `.txt` per image (one caption per non-empty line). Image bytes are stored verbatim
  (no re-encoding), so a corrupt file survives preparation and is skipped, counted, at load
  time. Prepare with `python -m diffusion_jax.tools.prepare_folder --src=DIR --data_dir=DIR`.
- `shapes`: the procedural dataset of `diffusion_jax.data.shapes`, rendered on the fly and
  deterministic from (seed, index) (`ShapesSource`), or prepared like the others
  (`shapes_captions` builder) when a fixed file set is wanted.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Sequence

import numpy as np

from diffusion_jax.data import shapes

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif')
DATASETS = ('shapes', 'coco_captions', 'folder')


class DatasetEmptyError(ValueError):
  """A source with no examples; the message names it."""


# ----------------------------------------------------------------------------- Shapes


class ShapesSource:
  """The Shapes dataset rendered on the fly: element i depends only on (seed, i)."""

  def __init__(self, num_examples: int = 100_000, image_size: int = 64, seed: int = 0):
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f'Shapes index {index} out of range [0, {self.num_examples})')
    image, caption = shapes.random_example(self.seed, index, self.image_size)
    return {'image': image, 'captions': [caption], 'key': f'shapes/{self.seed}/{index}'}

  def __repr__(self) -> str:
    return (f'ShapesSource(num_examples={self.num_examples}, image_size={self.image_size}, '
            f'seed={self.seed})')


# ----------------------------------------------------------------------------- folders


def _read_captions_txt(path: str) -> list[str]:
  with open(path, encoding='utf-8', errors='replace') as f:
    return [line.strip() for line in f if line.strip()]


def list_folder(src: str) -> list[tuple[str, list[str]]]:
  """(relative image path, captions) for every image in `src`, sorted by path.

  Images without a caption get an empty list (skipped and counted at load time, so the
  preparation and the skip count agree); jsonl rows naming a missing file are kept and
  fail to decode the same way.
  """
  if not os.path.isdir(src):
    raise FileNotFoundError(f'image folder {src!r} does not exist')
  jsonl = os.path.join(src, 'captions.jsonl')
  if os.path.exists(jsonl):
    by_file: dict[str, list[str]] = {}
    with open(jsonl, encoding='utf-8') as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          name = str(row['file'])
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f'{jsonl}:{line_no}: expected {{"file", "caption"|"captions"}}: {e}')
        caps = row.get('captions', row.get('caption', []))
        caps = [caps] if isinstance(caps, str) else list(caps or [])
        by_file.setdefault(name, []).extend(str(c).strip() for c in caps if str(c).strip())
    return sorted(by_file.items())
  items = []
  for root, dirs, files in os.walk(src):
    dirs.sort()
    for name in sorted(files):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        path = os.path.join(root, name)
        txt = os.path.splitext(path)[0] + '.txt'
        caps = _read_captions_txt(txt) if os.path.exists(txt) else []
        items.append((os.path.relpath(path, src), caps))
  return sorted(items)


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError:
    return b''


class FolderSource:
  """Reads an unprepared folder directly (same records as the prepared builder).

  Handy for quick experiments and small folders; prepared TFDS data is the default since it
  is one file per shard instead of one per image.
  """

  def __init__(self, src: str):
    self.src = src
    self.items = list_folder(src)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    rel, caps = self.items[int(index)]
    return {'image': _read_bytes(os.path.join(self.src, rel)), 'captions': list(caps),
            'key': rel}

  def __repr__(self) -> str:
    return f'FolderSource({self.src!r}, {len(self.items)} images)'


# ----------------------------------------------------------------------------- TFDS

_BUILDERS: dict[str, Any] = {}


def _tfds():
  import tensorflow_datasets as tfds  # noqa: PLC0415 - heavy import, only when TFDS is used
  return tfds


def _no_code_path(tfds):
  """A `code_path` class property that is None.

  TFDS looks for a checksums file next to a builder's source, and on the way needs the
  optional `importlib_resources` package; these builders download nothing, so they have no
  checksums and skip the lookup.
  """
  return tfds.core.utils.classproperty(classmethod(lambda cls: None))


def folder_builder_class():
  """The `captioned_folder` TFDS builder (defined lazily: importing TFDS costs seconds)."""
  if 'folder' in _BUILDERS:
    return _BUILDERS['folder']
  tfds = _tfds()

  class CaptionedFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images with captions from a local folder (given as the manual dir)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Encoded image bytes stored verbatim, captions as a list.'}
    code_path = _no_code_path(tfds)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'Pass the folder as manual_dir: images plus captions.jsonl, or one .txt per image.')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description='Captioned images from a local folder.',
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Tensor(shape=(), dtype=np.object_),
              'captions': tfds.features.Sequence(tfds.features.Text()),
              'file': tfds.features.Text(),
          }),
      )

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(os.fspath(dl_manager.manual_dir))}

    def _generate_examples(self, src):
      for rel, caps in list_folder(src):
        yield rel, {'image': _read_bytes(os.path.join(src, rel)), 'captions': caps,
                    'file': rel}

  _BUILDERS['folder'] = CaptionedFolder
  return CaptionedFolder


def shapes_builder_class():
  """`shapes_captions`: the Shapes dataset written to disk (PNG bytes + caption)."""
  if 'shapes' in _BUILDERS:
    return _BUILDERS['shapes']
  tfds = _tfds()

  class ShapesCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Procedural Shapes scenes; config name `<size>px_<num_examples>_seed<seed>`."""

    VERSION = tfds.core.Version('1.0.0')
    code_path = _no_code_path(tfds)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description='Procedural Shapes scenes with exact captions.',
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Tensor(shape=(), dtype=np.object_),
              'captions': tfds.features.Sequence(tfds.features.Text()),
              'file': tfds.features.Text(),
          }),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      size, num, seed = _parse_shapes_config(self.builder_config.name)
      return {'train': self._generate_examples(size, num, seed)}

    def _generate_examples(self, size, num, seed):
      from PIL import Image  # noqa: PLC0415
      for i in range(num):
        image, caption = shapes.random_example(seed, i, size)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format='PNG')
        yield i, {'image': buf.getvalue(), 'captions': [caption], 'file': f'{i:08d}'}

  _BUILDERS['shapes'] = ShapesCaptions
  return ShapesCaptions


def _parse_shapes_config(name: str) -> tuple[int, int, int]:
  size, num, seed = name.split('_')
  return int(size.removesuffix('px')), int(num), int(seed.removeprefix('seed'))


def _builder(cls, name: str, data_dir: str | None):
  tfds = _tfds()
  config = tfds.core.BuilderConfig(name=name, version=cls.VERSION)
  return cls(config=config, data_dir=data_dir, file_format='array_record')


def prepare_folder(src: str, data_dir: str | None = None, name: str = 'default') -> str:
  """Prepares a captioned folder as array_record; returns the prepared directory."""
  tfds = _tfds()
  builder = _builder(folder_builder_class(), name, data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=src))
  return os.fspath(builder.data_dir)


def prepare_shapes(data_dir: str | None = None, *, image_size: int = 64,
                   num_examples: int = 10_000, seed: int = 0) -> str:
  builder = _builder(shapes_builder_class(), f'{image_size}px_{num_examples}_seed{seed}',
                     data_dir)
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


class RecordSource:
  """Wraps a TFDS data source, converting each example to the raw record format."""

  def __init__(self, source: Sequence[Any], name: str, convert):
    self.source, self.name, self._convert = source, name, convert

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._convert(self.source[int(index)], int(index))

  def __repr__(self) -> str:
    return f'RecordSource({self.name}, {len(self)} examples)'


def _text(x) -> str:
  return x.decode('utf-8', errors='replace') if isinstance(x, bytes) else str(x)


def _texts(x) -> list[str]:
  if x is None:
    return []
  if isinstance(x, (str, bytes)):
    x = [x]
  return [t for t in (_text(v).strip() for v in np.asarray(x, dtype=object).ravel()) if t]


def _convert_plain(example, index: int) -> dict[str, Any]:
  return {'image': example['image'], 'captions': _texts(example.get('captions')),
          'key': _text(example.get('file', index))}


def _convert_coco(example, index: int) -> dict[str, Any]:
  caps = example.get('captions')
  caps = caps.get('text') if isinstance(caps, dict) else caps
  key = example.get('image/filename', example.get('image/id', index))
  return {'image': example['image'], 'captions': _texts(caps), 'key': _text(key)}


def _skip_image_decoding():
  return {'image': _tfds().decode.SkipDecoding()}


def _tfds_data_dir(data_dir: str | None) -> str:
  return data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'


def get_source(dataset: str, *, data_dir: str | None = None, split: str = 'train',
               image_size: int = 64, name: str = 'default', num_examples: int = 100_000,
               seed: int = 0, prepared: bool = False):
  """A random-access source of raw records for `dataset` in DATASETS.

  name: the folder builder's config (one per prepared folder) or, for a prepared Shapes
  set, ignored. num_examples/seed: the Shapes epoch length and content seed.
  Raises DatasetEmptyError (one line, naming the source) when nothing can be read.
  """
  if dataset not in DATASETS:
    raise ValueError(f'input.dataset={dataset!r} is not one of {", ".join(DATASETS)}')
  if dataset == 'shapes' and not prepared:
    source = ShapesSource(num_examples, image_size, seed)
  elif dataset == 'coco_captions':
    tfds = _tfds()
    where = _tfds_data_dir(data_dir)
    try:
      raw = tfds.data_source('coco_captions', split=split, data_dir=data_dir, download=False,
                             decoders=_skip_image_decoding())
    except Exception as e:  # noqa: BLE001 - TFDS raises several types for "not prepared".
      raise DatasetEmptyError(
          f'coco_captions split {split!r} is not prepared in {where} '
          '(run `tfds build coco_captions --file_format=array_record --data_dir=...` once): '
          f'{type(e).__name__}') from None
    source = RecordSource(raw, f'coco_captions[{split}] in {where}', _convert_coco)
  else:
    cls = folder_builder_class() if dataset == 'folder' else shapes_builder_class()
    if dataset == 'shapes':
      name = f'{image_size}px_{num_examples}_seed{seed}'
    builder = _builder(cls, name, data_dir)
    where = os.fspath(builder.data_dir)
    if not builder.is_prepared():
      hint = ('python -m diffusion_jax.tools.prepare_folder --src=DIR --data_dir=...'
              if dataset == 'folder' else 'diffusion_jax.data.datasets.prepare_shapes(...)')
      raise DatasetEmptyError(f'{dataset} {name!r} is not prepared in {where} (run {hint})')
    raw = builder.as_data_source(split=split)
    source = RecordSource(raw, f'{dataset}/{name}[{split}] in {where}', _convert_plain)
  if len(source) == 0:
    raise DatasetEmptyError(f'{source!r} has no examples')
  return source

"""Random-access sources of captioned images (TFDS-prepared array_record), found by name.

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
- `folder`: the `captioned_folder` builder, for a local folder of images with captions, either a
  `captions.jsonl` ({"file": ..., "caption": ...} or {"file": ..., "captions": [...]}) or
  one `.txt` per image (one caption per non-empty line). Image bytes are stored verbatim
  (no re-encoding), so a corrupt file survives preparation and is skipped, counted, at load
  time. Prepare with `python -m diffusion_jax.tools.prepare_folder --src=IMAGES --data_dir=DATA
  --name=NAME`, which also writes a word-level tokenizer of the captions, prints the train
  flags, and prepares again when the folder changed (`prepare_folder`).

Datasets are found by name (`input.dataset`) in `data.registry`: this module registers
`coco_captions` and `folder`; a project registers its own (a `source_fn(input_cfg)` built on
the helpers here: `field`, `tfds_builder`, `prepared_source`) in a module its configs list
in `input.modules` (e.g. `projects.shapes.data`).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from diffusion_jax import errors
from diffusion_jax.data import field, registry  # noqa: F401 - field: for the projects' sources

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif')


class DatasetEmptyError(errors.InputError):
  """A source with no examples (or not prepared); the message names it and how to prepare it."""


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


def _opens_as_image(path: str) -> bool:
  """Whether an image library reads the file's header (the pixels are decoded at load time)."""
  from PIL import Image
  try:
    with Image.open(path):
      return True
  except Exception:  # noqa: BLE001 - PIL raises many types on files that are not images
    return False


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


def import_tfds():
  import tensorflow_datasets as tfds  # noqa: PLC0415 - heavy import, only when TFDS is used
  return tfds


def no_code_path(tfds):
  """A `code_path` class property that is None.

  TFDS looks for a checksums file next to a builder's source, and on the way needs the
  optional `importlib_resources` package; builders that download nothing have no checksums
  and skip the lookup with this.
  """
  return tfds.core.utils.classproperty(classmethod(lambda cls: None))


def record_features(tfds):
  """The features of a prepared set of raw records: encoded image bytes stored verbatim,
  a list of captions and the file name (the key in warnings)."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(), dtype=np.object_),
      'captions': tfds.features.Sequence(tfds.features.Text()),
      'file': tfds.features.Text(),
  })


def folder_builder_class():
  """The `captioned_folder` TFDS builder (defined lazily: importing TFDS costs seconds)."""
  if 'folder' in _BUILDERS:
    return _BUILDERS['folder']
  tfds = import_tfds()

  class CaptionedFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images with captions from a local folder (given as the manual dir)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Encoded image bytes stored verbatim, captions as a list.'}
    code_path = no_code_path(tfds)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'Pass the folder as manual_dir: images plus captions.jsonl, or one .txt per image.')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self,
                                   description='Captioned images from a local folder.',
                                   features=record_features(tfds))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(os.fspath(dl_manager.manual_dir))}

    def _generate_examples(self, src):
      for rel, caps in list_folder(src):
        yield rel, {'image': _read_bytes(os.path.join(src, rel)), 'captions': caps,
                    'file': rel}

  _BUILDERS['folder'] = CaptionedFolder
  return CaptionedFolder


def tfds_builder(cls, name: str, data_dir: str | None):
  """An array_record builder of `cls` with the config `name` in `data_dir`."""
  tfds = import_tfds()
  config = tfds.core.BuilderConfig(name=name, version=cls.VERSION)
  return cls(config=config, data_dir=data_dir, file_format='array_record')


class FolderError(errors.InputError):
  """Bad input to `prepare_folder` (no such folder, no images, a data dir that cannot be
  written); the message is one line meant for the user."""


FOLDER_FINGERPRINT = 'folder_fingerprint.json'  # in the prepared directory, written last
FOLDER_TOKENIZER = 'tokenizer'  # the word-level tokenizer of the captions, beside it
_STAGING_PREFIX = 'incomplete.prepare_folder.'  # TFDS ignores `incomplete.*` directories
_WORD = re.compile(r'\w+|[^\w\s]+')  # the word tokenizer's pre-tokenizer (Whitespace)


@dataclasses.dataclass(frozen=True)
class PreparedFolder:
  """What `prepare_folder` did: status 'prepared' (first time), 're-prepared' (the folder or
  the settings changed since; `reason` says how) or 'unchanged' (nothing was written)."""
  status: str
  reason: str
  path: str  # the prepared directory, DATA/captioned_folder/NAME/<version>
  data_dir: str  # DATA, absolute
  name: str
  num_images: int
  without_caption: int  # images with no caption (skipped, counted, at load time)
  unreadable: int  # files whose header is not an image's (skipped, counted, at load time)
  several_captions: int  # images with more than one (one is drawn per example)
  tokenizer_path: str
  tokenizer_words: int  # caption words in the tokenizer (the rest map to its unk token)
  caption_words: int  # distinct caption words

  def train_flags(self) -> str:
    """The train command-line flags that read this prepared folder."""
    q = shlex.quote
    return (f'--config.input.dataset=folder --config.input.data_dir={q(self.data_dir)} '
            f'--config.input.folder_name={q(self.name)}')


def caption_words(items: Sequence[tuple[str, list[str]]]) -> list[str]:
  """The distinct lower-cased caption words, most frequent first (ties alphabetically), split
  as the word-level tokenizer splits them."""
  counts = collections.Counter(w for _, caps in items for c in caps
                               for w in _WORD.findall(c.lower()))
  return sorted(counts, key=lambda w: (-counts[w], w))


def folder_fingerprint(src: str, items: Sequence[tuple[str, list[str]]],
                       settings: Mapping[str, Any]) -> dict[str, Any]:
  """What a prepared folder was made from: digests of the sorted (relative path, size,
  mtime) of its images, of their captions and of the preparation settings, and the count.
  Any image added, removed, replaced or touched, and any caption edited, changes it."""
  files, captions = hashlib.sha256(), hashlib.sha256()
  for rel, caps in items:
    try:
      st = os.stat(os.path.join(src, rel))
      stat = [st.st_size, st.st_mtime_ns]
    except OSError:
      stat = None  # a jsonl row naming a missing file (skipped at load time)
    files.update(json.dumps([rel, stat]).encode() + b'\n')
    captions.update(json.dumps([rel, caps]).encode() + b'\n')
  return {'images': files.hexdigest(), 'captions': captions.hexdigest(),
          'settings': dict(settings), 'num_images': len(items)}


def _read_fingerprint(path: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(path, FOLDER_FINGERPRINT), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
  what = [k for k in ('images', 'captions', 'settings') if old.get(k) != new.get(k)]
  count = f'{old.get("num_images", "?")} -> {new["num_images"]} images'
  return f'{" and ".join(what) or "content"} changed ({count})'


def _writable_dir(path: str) -> None:
  try:
    os.makedirs(path, exist_ok=True)
    tempfile.TemporaryFile(dir=path).close()
  except OSError as e:
    raise FolderError(f'data_dir: cannot write to {path!r} ({e.strerror or e})') from None


def prepare_folder(src: str, data_dir: str | None = None, name: str = 'default', *,
                   tokenizer_style: str = 't5', vocab_size: int = 64) -> PreparedFolder:
  """Prepares a captioned folder as array_record, with a word-level tokenizer of its
  captions (`vocab_size` tokens, specials included: the frozen encoder's embedding size;
  less frequent words map to unk), in DATA/captioned_folder/NAME/<version>.

  The prepared directory records the folder's `folder_fingerprint`: preparing again an
  unchanged folder writes nothing ('unchanged'); a changed one (or other settings) is
  prepared again ('re-prepared'). A new version is built in a staging directory beside the
  old one and swapped in by renames once complete (fingerprint written last), so a killed
  run leaves either the old complete version or none, never a partial one; its leftovers
  are removed by the next run (so prepare one NAME at a time). Raises FolderError (one
  line) for bad input.
  """
  if not src or not os.path.isdir(src):
    raise FolderError(f'--src: image folder {src!r} does not exist or is not a folder')
  try:
    items = list_folder(src)
  except ValueError as e:  # a malformed captions.jsonl row
    raise FolderError(str(e)) from None
  if not any(os.path.isfile(os.path.join(src, rel)) for rel, _ in items):
    raise FolderError(f'--src: no images ({", ".join(IMAGE_EXTENSIONS)}) found in {src!r}'
                      + (' (captions.jsonl names none that exist)' if items else ''))
  if not re.fullmatch(r'[A-Za-z0-9][\w.-]*', name or ''):
    raise FolderError(f'--name: {name!r} is not a name (letters, digits, "_", "." and "-")')
  if tokenizer_style not in ('t5', 'clip'):
    raise FolderError(f"tokenizer_style must be 't5' or 'clip', got {tokenizer_style!r}")
  if vocab_size < 4:
    raise FolderError(f'vocab_size must be at least 4 (3 special tokens), got {vocab_size}')
  tfds = import_tfds()
  cls = folder_builder_class()
  settings = {'version': str(cls.VERSION), 'tokenizer_style': tokenizer_style,
              'vocab_size': int(vocab_size)}
  fingerprint = folder_fingerprint(src, items, settings)
  words = caption_words(items)
  kept = words[:vocab_size - 3]  # t5: pad, eos, unk; clip: unk, bos, eos

  final = os.path.abspath(os.path.expanduser(os.fspath(
      tfds_builder(cls, name, data_dir).data_dir)))
  parent = os.path.dirname(final)  # DATA/captioned_folder/NAME
  root = os.path.dirname(os.path.dirname(parent))
  result = functools.partial(
      PreparedFolder, path=final, data_dir=root, name=name, num_images=len(items),
      without_caption=sum(not caps for _, caps in items),
      unreadable=sum(not _opens_as_image(os.path.join(src, rel)) for rel, _ in items),
      several_captions=sum(len(caps) > 1 for _, caps in items),
      tokenizer_path=os.path.join(final, FOLDER_TOKENIZER), tokenizer_words=len(kept),
      caption_words=len(words))
  _writable_dir(parent)
  for leftover in os.listdir(parent):  # from a killed run
    if leftover.startswith(_STAGING_PREFIX):
      shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)

  old = _read_fingerprint(final) if os.path.isdir(final) else None
  if old is not None and {k: old.get(k) for k in fingerprint} == fingerprint:
    return result(status='unchanged', reason='the folder has not changed since it was prepared')
  if old is not None:
    status, reason = 're-prepared', _changes(old, fingerprint)
  elif os.path.isdir(final):
    status, reason = 're-prepared', 'the prepared data has no fingerprint (an older version)'
  else:
    status, reason = 'prepared', 'first time'

  staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=parent)
  try:
    builder = tfds_builder(cls, name, staging)
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints the staging path
      builder.download_and_prepare(
          download_dir=os.path.join(staging, 'downloads'),
          download_config=tfds.download.DownloadConfig(manual_dir=src))
    built = os.fspath(builder.data_dir)
    from diffusion_jax import tokenizer as tokenizer_lib  # noqa: PLC0415 - heavy import
    tokenizer_lib.build_word_tokenizer(kept, os.path.join(built, FOLDER_TOKENIZER),
                                       style=tokenizer_style)
    with open(os.path.join(built, FOLDER_FINGERPRINT), 'w', encoding='utf-8') as f:
      json.dump({**fingerprint, 'src': os.path.abspath(src)}, f, indent=1)
    if os.path.isdir(final):  # out of the way first: TFDS ignores `incomplete.*`
      os.rename(final, os.path.join(staging, 'old'))
    os.rename(built, final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return result(status=status, reason=reason)


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


def convert_record(example, index: int) -> dict[str, Any]:
  """A prepared example with `record_features` -> the raw record format."""
  return {'image': example['image'], 'captions': _texts(example.get('captions')),
          'key': _text(example.get('file', index))}


def _convert_coco(example, index: int) -> dict[str, Any]:
  caps = example.get('captions')
  caps = caps.get('text') if isinstance(caps, dict) else caps
  key = example.get('image/filename', example.get('image/id', index))
  return {'image': example['image'], 'captions': _texts(caps), 'key': _text(key)}


def _skip_image_decoding():
  return {'image': import_tfds().decode.SkipDecoding()}


def _tfds_data_dir(data_dir: str | None) -> str:
  return data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'


def prepared_source(cls, name: str, *, dataset: str, data_dir: str | None, split: str,
                    hint: str) -> RecordSource:
  """The split of the prepared set `cls`/`name` in `data_dir` (`record_features`); raises
  DatasetEmptyError, naming `dataset`, the set, the directory and the `hint` to prepare it,
  when it is not prepared."""
  builder = tfds_builder(cls, name, data_dir)
  where = os.fspath(builder.data_dir)
  if not builder.is_prepared():
    raise DatasetEmptyError(f'{dataset} {name!r} is not prepared in {where} (run {hint})')
  raw = builder.as_data_source(split=split)
  return RecordSource(raw, f'{dataset}/{name}[{split}] in {where}', convert_record)


# ----------------------------------------------------------------------------- by name


def _coco_source(input_cfg) -> RecordSource:
  data_dir, split = field(input_cfg, 'data_dir', None), field(input_cfg, 'split', 'train')
  tfds = import_tfds()
  where = _tfds_data_dir(data_dir)
  try:
    raw = tfds.data_source('coco_captions', split=split, data_dir=data_dir, download=False,
                           decoders=_skip_image_decoding())
  except Exception as e:  # noqa: BLE001 - TFDS raises several types for "not prepared".
    raise DatasetEmptyError(
        f'coco_captions split {split!r} is not prepared in {where} '
        '(run `tfds build coco_captions --file_format=array_record --data_dir=...` once): '
        f'{type(e).__name__}') from None
  return RecordSource(raw, f'coco_captions[{split}] in {where}', _convert_coco)


def _folder_source(input_cfg) -> RecordSource:
  return prepared_source(
      folder_builder_class(), field(input_cfg, 'folder_name', 'default'), dataset='folder',
      data_dir=field(input_cfg, 'data_dir', None), split=field(input_cfg, 'split', 'train'),
      hint='python -m diffusion_jax.tools.prepare_folder --src=IMAGES --data_dir=DATA '
      '--name=NAME')


def _folder_tokenizer(input_cfg) -> str | None:
  """The word-level tokenizer `prepare_folder` wrote beside the prepared folder."""
  builder = tfds_builder(folder_builder_class(), field(input_cfg, 'folder_name', 'default'),
                         field(input_cfg, 'data_dir', None))
  path = os.path.join(os.fspath(builder.data_dir), FOLDER_TOKENIZER)
  return path if os.path.isdir(path) else None


registry.register_dataset('coco_captions', _coco_source)
registry.register_dataset('folder', _folder_source, tokenizer_fn=_folder_tokenizer)


def source_from_config(input_cfg):
  """The random-access source of raw records that `input_cfg.dataset` names, after importing
  the modules `input_cfg.modules` lists (they register their datasets by name).

  Raises ValueError (one line) for a dataset nobody registered and DatasetEmptyError (one
  line, naming the source) when nothing can be read.
  """
  registry.import_modules(field(input_cfg, 'modules', ()))
  source = registry.dataset(field(input_cfg, 'dataset')).source_fn(input_cfg)
  if len(source) == 0:
    raise DatasetEmptyError(f'{source!r} has no examples')
  return source


def get_source(dataset: str, **fields):
  """`source_from_config` of an input config with `dataset` and the given fields, e.g.
  get_source('folder', data_dir=DIR, folder_name='mine') or get_source('coco_captions',
  data_dir=DIR, split='val'). The library's datasets read data_dir [None: $TFDS_DATA_DIR],
  split ['train'] and, for 'folder', folder_name ['default']."""
  return source_from_config({**fields, 'dataset': dataset})

"""Sources: prepared captioned folders (with corrupt files), mock coco_captions, by name."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import datasets, pipeline, registry
from projects.shapes import shapes  # images with known content

NUM_IMAGES, CORRUPT = 50, ('broken_07.png', 'junk_21.jpg', 'empty_33.png')


def tokenizer(texts):
  ids = np.asarray([[len(w) + 1 for w in t.split()[:6]] + [0] * (6 - len(t.split()[:6]))
                    for t in texts], np.int32)
  return ids, ids != 0


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """50 captioned images of varied sizes, 3 of them corrupt (truncated, junk, empty)."""
  src = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  for i in range(NUM_IMAGES):
    corrupt = {int(name.split('_')[1].split('.')[0]): name for name in CORRUPT}
    name = corrupt.get(i, f'img_{i:02d}.png')
    if i in corrupt:
      data = {'broken': _png(np.zeros((30, 30, 3), np.uint8))[:60], 'junk': b'not an image',
              'empty': b''}[name.split('_')[0]]
    else:
      h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
      data = _png((rng.random((h, w, 3)) * 255).astype(np.uint8))
    sub = src / ('a' if i % 2 else 'b')
    sub.mkdir(exist_ok=True)
    (sub / name).write_bytes(data)
    (sub / name).with_suffix('.txt').write_text(f'caption of {i}\nanother caption of {i}\n')
  return src


@pytest.fixture(scope='module')
def prepared(folder, tmp_path_factory):
  """The folder prepared through the CLI, as a user would."""
  data_dir = tmp_path_factory.mktemp('tfds')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'diffusion_jax.tools.prepare_folder', f'--src={folder}',
       f'--data_dir={data_dir}', '--name=mine'],
      capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
      timeout=300)
  assert result.returncode == 0, f'prepare_folder failed:\n{result.stderr[-2000:]}'
  assert f'prepared {NUM_IMAGES} images' in result.stdout, result.stdout
  # 'junk' and 'empty' have no image header; the truncated PNG's header reads (its pixels
  # fail at load time)
  assert '2 unreadable' in result.stdout, result.stdout
  return data_dir


def folder_cfg(data_dir, **overrides):
  cfg = dict(dataset='folder', data_dir=str(data_dir), folder_name='mine', batch_size=1,
             image_size=16, text_max_len=6, num_epochs=1, num_threads=2)
  cfg.update(overrides)
  return cfg


def test_prepared_folder_skips_and_counts_corrupt_files(prepared):
  it = pipeline.make_train_iterator(folder_cfg(prepared), tokenizer=tokenizer, seed=0,
                                    process_index=0, process_count=1)
  keys = []
  for batch in it:
    assert batch['image'].shape == (1, 16, 16, 3)
    keys += it.last_keys
  assert len(keys) == NUM_IMAGES - 3 == it.examples, f'expected 47 examples, got {len(keys)}'
  assert it.skipped == 3, f'expected 3 skipped, got {it.skipped} ({it.skip_reasons})'
  assert it.skip_reasons == {'undecodable_image': 2, 'empty_file': 1}, it.skip_reasons
  assert not {os.path.basename(k) for k in keys} & set(CORRUPT), 'a corrupt file was yielded'
  assert len(set(keys)) == len(keys), 'an image was yielded twice in one epoch'


def test_prepared_folder_batches_with_crop_and_low_res(prepared):
  cfg = folder_cfg(prepared, batch_size=8, image_size=32, low_res_size=8, random_crop=True,
                   low_res_degradation='bsr', num_epochs=None)
  it = pipeline.make_train_iterator(cfg, tokenizer=tokenizer, seed=1, process_index=0,
                                    process_count=1)
  for _ in range(8):  # ~1.3 epochs: the skip count keeps growing across epochs
    batch = next(it)
  assert batch['image'].shape == (8, 32, 32, 3) and batch['low_res'].shape == (8, 8, 8, 3)
  for caption, key in zip(it.last_captions, it.last_keys):
    assert int(caption.split()[-1]) == int(key.split('_')[-1].split('.')[0]), (
        f'caption {caption!r} does not belong to {key}')
  assert it.skipped >= 3


def test_folder_source_reads_jsonl(tmp_path):
  image = shapes.render('a red circle', 24, 0)
  (tmp_path / 'x.png').write_bytes(_png(image))
  (tmp_path / 'y.png').write_bytes(_png(image))
  rows = [{'file': 'x.png', 'caption': 'a red circle'},
          {'file': 'y.png', 'captions': ['one', 'two']},
          {'file': 'missing.png', 'caption': 'gone'}]
  (tmp_path / 'captions.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  source = datasets.FolderSource(str(tmp_path))
  assert [source[i]['captions'] for i in range(3)] == [['gone'], ['a red circle'], ['one', 'two']]
  it = pipeline.make_train_iterator(
      dict(dataset='folder', batch_size=2, image_size=24, num_epochs=1, shuffle=False),
      tokenizer=tokenizer, seed=0, process_index=0, process_count=1, source=source)
  batch = next(it)
  assert it.skip_reasons == {'empty_file': 1}, 'a missing file must be skipped and counted'
  assert shapes.score(batch['image'][0], 'a red circle')['all'], 'image decoded wrongly'


def test_folder_without_images_fails_fast(tmp_path):
  with pytest.raises(datasets.DatasetEmptyError, match='FolderSource'):
    pipeline.make_train_iterator(dict(dataset='folder', batch_size=2, image_size=16),
                                 tokenizer=tokenizer, seed=0, process_index=0, process_count=1,
                                 source=datasets.FolderSource(str(tmp_path)))
  with pytest.raises(datasets.DatasetEmptyError, match='not prepared.*prepare_folder'):
    datasets.get_source('folder', data_dir=str(tmp_path), folder_name='nothing')


def _coco_examples(n):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    buf = io.BytesIO()
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(buf, format='JPEG')
    out.append({'image': buf.getvalue(), 'image/filename': f'COCO_train2014_{i:012d}.jpg',
                'image/id': i,
                'captions': {'text': np.asarray([f'photo {i} first'.encode(),
                                                 f'photo {i} second'.encode()], object),
                             'id': np.asarray([2 * i, 2 * i + 1])}})
  return out


def test_mock_coco_captions_produces_batches():
  import tensorflow_datasets as tfds  # noqa: PLC0415

  examples = _coco_examples(12)
  seen = {}

  def as_data_source(builder, split=None, decoders=None, **kwargs):
    del kwargs
    seen.update(name=builder.name, split=split, decoders=decoders)
    return examples

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    it = pipeline.make_train_iterator(
        dict(dataset='coco_captions', batch_size=4, image_size=32, low_res_size=16),
        tokenizer=tokenizer, seed=0, process_index=0, process_count=1)
    batches = [next(it) for _ in range(4)]
  assert seen['name'] == 'coco_captions' and seen['split'] == 'train'
  assert isinstance(seen['decoders']['image'], tfds.decode.SkipDecoding), (
      'images must reach the pipeline undecoded so that bad ones can be skipped')
  assert batches[0]['image'].shape == (4, 32, 32, 3)
  assert batches[0]['low_res'].shape == (4, 16, 16, 3)
  assert it.skipped == 0 and it.examples == 16
  for caption, key in zip(it.last_captions, it.last_keys):
    i = int(key.split('_')[-1].split('.')[0])
    assert caption in (f'photo {i} first', f'photo {i} second'), (caption, key)


def test_missing_coco_fails_with_one_line(tmp_path):
  with pytest.raises(datasets.DatasetEmptyError) as info:
    datasets.get_source('coco_captions', data_dir=str(tmp_path))
  message = str(info.value)
  assert 'coco_captions' in message and str(tmp_path) in message and '\n' not in message


def test_library_datasets_are_registered_by_name(prepared):
  assert {'coco_captions', 'folder'} <= set(registry.datasets())
  # The registered folder dataset reads what the fixture prepared, through the config fields.
  source = datasets.get_source('folder', data_dir=str(prepared), folder_name='mine')
  assert len(source) == NUM_IMAGES, 'every image of the prepared folder, corrupt ones too'
  assert registry.dataset('folder').source_fn(folder_cfg(prepared)).name == source.name
  assert registry.dataset('folder').vocabulary is None, 'photos have no closed vocabulary'
  with pytest.raises(ValueError, match='input.dataset=.nonexistent. is not registered'):
    datasets.get_source('nonexistent')

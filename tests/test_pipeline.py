"""The grain pipeline: determinism, bit-exact resume through orbax, sharding, conditioning."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from diffusion_jax.data import datasets, pipeline
from projects.shapes import data as shapes_data
from projects.shapes import shapes

WORDS = {w: i + 2 for i, w in enumerate(shapes.VOCABULARY)}  # 0 = pad, 1 = unknown


def tokenizer(texts):
  """Stand-in word tokenizer: (ids [B, L] int32, mask [B, L] bool), L = longest text."""
  rows = [[WORDS.get(w, 1) for w in t.split()] for t in texts]
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  return ids, ids != 0


EPOCH = 24  # Shapes examples per epoch: small, so that tests cross epoch boundaries


def shapes_cfg(**overrides):
  cfg = dict(dataset='shapes', modules=('projects.shapes.data',), batch_size=4, image_size=16,
             text_max_len=12, shapes_num_examples=EPOCH, num_threads=2, prefetch_buffer_size=16)
  cfg.update(overrides)
  return cfg


def make(seed=0, process_index=0, process_count=1, **overrides):
  return pipeline.make_train_iterator(shapes_cfg(**overrides), tokenizer=tokenizer, seed=seed,
                                      process_index=process_index,
                                      process_count=process_count)


def take(it, n):
  out = []
  for _ in range(n):
    batch = next(it)
    out.append((batch, list(it.last_captions)))
  return out


def assert_same(a, b, what):
  (ba, ca), (bb, cb) = a, b
  assert ca == cb, f'{what}: captions differ {ca} vs {cb}'
  assert ba.keys() == bb.keys(), f'{what}: keys differ'
  for k in ba:
    np.testing.assert_array_equal(ba[k], bb[k], err_msg=f'{what}: {k} differs')


def test_batch_format():
  it = make(low_res_size=8, low_res_degradation='blur')
  batch = next(it)
  assert set(batch) == {'image', 'low_res', 'text_ids', 'text_mask'}, (
      'the batch holds exactly the arrays (captions stay on the host)')
  assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['low_res'].shape == (4, 8, 8, 3) and batch['low_res'].dtype == np.float32
  for k in ('image', 'low_res'):
    assert -1 <= batch[k].min() and batch[k].max() <= 1, f'{k} not in [-1, 1]'
    assert batch[k].max() > 0.9, f'{k}: white background should map to ~1'
  assert batch['text_ids'].shape == (4, 12) and batch['text_ids'].dtype == np.int32
  assert batch['text_mask'].dtype == bool
  np.testing.assert_array_equal(batch['text_mask'], batch['text_ids'] != 0)
  assert len(it.last_captions) == 4
  expected = tokenizer(it.last_captions)[0]
  np.testing.assert_array_equal(batch['text_ids'][:, :expected.shape[1]], expected,
                                err_msg='text_ids are not the tokens of last_captions')
  assert 'low_res' not in next(make()), 'low_res present for a base stage'


def test_images_match_captions_at_64px():
  it = make(image_size=64)
  batch = next(it)
  for image, caption in zip(batch['image'], it.last_captions):
    assert shapes.score(image, caption)['all'], f'image does not show {caption!r}'


def test_same_seed_same_batches_different_seed_differs():
  a, b, c = take(make(seed=1), 8), take(make(seed=1), 8), take(make(seed=2), 8)
  for i in range(8):
    assert_same(a[i], b[i], f'batch {i} with the same seed')
  assert [x[1] for x in a] != [x[1] for x in c], 'a different seed gives the same order'


def test_epochs_reshuffle_and_cover_the_data():
  it = make(seed=3, batch_size=EPOCH // 2)
  epochs = [[k for _ in range(2) for k in (next(it), it.last_keys)[1]] for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(f'shapes/0/{i}' for i in range(EPOCH))
  assert epochs[0] != epochs[1], 'every epoch has the same order'
  unshuffled = make(seed=3, batch_size=EPOCH, shuffle=False)
  next(unshuffled)
  assert unshuffled.last_keys == [f'shapes/0/{i}' for i in range(EPOCH)]


@pytest.mark.parametrize('k', [3, 5])  # 6 batches per epoch: k + 20 crosses 3-4 boundaries
def test_resume_through_orbax_is_exact(tmp_path, k):
  cfg = dict(seed=7, low_res_size=8, low_res_degradation='bsr', random_crop=True)
  reference = take(make(**cfg), k + 20)

  it = make(**cfg)
  take(it, k)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(k, args=ocp.args.Composite(data=pipeline.save_args(it)))
    take(it, 2)  # training goes on while an async save may still be writing
    mngr.wait_until_finished()
  del it

  fresh = make(**cfg)  # rebuilt from scratch, as after a preemption
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    assert mngr.latest_step() == k
    mngr.restore(k, args=ocp.args.Composite(data=pipeline.restore_args(fresh)))
  assert fresh.batches == k and fresh.examples == 4 * k, 'counters not restored'
  resumed = take(fresh, 20)
  for i in range(20):
    assert_same(reference[k + i], resumed[i], f'batch {k + i + 1} after resuming at {k}')


def test_state_roundtrip_without_orbax():
  with make(seed=4) as it:
    take(it, 2)
    state = it.get_state()
    expected = take(it, 3)
  with make(seed=4) as other:
    other.set_state(state)
    for i, got in enumerate(take(other, 3)):
      assert_same(expected[i], got, f'batch {i} after set_state')


def test_two_processes_are_disjoint_and_cover_the_epoch():
  p0 = make(seed=5, process_index=0, process_count=2)
  p1 = make(seed=5, process_index=1, process_count=2)
  assert p0.local_batch_size == 2
  keys0 = [key for _ in range(EPOCH // 4) for key in (next(p0), p0.last_keys)[1]]
  keys1 = [key for _ in range(EPOCH // 4) for key in (next(p1), p1.last_keys)[1]]
  assert not set(keys0) & set(keys1), f'processes share examples: {set(keys0) & set(keys1)}'
  assert sorted(keys0 + keys1) == sorted(f'shapes/0/{i}' for i in range(EPOCH)), (
      'the two processes do not cover the epoch')
  # The global batch does not depend on the number of processes.
  single = make(seed=5)
  for b in range(EPOCH // 4):
    next(single)
    assert sorted(single.last_keys) == sorted(keys0[2 * b:2 * b + 2] + keys1[2 * b:2 * b + 2])


def test_batch_size_must_divide_among_processes():
  with pytest.raises(ValueError, match='divisible'):
    make(batch_size=5, process_index=0, process_count=2)


def test_resize_crop_and_degradations():
  rng = np.random.default_rng(0)
  photo = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
  center = pipeline.resize_and_crop(photo, 20, None)
  assert center.shape == (20, 20, 3)
  crops = {pipeline.resize_and_crop(photo, 20, np.random.default_rng(s)).tobytes()
           for s in range(8)}
  assert len(crops) > 1, 'random crop never moves'
  # Antialiasing: downsampling noise averages it (a strided pick would keep the variance).
  assert center.std() < 0.6 * photo.std(), 'resize does not antialias'
  image = shapes.render('a red circle to the left of a blue square', 64, 0)
  lows = {kind: pipeline.degrade(image, 16, kind, np.random.default_rng(1))
          for kind in pipeline.DEGRADATIONS}
  assert all(v.shape == (16, 16, 3) and v.dtype == np.uint8 for v in lows.values())
  grad = lambda x: np.abs(np.diff(x.astype(np.float32), axis=1)).mean()  # noqa: E731
  assert grad(lows['blur']) < grad(lows['none']), 'blur does not blur'
  assert not np.array_equal(lows['bsr'], lows['none'])
  np.testing.assert_array_equal(
      lows['bsr'], pipeline.degrade(image, 16, 'bsr', np.random.default_rng(1)),
      err_msg='bsr is not deterministic given the rng')
  assert not np.array_equal(lows['bsr'], pipeline.degrade(image, 16, 'bsr',
                                                          np.random.default_rng(2)))


def test_train_crops_are_aligned_windows_of_image_and_low_res():
  """An SR training crop is a window of the whole example on the low-res grid, and its
  low_res is the same region of the low-res image degraded from the whole image."""
  record = {'image': shapes.render('a red circle to the left of a blue square', 32, 3),
            'captions': ['a red circle to the left of a blue square']}
  whole_spec = pipeline.ExampleSpec(image_size=32, low_res_size=8, low_res_degradation='blur')
  whole = pipeline.process_example(record, whole_spec, np.random.default_rng(5))
  offsets = set()
  for seed in range(12):
    spec = pipeline.ExampleSpec(image_size=32, low_res_size=8, low_res_degradation='blur',
                                train_crop_size=16)
    crop = pipeline.process_example(record, spec, np.random.default_rng([seed]))
    ref = pipeline.process_example(record, whole_spec, np.random.default_rng([seed]))
    assert crop['image'].shape == (16, 16, 3) and crop['low_res'].shape == (4, 4, 3)
    found = [(t, l) for t in range(0, 17, 4) for l in range(0, 17, 4)
             if np.array_equal(crop['image'], ref['image'][t:t + 16, l:l + 16])]
    assert found, f'seed {seed}: the crop is not an aligned window of the whole image'
    # (A window of bare background matches several offsets; one of them must fit low_res.)
    aligned = [(t, l) for t, l in found if np.array_equal(
        crop['low_res'], ref['low_res'][t // 4:t // 4 + 4, l // 4:l // 4 + 4])]
    assert aligned, f'seed {seed}: low_res is not the window of the whole low-res image'
    offsets.add(aligned[0])
  assert len(offsets) > 3, f'crop windows barely move: {offsets}'
  assert whole['image'].shape == (32, 32, 3), 'no crop without train_crop_size'
  with pytest.raises(ValueError, match='multiple of image_size / low_res_size'):
    pipeline.ExampleSpec(image_size=32, low_res_size=8, train_crop_size=18)
  with pytest.raises(ValueError, match='must be in'):
    pipeline.ExampleSpec(image_size=32, train_crop_size=48)
  batch = next(make(low_res_size=8, train_crop_size=8))
  assert batch['image'].shape == (4, 8, 8, 3) and batch['low_res'].shape == (4, 4, 4, 3), (
      'input.train_crop_size does not reach the batches')
  assert pipeline.batch_shapes(shapes_cfg(low_res_size=8, train_crop_size=8)) == {
      k: (v.shape, v.dtype) for k, v in batch.items()}, (
      'batch_shapes (what AOT compiles and benchmarks time) differs from the real batches')


def test_caption_choice_and_tokenize_padding():
  record = {'image': np.zeros((8, 8, 3), np.uint8),
            'captions': ['a red circle', 'two blue squares']}
  spec = pipeline.ExampleSpec(image_size=8)
  chosen = {pipeline.process_example(record, spec, np.random.default_rng(s))['caption']
            for s in range(16)}
  assert chosen == set(record['captions']), f'caption choice not random: {chosen}'
  first = pipeline.ExampleSpec(image_size=8, caption_choice='first')
  chosen = pipeline.process_example(record, first, np.random.default_rng(0))['caption']
  assert chosen == 'a red circle', 'caption_choice=first does not take the first caption'
  ids, mask = pipeline.tokenize(tokenizer, ['a red circle', 'two blue squares and a red circle'], 4)
  assert ids.shape == mask.shape == (2, 4), 'not truncated to text_max_len'
  assert mask.tolist() == [[True] * 3 + [False], [True] * 4]
  ids, mask = pipeline.tokenize(tokenizer, ['a red circle'], 6)
  assert ids.shape == (1, 6) and mask.tolist() == [[True] * 3 + [False] * 3]


def test_bad_records_are_skipped_and_counted():
  good = shapes_data.ShapesSource(8, 16, 0)

  class Mixed:
    def __len__(self):
      return 12

    def __getitem__(self, i):
      if i < 8:
        return good[i]
      return [{'image': b'', 'captions': ['x']}, {'image': b'\x89PNG junk', 'captions': ['x']},
              {'image': good[0]['image'], 'captions': []},
              {'image': good[0]['image'], 'captions': ['  ']}][i - 8]

  it = pipeline.make_train_iterator(shapes_cfg(batch_size=2, num_epochs=1), tokenizer=tokenizer,
                                    seed=0, process_index=0, process_count=1, source=Mixed())
  n = sum(1 for _ in it)
  assert n == 4 and it.examples == 8, f'expected 8 good examples in 4 batches, got {it.examples}'
  assert it.skipped == 4 and it.skip_reasons == {'empty_file': 1, 'undecodable_image': 1,
                                                 'missing_caption': 2}, it.skip_reasons
  assert it.metrics()['data/skipped'] == 4
  assert it.metrics()['data/skipped/missing_caption'] == 2, 'the logs must say why'


def test_dataset_of_only_bad_examples_fails_fast():
  class Broken:
    def __len__(self):
      return 5

    def __getitem__(self, i):
      return {'image': b'junk', 'captions': ['a'], 'key': f'broken/{i}'}

    def __repr__(self):
      return 'Broken(source)'

  it = pipeline.make_train_iterator(shapes_cfg(), tokenizer=tokenizer, seed=0, process_index=0,
                                    process_count=1, source=Broken())
  with pytest.raises(datasets.DatasetEmptyError, match='Broken'):
    next(it)
  with pytest.raises(datasets.DatasetEmptyError, match='no examples'):
    pipeline.make_train_iterator(shapes_cfg(shapes_num_examples=0), tokenizer=tokenizer, seed=0,
                                 process_index=0, process_count=1)


def test_batches_become_global_arrays(num_devices):
  from configs.common import mesh_config  # noqa: PLC0415
  from diffusion_jax import parallel  # noqa: PLC0415
  mesh = parallel.create_mesh(mesh_config(data=-1))
  it = make(batch_size=num_devices, low_res_size=8)
  local = next(it)
  batch = parallel.shard_batch(local, mesh)
  assert set(batch) == set(local)
  for k, v in batch.items():
    assert v.shape == local[k].shape and v.dtype == local[k].dtype, k
    assert len(v.sharding.device_set) == num_devices, f'{k} is not sharded over the batch'
    np.testing.assert_array_equal(np.asarray(v), local[k])


# ----------------------------------------------------------------------------- hostile images


def _encode(im, fmt='PNG', **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def _raw_png(width, height, bit_depth, color_type, rows: bytes) -> bytes:
  """A PNG of unfiltered `rows` (each already prefixed with filter byte 0)."""
  header = struct.pack('>IIBBBBB', width, height, bit_depth, color_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header)
          + _png_chunk(b'IDAT', zlib.compress(rows)) + _png_chunk(b'IEND', b''))


def _png_header_claiming(width, height) -> bytes:
  """A 1x1 gray PNG whose IHDR says width x height: tiny on disk, huge if decoded."""
  return _raw_png(width, height, 8, 0, b'\x00\x80')


def test_16bit_png_is_scaled_not_white():
  gray = Image.fromarray(np.full((4, 4), 32768, np.uint16))  # PIL mode I;16
  out = pipeline.decode_image(_encode(gray))
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - 128).max() <= 1, f'16-bit mid grey decoded as {out[0, 0]}'
  rgb48 = _raw_png(2, 1, 16, 2, b'\x00' + struct.pack('>HHH', 32768, 65535, 0) * 2)
  np.testing.assert_allclose(pipeline.decode_image(rgb48)[0, 0], [128, 255, 0], atol=1)


def test_exif_orientation_is_applied():
  stored = np.zeros((16, 32, 3), np.uint8)
  stored[...] = (0, 0, 255)
  stored[:8, :8] = (255, 0, 0)  # red top-left corner, as stored
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
  data = _encode(Image.fromarray(stored), 'JPEG', quality=95, exif=exif.tobytes())
  out = pipeline.decode_image(data).astype(int)
  assert out.shape == (32, 16, 3), f'orientation 6 not applied: shape {out.shape}'
  # After a clockwise quarter turn the stored top-left corner is the top-right one.
  assert np.abs(out[2:6, -6:-2] - (255, 0, 0)).max() < 40, out[2:6, -6:-2].mean((0, 1))
  assert np.abs(out[2:6, 2:6] - (0, 0, 255)).max() < 40, out[2:6, 2:6].mean((0, 1))


def test_transparency_is_composited_over_white():
  rgba = np.zeros((1, 3, 4), np.uint8)
  rgba[0] = [(0, 0, 0, 0), (200, 0, 0, 255), (200, 0, 0, 128)]
  blend = np.round(np.array([200, 0, 0]) * 128 / 255 + 255 * 127 / 255)
  for image in (_encode(Image.fromarray(rgba, 'RGBA')), rgba):  # bytes and decoded arrays
    out = pipeline.decode_image(image).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255], f'alpha 0 is not white: {out[0, 0]}'
    assert out[0, 1].tolist() == [200, 0, 0], f'alpha 255 changed: {out[0, 1]}'
    assert np.abs(out[0, 2] - blend).max() <= 1, f'alpha 128: {out[0, 2]} vs {blend}'
  palette = Image.new('P', (2, 1))
  palette.putpalette([0, 200, 0, 0, 0, 0] + [0] * 762)
  palette.putpixel((1, 0), 1)  # index 1 (black) is the transparent one
  for fmt in ('PNG', 'GIF'):
    out = pipeline.decode_image(_encode(palette, fmt, transparency=1))
    assert out[0].tolist() == [[0, 200, 0], [255, 255, 255]], f'{fmt}: {out[0].tolist()}'


def test_other_modes_and_first_frame():
  cmyk = pipeline.decode_image(_encode(Image.new('CMYK', (8, 8), (0, 255, 255, 0)), 'JPEG'))
  assert np.abs(cmyk[4, 4].astype(int) - (255, 0, 0)).max() < 10, f'CMYK red is {cmyk[4, 4]}'
  bits = pipeline.decode_image(_encode(Image.new('1', (2, 1), 1)))
  assert bits.tolist() == [[[255] * 3] * 2]
  frames = [Image.new('RGB', (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
  gif = _encode(frames[0], 'GIF', save_all=True, append_images=frames[1:])
  assert pipeline.decode_image(gif)[0, 0].tolist() == [255, 0, 0], 'not the first frame'
  raw16 = pipeline.decode_image(np.full((2, 2, 1), 32768, np.uint16))
  assert raw16.tolist() == [[[128] * 3] * 2] * 2, 'a uint16 array is not scaled to 8 bits'


@pytest.mark.filterwarnings('error')  # PIL's DecompressionBombWarning must not fire first
def test_huge_header_is_too_large_before_decoding():
  for side in (12000, 20000):  # over our bound, over PIL's warning and over its error limit
    with pytest.raises(pipeline.BadExample) as e:
      pipeline.decode_image(_png_header_claiming(side, side))
    assert e.value.reason == 'too_large', str(e.value)
  small = _encode(Image.new('RGB', (16, 16)))
  assert pipeline.decode_image(small, max_pixels=256).shape == (16, 16, 3)
  with pytest.raises(pipeline.BadExample, match='too_large'):
    pipeline.decode_image(small, max_pixels=255)


def test_images_over_max_image_pixels_are_skipped_and_counted():
  good = shapes_data.ShapesSource(8, 16, 0)  # 16 x 16 = 256 pixels each

  class WithLarge:
    def __len__(self):
      return 10

    def __getitem__(self, i):
      if i < 8:
        return good[i]
      large = (_encode(Image.new('RGB', (17, 16))), _png_header_claiming(12000, 12000))[i - 8]
      return {'image': large, 'captions': ['x']}

  it = pipeline.make_train_iterator(shapes_cfg(batch_size=2, num_epochs=1, max_image_pixels=256),
                                    tokenizer=tokenizer, seed=0, process_index=0,
                                    process_count=1, source=WithLarge())
  assert sum(1 for _ in it) == 4 and it.examples == 8
  assert it.skip_reasons == {'too_large': 2}, it.skip_reasons

"""FID-30K protocol end to end on mock COCO: captions, reference statistics, resumable
sharded generation, result JSON."""
from __future__ import annotations

import io
import json
import math
import os
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import convert
from diffusion_jax.eval import fid, protocol
from diffusion_jax.models import inception

SPLIT_SIZES = {'val': 3, 'test': 2, 'restval': 2}


def _coco_split(split, n):
  rng = np.random.default_rng(zlib.crc32(split.encode()))
  out = []
  for i in range(n):
    h, w = (40, 64) if i % 2 else (72, 48)  # landscape and portrait: the crop matters
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format='JPEG')
    out.append({'image': buf.getvalue(), 'image/filename': f'COCO_val2014_{split}_{i}.jpg',
                'image/id': i,
                'captions': {'text': np.asarray([f'{split} photo {i} a'.encode(),
                                                 f'{split} photo {i} b'.encode()], object),
                             'id': np.asarray([2 * i, 2 * i + 1])}})
  return out


COCO = {s: _coco_split(s, n) for s, n in SPLIT_SIZES.items()}


@pytest.fixture()
def mock_coco():
  import tensorflow_datasets as tfds  # noqa: PLC0415
  seen = []

  def as_data_source(builder, split=None, decoders=None, **kwargs):
    del decoders, kwargs
    seen.append((builder.name, split))
    return COCO[split]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    yield seen


class Interrupted(Exception):
  pass


def fake_generate(size, calls=None, fail_at=None):
  """Images that depend on the prompt and on the key, as a sampler's do."""
  def generate_fn(prompts, rng):
    if calls is not None:
      calls.append(list(prompts))
      if fail_at is not None and len(calls) == fail_at:
        raise Interrupted('killed')
    seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    return np.stack([np.random.default_rng([seed, zlib.crc32(p.encode())]).integers(
        0, 256, (size, size, 3), dtype=np.uint8) for p in prompts])
  return generate_fn


def test_caption_draw_is_seeded_and_without_replacement():
  pool = [f'c{i}' for i in range(100)]
  a = protocol.sample_captions(pool, 30, seed=0)
  assert a == protocol.sample_captions(pool, 30, seed=0), 'same seed, different captions'
  assert a != protocol.sample_captions(pool, 30, seed=1), 'the seed does not matter'
  assert len(set(a)) == 30, 'captions must be drawn without replacement'


def test_center_crop_keeps_the_middle_of_the_shorter_side():
  img = np.zeros((100, 300, 3), np.uint8)
  img[:, 100:200] = 255  # the central third is white
  out = protocol.center_crop_resize(img, 64)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  assert out[:, 2:-2].min() > 200, 'the center crop should hold only the white middle'


def test_fid30k_protocol_end_to_end_with_resume(mock_coco, tmp_path, monkeypatch):
  distances = []
  real_fd = fid.frechet_distance

  def spy(*args, **kw):  # Records what the distance was taken between.
    distances.append((args, real_fd(*args, **kw)))
    return distances[-1][1]

  monkeypatch.setattr(fid, 'frechet_distance', spy)
  weights = str(tmp_path / 'inception_random.safetensors')
  weights_sha = convert.save_inception(weights, inception.random_params(0))
  cfg = protocol.ProtocolConfig(num_samples=8, caption_seed=3, sample_seed=5, image_size=64,
                                shard_size=3, batch_size=2, feature_batch_size=8)
  sampling = {'guidance': 3.0, 'sampler': 'ddim', 'steps': 4, 'cascade': 'fake'}
  workdir = str(tmp_path / 'eval')

  # A run killed while generating shard 2 (the 5th generate call: 2 calls per shard).
  calls = []
  with pytest.raises(Interrupted):
    protocol.run(fake_generate(64, calls, fail_at=5), workdir=workdir, inception_path=weights,
                 config=cfg, sampling=sampling, log=lambda s: None)
  assert {s for _, s in mock_coco} == set(SPLIT_SIZES), 'captions must come from all val2014 splits'
  samples = os.path.join(workdir, 'samples')
  assert sorted(os.listdir(samples)) == ['shard_00000.npz', 'shard_00001.npz'], os.listdir(samples)
  with open(os.path.join(samples, 'shard_00002.npz'), 'wb') as f:
    f.write(b'PK\x03\x04 truncated')  # a half-written shard from some other crash

  calls2 = []
  result = protocol.run(fake_generate(64, calls2), workdir=workdir, inception_path=weights,
                        config=cfg, sampling=sampling, log=lambda s: None)
  with open(os.path.join(workdir, 'captions.json')) as f:
    captions = json.load(f)['captions']
  assert calls2 == [captions[6:8]], (
      f'resume should generate only shard 2, generated {calls2}')

  # Every field filled.
  with open(os.path.join(workdir, 'result.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  for key in ('fid', 'num_samples', 'num_reference', 'guidance', 'sampler', 'steps', 'resize',
              'inception_weights_sha256', 'reference_stats_sha256', 'captions_sha256',
              'sample_stats_sha256', 'reference_preprocess', 'caption_seed'):
    assert saved.get(key) is not None, f'result field {key} missing: {saved}'
  bad = [k for k, v in saved.items()
         if v is None or (isinstance(v, float) and not math.isfinite(v))]
  assert not bad, f'empty or non-finite result fields: {bad}'
  assert saved['num_samples'] == 8 and saved['num_reference'] == sum(SPLIT_SIZES.values())
  assert (saved['guidance'], saved['sampler'], saved['steps']) == (3.0, 'ddim', 4)
  assert saved['inception_weights_sha256'] == weights_sha
  assert saved['shards'] == 3 and saved['shards_resumed'] == 2
  assert '299' in saved['resize'] and saved['fid'] > 0

  # Captions: the seeded draw from every caption of the three splits, in source order.
  pool = [f'{s} photo {i} {x}' for s, n in SPLIT_SIZES.items() for i in range(n) for x in 'ab']
  assert captions == protocol.sample_captions(pool, 8, seed=3)

  # Resumed samples equal an uninterrupted run's, image for image.
  fresh = str(tmp_path / 'fresh')
  protocol.generate_samples(fake_generate(64), captions, fresh, seed=5, shard_size=3,
                            batch_size=2, image_size=64, log=lambda s: None)
  for a, b in zip(protocol.iter_shards(samples, 3), protocol.iter_shards(fresh, 3)):
    assert np.array_equal(a, b), 'a resumed run produced different images'

  # The reference statistics are those of the center-cropped val images, recomputed here.
  ref_files = os.listdir(os.path.join(workdir, 'reference'))
  ref = fid.load_stats(os.path.join(workdir, 'reference', ref_files[0]))
  assert ref['sha256'] == saved['reference_stats_sha256']
  images = np.stack([protocol.center_crop_resize(r['image'], 64)
                     for s in SPLIT_SIZES for r in COCO[s]])
  extractor = fid.InceptionFeatures(*convert.load_inception(weights), batch_size=8)
  direct = fid.RunningStats.from_features(extractor(images))
  np.testing.assert_allclose(ref['mu'], direct.mu, rtol=1e-5, atol=1e-5,
                             err_msg='reference mean is not that of the cropped val images')
  sample_stats = fid.load_stats(os.path.join(workdir, 'sample_stats.npz'))
  assert sample_stats['sha256'] == saved['sample_stats_sha256']
  # The number is the Fréchet distance between the stored statistics (recomputing it would
  # cost another 2048x2048 sqrtm, ~30 s on two cores; the spy saw the call instead).
  assert len(distances) == 1
  (mu1, s1, mu2, s2), value = distances[0]
  assert value == saved['fid']
  assert fid.stats_hash(mu1, s1) == sample_stats['sha256'], 'FID not taken from the samples'
  assert fid.stats_hash(mu2, s2) == ref['sha256'], 'FID not taken against the reference'


def test_compare_table_and_tradeoff_plot(tmp_path):
  results = [{'name': 'imagen', 'guidance': 1.0, 'sampler': 'ddim', 'steps': 50, 'fid': 12.5,
              'alignment_all': 0.4},
             {'name': 'imagen', 'guidance': 5.0, 'sampler': 'ddim', 'steps': 50, 'fid': 9.25,
              'alignment_all': 0.7, 'clip_score': 27.0}]
  table = protocol.compare_table(results)
  rows = table.strip().split('\n')
  assert len(rows) == 4 and rows[0].startswith('| name | guidance')
  assert '| imagen | 5.000 | ddim | 50 | – | 9.250 | 27.000 | 0.700 |' == rows[3], rows[3]
  path = protocol.plot_tradeoff(results, str(tmp_path / 'tradeoff.png'))
  img = np.asarray(Image.open(path).convert('RGB'))
  assert img.shape == (800, 640, 3)
  red = (img[..., 0] > 150) & (img[..., 1] < 80)
  blue = (img[..., 2] > 150) & (img[..., 0] < 80)
  assert red[:400].sum() > 50 and blue[400:].sum() > 50, 'each metric needs its own curve'


class _FakePipeline:
  """Renders every prompt as the same noise image at `size`; records the guidance scales it
  was asked for."""

  def __init__(self, size):
    self.size, self.guidance = size, []

  def generate(self, prompts, rng, **overrides):
    del rng
    self.guidance.append(overrides.get('guidance_scale'))
    return np.stack([np.random.default_rng(0).integers(0, 256, (self.size, self.size, 3),
                                                       dtype=np.uint8) for _ in prompts])


def test_evaluate_binary_wires_pipelines_to_the_metrics(tmp_path, monkeypatch):
  from configs import imagen  # noqa: PLC0415
  from diffusion_jax import evaluate, pipelines  # noqa: PLC0415
  config = imagen.get_config('stage=cascade,size=tiny')
  fake = _FakePipeline(64)
  monkeypatch.setattr(pipelines, 'load', lambda cfg, root: fake)
  runs = []

  def fake_run(generate_fn, **kw):  # protocol.run itself is tested end to end above
    runs.append(kw)
    images = generate_fn(['a red circle'], jax.random.PRNGKey(0))
    assert images.dtype == np.uint8 and images.shape == (1, 64, 64, 3)
    return {'fid': 1.5, **kw['sampling'], 'inception_weights_sha256': 'x'}

  monkeypatch.setattr(protocol, 'run', fake_run)
  root = str(tmp_path / 'root')
  results = evaluate.evaluate(config, root, metrics=['fid'], guidance=[1.0, 4.0],
                              random_inception_seed=0)
  assert sorted(results) == ['fid_g1', 'fid_g4']
  assert [r['sampling']['guidance'] for r in runs] == [1.0, 4.0]
  assert runs[0]['sampling']['steps'] == {s: int(config.stages[s].num_steps) for s in config.order}
  assert os.path.isfile(runs[0]['inception_path']), 'random weights must be written for the run'
  assert set(fake.guidance) == {1.0, 4.0}, 'the guidance scale must reach the pipeline'
  with open(os.path.join(root, 'eval', 'fid_g4', 'result.json')) as f:
    assert json.load(f)['inception_random'] is True
  # --compare: a table and a plot over every result written above.
  out = str(tmp_path / 'cmp' / 'compare')
  compared = evaluate.compare([os.path.join(root, 'eval', '*', 'result.json')], out)
  assert len(compared) == 2
  with open(out + '.md') as f:
    table = f.read()
  assert 'fid_g4' in table and 'fid_g1' in table
  assert Image.open(out + '.png').size == (640, 800)
  # The library evaluates FID (and CLIP score) only; a project evaluates its own metrics.
  with pytest.raises(ValueError, match='projects.shapes.evaluate'):
    evaluate.evaluate(config, root, metrics=['shapes'])


def test_evaluate_binary_on_a_real_tiny_cascade(mock_coco, tmp_path):
  """The evaluate entry point end to end: tiny Imagen stages trained by the real trainer,
  random Inception weights, TFDS mock COCO; every field of the result file filled."""
  from diffusion_jax import evaluate
  import pipeline_fixtures  # the same module (and trained roots) the pipeline tests use
  root = pipeline_fixtures.trained_root('imagen', ('base64', 'sr256'))
  config = pipeline_fixtures.cascade_config('imagen', num_steps=2)
  cfg = protocol.ProtocolConfig(num_samples=4, caption_seed=1, sample_seed=2, image_size=32,
                                shard_size=4, batch_size=4, feature_batch_size=8)
  results = evaluate.evaluate(config, root, metrics=('fid',), random_inception_seed=0,
                              protocol_config=cfg)
  fid_result = results[next(k for k in results if k.startswith('fid_'))]
  assert math.isfinite(fid_result['fid']) and fid_result['fid'] > 0
  assert fid_result['num_samples'] == 4 and fid_result['inception_random'] is True
  for key in ('guidance', 'sampler', 'steps', 'resize', 'inception_weights_sha256',
              'reference_stats_sha256'):
    assert fid_result.get(key) is not None, f'FID result field {key} missing'
  with open(os.path.join(root, 'eval', next(k for k in results if k.startswith('fid_')),
                         'result.json')) as f:
    assert json.load(f)['fid'] == fid_result['fid']

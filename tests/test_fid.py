"""FID: Fréchet distance (closed forms, pytorch-fid's formula), streaming statistics, stats
files, and sharded feature extraction."""
from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from scipy import linalg

from diffusion_jax import parallel
from diffusion_jax.eval import fid
from diffusion_jax.models import inception


def _sqrtm(a):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    out = linalg.sqrtm(a, disp=False)  # scipy < 1.16 returned (root, error estimate)
  return out[0] if isinstance(out, tuple) else out


def pytorch_fid_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid's `calculate_frechet_distance` (src/pytorch_fid/fid_score.py), as published."""
  mu1 = np.atleast_1d(mu1)
  mu2 = np.atleast_1d(mu2)
  sigma1 = np.atleast_2d(sigma1)
  sigma2 = np.atleast_2d(sigma2)
  assert mu1.shape == mu2.shape
  assert sigma1.shape == sigma2.shape
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError('Imaginary component {}'.format(np.max(np.abs(covmean.imag))))
    covmean = covmean.real
  tr_covmean = np.trace(covmean)
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def _random_rotation(d, rng):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))


@pytest.mark.parametrize('rotate', [False, True])
def test_frechet_distance_closed_form_for_commuting_covariances(rotate):
  # Shared eigenvectors: Tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so
  # FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(0)
  d = 16
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  q = _random_rotation(d, rng) if rotate else np.eye(d)
  s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(expected, rel=1e-10), (
      f'FD {got} != closed form {expected} (rotated={rotate})')


def test_frechet_distance_scalar_gaussians():
  # 1-d: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
  assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_distance_is_zero_for_identical_statistics():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
  mu, sigma = x.mean(0), np.cov(x, rowvar=False)
  got = fid.frechet_distance(mu, sigma, mu, sigma)
  assert abs(got) < 1e-9 * np.trace(sigma), f'FD of a Gaussian with itself is {got}, not 0'


@pytest.mark.parametrize('n', [300, 40])  # 40 < d: singular covariances (the eps path)
def test_frechet_distance_matches_pytorch_fid(n):
  rng = np.random.default_rng(2)
  d = 64
  f1 = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.uniform(0, 1, d)
  f2 = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.uniform(0, 1.5, d)
  mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
  mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
  ref = pytorch_fid_reference(mu1, s1, mu2, s2)
  ours = fid.frechet_distance(mu1, s1, mu2, s2)
  assert ours == pytest.approx(ref, rel=1e-6), f'ours {ours} vs pytorch-fid {ref} (n={n})'
  assert ours > 1.0, 'different distributions should be far apart'


def test_frechet_distance_rejects_large_imaginary_part_and_bad_shapes():
  # A "covariance" with a negative eigenvalue has no real square root product.
  with pytest.raises(ValueError, match='imaginary'):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2), np.diag([-1.0, 1.0]))
  with pytest.raises(ValueError, match='lengths'):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_streaming_statistics_equal_one_shot():
  rng = np.random.default_rng(3)
  # Features with a large common offset: naive sum-of-squares accumulation would lose digits.
  feats = rng.normal(size=(1000, 48)) * rng.uniform(0.1, 2.0, 48) + 50.0
  sizes = [1, 250, 7, 333, 2, 150, 257]
  assert sum(sizes) == len(feats)
  stats = fid.RunningStats(48)
  start = 0
  for s in sizes:
    stats.update(feats[start:start + s])
    start += s
  mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
  assert stats.n == 1000
  np.testing.assert_allclose(stats.mu, mu, rtol=1e-10, atol=0,
                             err_msg='streaming mean differs from the one-shot mean')
  np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-10, atol=1e-10 * np.abs(sigma).max(),
                             err_msg='streaming covariance differs from np.cov')
  # Merging per-device / per-process partials in a tree gives the same.
  parts, start = [], 0
  for s in sizes:
    parts.append(fid.RunningStats.from_features(feats[start:start + s]))
    start += s
  while len(parts) > 1:
    parts = [parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i]
             for i in range(0, len(parts), 2)]
  np.testing.assert_allclose(parts[0].sigma, sigma, rtol=1e-10, atol=1e-10 * np.abs(sigma).max())
  # The process exchange format is lossless.
  back = fid.RunningStats.from_words(stats.to_words(), 48)
  assert back.n == stats.n and np.array_equal(back.m2, stats.m2) and np.array_equal(back.mean,
                                                                                    stats.mean)


def test_stats_file_round_trip_hash_and_no_pickles(tmp_path):
  rng = np.random.default_rng(4)
  mu, sigma = rng.normal(size=8), np.cov(rng.normal(size=(30, 8)), rowvar=False)
  path = str(tmp_path / 'ref.npz')
  digest = fid.save_stats(path, mu, sigma, n=30, source='test')
  got = fid.load_stats(path)
  assert np.array_equal(got['mu'], mu) and np.array_equal(got['sigma'], sigma)
  assert got['n'] == 30 and got['sha256'] == digest and got['meta'] == {'source': 'test'}
  assert fid.stats_hash(mu, sigma + 1e-12) != digest, 'the hash must depend on the values'
  # pytorch-fid's own files (mu, sigma only) load too.
  np.savez(str(tmp_path / 'plain.npz'), mu=mu, sigma=sigma)
  assert fid.load_stats(str(tmp_path / 'plain.npz'))['sha256'] == digest
  # A file whose arrays no longer match its hash is refused.
  np.savez(str(tmp_path / 'bad.npz'), mu=mu + 1, sigma=sigma, sha256=np.asarray(digest))
  with pytest.raises(ValueError, match='does not match'):
    fid.load_stats(str(tmp_path / 'bad.npz'))
  # Object arrays would need unpickling: refused.
  np.savez(str(tmp_path / 'pickle.npz'), mu=np.asarray([{'x': 1}], object), sigma=sigma)
  with pytest.raises(ValueError, match='allow_pickle'):
    fid.load_stats(str(tmp_path / 'pickle.npz'))


@pytest.fixture(scope='module')
def inception_net():
  module = inception.InceptionV3()
  return module, inception.random_params(0)


def _images(n, seed, size=(40, 48)):
  return np.random.default_rng(seed).integers(0, 256, (n,) + size + (3,), dtype=np.uint8)


def test_sharded_and_single_device_features_give_the_same_fid(inception_net, num_devices):
  module, params = inception_net
  one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), parallel.MESH_AXES)
  single = fid.InceptionFeatures(module, params, mesh=one, batch_size=4)
  sharded = fid.InceptionFeatures(module, params, batch_size=8)
  assert sharded.mesh.size == num_devices and sharded.batch_size == 8
  a, b = _images(9, 0), _images(6, 1)  # 9: the last batch carries padding rows
  fa1, fb1 = single(a), single(b)
  assert fa1.shape == (9, 2048)
  # A padded batch: row i's features do not depend on its batch mates.
  np.testing.assert_allclose(single(a[8:9])[0], fa1[8], rtol=1e-5, atol=1e-5 * np.abs(fa1).max())
  # Single device, one shot; 8 devices, streamed over uneven batches.
  s1 = fid.RunningStats.from_features(fa1), fid.RunningStats.from_features(fb1)
  s8 = sharded.statistics([a]), sharded.statistics([b[:5], b[5:]])
  for x1, x8 in zip(s1, s8):
    assert x1.n == x8.n
    np.testing.assert_allclose(x8.mu, x1.mu, rtol=1e-5, atol=1e-5 * np.abs(x1.mu).max(),
                               err_msg='sharded feature means differ from single-device ones')
    np.testing.assert_allclose(x8.sigma, x1.sigma, rtol=1e-4, atol=1e-5 * np.abs(x1.sigma).max())
  # scipy's sqrtm of a 2048x2048 matrix takes ~30 s on two CPU cores, so the distance is
  # taken between the marginals of the first 256 features (a Gaussian's marginal is one).
  k = slice(0, 256)
  sub = lambda s: (s.mu[k], s.sigma[k, k])
  f1 = fid.frechet_distance(*sub(s1[0]), *sub(s1[1]))
  f8 = fid.frechet_distance(*sub(s8[0]), *sub(s8[1]))
  assert f8 == pytest.approx(f1, rel=1e-4), f'sharded FID {f8} != single-device FID {f1}'
  assert f1 > 0
  with pytest.raises(TypeError, match='uint8'):
    single(a.astype(np.float32))


_TWO_PROCESS_SCRIPT = '''
import sys
import jax
import numpy as np
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from diffusion_jax.eval import fid
from diffusion_jax.models import inception
module = inception.InceptionV3(resize_size=75)
images = np.random.default_rng(0).integers(0, 256, (11, 40, 48, 3), dtype=np.uint8)
mine = images[:6] if jax.process_index() == 0 else images[6:]  # uneven: 6 and 5 images
extractor = fid.InceptionFeatures(module, inception.random_params(0), batch_size=8)
stats = extractor.statistics([mine[:4], mine[4:]])
if jax.process_index() == 0:
  np.savez(sys.argv[3], n=stats.n, mu=stats.mu, sigma=stats.sigma)
'''


def test_two_processes_merge_to_the_single_process_statistics(tmp_path):
  # 2 processes x 4 CPU devices on loopback: per-process feature blocks, uneven image
  # counts (the shorter process joins the last step with padding only), statistics merged
  # bit-exactly across processes.
  import os
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  out = str(tmp_path / 'stats.npz')
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
    procs.append(subprocess.Popen(
        [sys.executable, '-c', _TWO_PROCESS_SCRIPT, f'127.0.0.1:{port}', str(pid), out],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  module = inception.InceptionV3(resize_size=75)
  images = np.random.default_rng(0).integers(0, 256, (11, 40, 48, 3), dtype=np.uint8)
  one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), parallel.MESH_AXES)
  feats = fid.InceptionFeatures(module, inception.random_params(0), mesh=one, batch_size=4)(images)
  ref = fid.RunningStats.from_features(feats)
  with np.load(out) as got:
    assert int(got['n']) == 11, f'merged count {int(got["n"])}, expected 11'
    np.testing.assert_allclose(got['mu'], ref.mu, rtol=1e-5, atol=1e-5 * np.abs(ref.mu).max(),
                               err_msg='2-process mean differs from the 1-process one')
    np.testing.assert_allclose(got['sigma'], ref.sigma, rtol=1e-4,
                               atol=1e-5 * np.abs(ref.sigma).max(),
                               err_msg='2-process covariance differs from the 1-process one')

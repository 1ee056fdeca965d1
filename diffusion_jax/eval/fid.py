"""FID: Inception pool3 features of uint8 images, streaming Gaussian statistics, Fréchet distance.

    extractor = InceptionFeatures(*convert.load_inception(path))       # jitted, sharded over devices
    stats = extractor.statistics(batches_of_uint8_images)       # merged over all processes
    fid = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)

Statistics are accumulated on the host in float64 with Chan et al.'s pairwise update (count,
mean and the centred sum of outer products `m2`), so that merging batches, devices and
processes in any grouping gives the one-shot mean and covariance to rounding; the
covariance is the unbiased one (`np.cov(feats, rowvar=False)`, as pytorch-fid). Reference
statistics are .npz files with pytorch-fid's keys (`mu`, `sigma`) plus the count and a
content hash, read with `allow_pickle=False`.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import linalg

from diffusion_jax import io_util, parallel

# ----------------------------------------------------------------------------- Fréchet distance


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), computed as pytorch-fid's
  `calculate_frechet_distance`: scipy's `sqrtm`; if the product is singular enough to give a
  non-finite root, `eps` is added to both diagonals and it is retried; an imaginary part of
  the root's diagonal beyond 1e-3 is an error, a smaller one is numerical noise and dropped.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f'mean vectors have different lengths: {mu1.shape} vs {mu2.shape}')
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'covariances {sigma1.shape} and {sigma2.shape} do not match means '
                     f'{mu1.shape}')
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f'FID: singular covariance product; adding {eps} to the diagonals')
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'FID: imaginary component {np.max(np.abs(covmean.imag))} in the '
                       'square root of the covariance product')
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- statistics


class RunningStats:
  """Streaming mean and covariance in float64: count `n`, `mean` [D], centred `m2` [D, D]."""

  def __init__(self, dim: int, n: int = 0, mean=None, m2=None):
    self.dim = int(dim)
    self.n = int(n)
    self.mean = np.zeros(dim, np.float64) if mean is None else np.asarray(mean, np.float64)
    self.m2 = np.zeros((dim, dim), np.float64) if m2 is None else np.asarray(m2, np.float64)

  @classmethod
  def from_features(cls, feats_ND) -> RunningStats:
    x = np.asarray(feats_ND, np.float64)
    if x.ndim != 2:
      raise ValueError(f'features must be [N, D], got shape {x.shape}')
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    xc = x - mean
    return cls(x.shape[1], len(x), mean, xc.T @ xc)

  def merge(self, other: RunningStats) -> RunningStats:
    """The statistics of the union of both sets (Chan, Golub & LeVeque's pairwise update)."""
    if other.dim != self.dim:
      raise ValueError(f'cannot merge {self.dim}-d and {other.dim}-d statistics')
    if other.n == 0:
      return RunningStats(self.dim, self.n, self.mean.copy(), self.m2.copy())
    if self.n == 0:
      return RunningStats(other.dim, other.n, other.mean.copy(), other.m2.copy())
    n = self.n + other.n
    delta = other.mean - self.mean
    mean = self.mean + delta * (other.n / n)
    m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
    return RunningStats(self.dim, n, mean, m2)

  def update(self, feats_ND) -> RunningStats:
    """Adds a batch of features in place; returns self."""
    merged = self.merge(RunningStats.from_features(feats_ND))
    self.n, self.mean, self.m2 = merged.n, merged.mean, merged.m2
    return self

  @property
  def mu(self) -> np.ndarray:
    return self.mean

  @property
  def sigma(self) -> np.ndarray:
    if self.n < 2:
      raise ValueError(f'a covariance needs at least 2 samples, have {self.n}')
    return self.m2 / (self.n - 1)

  # Exchanged between processes bit for bit: float64 travels as pairs of uint32, because
  # JAX collectives without x64 would round float64 to float32.
  def to_words(self) -> np.ndarray:
    flat = np.concatenate([[float(self.n)], self.mean, self.m2.ravel()]).astype('<f8')
    return flat.view('<u4')

  @classmethod
  def from_words(cls, words, dim: int) -> RunningStats:
    flat = np.ascontiguousarray(words, '<u4').view('<f8')
    return cls(dim, int(flat[0]), flat[1:1 + dim].copy(), flat[1 + dim:].reshape(dim, dim).copy())


def merge_across_processes(stats: RunningStats) -> RunningStats:
  """Every process's statistics merged (in process order); identical on every process."""
  if jax.process_count() == 1:
    return stats
  from jax.experimental import multihost_utils  # noqa: PLC0415
  words = np.asarray(multihost_utils.process_allgather(stats.to_words()))
  words = words.reshape(jax.process_count(), -1)
  out = RunningStats(stats.dim)
  for row in words:
    out = out.merge(RunningStats.from_words(row, stats.dim))
  return out


def stats_hash(mu, sigma) -> str:
  """sha256 of the float64 little-endian bytes and shapes of mu and sigma (not of the file:
  zip timestamps would change it)."""
  h = hashlib.sha256()
  for name, a in (('mu', mu), ('sigma', sigma)):
    a = np.ascontiguousarray(a, '<f8')
    h.update(f'{name}{a.shape}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def save_stats(path: str, mu, sigma, n: int = -1, **meta: str) -> str:
  """Writes mu/sigma (pytorch-fid's keys), n, and the content hash; returns the hash."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  digest = stats_hash(mu, sigma)
  extra = {f'meta_{k}': np.asarray(str(v)) for k, v in meta.items()}
  io_util.replace_atomically(path, lambda tmp: np.savez(
      tmp, mu=mu, sigma=sigma, n=np.asarray(int(n), np.int64), sha256=np.asarray(digest),
      **extra))
  return digest


def load_stats(path: str) -> dict:
  """{'mu', 'sigma', 'n', 'sha256', 'meta'} from an .npz (ours or pytorch-fid's); no pickles.

  A stored hash that does not match the arrays is an error (a corrupt or edited file).
  """
  with np.load(path, allow_pickle=False) as f:
    if 'mu' not in f or 'sigma' not in f:
      raise ValueError(f'{path}: not an FID statistics file (needs arrays mu and sigma, has '
                       f'{sorted(f.files)})')
    mu, sigma = np.asarray(f['mu'], np.float64), np.asarray(f['sigma'], np.float64)
    n = int(f['n']) if 'n' in f else -1
    stored = str(f['sha256']) if 'sha256' in f else None
    meta = {k[5:]: str(f[k]) for k in f.files if k.startswith('meta_')}
  digest = stats_hash(mu, sigma)
  if stored is not None and stored != digest:
    raise ValueError(f'{path}: content hash {digest} does not match the stored {stored}')
  return {'mu': mu, 'sigma': sigma, 'n': n, 'sha256': digest, 'meta': meta}


# ----------------------------------------------------------------------------- features


def default_mesh() -> Mesh:
  """Every device of every process on the 'data' axis."""
  return Mesh(np.asarray(jax.devices()).reshape(-1, 1, 1), parallel.MESH_AXES)


class InceptionFeatures:
  """uint8 images [N, H, W, 3] -> float32 pool3 features, batched and sharded.

  Each call runs on this process's images; `batch_size` is the global batch (rounded up to
  a multiple of the devices), split into equal per-process and per-device blocks. Rows that
  pad the last batch are dropped before any statistic sees them.
  """

  def __init__(self, module, params, *, mesh: Mesh | None = None, batch_size: int = 64):
    self.module = module
    self.mesh = default_mesh() if mesh is None else mesh
    shards = math.prod(self.mesh.shape[a] for a in parallel.BATCH_AXES)
    self.batch_size = max(shards, -(-int(batch_size) // shards) * shards)
    if self.batch_size % jax.process_count():
      raise ValueError(f'batch {self.batch_size} does not split over {jax.process_count()} '
                       'processes')
    self.local_batch_size = self.batch_size // jax.process_count()
    self._batch = NamedSharding(self.mesh, P(parallel.BATCH_AXES))
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))

    def forward(p, images_BHWC):
      x = images_BHWC.astype(jnp.float32) / 255.0  # torchvision's ToTensor
      return module.apply({'params': p}, x)

    self._fn = jax.jit(forward, out_shardings=self._batch)

  def _local_rows(self, out) -> np.ndarray:
    if jax.process_count() == 1:
      return np.asarray(out)
    shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])

  def _num_chunks(self, n: int) -> int:
    chunks = -(-n // self.local_batch_size)
    if jax.process_count() > 1:  # Every process must join every step.
      from jax.experimental import multihost_utils  # noqa: PLC0415
      chunks = int(np.max(multihost_utils.process_allgather(np.int32(chunks))))
    return chunks

  def __call__(self, images_NHWC) -> np.ndarray:
    images = np.asarray(images_NHWC)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise TypeError(f'FID features need uint8 [N, H, W, 3] images (both sides quantised), '
                      f'got {images.dtype} {images.shape}')
    bs, out = self.local_batch_size, []
    for c in range(self._num_chunks(len(images))):
      chunk = images[c * bs:(c + 1) * bs]
      valid = len(chunk)
      if valid < bs:
        pad = np.zeros((bs - valid,) + images.shape[1:], np.uint8)
        chunk = np.concatenate([chunk, pad]) if valid else pad
      x = jax.make_array_from_process_local_data(self._batch, chunk)
      out.append(self._local_rows(self._fn(self.params, x))[:valid])
    if not out:
      return np.zeros((0, self.feature_dim), np.float32)
    return np.concatenate(out).astype(np.float32)

  @property
  def feature_dim(self) -> int:
    return 2048

  def statistics(self, batches: Iterable[np.ndarray], *, across_processes: bool = True
                 ) -> RunningStats:
    """Streams uint8 image batches into float64 statistics (merged over processes)."""
    stats = RunningStats(self.feature_dim)
    for images in batches:
      stats.update(self(images))
    return merge_across_processes(stats) if across_processes else stats


def fid_from_stats(a, b) -> float:
  """FID between two `RunningStats` or `load_stats` dicts."""
  get = lambda s: (s['mu'], s['sigma']) if isinstance(s, dict) else (s.mu, s.sigma)
  return frechet_distance(*get(a), *get(b))

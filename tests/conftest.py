"""Test setup: 8 simulated CPU devices, strict rank promotion, no network access."""
import gc
import os

# Must happen before jax is imported anywhere.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['TRANSFORMERS_OFFLINE'] = '1'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One persistent compilation cache for the whole session (and the CLI subprocesses the tests
# start): tests that rebuild the same tiny model compile it once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.environ.get('TMPDIR', '/tmp'), f'diffusion_jax_tests_jax_cache_{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ.setdefault('TFDS_DATA_DIR', os.path.join(os.environ.get('TMPDIR', '/tmp'),
                                                    'diffusion_jax_tests_tfds'))

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_threefry_partitionable', True)

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def num_devices():
  assert jax.device_count() == 8, 'conftest must set 8 simulated devices before jax is imported'
  return jax.device_count()


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_programs():
  """Each test file's compiled programs are dropped when it ends (the persistent compilation
  cache above brings back any a later file needs), so a worker that runs many files does not
  hold every file's executables at once."""
  yield
  jax.clear_caches()
  gc.collect()

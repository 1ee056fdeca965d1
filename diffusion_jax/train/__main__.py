r"""Trains one stage of a cascade.

  python -m diffusion_jax.train --config=configs/imagen.py:stage=base64,size=tiny \
      --workdir=/tmp/run/base64 [--config.total_steps=100]

Multi-host: launch one process per host with the same flags and --distributed (on TPU VMs
and SLURM, jax finds its peers itself), or with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID set by the launcher; each process feeds its share of the global batch.
"""
from __future__ import annotations

import logging
import os

from absl import app, flags
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Stage config: FILE:ARG.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of this stage (ROOT/<stage>).')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Call jax.distributed.initialize() (multi-host runs).')
_CACHE = flags.DEFINE_string('compilation_cache', None,
                             'Persistent compilation cache dir (default: ROOT/.jax_cache).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _DISTRIBUTED.value or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    env = os.environ.get
    jax.distributed.initialize(
        coordinator_address=env('JAX_COORDINATOR_ADDRESS'),
        num_processes=int(env('JAX_NUM_PROCESSES')) if env('JAX_NUM_PROCESSES') else None,
        process_id=int(env('JAX_PROCESS_ID')) if env('JAX_PROCESS_ID') else None)
  logging.getLogger().setLevel(logging.INFO)
  workdir = os.path.abspath(_WORKDIR.value)
  cache = _CACHE.value or os.path.join(os.path.dirname(workdir), '.jax_cache')
  jax.config.update('jax_compilation_cache_dir', cache)
  from diffusion_jax.train import loop  # after distributed init
  metrics = loop.train(_CONFIG.value, workdir)
  logging.info('done: %s', metrics)


if __name__ == '__main__':
  from diffusion_jax import hugepages
  hugepages.reexec_with_huge_pages()
  app.run(main)

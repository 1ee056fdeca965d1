r"""Trains one stage of a cascade.

  python -m diffusion_jax.train --config=configs/imagen.py:stage=base64,size=tiny \
      --workdir=/tmp/run/base64 [--config.total_steps=100]

Exit status: 0 when total_steps are done; 75 (EX_TEMPFAIL) when SIGTERM (preemption) stopped
the run after saving the current step, 130 after a first Ctrl-C did the same; 2 for bad input
(a config, a workdir that another run holds); a traceback is a bug. Resuming with a config
that changes what the weights mean is refused unless --allow_config_change.

Fine-tuning: --config.init_from=DIR/<stage> (a pretrained stage directory, e.g. converted by
diffusion_jax.tools.convert_glide, or a trained ROOT/<stage>) starts a fresh run from its
weights, EMA included, with the network, diffusion and text fields of its config (a warning
lists each one replaced); a run that finds a checkpoint resumes it and ignores the flag.

Multi-host: launch one process per host with the same flags and --distributed (on TPU VMs
and SLURM, jax finds its peers itself), or with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID set by the launcher; each process feeds its share of the global batch.
"""
from __future__ import annotations

import logging
import os
import signal

from absl import flags

from diffusion_jax import cli, errors


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  cli.define_config(flag_values, sys_argv, required=True)
  flags.DEFINE_string('workdir', None, 'Directory of this stage (ROOT/<stage>).',
                      required=True, flag_values=flag_values)
  flags.DEFINE_bool('distributed', False,
                    'Call jax.distributed.initialize() (multi-host runs).',
                    flag_values=flag_values)
  flags.DEFINE_bool('allow_config_change', False,
                    'Resume even if the config changes what the saved weights mean (network, '
                    'diffusion, encoder): fine-tuning from them.', flag_values=flag_values)
  flags.DEFINE_string('compilation_cache', None,
                      'Persistent compilation cache dir (default: ROOT/.jax_cache).',
                      flag_values=flag_values)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  if not F.workdir.strip():
    raise errors.InputError('--workdir is empty: name the directory of this stage (ROOT/<stage>)')
  import jax  # after the flags: --help and a bad command line answer without it
  if F.distributed or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    env = os.environ.get
    jax.distributed.initialize(
        coordinator_address=env('JAX_COORDINATOR_ADDRESS'),
        num_processes=int(env('JAX_NUM_PROCESSES')) if env('JAX_NUM_PROCESSES') else None,
        process_id=int(env('JAX_PROCESS_ID')) if env('JAX_PROCESS_ID') else None)
  logging.getLogger().setLevel(logging.INFO)
  workdir = os.path.abspath(F.workdir)
  cache = F.compilation_cache or os.path.join(os.path.dirname(workdir), '.jax_cache')
  jax.config.update('jax_compilation_cache_dir', cache)
  from diffusion_jax.train import loop  # after distributed init
  metrics = loop.train(F.config, workdir, allow_config_change=F.allow_config_change)
  if metrics.get('signal'):
    logging.warning('stopped by signal %d at step %d: resume with the same command',
                    metrics['signal'], metrics['step'])
    return (errors.PREEMPTED_EXIT_STATUS if metrics['signal'] == signal.SIGTERM else
            errors.INTERRUPTED_EXIT_STATUS)
  logging.info('done: %s', metrics)
  return 0


if __name__ == '__main__':
  from diffusion_jax import hugepages
  hugepages.reexec_with_huge_pages()
  define_flags()
  cli.run(main, config='stage')

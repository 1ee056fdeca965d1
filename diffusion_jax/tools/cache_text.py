r"""Runs a stage's frozen text encoder once over every caption of its dataset and stores the
outputs, so that training reads them instead of running the encoder (T5-XXL) every step.

  python -m diffusion_jax.tools.cache_text --config=configs/imagen.py:stage=base64,size=tiny \
      --out=DIR [the same --config.* flags as the training run]
  python -m diffusion_jax.train --config=configs/imagen.py:stage=base64,size=tiny \
      --workdir=ROOT/base64 --config.input.text_cache=DIR

The cache (format: `diffusion_jax.data.text_cache`) records what it was made from: the
encoder and its weights, the token length, the caption rewrite and the dataset. A run whose
settings differ is refused in one line, and so is a missing, truncated or corrupt entry; run
this again to rebuild. Writing into a directory that holds a cache replaces it.
"""
from __future__ import annotations

import logging

from absl import flags

from diffusion_jax import cli, errors


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  cli.define_config(flag_values, sys_argv, required=True)
  flags.DEFINE_string('out', None, 'Directory the cache is written to (the training run\'s '
                      '--config.input.text_cache).', flag_values=flag_values)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  if not F.out or not F.out.strip():
    raise errors.InputError('--out is required: the directory the text cache is written to')
  logging.getLogger().setLevel(logging.INFO)
  from diffusion_jax.train import text_cache_build  # noqa: PLC0415 - after the flags: --help is fast
  done = text_cache_build.build(F.config, F.out)
  print(f'cached {done["captions"]} captions of {done["records"]} records '
        f'({done["unreadable"]} unreadable) as tokens {tuple(done["tokens_shape"])} in '
        f'{done["out"]} ({done["seconds"]:.1f} s)')
  print(f'train on it with:\n  --config.input.text_cache={done["out"]}')


if __name__ == '__main__':
  define_flags()
  cli.run(main, config='stage')

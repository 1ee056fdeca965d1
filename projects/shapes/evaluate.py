r"""The Shapes alignment of a cascade: the oracle's rates on held-out captions, per guidance.

    python -m projects.shapes.evaluate --config=projects/shapes/configs/imagen.py:stage=cascade \
        --workdir=ROOT --guidance=1,3,5 --samples=500 --train_examples=5000

Writes ROOT/eval/shapes_g<scale>/result.json in the layout of the library's FID results
(`diffusion_jax.evaluate`), so `python -m diffusion_jax.evaluate --compare='ROOT/eval/*/result.json'`
tables and plots both.

The captions are held out from the first stage's training set (`--train_seed`,
`--train_examples` scenes) as that stage reads them (through its trained caption rewrite,
recorded as `caption_rewrite`), when the template space leaves any
(`alignment.heldout_captions`); otherwise they are fresh random captions and the result
records `heldout: false`.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from absl import flags, logging
import numpy as np

from diffusion_jax import cli, config_util, errors, validation
from diffusion_jax import evaluate as library_evaluate
from projects.shapes import alignment
from projects.shapes import data as shapes_data  # registers the caption rewrite  # noqa: F401
from projects.shapes import shapes


def captions_for(input_cfg, n: int, *, caption_seed: int, train_seed: int,
                 train_examples: int) -> tuple[list[str], str | None, bool]:
  """(captions, caption rewrite name, held out?) for a first stage with `input_cfg` (as
  restored from its checkpoint): held out as it reads them, through the caption rewrite it
  was trained with, if any. Where the training set covers almost every caption, fresh random
  ones instead."""
  from diffusion_jax.data import pipeline as data_pipeline  # noqa: PLC0415 - grain, jax
  rewrite_name = config_util.get(input_cfg, 'caption_rewrite')
  try:
    return alignment.heldout_captions(
        n, seed=caption_seed, train_seed=train_seed, train_examples=train_examples,
        rewrite=data_pipeline.caption_rewrite(input_cfg)), rewrite_name, True
  except ValueError as e:
    logging.warning('Shapes alignment on captions that training may have seen: %s', e)
    rng = np.random.default_rng([caption_seed, 1])
    return [shapes.random_caption(rng) for _ in range(n)], rewrite_name, False


def evaluate(config, workdir: str, *, guidance: Sequence[float] = (), samples: int = 500,
             train_seed: int = 0, train_examples: int = 100_000, sample_seed: int = 0,
             batch_size: int = 50, caption_seed: int = 0) -> dict[str, dict]:
  """The alignment rates for each guidance scale; returns {'shapes_g<scale>': result}.
  Bad input (the config, a count below 1, a negative scale, a workdir that cannot hold
  ROOT/eval, an untrained stage) raises errors.InputError before anything is built."""
  import jax  # noqa: PLC0415
  from diffusion_jax import pipelines  # noqa: PLC0415
  validation.check_cascade_config(config)
  for name, value in (('samples', samples), ('batch_size', batch_size),
                      ('train_examples', train_examples)):
    if not value >= 1:
      raise errors.InputError(f'--{name}={value}: must be at least 1')
  scales = library_evaluate.guidance_scales(config, guidance)
  validation.check_writable_dir(workdir, '--workdir')  # it holds ROOT/eval
  pipe = pipelines.load(config, workdir)
  captions, rewrite_name, heldout = captions_for(
      pipe.stage(config.order[0]).config.input, samples, caption_seed=caption_seed,
      train_seed=train_seed, train_examples=train_examples)
  results: dict[str, dict] = {}
  for g in scales:
    generate = lambda prompts, rng, g=g: pipe.generate(prompts, rng, guidance_scale=g)
    rates = alignment.evaluate(generate, captions, jax.random.PRNGKey(sample_seed),
                               batch_size=batch_size)
    name = f'shapes_g{g:g}'
    result = {**library_evaluate.sampling_info(config, g), 'metric': 'shapes_alignment',
              'heldout': heldout, 'caption_rewrite': rewrite_name,
              'caption_seed': caption_seed, 'sample_seed': sample_seed,
              'num_samples': rates['n'],
              **{f'alignment_{k}': v for k, v in rates.items() if k != 'n'}}
    library_evaluate.write_result(os.path.join(workdir, 'eval', name, 'result.json'), result)
    results[name] = result
  return results


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  if F.config is None or not F.workdir:
    raise cli.CLIError('--config and --workdir are required')
  try:
    guidance = [float(g) for g in F.guidance]
  except ValueError:
    raise cli.CLIError(f'--guidance={",".join(F.guidance)}: give numbers, e.g. 1,3,5') from None
  results = evaluate(F.config, F.workdir, guidance=guidance, samples=F.samples,
                     train_seed=F.train_seed, train_examples=F.train_examples,
                     sample_seed=F.sample_seed, batch_size=F.batch_size,
                     caption_seed=F.caption_seed)
  for name, r in results.items():
    print(json.dumps({'run': name, 'alignment_all': r['alignment_all'],
                      'num_samples': r['num_samples'], 'heldout': r['heldout']}))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """Flags exist only when run as a program (importing this module defines none)."""
  fv = dict(flag_values=flag_values)
  cli.define_config(flag_values, sys_argv, kind='cascade')
  flags.DEFINE_string('workdir', None, 'cascade root (stages in ROOT/<stage>)', **fv)
  flags.DEFINE_list('guidance', [], "guidance scales (default: the first stage's)", **fv)
  flags.DEFINE_integer('samples', 500, 'captions to sample and score', **fv)
  flags.DEFINE_integer('train_seed', 0, "the first stage's training set: its seed "
                       '(input.shapes_seed)', **fv)
  flags.DEFINE_integer('train_examples', 100_000, "the first stage's training set: its "
                       'number of examples (input.shapes_num_examples)', **fv)
  flags.DEFINE_integer('caption_seed', 0, 'seed of the caption draw', **fv)
  flags.DEFINE_integer('sample_seed', 0, 'seed of the samples', **fv)
  flags.DEFINE_integer('batch_size', 50, 'prompts per generate call', **fv)


if __name__ == '__main__':
  from diffusion_jax import hugepages
  hugepages.reexec_with_huge_pages()
  define_flags()
  cli.run(main, config='cascade')

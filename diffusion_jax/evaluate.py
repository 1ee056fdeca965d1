r"""Evaluates a cascade: zero-shot COCO FID-30K (+ CLIP score); compares results.

    python -m diffusion_jax.evaluate --config=configs/imagen.py:stage=cascade,size=tiny \
        --workdir=ROOT --inception_weights=pt_inception-2015-12-05.safetensors \
        --guidance=1,3,5

    python -m diffusion_jax.evaluate --compare='ROOT/eval/*/result.json' --out=ROOT/eval/compare

Every guidance scale is evaluated in its own directory, ROOT/eval/<metric>_g<scale>/, whose
result.json records the settings beside the number; FID runs resume from the sample shards
already written (`diffusion_jax.eval.protocol`). `--random_inception_seed=S` stands in for the
weights file in smoke tests: random weights are written to ROOT/eval/ and the result says
`inception_random: true` (such an FID is not comparable to anything).

`--compare` writes a markdown table (.md) and the FID / alignment trade-off over guidance
(.png) from result files, these and any other metric's written in the same layout (a
project's, e.g. `projects.shapes.evaluate`'s ROOT/eval/shapes_g<scale>/result.json).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Sequence

from absl import flags, logging

from diffusion_jax import cli, errors, io_util, validation


def sampling_info(config, guidance: float) -> dict[str, Any]:
  """What produced the samples, for the result JSON."""
  order = list(config.order)
  return {'guidance': float(guidance),
          'sampler': '/'.join(str(config.stages[s].sampler) for s in order),
          'steps': {s: int(config.stages[s].num_steps) for s in order},
          'cascade': f'{config.family}:{config.size}', 'order': order}


def compare(patterns: Sequence[str], out: str) -> list[dict]:
  from diffusion_jax.eval import protocol  # noqa: PLC0415
  files = sorted({f for pat in patterns for f in glob.glob(pat)})
  if not files:
    raise errors.InputError(f'--compare: no result files match {list(patterns)}')
  results = []
  for f in files:
    try:
      with open(f, encoding='utf-8') as fh:
        r = json.load(fh)
    except (OSError, ValueError) as e:
      raise errors.InputError(f'--compare: {f} is not a readable result JSON ({e}); remove it '
                              'or narrow the pattern') from None
    if not isinstance(r, dict):
      raise errors.InputError(f'--compare: {f} holds a JSON {type(r).__name__}, not a result')
    r.setdefault('name', os.path.basename(os.path.dirname(os.path.abspath(f))))
    results.append(r)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + '.md', 'w') as fh:
    fh.write(protocol.compare_table(results))
  protocol.plot_tradeoff(results, out + '.png')
  return results


def evaluate(config, workdir: str, *, metrics: Sequence[str] = ('fid',),
             guidance: Sequence[float] = (), inception_weights: str | None = None,
             random_inception_seed: int = -1, protocol_config=None,
             clip_path: str | None = None) -> dict[str, dict]:
  """Runs the metrics (`fid`: FID-30K, with CLIP score when `clip_path` is given) for each
  guidance scale; returns {directory name: result}. Bad input (the config, the metrics, the
  scales, a missing weights file, a workdir that cannot hold ROOT/eval) raises
  errors.InputError before anything is built."""
  from diffusion_jax import convert, encoders, pipelines  # noqa: PLC0415
  from diffusion_jax.eval import protocol  # noqa: PLC0415
  from diffusion_jax.models import inception  # noqa: PLC0415
  validation.check_cascade_config(config)
  unknown = set(metrics) - {'fid'}
  if unknown:
    raise errors.InputError(f'--metrics={",".join(metrics)}: this evaluates fid (a project '
                            'evaluates its own, e.g. python -m projects.shapes.evaluate)')
  scales = guidance_scales(config, guidance)
  weights, random_weights = inception_weights, False
  if 'fid' in metrics and not weights and random_inception_seed < 0:
    raise errors.InputError('FID needs --inception_weights (pytorch-fid weights converted '
                            'with diffusion_jax.tools.convert_inception), or '
                            '--random_inception_seed for a smoke test')
  if weights and not os.path.isfile(weights):
    raise errors.InputError(f'--inception_weights={weights}: no such file (convert '
                            "pytorch-fid's weights with diffusion_jax.tools.convert_inception)")
  if clip_path and not os.path.isdir(clip_path):
    raise errors.InputError(f'--clip_path={clip_path}: no such directory (a transformers '
                            'CLIPModel directory)')
  eval_root = os.path.join(workdir, 'eval')
  validation.check_writable_dir(workdir, '--workdir')  # it holds ROOT/eval
  pipe = pipelines.load(config, workdir)
  os.makedirs(eval_root, exist_ok=True)
  if 'fid' in metrics and not weights:
    weights = os.path.join(eval_root, f'inception_random_seed{random_inception_seed}.safetensors')
    if not os.path.isfile(weights):
      convert.save_inception(weights, inception.random_params(random_inception_seed))
    random_weights = True
  clip = (encoders.build_encoder(encoders.encoder_config('clip', path=clip_path))
          if clip_path else None)
  results: dict[str, dict] = {}
  for g in scales:
    generate = lambda prompts, rng, g=g: pipe.generate(prompts, rng, guidance_scale=g)
    sampling = sampling_info(config, g)
    if 'fid' in metrics:
      name = f'fid_g{g:g}'
      result = protocol.run(generate, workdir=os.path.join(eval_root, name),
                            inception_path=weights, config=protocol_config, sampling=sampling,
                            clip_encoder=clip, log=logging.info)
      result['inception_random'] = random_weights
      write_result(os.path.join(eval_root, name, 'result.json'), result)
      results[name] = result
  return results


def guidance_scales(config, guidance: Sequence[float] = ()) -> list[float]:
  """The scales to evaluate: `guidance` (each >= 0), else the cascade's first stage's own."""
  scales = [float(g) for g in guidance]
  bad = [g for g in scales if not g >= 0]
  if bad:
    raise errors.InputError(f'--guidance={",".join(f"{g:g}" for g in scales)}: guidance '
                            'scales must be >= 0 (1: none), e.g. 1,3,5')
  return scales or [float(config.stages[config.order[0]].guidance_scale)]


def write_result(path: str, result: dict) -> None:
  """Writes a result.json (process 0 only), atomically."""
  import jax  # noqa: PLC0415
  if jax.process_index() != 0:
    return
  io_util.write_json(path, result)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  if F.compare:
    out = F.out or 'compare'
    results = compare(F.compare, out)
    print(f'wrote {out}.md and {out}.png ({len(results)} results)')
    return
  if F.config is None or not F.workdir:
    raise cli.CLIError('--config and --workdir are required (or --compare)')
  for name in ('num_samples', 'image_size', 'shard_size', 'batch_size', 'reference_images'):
    if F[name].value is not None and F[name].value < 1:
      raise cli.CLIError(f'--{name}={F[name].value}: must be at least 1')
  try:
    guidance = [float(g) for g in F.guidance]
  except ValueError:
    raise cli.CLIError(f'--guidance={",".join(F.guidance)}: give numbers, e.g. 1,3,5') from None
  from diffusion_jax.eval import protocol  # noqa: PLC0415
  cfg = protocol.ProtocolConfig(num_samples=F.num_samples, caption_seed=F.caption_seed,
                                sample_seed=F.sample_seed, image_size=F.image_size,
                                shard_size=F.shard_size, batch_size=F.batch_size,
                                reference_images=F.reference_images, data_dir=F.tfds_data_dir)
  results = evaluate(F.config, F.workdir, metrics=F.metrics, guidance=guidance,
                     inception_weights=F.inception_weights,
                     random_inception_seed=F.random_inception_seed,
                     protocol_config=cfg, clip_path=F.clip_path)
  for name, r in results.items():
    print(json.dumps({'run': name, **{k: r[k] for k in ('fid', 'clip_score')
                                      if k in r}}))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """Flags exist only when run as a program (importing `evaluate` for its functions defines
  none, so it coexists with the other CLIs in one process)."""
  fv = dict(flag_values=flag_values)
  cli.define_config(flag_values, sys_argv, kind='cascade')
  flags.DEFINE_string('workdir', None, 'cascade root (stages in ROOT/<stage>)', **fv)
  flags.DEFINE_string('inception_weights', None,
                      'FID Inception .safetensors (tools/convert_inception)', **fv)
  flags.DEFINE_integer('random_inception_seed', -1,
                       'smoke tests only: random Inception weights from this seed', **fv)
  flags.DEFINE_list('metrics', ['fid'], 'fid (FID-30K; with --clip_path, CLIP score too)', **fv)
  flags.DEFINE_list('guidance', [], "guidance scales (default: the config's)", **fv)
  flags.DEFINE_integer('num_samples', 30_000, 'FID: captions / samples', **fv)
  flags.DEFINE_integer('caption_seed', 0, 'seed of the caption draw', **fv)
  flags.DEFINE_integer('sample_seed', 0, 'seed of the samples', **fv)
  flags.DEFINE_integer('image_size', 256, 'generated and reference resolution', **fv)
  flags.DEFINE_integer('shard_size', 1000, 'FID: captions per saved shard', **fv)
  flags.DEFINE_integer('batch_size', 50, 'prompts per generate call', **fv)
  flags.DEFINE_integer('reference_images', None, 'FID: reference images (default all)', **fv)
  flags.DEFINE_string('tfds_data_dir', None, 'TFDS data dir holding coco_captions', **fv)
  flags.DEFINE_string('clip_path', None, 'transformers CLIP directory: adds CLIP score', **fv)
  flags.DEFINE_list('compare', [], 'result.json files or globs to compare', **fv)
  flags.DEFINE_string('out', None, 'compare: output path prefix (.md, .png)', **fv)


if __name__ == '__main__':
  from diffusion_jax import hugepages
  hugepages.reexec_with_huge_pages()
  define_flags()
  cli.run(main, config='cascade')

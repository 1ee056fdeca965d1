r"""GLIDE at the released sizes: `pipelines.from_pretrained` + one guided base sample (64 px,
100 ancestral DDPM steps, classifier-free guidance 3) + 27-step DDIM upsampling (64 -> 256 px)
of one prompt, on random weights of the published shapes; beside glide-text2im's own sampler.

  python benchmarks/glide_release.py [--glide_text2im=DIR] [--peer=auto|yes|no]
      [--base_steps=100] [--up_steps=27] [--options=JSON] [--up_options=JSON]

First, a child process writes a pretrained directory (`pretrained.write_stage`, as
`tools/convert_glide` does from the released files) for `base` and `upsample` at glide-text2im's
defaults (`convert_glide.released_options`, updated by `--options` / `--up_options`, its own
option names), every parameter random normal at the network's init shapes (jax.eval_shape),
scaled by 1/sqrt(fan-in); its process is separate so that this one's peak RSS is the
sampler's. Then this process times the `from_pretrained` load (both stages' weights read), a
first `generate` (compile + run) and a second (run only) for one prompt: batch 1, the guided
base two rows (conditional + unconditional), the upsampler one. compile_s = first - second.
With glide-text2im importable (`--glide_text2im=DIR`, its checkout) `benchmarks/glide_peer.py`
then runs its text2im notebook's recipe in a child process on the same CPU.

`--base_steps` / `--up_steps` shorten the chains (the base's respacing 'N', the upsampler's
'ddimN'; 27 is glide-text2im's 'fast27'), and the two option flags shrink the networks, so the
tests run it tiny. Ends with one JSON line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def base_spacing(steps: int) -> str:
  return str(steps)


def up_spacing(steps: int) -> str:
  return 'fast27' if steps == 27 else f'ddim{steps}'


def kind_options(options: dict, up_options: dict) -> dict[str, dict]:
  """glide-text2im's option overrides of each kind (the flags' JSON objects)."""
  return {'base': dict(options), 'upsample': dict(up_options)}


# --- the random-weight release ---------------------------------------------------------------

def _byte_symbols() -> dict[int, str]:
  """GPT-2's reversible map of the 256 bytes to printable characters."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def write_byte_bpe(out_dir: str) -> None:
  """A GPT-2 byte-level BPE without merges (256 byte tokens + <|endoftext|>): the released
  tokenizer's format when glide-text2im's own files are not at hand (the prompt's token count
  changes, the network's work does not: it always reads text_ctx tokens)."""
  vocab = [_byte_symbols()[b] for b in range(256)] + ['<|endoftext|>']
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'encoder.json'), 'w', encoding='utf-8') as f:
    json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
  with open(os.path.join(out_dir, 'vocab.bpe'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n')


def random_params(template, seed: int):
  """Random normal parameters of the template's shapes: matrices / kernels scaled by
  1/sqrt(fan-in), norm scales 1, biases 0.02 N(0, 1)."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(dict(template))
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat.items():
    shape = tuple(leaf.shape)
    if len(shape) >= 2:
      a = rng.standard_normal(shape, dtype=np.float32)
      a *= np.float32(1.0 / np.sqrt(max(1, int(np.prod(shape[:-1])))))
    elif path[-1] == 'scale':
      a = np.ones(shape, np.float32)
    else:
      a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    out[path] = a
  return traverse_util.unflatten_dict(out)


def write_release(out: str, options: dict, up_options: dict, tokenizer: str | None) -> dict:
  """OUT/base and OUT/upsample at the released configs with random weights; returns
  kind -> parameter count."""
  import flax.linen as nn
  import jax

  from diffusion_jax import conditioning, convert_glide, models, pretrained
  from diffusion_jax.tools import convert_glide as tool
  tok_src = os.path.join(out, '.tokenizer_src')
  if tokenizer:
    tok_src = tool.tokenizer_source(tokenizer)
  else:
    write_byte_bpe(tok_src)
  counts = {}
  for i, (kind, opts) in enumerate(kind_options(options, up_options).items()):
    config = tool.stage_config(kind, convert_glide.released_options(kind, opts))
    model = models.build(config.model)
    template = nn.meta.unbox(jax.eval_shape(conditioning.init_params_fn(config, model),
                                            jax.random.PRNGKey(0)))
    params = random_params(template, seed=i)
    counts[kind] = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    stage_dir = os.path.join(out, kind)
    pretrained.write_stage(stage_dir, config, params,
                           metadata={'source': 'random weights', 'kind': kind})
    del params
    convert_glide.convert_tokenizer(tok_src, os.path.join(stage_dir, pretrained.TOKENIZER_DIR))
  return counts


# --- timing ------------------------------------------------------------------------------------

def run_ours(release: str, prompt: str, base_steps: int, up_steps: int,
             generates: int = 2) -> dict:
  import jax

  from diffusion_jax import pipelines
  t0 = time.perf_counter()
  pipe = pipelines.from_pretrained(release)
  for name in pipe.order:  # stages load lazily: read both now
    pipe.stage(name)
  load_s = time.perf_counter() - t0
  overrides = {'base': {'spacing': base_spacing(base_steps)},
               'upsample': {'spacing': up_spacing(up_steps)}}
  runs, timings, out = [], [], None
  for i in range(generates):
    pipe.timings.clear()
    t0 = time.perf_counter()
    out = pipe.generate([prompt], jax.random.key(i), **overrides)
    out = np.asarray(out)
    runs.append(time.perf_counter() - t0)
    timings.append(dict(pipe.timings))
  if len(runs) == 1:  # compile + run only: no separate compile time
    return {'order': list(pipe.order), 'load_s': load_s, 'first_generate_s': runs[0],
            'timings_first': timings[0], 'output_shape': list(out.shape),
            'output_dtype': str(out.dtype)}
  first, second = runs
  return {'order': list(pipe.order), 'load_s': load_s, 'first_generate_s': first,
          'second_generate_s': second, 'compile_s': first - second, 's_per_image': second,
          'timings_first': timings[0], 'timings_second': timings[1],
          'base_s_per_step': timings[1].get('base', 0.0) / base_steps,
          'upsample_s_per_step': timings[1].get('upsample', 0.0) / up_steps,
          # the per-step times at the released 100 + 27 steps, plus what is not a step
          'extrapolated_s_per_image_100_27': (
              second - sum(timings[1].values()) + 100 * timings[1].get('base', 0.0) / base_steps
              + 27 * timings[1].get('upsample', 0.0) / up_steps),
          'output_shape': list(out.shape), 'output_dtype': str(out.dtype)}


def run_peer(F) -> dict:
  """glide-text2im's numbers from `benchmarks/glide_peer.py` in a child process."""
  cmd = [sys.executable, os.path.join(HERE, 'glide_peer.py'), f'--glide_text2im={F.glide_text2im}',
         f'--base_steps={F.base_steps}', f'--up_steps={F.up_steps}', f'--prompt={F.prompt}',
         f'--options={F.options}', f'--up_options={F.up_options}']
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    print(f'peer process failed (exit {proc.returncode}): {tail}', file=sys.stderr)
    return {'peer': f'glide-text2im failed: {tail}'}
  return json.loads(lines[-1])


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  del sys_argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('options', '{}', "JSON: glide-text2im option overrides of the base "
                      '(e.g. {"num_channels": 32}); {}: the released base', **fv)
  flags.DEFINE_string('up_options', '{}', 'JSON: the same for the upsampler', **fv)
  flags.DEFINE_integer('base_steps', 100, "base DDPM steps (respacing 'N'; released: 100)", **fv)
  flags.DEFINE_integer('up_steps', 27, "upsampler DDIM steps (27: 'fast27', else 'ddimN')", **fv)
  flags.DEFINE_string('prompt', 'an oil painting of a corgi', 'the one prompt', **fv)
  flags.DEFINE_string('glide_text2im', '', 'a glide-text2im checkout (the peer, and its '
                      'tokenizer for our release); empty: neither', **fv)
  flags.DEFINE_enum('peer', 'auto', ('auto', 'yes', 'no'),
                    'also time glide-text2im (auto: when --glide_text2im is given)', **fv)
  flags.DEFINE_integer('generates', 2, '2: compile + run, then run; 1: only the first (no '
                       'separate compile time or s/image)', **fv)
  flags.DEFINE_string('release', '', 'write the random-weight release here and keep it '
                      '(default: a temporary directory, removed)', **fv)
  flags.DEFINE_string('write_only', '', 'internal: write the release into this directory and '
                      'exit (the child process)', **fv)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  from diffusion_jax.tools import convert_glide as tool
  options, up_options = tool.parse_options(F.options), tool.parse_options(F.up_options)
  tokenizer = (os.path.join(F.glide_text2im, 'glide_text2im', 'tokenizer')
               if F.glide_text2im else None)
  if F.write_only:
    counts = write_release(F.write_only, options, up_options, tokenizer)
    common.emit({'params': counts})
    return
  if min(F.base_steps, F.up_steps, F.generates) < 1:
    raise ValueError('--base_steps, --up_steps and --generates must be positive')
  tmp = None
  release = F.release
  if not release:
    tmp = tempfile.TemporaryDirectory(prefix='glide_release_')
    release = tmp.name
  try:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f'--write_only={release}',
         f'--options={F.options}', f'--up_options={F.up_options}',
         f'--glide_text2im={F.glide_text2im}'], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError('writing the release failed: '
                         + (proc.stderr.strip().splitlines() or ['no output'])[-1])
    written = json.loads(proc.stdout.strip().splitlines()[-1])
    write_s = time.perf_counter() - t0
    result = {'benchmark': 'glide_release', 'prompt': F.prompt, 'batch': 1,
              'base_steps': F.base_steps, 'up_steps': F.up_steps,
              'base_spacing': base_spacing(F.base_steps), 'up_spacing': up_spacing(F.up_steps),
              'options': options, 'up_options': up_options, 'params': written['params'],
              'dtype': 'float32', 'write_release_s': write_s, **common.machine(),
              'load_avg_before': list(os.getloadavg())}
    result.update(run_ours(release, F.prompt, F.base_steps, F.up_steps, F.generates))
    result['peak_rss_mb'] = common.peak_rss_mb()
    result['load_avg_after'] = list(os.getloadavg())
  finally:
    if tmp is not None:
      tmp.cleanup()
  if F.generates < 2:
    common.emit(result)
    return
  print(f"ours: load {result['load_s']:.1f} s, compile {result['compile_s']:.1f} s, "
        f"{result['s_per_image']:.1f} s/image (base {result['base_s_per_step']:.2f} s/step x "
        f"{F.base_steps}, upsample {result['upsample_s_per_step']:.2f} s/step x {F.up_steps}), "
        f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
  if F.peer == 'yes' or (F.peer == 'auto' and F.glide_text2im):
    peer = run_peer(F)
    result.update({k if k.startswith('peer') else f'peer_{k}': v for k, v in peer.items()})
    if peer.get('peer_s_per_image'):
      result['speedup_vs_peer'] = peer['peer_s_per_image'] / result['s_per_image']
      result['peer_extrapolated_s_per_image_100_27'] = (
          100 * peer['peer_base_s_per_step'] + 27 * peer['peer_upsample_s_per_step'])
  common.emit(result)


if __name__ == '__main__':
  define_flags()
  common.run(main)

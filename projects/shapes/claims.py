r"""The seeds' qualitative claims, reproduced at toy scale on the demo's Imagen cascade.

  python -m projects.shapes.demo --workdir=/tmp/demo                      # trains the cascade
  python -m projects.shapes.claims --workdir=/tmp/demo --out=projects/shapes/docs/claims

(a) Guidance trades diversity for alignment: base-stage samples over a sweep of guidance
    scales, several seeds per caption; alignment is the oracle's all-correct rate, diversity
    the mean pairwise RMS distance (pixels in [0, 1]) between samples of the same caption.
(b) At high guidance, no thresholding saturates pixels, static clipping over-saturates and
    dynamic thresholding keeps images natural: the fraction of saturated object pixels (a
    channel at 0 or 255 in a clearly coloured pixel; the rendered data has none)
    over the sweep, for each thresholding method, beside the alignment.
(c) Super-resolution with noise-conditioning augmentation is more robust than without: a second
    SR stage trained identically but without augmentation (`WORKDIR/sr256_noaug`), both fed
    (1) the base stage's own samples (the cascade's real inputs: alignment of the output) and
    (2) ground-truth low-res renders with added Gaussian noise (PSNR against the 64 px render).

Writes OUT/claims.json, OUT/claims.md and the figures OUT/*.png; the base and SR stages come
from the demo (trained here if missing, with the demo's plan), the no-augmentation stage is
trained here (resumable like every stage).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

from absl import flags
import numpy as np

from diffusion_jax import cli
from projects.shapes import demo, shapes

GUIDANCE_SWEEP = (1.0, 2.0, 4.0, 8.0, 16.0)
THRESHOLDS = ('none', 'static', 'dynamic')
NOISE_LEVELS = (0.0, 0.1, 0.2, 0.4)


# Measures -----------------------------------------------------------------------------------------

def saturated_fraction(images_NHWC) -> float:
  """Fraction of clearly coloured pixels (a channel below 200) with a channel at 0 or 255.

  The white background and the faint anti-aliased rims are not counted; palette colours have
  no channel at either extreme, so rendered data scores 0.
  """
  x = np.asarray(images_NHWC)
  extreme = np.any((x == 0) | (x == 255), axis=-1)
  objects = np.any(x < 200, axis=-1)
  return float((extreme & objects).sum() / max(objects.sum(), 1))


def diversity(images_NHWC, groups: Sequence[int]) -> float:
  """Mean pairwise RMS distance ([0, 1] pixels) between images that share a group id."""
  x = np.asarray(images_NHWC, np.float32) / 255.0
  groups = np.asarray(groups)
  dists = []
  for g in np.unique(groups):
    members = x[groups == g]
    for i in range(len(members)):
      for j in range(i + 1, len(members)):
        dists.append(float(np.sqrt(np.mean((members[i] - members[j]) ** 2))))
  return float(np.mean(dists)) if dists else float('nan')


def psnr(a_NHWC, b_NHWC) -> float:
  a = np.asarray(a_NHWC, np.float64) / 255.0
  b = np.asarray(b_NHWC, np.float64) / 255.0
  mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))


# Figures ------------------------------------------------------------------------------------------

_COLORS = [(200, 40, 40), (40, 90, 200), (30, 150, 60), (150, 60, 170)]


def plot_series(series: dict[str, Sequence[tuple[float, float]]], path: str, *, title: str,
                xlabel: str, ylabel: str, log_x: bool = False, size=(640, 400)) -> str:
  """One PNG panel with a line per series (PIL only): {name: [(x, y), ...]}."""
  from PIL import Image, ImageDraw
  w, h = size
  im = Image.new('RGB', (w, h), 'white')
  draw = ImageDraw.Draw(im)
  left, top, right, bottom = 70, 40, w - 20, h - 50
  draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
  draw.text((left, 12), title, fill=(0, 0, 0))
  draw.text((left + (right - left) // 2 - 30, h - 22), xlabel, fill=(0, 0, 0))
  draw.text((6, top - 14), ylabel, fill=(0, 0, 0))
  pts = [p for s in series.values() for p in s if np.isfinite(p[1])]
  if not pts:
    im.save(path)
    return path
  fx = (lambda v: np.log2(v)) if log_x else (lambda v: v)
  xs = np.asarray([fx(p[0]) for p in pts])
  ys = np.asarray([p[1] for p in pts])
  x0, x1 = xs.min(), max(xs.max(), xs.min() + 1e-9)
  y0, y1 = min(ys.min(), 0.0), max(ys.max(), 1e-9) * 1.08
  px = lambda v: left + 10 + (fx(v) - x0) / (x1 - x0) * (right - left - 20)  # noqa: E731
  py = lambda v: bottom - 10 - (v - y0) / (y1 - y0) * (bottom - top - 20)  # noqa: E731
  for v in sorted({p[0] for p in pts}):
    draw.text((px(v) - 6, bottom + 4), f'{v:g}', fill=(0, 0, 0))
  for frac in (0.0, 0.5, 1.0):
    v = y0 + frac * (y1 - y0)
    draw.text((8, py(v) - 6), f'{v:.3g}', fill=(0, 0, 0))
  for k, (name, s) in enumerate(series.items()):
    color = _COLORS[k % len(_COLORS)]
    s = sorted((x, y) for x, y in s if np.isfinite(y))
    line = [(px(x), py(y)) for x, y in s]
    if len(line) > 1:
      draw.line(line, fill=color, width=2)
    for a, b in line:
      draw.ellipse([a - 3, b - 3, a + 3, b + 3], fill=color)
    draw.rectangle([right - 150, top + 8 + 16 * k, right - 138, top + 18 + 16 * k], fill=color)
    draw.text((right - 132, top + 6 + 16 * k), name, fill=(0, 0, 0))
  im.save(path)
  return path


# The experiments --------------------------------------------------------------------------------

def noaug_config(plan: demo.Plan, steps: int):
  """The demo's SR stage trained identically but without noise-conditioning augmentation."""
  c = demo.stage_config(plan, plan.order[1], steps)
  c.diffusion.noise_aug = False
  c.sampler.aug_level = 0.0
  return c


def _pipeline(plan: demo.Plan, root: str):
  from diffusion_jax import pipelines
  c = demo.cascade_config(plan)
  sr = plan.order[1]
  with c.unlocked():
    entry = c.stages[sr].copy_and_resolve_references()
    entry.dir = f'{sr}_noaug'
    entry.aug_level = 0.0
    c.stages[f'{sr}_noaug'] = entry
  return pipelines.load(c, root)


def _generate(pipe, names, captions, rng, overrides, first_low_res=None, batch=48):
  import jax
  out = []
  for i, lo in enumerate(range(0, len(captions), batch)):
    low = None if first_low_res is None else first_low_res[lo:lo + batch]
    x = pipe.image_chain(names, list(captions[lo:lo + batch]), jax.random.fold_in(rng, i),
                         overrides, first_low_res=low)
    out.append(np.asarray(jax.device_get(x)))
  from diffusion_jax.io_util import to_uint8
  return to_uint8(np.concatenate(out))


def run(root: str, out: str, *, captions_per_kind: int = 12, seeds: int = 3,
        noaug_steps: int | None = None, plan: demo.Plan | None = None) -> dict:
  import jax
  plan = plan or demo.default_plan()
  root = os.path.abspath(root)
  os.makedirs(out, exist_ok=True)
  demo.train_stages(plan, root)
  base, sr = plan.order
  sr_steps = dict(plan.stages)[sr] if noaug_steps is None else noaug_steps
  from diffusion_jax.train import loop
  print(f'training {sr} without noise augmentation ({sr_steps} steps) for claim (c)', flush=True)
  loop.train(noaug_config(plan, sr_steps), os.path.join(root, f'{sr}_noaug'),
             hooks=(demo._Printer(f'{sr}_noaug', sr_steps),))
  pipe = _pipeline(plan, root)
  per_kind = {k: captions_per_kind for k in demo.KINDS}
  captions = demo.plan_eval_captions(plan, per_kind)
  rng = jax.random.PRNGKey(plan.seed + 7)
  result: dict = {'plan': dataclasses.asdict(plan), 'captions': len(captions), 'seeds': seeds,
                  'stage_sampler': {'sampler': plan.sampler, 'num_steps': plan.sample_steps,
                                    'sr_num_steps': plan.sr_sample_steps}}
  start = time.perf_counter()

  # (a) guidance vs alignment and diversity (base stage, several seeds per caption).
  rows = [c for c in captions for _ in range(seeds)]
  groups = [i for i in range(len(captions)) for _ in range(seeds)]
  sweep = []
  base_images = {}
  for g in GUIDANCE_SWEEP:
    images = _generate(pipe, (base,), rows, jax.random.fold_in(rng, 1),
                       {'guidance_scale': g, 'threshold': 'dynamic'})
    base_images[g] = images
    r = demo.rates_by_kind(images, rows)['overall']
    sweep.append({'guidance': g, 'alignment_all': r['all'], 'alignment_color': r['color'],
                  'diversity': diversity(images, groups)})
    print(f'  (a) guidance {g:g}: all-correct {r["all"]:.3f}, diversity '
          f'{sweep[-1]["diversity"]:.4f}', flush=True)
  result['a_guidance'] = sweep

  # (b) thresholding at growing guidance (base stage, one seed per caption).
  thr = []
  for method in THRESHOLDS:
    for g in GUIDANCE_SWEEP:
      if method == 'dynamic':
        images = base_images[g][::seeds]
      else:
        images = _generate(pipe, (base,), captions, jax.random.fold_in(rng, 1),
                           {'guidance_scale': g, 'threshold': method})
      r = demo.rates_by_kind(images, captions)['overall']
      thr.append({'threshold': method, 'guidance': g, 'saturated': saturated_fraction(images),
                  'alignment_all': r['all']})
      print(f'  (b) {method:>7} guidance {g:g}: saturated {thr[-1]["saturated"]:.3f}, '
            f'all-correct {r["all"]:.3f}', flush=True)
  result['b_thresholding'] = thr
  truth = np.stack([shapes.render(c, base_images[1.0].shape[1], seed=i)
                    for i, c in enumerate(captions)])
  result['b_saturated_in_data'] = saturated_fraction(truth)

  # (c) SR robustness: the base stage's samples as inputs, then noisy ground truth.
  g_base = float(plan.guidance_scale)
  low = base_images[min(GUIDANCE_SWEEP, key=lambda v: abs(v - g_base))][::seeds]
  low_f = low.astype(np.float32) / 127.5 - 1.0
  sr_rows = []
  size = pipe.stage(sr).config.model.image_size
  hi_truth = np.stack([shapes.render(c, size, seed=i) for i, c in enumerate(captions)])
  lo_truth = np.stack([shapes.render(c, low.shape[1], seed=i) for i, c in enumerate(captions)])
  noise_rng = np.random.default_rng(plan.seed)
  noisy = {s: np.clip(lo_truth / 127.5 - 1.0 + s * noise_rng.standard_normal(lo_truth.shape),
                      -1, 1).astype(np.float32) for s in NOISE_LEVELS}
  for name in (sr, f'{sr}_noaug'):
    images = _generate(pipe, (name,), captions, jax.random.fold_in(rng, 3),
                       {'guidance_scale': g_base}, first_low_res=low_f)
    row = {'stage': name, 'augmentation': name == sr,
           'cascade_alignment_all': demo.rates_by_kind(images, captions)['overall']['all']}
    for s in NOISE_LEVELS:
      out_s = _generate(pipe, (name,), captions, jax.random.fold_in(rng, 4),
                        {'guidance_scale': g_base}, first_low_res=noisy[s])
      row[f'psnr_noise_{s:g}'] = psnr(out_s, hi_truth)
      row[f'alignment_noise_{s:g}'] = demo.rates_by_kind(out_s, captions)['overall']['all']
    sr_rows.append(row)
    print(f'  (c) {name}: {row}', flush=True)
  result['c_sr_robustness'] = sr_rows
  result['c_noise_aug_max'] = float(
      demo.stage_config(plan, sr, dict(plan.stages)[sr]).diffusion.get('noise_aug_max', 1.0))
  result['seconds'] = time.perf_counter() - start
  _write(out, result)
  return result


def _write(out: str, r: dict) -> None:
  with open(os.path.join(out, 'claims.json'), 'w') as f:
    json.dump(r, f, indent=1)
  a = r['a_guidance']
  plot_series({'all-correct': [(x['guidance'], x['alignment_all']) for x in a],
               'diversity x10': [(x['guidance'], 10 * x['diversity']) for x in a]},
              os.path.join(out, 'a_guidance.png'), title='(a) guidance: alignment vs diversity',
              xlabel='guidance scale', ylabel='rate', log_x=True)
  b = r['b_thresholding']
  plot_series({m: [(x['guidance'], x['saturated']) for x in b if x['threshold'] == m]
               for m in THRESHOLDS}, os.path.join(out, 'b_thresholding.png'),
              title='(b) saturated object pixels', xlabel='guidance scale',
              ylabel='fraction', log_x=True)
  c = r['c_sr_robustness']
  plot_series({('with aug' if x['augmentation'] else 'no aug'):
               [(s, x[f'psnr_noise_{s:g}']) for s in NOISE_LEVELS] for x in c},
              os.path.join(out, 'c_sr_robustness.png'), title='(c) SR on noisy low-res input',
              xlabel='input noise std', ylabel='PSNR dB')
  lines = ['# Toy-scale reproduction of the qualitative claims', '',
           f'Imagen demo cascade ({" -> ".join(r["plan"]["order"])}), {r["captions"]} held-out '
           f'Shapes captions, {r["stage_sampler"]["sampler"]} with '
           f'{r["stage_sampler"]["num_steps"]} steps; produced by '
           '`python -m projects.shapes.claims`.', '',
           '## (a) Guidance trades diversity for alignment', '',
           '| guidance | all-correct | colour | diversity (RMS) |', '|---|---|---|---|']
  lines += [f'| {x["guidance"]:g} | {x["alignment_all"]:.3f} | {x["alignment_color"]:.3f} | '
            f'{x["diversity"]:.4f} |' for x in a]
  lines += ['', '![guidance](a_guidance.png)', '',
            '## (b) Thresholding at high guidance', '',
            f'Saturated object pixels in rendered data: {r["b_saturated_in_data"]:.3f}.', '',
            '| guidance | ' + ' | '.join(f'{m} saturated | {m} all-correct' for m in THRESHOLDS)
            + ' |', '|---|' + '---|---|' * len(THRESHOLDS)]
  for g in GUIDANCE_SWEEP:
    cells = []
    for m in THRESHOLDS:
      x = next(x for x in b if x['threshold'] == m and x['guidance'] == g)
      cells += [f'{x["saturated"]:.3f}', f'{x["alignment_all"]:.3f}']
    lines.append(f'| {g:g} | ' + ' | '.join(cells) + ' |')
  lines += ['', '![thresholding](b_thresholding.png)', '',
            '## (c) Noise-conditioning augmentation makes super-resolution robust', '',
            f'The augmented stage draws its training levels from U[0, '
            f'{r.get("c_noise_aug_max", 1.0):g}].', '',
            '| SR stage | cascade all-correct | ' + ' | '.join(
                f'PSNR @ noise {s:g}' for s in NOISE_LEVELS) + ' |',
            '|---|---|' + '---|' * len(NOISE_LEVELS)]
  for x in c:
    lines.append(f'| {"with" if x["augmentation"] else "without"} augmentation | '
                 f'{x["cascade_alignment_all"]:.3f} | ' +
                 ' | '.join(f'{x[f"psnr_noise_{s:g}"]:.2f}' for s in NOISE_LEVELS) + ' |')
  lines += ['', '![sr](c_sr_robustness.png)', '']
  with open(os.path.join(out, 'claims.md'), 'w') as f:
    f.write('\n'.join(lines))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  del sys_argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('workdir', None, 'the demo root (stages trained if missing)',
                      required=True, **fv)
  flags.DEFINE_string('out', 'claims', 'where claims.md and the figures go', **fv)
  flags.DEFINE_integer('captions_per_kind', 12, 'held-out captions per caption kind', **fv)
  flags.DEFINE_integer('seeds', 3, 'samples per caption for diversity', **fv)
  flags.DEFINE_integer('noaug_steps', None, 'train steps of the no-augmentation SR '
                       "(default: the demo's SR stage's)", **fv)


def main(argv, F: flags.FlagValues = flags.FLAGS) -> None:
  del argv
  demo.configure_logging(False)
  try:
    r = run(F.workdir, F.out, captions_per_kind=F.captions_per_kind, seeds=F.seeds,
            noaug_steps=F.noaug_steps)
  except (ValueError, FileNotFoundError) as e:
    raise cli.CLIError(e) from None
  print(f'wrote {F.out}/claims.md, claims.json and figures ({r["seconds"]:.0f} s)')


if __name__ == '__main__':
  from diffusion_jax import hugepages
  hugepages.reexec_with_huge_pages()
  define_flags()
  cli.run(main)

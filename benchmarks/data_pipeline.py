"""Throughput of the input pipeline (examples/s) for Shapes and a prepared folder at 64 px.

  python benchmarks/data_pipeline.py [--batch_size=64] [--batches=40] [--threads=4]

(from the repository root with the package installed, `pip install -e .`, or PYTHONPATH=.)

Shapes is rendered on the fly; the folder benchmark first writes 512 random 96x128 JPEGs
with captions to a temporary directory and prepares them with TFDS (array_record), then
decodes, resizes, crops and tokenizes them. Prints one JSON line per pipeline.
"""
from __future__ import annotations

import functools
import io
import json
import os
import sys
import tempfile
import time

from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion_jax import cli  # noqa: E402


@functools.cache
def _words() -> dict[str, int]:
  from projects.shapes import shapes
  return {w: i + 2 for i, w in enumerate(shapes.VOCABULARY)}


def tokenizer(texts):
  words = _words()
  rows = [[words.get(w, 1) for w in t.split()] for t in texts]
  ids = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  return ids, ids != 0


def measure(name, cfg, batches):
  from diffusion_jax.data import pipeline
  it = pipeline.make_train_iterator(cfg, tokenizer=tokenizer, seed=0, process_index=0,
                                    process_count=1)
  next(it)  # warm-up: threads started, first files opened
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  result = {'pipeline': name, 'image_size': cfg['image_size'],
            'low_res_size': cfg.get('low_res_size'), 'batch_size': cfg['batch_size'],
            'num_threads': cfg['num_threads'],
            'examples_per_sec': round(batches * cfg['batch_size'] / seconds, 1),
            'skipped': it.skipped}
  print(json.dumps(result), flush=True)
  return result


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  del sys_argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer('batch_size', 64, 'examples per batch', **fv)
  flags.DEFINE_integer('batches', 40, 'timed batches (after one untimed)', **fv)
  flags.DEFINE_integer('threads', 4, 'grain worker threads', **fv)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  from PIL import Image
  from diffusion_jax.data import datasets
  from projects.shapes import shapes
  common = dict(batch_size=F.batch_size, image_size=64, text_max_len=16,
                num_threads=F.threads, prefetch_buffer_size=4 * F.batch_size)
  shapes_cfg = dict(common, dataset='shapes', modules=('projects.shapes.data',))
  measure('shapes', shapes_cfg, F.batches)
  measure('shapes+low_res32', dict(shapes_cfg, low_res_size=32), F.batches)
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, 'images')
    os.makedirs(src)
    rng = np.random.default_rng(0)
    for i in range(512):
      buf = io.BytesIO()
      Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).save(
          buf, format='JPEG', quality=90)
      with open(os.path.join(src, f'{i:04d}.jpg'), 'wb') as f:
        f.write(buf.getvalue())
      with open(os.path.join(src, f'{i:04d}.txt'), 'w') as f:
        f.write(shapes.random_caption(rng) + '\n')
    data_dir = os.path.join(tmp, 'tfds')
    datasets.prepare_folder(src, data_dir, 'bench')
    folder = dict(common, dataset='folder', data_dir=data_dir, folder_name='bench',
                  random_crop=True)
    measure('folder', folder, F.batches)


if __name__ == '__main__':
  define_flags()
  cli.run(main)

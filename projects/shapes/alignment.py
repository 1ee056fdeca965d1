"""Shapes alignment: does a sample show what its caption says? Rates per category.

`shapes.score(image, caption)` parses the caption into the expected scene and detects the
scene in the image; this module turns those verdicts into rates:

  color, shape, count   fraction of pairs where the category is right (all pairs)
  relation              fraction among the pairs whose caption names a relation (NaN if none)
  all                   fraction with every object bound to its colour and the relation held

Captions for evaluation should be held out from training: `heldout_captions` draws captions
from the Shapes templates and rejects every caption of the training set (seed, examples).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from projects.shapes import shapes

CATEGORIES = ('color', 'shape', 'count', 'relation', 'all')


def score_pairs(images_NHWC, captions: Sequence[str]) -> list[dict]:
  if len(images_NHWC) != len(captions):
    raise ValueError(f'{len(images_NHWC)} images but {len(captions)} captions')
  return [shapes.score(np.asarray(im), c) for im, c in zip(images_NHWC, captions)]


def rates(verdicts: Sequence[dict]) -> dict[str, Any]:
  """Per-category rates from `shapes.score` verdicts, with the counts they rest on."""
  out: dict[str, Any] = {'n': len(verdicts)}
  for k in CATEGORIES:
    vals = [v[k] for v in verdicts if v.get(k) is not None]
    out[k] = float(np.mean(vals)) if vals else float('nan')
    out[f'n_{k}'] = len(vals)
  return out


def alignment_rates(images_NHWC, captions: Sequence[str]) -> dict[str, Any]:
  """Rates for (image, caption) pairs: {'color', 'shape', 'count', 'relation', 'all', 'n', ...}."""
  return rates(score_pairs(images_NHWC, captions))


def training_captions(train_seed: int, train_examples: int,
                      rewrite: Callable[[str], str] | None = None) -> set[str]:
  """Every caption of the Shapes training set (seed, number of examples); nothing rendered.

  `rewrite`: the caption rewrite the model reads captions through (the captions returned
  are the rewritten ones).
  """
  said = rewrite or (lambda c: c)
  out = set()
  for i in range(int(train_examples)):
    rng = np.random.default_rng([int(train_seed) % 2**63, i])  # as shapes.random_example
    out.add(said(shapes.caption_of(shapes.random_scene(rng))))
  return out


def heldout_captions(n: int, *, seed: int, train_seed: int, train_examples: int,
                     max_tries: int = 200_000,
                     rewrite: Callable[[str], str] | None = None) -> list[str]:
  """`n` captions (repeats allowed) from the templates that the training set never shows.

  `rewrite`: the caption rewrite the model reads captions through (a stage's
  `input.caption_rewrite`); a caption is held out only if its rewrite is no training
  caption's, so none says a training scene in other words.
  """
  said = rewrite or (lambda c: c)
  seen = training_captions(train_seed, train_examples, rewrite)
  rng = np.random.default_rng([int(seed), 0x5A11])
  out = []
  for _ in range(max_tries):
    if len(out) == n:
      return out
    c = shapes.random_caption(rng)
    if said(c) not in seen:
      out.append(c)
  raise ValueError(f'only {len(out)} of {n} held-out captions found in {max_tries} draws: '
                   f'the {train_examples} training examples (seed {train_seed}) cover almost '
                   'every Shapes caption; train on fewer examples to hold some out')


def evaluate(generate_fn: Callable, captions: Sequence[str], rng, *, batch_size: int = 64
             ) -> dict[str, Any]:
  """Generates one image per caption with `generate_fn(prompts, rng) -> uint8 [N, H, W, 3]`
  and returns the alignment rates (`rng`: a jax PRNG key, split per batch)."""
  import jax  # noqa: PLC0415
  verdicts = []
  for i, start in enumerate(range(0, len(captions), batch_size)):
    batch = list(captions[start:start + batch_size])
    images = np.asarray(generate_fn(batch, jax.random.fold_in(rng, i)))
    verdicts += score_pairs(images, batch)
  return rates(verdicts)

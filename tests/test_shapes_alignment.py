"""Shapes alignment (projects.shapes.alignment): the oracle's verdicts as rates per category,
and captions held out from a training set."""
from __future__ import annotations

import numpy as np
import pytest

from projects.shapes import alignment, shapes


def test_alignment_rates_per_category():
  rng = np.random.default_rng(1)
  caps = []
  while len(caps) < 6:  # three with a relation, three without
    c = shapes.random_caption(rng)
    has_rel = shapes.parse(c).relation is not None
    if sum((shapes.parse(x).relation is not None) == has_rel for x in caps) < 3:
      caps.append(c)
  images = np.stack([shapes.render(c, 64, seed=0) for c in caps])
  right = alignment.alignment_rates(images, caps)
  assert right['all'] == 1.0 and right['color'] == 1.0 and right['count'] == 1.0, right
  assert right['n'] == 6 and right['n_relation'] == 3
  # Blank images: no object, so every category fails.
  blank = np.full_like(images, 255)
  wrong = alignment.alignment_rates(blank, caps)
  assert wrong['all'] == 0.0 and wrong['count'] == 0.0 and wrong['relation'] == 0.0, wrong
  # Half right, half blank: rates are fractions of the scored pairs.
  mixed = alignment.alignment_rates(np.concatenate([images[:3], blank[3:]]), caps)
  expect = np.mean([shapes.score(im, c)['all'] for im, c in
                    zip(np.concatenate([images[:3], blank[3:]]), caps)])
  assert mixed['all'] == pytest.approx(expect) and 0 < mixed['all'] < 1
  no_rel = alignment.alignment_rates(images[:0], [])
  assert np.isnan(no_rel['relation']) and no_rel['n'] == 0


def test_heldout_captions_avoid_the_training_set():
  train = alignment.training_captions(0, 300)
  held = alignment.heldout_captions(50, seed=1, train_seed=0, train_examples=300)
  assert len(held) == 50 and not set(held) & train, 'held-out captions seen in training'
  first = shapes.random_example(0, 7, 16)[1]
  assert first in train, 'training_captions must list the dataset\'s captions'
  with pytest.raises(ValueError, match='held-out'):
    alignment.heldout_captions(5, seed=1, train_seed=0, train_examples=100_000, max_tries=200)


def test_heldout_captions_as_a_caption_rewrite_reads_them():
  """With the rewrite a model reads captions through, no held-out caption says a training
  scene in other words ("A right of B" where training showed "B left of A")."""
  said = shapes.canonical_caption
  train = {said(c) for c in alignment.training_captions(0, 3000)}
  plain = alignment.heldout_captions(40, seed=1, train_seed=0, train_examples=3000)
  held = alignment.heldout_captions(40, seed=1, train_seed=0, train_examples=3000,
                                    rewrite=said)
  assert sum(said(c) in train for c in plain) > 0, 'the check below would be vacuous'
  assert not [c for c in held if said(c) in train], 'a held-out caption rewrites to a seen one'


def test_alignment_evaluate_generates_one_image_per_caption():
  import jax  # noqa: PLC0415
  rng = np.random.default_rng(2)
  caps = [shapes.random_caption(rng) for _ in range(5)]
  seen = []

  def perfect(prompts, key):  # renders exactly what it is asked for
    seen.append((list(prompts), np.asarray(jax.random.key_data(key)).tolist()))
    return np.stack([shapes.render(p, 64, seed=1) for p in prompts])

  out = alignment.evaluate(perfect, caps, jax.random.PRNGKey(0), batch_size=2)
  assert [p for b, _ in seen for p in b] == caps, 'every caption generated once, in order'
  assert len({str(k) for _, k in seen}) == 3, 'each batch needs its own key'
  assert out['all'] == 1.0 and out['n'] == 5, out

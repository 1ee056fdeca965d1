"""CLIP score (100 x clamped cosine) and Shapes alignment rates."""
from __future__ import annotations

import numpy as np
import pytest

import hf_fixtures
from diffusion_jax import encoders
from diffusion_jax import tokenizer as tok_lib
from diffusion_jax.data import shapes
from diffusion_jax.eval import alignment, clip_score


class FakeEncoder:
  """Returns fixed embeddings: the score's formula is checked without a network."""

  def __init__(self, image_emb, text_emb):
    self.image_emb, self.text_emb = np.asarray(image_emb), np.asarray(text_emb)

  def encode_image(self, images):
    return self.image_emb[:len(images)]

  def encode_text(self, prompts):
    return None, None, self.text_emb[:len(prompts)]


def test_clip_score_is_100_times_clamped_cosine():
  img = np.asarray([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  txt = np.asarray([[1.0, 1.0], [5.0, 0.0], [-1.0, 0.2], [0.0, 0.5]])
  scores = clip_score.clip_scores(FakeEncoder(img, txt), np.zeros((4, 8, 8, 3), np.uint8),
                                  ['a', 'b', 'c', 'd'])
  np.testing.assert_allclose(scores, [100 / np.sqrt(2), 100.0, 0.0, 100.0], rtol=1e-12,
                             err_msg='expected 100*cos, norm-invariant, negative cosines -> 0')
  assert clip_score.clip_score(FakeEncoder(img, txt), np.zeros((4, 8, 8, 3), np.uint8),
                               'abcd') == pytest.approx(np.mean(scores))
  with pytest.raises(ValueError, match='captions'):
    clip_score.clip_scores(FakeEncoder(img, txt), np.zeros((3, 8, 8, 3), np.uint8), 'ab')


def test_clip_score_with_a_tiny_clip_encoder():
  words = list(shapes.VOCABULARY)
  tok = tok_lib.build_word_tokenizer(words, hf_fixtures.path('clip_score_tok'), style='clip')
  enc = encoders.build_encoder(encoders.encoder_config('clip', 'tiny', tokenizer_path=tok,
                                                       batch_size=8, seed=0))
  rng = np.random.default_rng(0)
  captions = [shapes.random_caption(rng) for _ in range(5)]
  images = np.stack([shapes.render(c, 32, seed=i) for i, c in enumerate(captions)])
  scores = clip_score.clip_scores(enc, images, captions)
  # Independently: the encoder's raw embeddings, cosine in numpy.
  a = enc.encode_image(images)
  _, _, b = enc.encode_text(captions)
  cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  np.testing.assert_allclose(scores, np.maximum(100 * cos, 0), rtol=1e-5, atol=1e-4)
  assert scores.shape == (5,) and np.all((scores >= 0) & (scores <= 100))
  # Pairs are scored independently of their batch mates.
  perm = [3, 0, 4, 1, 2]
  np.testing.assert_allclose(clip_score.clip_scores(enc, images[perm], [captions[i] for i in perm]),
                             scores[perm], rtol=1e-5, atol=1e-4)
  acc = clip_score.ClipScoreAccumulator(enc)
  acc.update(images[:2], captions[:2])
  acc.update(images[2:], captions[2:])
  assert acc.result()['clip_score'] == pytest.approx(scores.mean(), rel=1e-5)
  assert clip_score.encoder_info(enc)['preset'] == 'tiny'


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

"""CLIP score (100 x clamped cosine)."""
from __future__ import annotations

import numpy as np
import pytest

import hf_fixtures
from diffusion_jax import encoders
from diffusion_jax import tokenizer as tok_lib
from diffusion_jax.eval import clip_score
from projects.shapes import shapes  # captions and images to score


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

"""CLIP score: 100 x cosine similarity of CLIP image and caption embeddings, clamped at 0.

The number reported by GLIDE/DALL-E 2-era papers and torchmetrics' `CLIPScore`: per pair
max(100 * cos(E_img, E_txt), 0), averaged over pairs. Embeddings are CLIP's projected ones
(`encoders.CLIPEncoder`: images center-cropped, resized and normalised as CLIP expects;
captions tokenised with the model's tokenizer), so the score depends on the CLIP weights:
results record which (`encoder_info`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def cosine_scores(image_emb_ND, text_emb_ND) -> np.ndarray:
  """max(100 * cos, 0) per row, in float64."""
  a = np.asarray(image_emb_ND, np.float64)
  b = np.asarray(text_emb_ND, np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f'embeddings must both be [N, D], got {a.shape} and {b.shape}')
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  return np.maximum(100.0 * np.sum(a * b, axis=-1), 0.0)


def clip_scores(encoder, images_NHWC, captions: Sequence[str]) -> np.ndarray:
  """Per-pair CLIP scores [N] with an `encoders.CLIPEncoder` (uint8 or [-1, 1] images)."""
  captions = list(captions)
  if len(captions) != len(images_NHWC):
    raise ValueError(f'{len(images_NHWC)} images but {len(captions)} captions')
  if not captions:
    return np.zeros((0,), np.float64)
  image_emb = encoder.encode_image(images_NHWC)
  _, _, text_emb = encoder.encode_text(captions)
  return cosine_scores(image_emb, text_emb)


def clip_score(encoder, images_NHWC, captions: Sequence[str]) -> float:
  """The mean CLIP score over the pairs."""
  return float(np.mean(clip_scores(encoder, images_NHWC, captions)))


class ClipScoreAccumulator:
  """Streams (images, captions) batches; `result()` gives the mean, its standard error and N."""

  def __init__(self, encoder):
    self.encoder = encoder
    self.scores: list[np.ndarray] = []

  def update(self, images_NHWC, captions: Sequence[str]) -> None:
    self.scores.append(clip_scores(self.encoder, images_NHWC, captions))

  def result(self) -> dict[str, Any]:
    s = np.concatenate(self.scores) if self.scores else np.zeros(0)
    n = len(s)
    return {'clip_score': float(s.mean()) if n else float('nan'),
            'clip_score_sem': float(s.std(ddof=1) / np.sqrt(n)) if n > 1 else float('nan'),
            'n': n}


def encoder_info(encoder) -> dict[str, Any]:
  """What identifies the CLIP used (path or preset and seed) for the result JSON."""
  meta = dict(getattr(encoder, 'meta', {}) or {})
  return {k: meta.get(k) for k in ('name', 'preset', 'path', 'seed')}

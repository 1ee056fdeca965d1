"""The toy-scale claims' measures (projects.shapes.claims): closed forms on known images."""
import numpy as np

from projects.shapes import claims, shapes


def test_saturation_is_zero_on_rendered_data_and_counts_clipped_object_pixels():
  images = np.stack([shapes.render(c, 32, seed=i) for i, c in enumerate(
      ['a red circle', 'two blue squares', 'a yellow triangle above a cyan diamond'])])
  assert claims.saturated_fraction(images) == 0.0, 'palette colours have no channel at 0/255'
  clipped = images.copy()
  objects = np.any(images < 200, axis=-1)
  idx = np.argwhere(objects)
  half = idx[: len(idx) // 2]
  clipped[half[:, 0], half[:, 1], half[:, 2], 0] = 255  # over-saturate the red channel
  frac = claims.saturated_fraction(clipped)
  assert abs(frac - len(half) / objects.sum()) < 0.02, frac


def test_diversity_and_psnr_closed_forms():
  a = np.zeros((1, 4, 4, 3), np.uint8)
  b = np.full((1, 4, 4, 3), 255, np.uint8)
  images = np.concatenate([a, b, a, a])
  # groups {0: a, b}, {1: a, a}: distances 1 and 0
  assert abs(claims.diversity(images, [0, 0, 1, 1]) - 0.5) < 1e-6
  assert np.isnan(claims.diversity(images, [0, 1, 2, 3])), 'no pairs: no diversity'
  noisy = np.full((2, 4, 4, 3), 128, np.uint8)
  ref = np.full((2, 4, 4, 3), 128 + 51, np.uint8)  # error 0.2 in [0, 1] units
  assert abs(claims.psnr(noisy, ref) - 10 * np.log10(1 / 0.2 ** 2)) < 1e-6

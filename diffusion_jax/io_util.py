"""Small host-side helpers shared by every room: image conversions, grids, atomic writes."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def to_uint8(x_BHWC) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 [0, 255] (rounded, clipped)."""
  return np.asarray(np.clip(np.round((np.asarray(x_BHWC, np.float32) + 1.0) * 127.5), 0, 255),
                    np.uint8)


def to_float(images) -> np.ndarray:
  """uint8 [0, 255] or float [-1, 1] images -> float32 [-1, 1]."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


def make_grid(images_BHWC: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles uint8 images [B, H, W, C] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image
  on white."""
  b, h, w, c = images_BHWC.shape
  columns = columns or int(np.ceil(np.sqrt(b)))
  rows = int(np.ceil(b / columns))
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images_BHWC):
    r, col = divmod(i, columns)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = image
  return grid


def replace_atomically(path: str, write_fn) -> str:
  """`write_fn(tmp_path)` then a rename: a reader never sees a half-written `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{os.getpid()}{ext}'  # keeps the suffix that writers such as np.savez add
  write_fn(tmp)
  os.replace(tmp, path)
  return path


def write_json(path: str, obj: Any, **json_kw) -> str:
  """JSON written atomically (`json.dump` keywords; default indent 2, sorted keys)."""
  json_kw = {'indent': 2, 'sort_keys': True, **json_kw}

  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(obj, f, **json_kw)
  return replace_atomically(path, write)

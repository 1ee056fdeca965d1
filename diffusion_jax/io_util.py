"""Small host-side helpers shared by every room: image conversions and decoding, grids,
atomic writes."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
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


def folder_fingerprint(path: str) -> str:
  """A digest of a directory's files without reading gigabytes: each file's name, size and
  16 spread 64 KiB samples of its bytes (all of a small file); subdirectories are skipped."""
  digest = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if not os.path.isfile(full):
      continue
    size = os.path.getsize(full)
    digest.update(f'{name}\0{size}\0'.encode())
    with open(full, 'rb') as f:
      for offset in sorted({size * i // 16 for i in range(16)}):
        f.seek(offset)
        digest.update(f.read(1 << 16))
  return digest.hexdigest()


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


# ----------------------------------------------------------------------------- decoding

# The largest image decoded, in pixels (8192 x 8192, 64 Mi): 192 MiB as RGB uint8; decoding a
# 16-bit, float or transparent one of that size peaks at about 1 GiB.
MAX_IMAGE_PIXELS = 8192 * 8192
_TRANSPARENT_MODES = ('RGBA', 'RGBa', 'LA', 'La', 'PA')


class ImageDecodeError(ValueError):
  """An image that cannot be used. `reason` names why, one of: empty_file, undecodable_image,
  too_large, empty_image, bad_image_shape (the training pipeline counts skips under it)."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason, self.detail = reason, detail


def decode_image_bytes(data, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """An encoded image (any format PIL reads) -> uint8 [H, W, 3]; raises ImageDecodeError.

  The size in the header is checked against `max_pixels` before any pixel is decoded
  ('too_large'). Then the first frame of an animation or multi-page file is decoded, its
  EXIF orientation applied, 16-bit samples scaled to 8 bits (65535 -> 255), 32-bit integer
  ('I') samples read as 16-bit and float ('F') samples as [0, 1]; transparency (an alpha
  channel, or a palette's or tRNS transparent colour) is composited over white, the
  background images with transparency are usually shown on (and that of `make_grid`);
  palette, 1-bit, grayscale, CMYK and YCbCr images are converted to RGB.
  """
  from PIL import Image, ImageOps  # noqa: PLC0415 - importing io_util stays light
  if len(data) == 0:
    raise ImageDecodeError('empty_file')
  try:
    with _pixel_bound(max_pixels), Image.open(io.BytesIO(bytes(data))) as im:
      _check_pixels(im.size, max_pixels)
      im.load()
      ImageOps.exif_transpose(im, in_place=True)
      array = pil_to_rgb8(im)
  except ImageDecodeError:
    raise
  except Image.DecompressionBombError as e:
    raise ImageDecodeError('too_large', f'over the limit of {max_pixels} pixels ({e})') from None
  except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data.
    raise ImageDecodeError('undecodable_image', f'{type(e).__name__}: {e}') from None
  return _nonempty(array)


@contextlib.contextmanager
def _pixel_bound(max_pixels: int):
  """Our bound speaks instead of PIL's decompression-bomb check: PIL's limit is raised to
  `max_pixels` where it is lower, and its warning (at 1x its limit) silenced; its error (at
  2x) is reported as too_large."""
  from PIL import Image  # noqa: PLC0415
  if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
    Image.MAX_IMAGE_PIXELS = max_pixels
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    yield


def _check_pixels(size_WH, max_pixels: int) -> None:
  w, h = size_WH
  if w * h > max_pixels:
    raise ImageDecodeError('too_large', f'{w}x{h} = {w * h} pixels is over the limit of '
                                        f'{max_pixels}')


def pil_to_rgb8(im) -> np.ndarray:
  """A loaded PIL image of any mode -> uint8 [H, W, 3] (see `decode_image_bytes`)."""
  if im.mode.startswith('I') or im.mode == 'F':
    return _gray_to_rgb(_scale_to_uint8(np.asarray(im), 1.0 if im.mode == 'F' else 65535))
  if im.mode in _TRANSPARENT_MODES or 'transparency' in im.info:
    return over_white(np.asarray(im.convert('RGBA')))
  return np.asarray(im.convert('RGB'))


def image_array_to_rgb8(array) -> np.ndarray:
  """An already decoded image, [H, W] or [H, W, 1|3|4], -> uint8 [H, W, 3]; raises
  ImageDecodeError. uint16 samples are scaled to 8 bits (65535 -> 255), bool ones to {0, 255},
  any other type is read as [0, 255] (rounded, clipped); RGBA is composited over white."""
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ImageDecodeError('bad_image_shape', str(array.shape))
  if array.dtype == np.uint16:
    array = _scale_to_uint8(array, 65535)
  elif array.dtype == bool:
    array = array.astype(np.uint8) * 255
  elif array.dtype != np.uint8:
    array = _scale_to_uint8(array, 255)
  if array.shape[-1] == 4:
    array = over_white(array)
  elif array.shape[-1] == 1:
    array = _gray_to_rgb(array[..., 0])
  return _nonempty(array)


def over_white(rgba_HW4: np.ndarray) -> np.ndarray:
  """uint8 RGBA -> uint8 RGB composited over white: alpha * rgb + (1 - alpha) * 255."""
  alpha = rgba_HW4[..., 3:].astype(np.uint16)
  out = rgba_HW4[..., :3] * alpha  # uint16, updated in place to bound memory
  out += 255 * (255 - alpha) + 127
  out //= 255
  return out.astype(np.uint8)


def _scale_to_uint8(samples: np.ndarray, top: float) -> np.ndarray:
  """Samples in [0, top] -> uint8 [0, 255], rounded and clipped (NaN -> 0)."""
  scaled = samples.astype(np.float32)  # one copy, updated in place to bound memory
  scaled *= np.float32(255 / top)
  np.nan_to_num(scaled, copy=False)
  np.clip(scaled, 0, 255, out=scaled)
  return np.round(scaled, out=scaled).astype(np.uint8)


def _gray_to_rgb(gray_HW: np.ndarray) -> np.ndarray:
  return np.repeat(gray_HW[..., None], 3, axis=-1)


def _nonempty(image_HW3: np.ndarray) -> np.ndarray:
  if image_HW3.shape[0] == 0 or image_HW3.shape[1] == 0:
    raise ImageDecodeError('empty_image', str(image_HW3.shape))
  return image_HW3

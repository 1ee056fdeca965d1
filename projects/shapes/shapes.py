"""Shapes: a procedural captioned dataset and its exact oracle.

Captions describe scenes of 1-3 flat objects on a white background, in four templates:

  "a red circle"                                    one object
  "two green triangles", "three blue squares"       several identical objects
  "a red circle and two cyan diamonds"              a conjunction (at most 3 objects)
  "a yellow square to the left of a purple circle"  a spatial relation between two objects

`render(caption, size, seed)` draws the scene anti-aliased (supersampled coverage), with a
layout (positions, sizes) that depends only on (caption, seed), so the same scene can be
rendered at any resolution from 16 to 256 px.

The oracle works the other way round: `parse(caption)` gives the expected scene and
`detect(image)` finds the objects in an image (nearest-palette colour segmentation with a
distance threshold, connected components, shape classification by geometry: fill ratio of
the bounding box and the vertical offset of the centroid, which separates the apex-up
triangle from the diamond). `score(image, caption)` compares the two per category:

  color     the set of colours in the image is the set the caption names
  shape     the set of shapes in the image is the set the caption names
  count     the number of objects is the number the caption implies
  relation  None without a relation; else the named objects exist and stand in that
            relation (the dominant axis of their centre offset decides: "left of" needs
            dx > |dy|)
  all       the multiset of (colour, shape) objects equals the caption's, and the relation,
            if any, holds: this is what binding errors (swapped colours) fail.

Colours are judged by the nearest palette colour within `COLOR_THRESHOLD` (RGB distance) and
components smaller than ~0.5% of the image are ignored, so that slightly noisy or blurry
generated samples are judged fairly.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import re
import zlib
from typing import Sequence

import numpy as np
from scipy import ndimage

# Well separated in RGB (min pairwise distance ~116) and far from the background; no
# anti-aliased blend of a colour with the background comes within COLOR_THRESHOLD of
# another palette colour, so object edges never read as a second object.
COLORS = {
    'red': (220, 30, 30),
    'green': (30, 160, 50),
    'blue': (30, 70, 220),
    'yellow': (245, 215, 20),
    'purple': (140, 50, 190),
    'cyan': (20, 195, 215),
}
BACKGROUND = (255, 255, 255)
SHAPES = ('circle', 'square', 'triangle', 'diamond')
RELATIONS = ('to the left of', 'to the right of', 'above', 'below')
COUNT_WORDS = {'a': 1, 'an': 1, 'one': 1, 'two': 2, 'three': 3}
NUMBER_NAMES = {1: 'a', 2: 'two', 3: 'three'}
MAX_OBJECTS = 3

COLOR_THRESHOLD = 80.0  # RGB distance within which a pixel takes its nearest palette colour.
MIN_AREA_FRACTION = 0.005  # components smaller than this fraction of the image are specks.

VOCABULARY = tuple(sorted(
    set(COUNT_WORDS) | set(COLORS) | set(SHAPES) | {s + 's' for s in SHAPES} | {'and'}
    | {w for rel in RELATIONS for w in rel.split()}))

_PALETTE_C3 = np.asarray(list(COLORS.values()), np.float32)
_COLOR_NAMES = tuple(COLORS)


@dataclasses.dataclass(frozen=True)
class Group:
  count: int
  color: str
  shape: str


@dataclasses.dataclass(frozen=True)
class Scene:
  """What a caption says: groups of identical objects and an optional relation.

  `relation` is (name, 0, 1): group 0 stands in relation `name` to group 1 (both singular).
  """
  groups: tuple[Group, ...]
  relation: tuple[str, int, int] | None = None

  @property
  def objects(self) -> list[tuple[str, str]]:
    return [(g.color, g.shape) for g in self.groups for _ in range(g.count)]


@dataclasses.dataclass(frozen=True)
class Detection:
  color: str
  shape: str
  x: float  # centre of mass, in [0, 1] of the image width
  y: float  # in [0, 1] of the image height, downwards
  area: float  # fraction of the image


# ----------------------------------------------------------------------------- captions


def _noun_phrase(g: Group) -> str:
  return f'{NUMBER_NAMES[g.count]} {g.color} {g.shape}{"s" if g.count > 1 else ""}'


def caption_of(scene: Scene) -> str:
  if scene.relation is not None:
    rel, a, b = scene.relation
    return f'{_noun_phrase(scene.groups[a])} {rel} {_noun_phrase(scene.groups[b])}'
  return ' and '.join(_noun_phrase(g) for g in scene.groups)


def _distinct_pair(rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str]]:
  while True:
    a = (_COLOR_NAMES[rng.integers(len(_COLOR_NAMES))], SHAPES[rng.integers(len(SHAPES))])
    b = (_COLOR_NAMES[rng.integers(len(_COLOR_NAMES))], SHAPES[rng.integers(len(SHAPES))])
    if a != b:
      return a, b


def random_scene(rng: np.random.Generator) -> Scene:
  kind = rng.choice(4, p=[0.2, 0.2, 0.2, 0.4])
  if kind == 0:
    return Scene((Group(1, _COLOR_NAMES[rng.integers(6)], SHAPES[rng.integers(len(SHAPES))]),))
  if kind == 1:
    return Scene((Group(int(rng.integers(2, 4)), _COLOR_NAMES[rng.integers(6)],
                        SHAPES[rng.integers(len(SHAPES))]),))
  (ca, sa), (cb, sb) = _distinct_pair(rng)
  if kind == 2:
    na, nb = ((1, 1), (2, 1), (1, 2))[rng.integers(3)]
    return Scene((Group(na, ca, sa), Group(nb, cb, sb)))
  return Scene((Group(1, ca, sa), Group(1, cb, sb)), (RELATIONS[rng.integers(4)], 0, 1))


def random_caption(rng: np.random.Generator) -> str:
  """A caption drawn from the templates above (rng: a numpy Generator)."""
  return caption_of(random_scene(rng))


_NP_RE = r'(a|an|one|two|three) (\w+) (\w+?)(s?)'
_REL_RE = re.compile(rf'^{_NP_RE} ({"|".join(RELATIONS)}) {_NP_RE}$')
_AND_RE = re.compile(rf'^{_NP_RE}(?: and {_NP_RE})?$')


def _group(count_word: str, color: str, shape: str, plural: str, caption: str) -> Group:
  count = COUNT_WORDS[count_word]
  if color not in COLORS or shape not in SHAPES or (count > 1) != bool(plural):
    raise ValueError(f'cannot parse Shapes caption {caption!r}')
  return Group(count, color, shape)


def parse(caption: str) -> Scene:
  """Caption -> expected Scene; raises ValueError for text outside the templates."""
  text = ' '.join(caption.lower().strip().rstrip('.').split())
  m = _REL_RE.match(text)
  if m:
    g = m.groups()
    a, b = _group(*g[0:4], caption), _group(*g[5:9], caption)
    if a.count != 1 or b.count != 1:
      raise ValueError(f'relations are between single objects: {caption!r}')
    return Scene((a, b), (g[4], 0, 1))
  m = _AND_RE.match(text)
  if not m:
    raise ValueError(f'cannot parse Shapes caption {caption!r}')
  g = m.groups()
  groups = [_group(*g[0:4], caption)]
  if g[4] is not None:
    groups.append(_group(*g[4:8], caption))
  scene = Scene(tuple(groups))
  if len(scene.objects) > MAX_OBJECTS:
    raise ValueError(f'at most {MAX_OBJECTS} objects: {caption!r}')
  return scene


# Each relation and the one that says the same with the objects named the other way round.
_MIRROR = {'to the right of': 'to the left of', 'below': 'above'}


def canonical_caption(caption: str) -> str:
  """The same scene said with "to the left of" and "above" only: "A to the right of B" ->
  "B to the left of A", "A below B" -> "B above A". Other captions, and text outside the
  templates, come back unchanged.

  A caption rewrite (`input.caption_rewrite='shapes_canonical'`): with it the first-named
  object always goes left or up, so a model need not learn that the relation word also
  flips which object that is (projects/shapes/docs/demo/HISTORY.md measures what that costs).
  """
  try:
    scene = parse(caption)
  except ValueError:
    return caption
  if scene.relation is None or scene.relation[0] not in _MIRROR:
    return caption
  a, b = scene.groups
  return caption_of(Scene((b, a), (_MIRROR[scene.relation[0]], 0, 1)))


def binding_contrasts(caption: str) -> list[tuple[str, str]]:
  """For each group of a two-group caption whose groups differ in shape, the group said alone
  and the same said with the other group's shape: "a red circle to the left of a blue
  square" -> [("a red circle", "a red square"), ("a blue square", "a blue circle")]. Empty
  for other captions and for text outside the templates.

  The demo's prompt pairs (`guidance.prompt_contrast`): a base that binds a single object's
  colour to its shape but draws two objects' shapes alike is pushed, where each colour is,
  towards that colour's shape; what a pair's two single-object captions share (one object
  of that colour, alone) cancels.
  """
  try:
    scene = parse(caption)
  except ValueError:
    return []
  if len(scene.groups) != 2 or scene.groups[0].shape == scene.groups[1].shape:
    return []
  a, b = scene.groups
  alone = lambda g: caption_of(Scene((g,)))  # noqa: E731
  return [(alone(a), alone(dataclasses.replace(a, shape=b.shape))),
          (alone(b), alone(dataclasses.replace(b, shape=a.shape)))]


def mismatched_caption(caption: str, kind: str, rng: np.random.Generator) -> str | None:
  """A caption that contradicts `caption` in one category, or None where impossible.

  kind: 'color' (swap the two colours, or change the only one), 'relation' (another
  relation), 'shape' (change one shape), 'count' (change one group's count).
  """
  scene = parse(caption)
  groups = list(scene.groups)
  if kind == 'color':
    a = groups[0]
    b = groups[-1]
    # Swapping keeps the palette of the scene and tests binding; it changes nothing for
    # two groups of the same shape unless a relation orders them.
    if len(groups) == 2 and a.color != b.color and (
        a.shape != b.shape or scene.relation is not None):
      groups = [dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)]
    else:
      i = int(rng.integers(len(groups)))
      others = [c for c in _COLOR_NAMES if c != groups[i].color]
      groups[i] = dataclasses.replace(groups[i], color=others[rng.integers(len(others))])
  elif kind == 'shape':
    i = int(rng.integers(len(groups)))
    others = [s for s in SHAPES if s != groups[i].shape]
    groups[i] = dataclasses.replace(groups[i], shape=others[rng.integers(len(others))])
  elif kind == 'relation':
    if scene.relation is None:
      return None
    others = [r for r in RELATIONS if r != scene.relation[0]]
    return caption_of(Scene(scene.groups, (others[rng.integers(3)],) + scene.relation[1:]))
  elif kind == 'count':
    if scene.relation is not None:
      return None
    total = len(scene.objects)
    options = [(i, n) for i, g in enumerate(groups) for n in (1, 2, 3)
               if n != g.count and total - g.count + n <= MAX_OBJECTS]
    i, n = options[rng.integers(len(options))]
    groups[i] = dataclasses.replace(groups[i], count=n)
  else:
    raise ValueError(f'unknown mismatch kind {kind!r}')
  new = Scene(tuple(groups), scene.relation)
  if new.relation is None and (
      collections.Counter(new.objects) == collections.Counter(scene.objects)):
    return None
  return caption_of(new)


# ----------------------------------------------------------------------------- layout

_MARGIN = 0.04  # keep objects this far from the border (fraction of the image)
_GAP = 0.08  # minimum gap between objects' bounding boxes


@dataclasses.dataclass(frozen=True)
class _Placed:
  color: str
  shape: str
  x: float
  y: float
  size: float  # bounding extent, fraction of the image


def _separated(a: _Placed, b: _Placed) -> bool:
  half = (a.size + b.size) / 2
  return max(abs(a.x - b.x) - half, abs(a.y - b.y) - half) >= _GAP


def layout(scene: Scene, rng: np.random.Generator) -> list[_Placed]:
  """Positions and sizes in [0, 1] coordinates, resolution independent."""
  objects = scene.objects
  n = len(objects)
  lo, hi = {1: (0.3, 0.5), 2: (0.22, 0.34), 3: (0.2, 0.26)}[n]
  for _ in range(1000):
    sizes = rng.uniform(lo, hi, size=n)
    if scene.relation is not None:
      rel = scene.relation[0]
      # Canonical frame: object 0 before object 1 along the main axis, small cross offset.
      half = sizes / 2
      main0 = rng.uniform(_MARGIN + half[0], 1 - _MARGIN - half[0])
      main1 = rng.uniform(_MARGIN + half[1], 1 - _MARGIN - half[1])
      dmain = main1 - main0
      if dmain < (sizes[0] + sizes[1]) / 2 + _GAP:
        continue
      cross0 = rng.uniform(_MARGIN + half[0], 1 - _MARGIN - half[0])
      cross1 = cross0 + rng.uniform(-0.3, 0.3) * dmain
      if not _MARGIN + half[1] <= cross1 <= 1 - _MARGIN - half[1]:
        continue
      if rel in ('to the right of', 'below'):
        main0, main1 = main1, main0
      if rel in ('to the left of', 'to the right of'):
        xy = [(main0, cross0), (main1, cross1)]
      else:
        xy = [(cross0, main0), (cross1, main1)]
      return [_Placed(c, s, x, y, float(sz)) for (c, s), (x, y), sz in zip(objects, xy, sizes)]
    placed = []
    for (c, s), sz in zip(objects, sizes):
      for _ in range(100):
        x, y = rng.uniform(_MARGIN + sz / 2, 1 - _MARGIN - sz / 2, size=2)
        cand = _Placed(c, s, float(x), float(y), float(sz))
        if all(_separated(cand, p) for p in placed):
          placed.append(cand)
          break
      else:
        break
    if len(placed) == n:
      return placed
  raise RuntimeError(f'could not lay out {caption_of(scene)!r}')


# ----------------------------------------------------------------------------- rendering


def _inside(shape: str, u, v, s: float):
  """u, v: offsets from the object's centre (fraction of the image); s: its extent."""
  h = s / 2
  if shape == 'circle':
    return u * u + v * v <= h * h
  if shape == 'square':
    return (np.abs(u) <= 0.86 * h) & (np.abs(v) <= 0.86 * h)
  if shape == 'diamond':
    return np.abs(u) + np.abs(v) <= h
  if shape == 'triangle':  # apex up, base at the bottom
    top, height = -0.9 * h, 1.8 * h
    t = (v - top) / height
    return (t >= 0) & (t <= 1) & (np.abs(u) <= t * h)
  raise ValueError(f'unknown shape {shape!r}')


def render_scene(objects: Sequence[_Placed], size: int) -> np.ndarray:
  image_HW3 = np.empty((size, size, 3), np.float32)
  image_HW3[:] = BACKGROUND
  k = max(2, -(-256 // size))  # supersampling factor: >= 256 samples across the image
  for o in objects:
    x0 = max(0, int(np.floor((o.x - o.size / 2) * size)) - 1)
    x1 = min(size, int(np.ceil((o.x + o.size / 2) * size)) + 1)
    y0 = max(0, int(np.floor((o.y - o.size / 2) * size)) - 1)
    y1 = min(size, int(np.ceil((o.y + o.size / 2) * size)) + 1)
    u = (x0 + (np.arange((x1 - x0) * k) + 0.5) / k) / size - o.x
    v = (y0 + (np.arange((y1 - y0) * k) + 0.5) / k) / size - o.y
    inside = _inside(o.shape, u[None, :], v[:, None], o.size)
    cover_hw = inside.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3), dtype=np.float32)
    patch = image_HW3[y0:y1, x0:x1]
    patch += cover_hw[..., None] * (np.asarray(COLORS[o.color], np.float32) - patch)
  return np.clip(np.round(image_HW3), 0, 255).astype(np.uint8)


def render(caption: str, size: int = 64, seed: int = 0) -> np.ndarray:
  """uint8 [size, size, 3]; deterministic from (caption, size, seed).

  The layout depends on (caption, seed) only, so one scene renders at every size.
  """
  scene = parse(caption)
  rng = np.random.default_rng([int(seed) % 2**63, zlib.crc32(caption.encode())])
  return render_scene(layout(scene, rng), int(size))


def random_example(seed: int, index: int, size: int = 64) -> tuple[np.ndarray, str]:
  """(image, caption), deterministic from (seed, index): the Shapes dataset's element."""
  rng = np.random.default_rng([int(seed) % 2**63, int(index)])
  scene = random_scene(rng)
  return render_scene(layout(scene, rng), int(size)), caption_of(scene)


# ----------------------------------------------------------------------------- oracle


# Area of each shape as a fraction of its extent squared (see `_inside`), and the offset of
# its centroid below its centre (fraction of the extent): used to fit templates.
_AREA_COEF = {'circle': np.pi / 4, 'square': 0.86**2, 'diamond': 0.5, 'triangle': 0.45}
_CENTROID_DY = {'circle': 0.0, 'square': 0.0, 'diamond': 0.0, 'triangle': 0.15}
_TEMPLATE_BLURS = (0.0, 0.6, 1.2)  # pixels


@functools.lru_cache(maxsize=512)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
  """[n, n] Gaussian blur along one axis with zero padding (matmuls beat ndimage here)."""
  i = np.arange(n, dtype=np.float32)
  radius = int(np.ceil(4 * sigma))
  k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
  k[np.abs(i[:, None] - i[None, :]) > radius] = 0
  norm = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
  return (k / norm).astype(np.float32)


def _classify(alpha_hw: np.ndarray) -> str:
  """The shape whose template best explains a component's coverage map.

  `alpha_hw` estimates per-pixel coverage (0..1). Each candidate shape is fitted by its
  area and centroid, rendered at the same supersampling as the data, and compared in L1:
  exact at low resolution where fill-ratio heuristics confuse pixelated circles, diamonds
  and squares.
  """
  area = float(alpha_hw.sum())
  h, w = alpha_hw.shape
  k = 4 if max(h, w) < 40 else 2  # large objects need less supersampling
  ys = np.arange(h, dtype=np.float32) + 0.5
  xs = np.arange(w, dtype=np.float32) + 0.5
  cy = float((alpha_hw.sum(1) * ys).sum() / area)
  cx = float((alpha_hw.sum(0) * xs).sum() / area)
  u = (np.arange(w * k, dtype=np.float32) + 0.5) / k - cx
  v = (np.arange(h * k, dtype=np.float32) + 0.5) / k - cy
  best, best_err = SHAPES[0], np.inf
  for shape in SHAPES:
    s = np.sqrt(area / _AREA_COEF[shape])
    inside = _inside(shape, u[None, :], v[:, None] + _CENTROID_DY[shape] * s, s)
    cover_hw = inside.reshape(h, k, w, k).mean(axis=(1, 3), dtype=np.float32)
    # Generated samples are often slightly blurred: also try blurred templates.
    for sigma in _TEMPLATE_BLURS:
      t_hw = _blur_matrix(h, sigma) @ cover_hw @ _blur_matrix(w, sigma).T if sigma else cover_hw
      err = float(np.abs(t_hw - alpha_hw).sum())
      if err < best_err:
        best, best_err = shape, err
  return best


def _as_rgb(image: np.ndarray) -> np.ndarray:
  """float32 [H, W, 3] in 0..255 from uint8 or from floats.

  Floats within [-1, 1] with a negative value are read as [-1, 1] (every palette colour has
  a channel below mid-grey, so a scene in [-1, 1] has negatives), floats within [0, 1]
  otherwise as [0, 1], and larger floats as 0..255.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected an RGB image [H, W, 3], got shape {image.shape}')
  if image.dtype == np.uint8:
    return image.astype(np.float32)
  x_HW3 = image.astype(np.float32)
  lo, hi = float(x_HW3.min()), float(x_HW3.max())
  if hi <= 1.0 + 1e-3:
    x_HW3 = (x_HW3 + 1.0) * 127.5 if lo < 0 else x_HW3 * 255.0
  return x_HW3


def segment(image: np.ndarray) -> np.ndarray:
  """int [H, W]: index into COLORS of each pixel's nearest palette colour, -1 for none."""
  x_HW3 = _as_rgb(image)
  # |x - p|^2 = |x|^2 - 2 x.p + |p|^2 as one matmul.
  d2_HWK = ((x_HW3 * x_HW3).sum(-1, keepdims=True) - 2 * (x_HW3 @ _PALETTE_C3.T)
            + (_PALETTE_C3 * _PALETTE_C3).sum(-1))
  nearest_HW = d2_HWK.argmin(-1)
  ok_HW = np.take_along_axis(d2_HWK, nearest_HW[..., None], -1)[..., 0] < COLOR_THRESHOLD**2
  return np.where(ok_HW, nearest_HW, -1)


_EIGHT = np.ones((3, 3), bool)


def detect(image: np.ndarray) -> list[Detection]:
  """Objects found in an image (uint8 [H, W, 3], or float in [-1, 1])."""
  x_HW3 = _as_rgb(image)
  labels_HW = segment(x_HW3)
  h, w = labels_HW.shape
  min_area = max(4.0, MIN_AREA_FRACTION * h * w)
  bg = np.asarray(BACKGROUND, np.float32)
  found = []
  counts = np.bincount(labels_HW.ravel() + 1, minlength=len(COLORS) + 1)[1:]
  for ci in np.flatnonzero(counts >= min_area):
    comp_HW, _ = ndimage.label(labels_HW == ci, structure=_EIGHT)
    direction = _PALETTE_C3[ci] - bg
    for j, sl in enumerate(ndimage.find_objects(comp_HW), start=1):
      mask_hw = comp_HW[sl] == j
      if mask_hw.sum() < min_area:
        continue
      # Coverage from the projection onto the background->colour segment, over the
      # component and its anti-aliased rim (unlabelled pixels next to it).
      y0, y1 = max(0, sl[0].start - 2), min(h, sl[0].stop + 2)
      x0, x1 = max(0, sl[1].start - 2), min(w, sl[1].stop + 2)
      own_hw = comp_HW[y0:y1, x0:x1] == j
      rim_hw = ndimage.binary_dilation(own_hw, _EIGHT, iterations=2)
      rim_hw &= labels_HW[y0:y1, x0:x1] == -1
      alpha_hw = ((x_HW3[y0:y1, x0:x1] - bg) @ direction) / float(direction @ direction)
      alpha_hw = np.where(ndimage.binary_fill_holes(own_hw) | rim_hw,
                          np.clip(alpha_hw, 0.0, 1.0), 0.0)
      area = float(alpha_hw.sum())
      yy = np.arange(y0, y1) + 0.5
      xx = np.arange(x0, x1) + 0.5
      found.append(Detection(
          color=_COLOR_NAMES[ci], shape=_classify(alpha_hw.astype(np.float32)),
          x=float((alpha_hw.sum(0) * xx).sum() / area / w),
          y=float((alpha_hw.sum(1) * yy).sum() / area / h),
          area=area / (h * w)))
  return found


def _holds(rel: str, a: Detection, b: Detection) -> bool:
  dx, dy = b.x - a.x, b.y - a.y  # from a to b
  if rel == 'to the left of':
    return dx > abs(dy)
  if rel == 'to the right of':
    return -dx > abs(dy)
  if rel == 'above':
    return dy > abs(dx)
  if rel == 'below':
    return -dy > abs(dx)
  raise ValueError(f'unknown relation {rel!r}')


def score_detections(found: Sequence[Detection], caption: str | Scene) -> dict:
  scene = parse(caption) if isinstance(caption, str) else caption
  want = scene.objects
  result = {
      'color': {c for c, _ in want} == {d.color for d in found},
      'shape': {s for _, s in want} == {d.shape for d in found},
      'count': len(want) == len(found),
      'relation': None,
  }
  if scene.relation is not None:
    rel, ia, ib = scene.relation
    ga, gb = scene.groups[ia], scene.groups[ib]
    cand_a = [d for d in found if (d.color, d.shape) == (ga.color, ga.shape)]
    cand_b = [d for d in found if (d.color, d.shape) == (gb.color, gb.shape)]
    result['relation'] = any(_holds(rel, a, b) for a in cand_a for b in cand_b)
  binding = (collections.Counter(want) ==
             collections.Counter((d.color, d.shape) for d in found))
  result['all'] = bool(binding and result['relation'] in (None, True))
  return result


def score(image: np.ndarray, caption: str) -> dict:
  """Per-category booleans: color, shape, count, relation (None if absent), all."""
  return score_detections(detect(image), caption)


def score_batch(images: np.ndarray, captions: Sequence[str]) -> dict[str, np.ndarray]:
  """Scores N images; returns bool arrays [N] (relation: float with NaN where absent)."""
  rows = [score(im, c) for im, c in zip(images, captions)]
  out = {k: np.asarray([r[k] for r in rows], bool) for k in ('color', 'shape', 'count', 'all')}
  out['relation'] = np.asarray([np.nan if r['relation'] is None else float(r['relation'])
                                for r in rows], np.float32)
  return out

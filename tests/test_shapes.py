"""The Shapes renderer and its oracle: exact on ground truth, strict on mismatches."""
from __future__ import annotations

import collections

import numpy as np
import pytest
from scipy import ndimage

from projects.shapes import shapes

NUM_SCENES = 1000


def _captions(n, seed):
  rng = np.random.default_rng(seed)
  return [shapes.random_caption(rng) for _ in range(n)]


@pytest.fixture(scope='module')
def scenes64():
  captions = _captions(NUM_SCENES, 0)
  return captions, [shapes.render(c, 64, i) for i, c in enumerate(captions)]


def test_captions_cover_templates_and_vocabulary():
  captions = _captions(2000, 1)
  vocab = set(shapes.VOCABULARY)
  for c in captions:
    assert set(c.split()) <= vocab, f'caption {c!r} uses words outside VOCABULARY'
    assert shapes.caption_of(shapes.parse(c)) == c, f'parse/caption_of do not round-trip {c!r}'
  kinds = collections.Counter(
      'relation' if shapes.parse(c).relation else
      ('and' if ' and ' in c else ('plural' if not c.startswith('a ') else 'single'))
      for c in captions)
  assert min(kinds.values()) > 200 and len(kinds) == 4, f'template mix is off: {kinds}'
  counts = collections.Counter(len(shapes.parse(c).objects) for c in captions)
  assert set(counts) == {1, 2, 3}, f'scenes should hold 1-3 objects, got {counts}'
  used = collections.Counter(o for c in captions for o in shapes.parse(c).objects)
  assert {c for c, _ in used} == set(shapes.COLORS) and len(shapes.COLORS) >= 6
  assert {s for _, s in used} == set(shapes.SHAPES) and len(shapes.SHAPES) >= 4


@pytest.mark.parametrize('bad', ['a red', 'a pink circle', 'two red circle', 'a red circles',
                                 'two red circles to the left of a blue square',
                                 'three red circles and a blue square', 'hello world'])
def test_parse_rejects_text_outside_the_grammar(bad):
  with pytest.raises(ValueError):
    shapes.parse(bad)


def test_parse_example():
  scene = shapes.parse('A red circle to the left of a blue square.')
  assert scene.objects == [('red', 'circle'), ('blue', 'square')]
  assert scene.relation == ('to the left of', 0, 1)
  assert shapes.parse('two green triangles and a cyan diamond').objects == [
      ('green', 'triangle'), ('green', 'triangle'), ('cyan', 'diamond')]


def test_canonical_caption_says_the_same_scene_with_left_and_above_only():
  captions = [c for c in _captions(400, 3) if shapes.parse(c).relation is not None]
  for i, c in enumerate(captions[:40]):
    canon = shapes.canonical_caption(c)
    rel = shapes.parse(c).relation[0]
    assert shapes.parse(canon).relation[0] == {'to the right of': 'to the left of',
                                                'below': 'above'}.get(rel, rel), (c, canon)
    assert shapes.canonical_caption(canon) == canon, 'the rewrite must be idempotent'
    assert sorted(shapes.parse(canon).objects) == sorted(shapes.parse(c).objects)
    # Meaning-preserving: the oracle reads a render of either as the other.
    assert shapes.score(shapes.render(canon, 64, seed=i), c)['all'], (c, canon)
    assert shapes.score(shapes.render(c, 64, seed=i), canon)['all'], (c, canon)
  assert shapes.canonical_caption('a red circle below a blue square') == \
      'a blue square above a red circle'
  for other in ('two green triangles', 'a red circle and two cyan diamonds', 'a dog on a mat',
                'a red circle to the left of a blue square'):
    assert shapes.canonical_caption(other) == other, other


def test_render_is_deterministic_and_resolution_independent():
  caption = 'a red circle to the left of a blue square'
  a = shapes.render(caption, 64, seed=3)
  assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
  np.testing.assert_array_equal(a, shapes.render(caption, 64, seed=3),
                                err_msg='render is not deterministic in (caption, size, seed)')
  assert not np.array_equal(a, shapes.render(caption, 64, seed=4)), 'seed does not change layout'
  # The same layout at every size: detected centres agree across resolutions.
  centres = {}
  for size in (16, 32, 64, 128, 256):
    image = shapes.render(caption, size, seed=3)
    assert image.shape == (size, size, 3)
    centres[size] = sorted((d.color, round(d.x, 2), round(d.y, 2))
                           for d in shapes.detect(image))
  for size in (32, 64, 256):
    for (c1, x1, y1), (c2, x2, y2) in zip(centres[128], centres[size]):
      assert c1 == c2 and abs(x1 - x2) < 0.03 and abs(y1 - y2) < 0.03, (
          f'layout changes with resolution: {centres[128]} vs {centres[size]} at {size}px')


def test_render_is_antialiased_with_plain_background():
  image = shapes.render('a red circle', 64, seed=0)
  colours = {tuple(p) for p in image.reshape(-1, 3)}
  assert tuple(shapes.BACKGROUND) in colours and tuple(shapes.COLORS['red']) in colours
  assert len(colours) > 4, 'edges are not anti-aliased (only flat colours found)'
  corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
  assert (corners == shapes.BACKGROUND).all(), 'background is not plain'


def _accuracy(captions, images):
  results = [shapes.score(im, c) for im, c in zip(images, captions)]
  failures = [(c, [(d.color, d.shape) for d in shapes.detect(im)])
              for c, im, r in zip(captions, images, results) if not r['all']]
  return 1 - len(failures) / len(captions), failures, results


def test_oracle_is_exact_on_ground_truth_64px(scenes64):
  captions, images = scenes64
  acc, failures, results = _accuracy(captions, images)
  assert acc >= 0.99, f'oracle all-correct {acc:.3f} < 0.99 at 64 px; e.g. {failures[:5]}'
  for key in ('color', 'shape', 'count'):
    assert all(r[key] for r in results[:200]), f'category {key} fails on ground truth'
  with_rel = [r['relation'] for c, r in zip(captions, results) if shapes.parse(c).relation]
  assert with_rel and all(with_rel), 'relation fails on ground truth'
  assert all(r['relation'] is None for c, r in zip(captions, results)
             if not shapes.parse(c).relation), 'relation must be None without one'


def test_oracle_is_exact_on_ground_truth_32px():
  captions = _captions(NUM_SCENES, 2)
  images = [shapes.render(c, 32, i) for i, c in enumerate(captions)]
  acc, failures, _ = _accuracy(captions, images)
  assert acc >= 0.99, f'oracle all-correct {acc:.3f} < 0.99 at 32 px; e.g. {failures[:5]}'


@pytest.mark.parametrize('kind', ['color', 'relation', 'shape', 'count'])
def test_oracle_rejects_mismatched_captions(scenes64, kind):
  captions, images = scenes64
  rng = np.random.default_rng(5)
  rejected, total = 0, 0
  for caption, image in zip(captions, images):
    wrong = shapes.mismatched_caption(caption, kind, rng)
    if wrong is None:
      continue
    total += 1
    result = shapes.score(image, wrong)
    rejected += not result['all']
    if kind == 'relation':
      assert result['relation'] is False, f'{wrong!r} accepted on an image of {caption!r}'
  assert total >= 300, f'too few {kind} mismatches generated ({total})'
  assert rejected / total >= 0.99, f'{kind} mismatches rejected only {rejected}/{total}'


def test_colour_swap_is_a_binding_error():
  caption = 'a red circle to the left of a blue square'
  image = shapes.render(caption, 64, seed=0)
  result = shapes.score(image, 'a blue circle to the left of a red square')
  assert result['color'] and result['shape'] and result['count'], result
  assert not result['all'] and result['relation'] is False, (
      f'swapped colours must fail binding and relation: {result}')


def test_oracle_tolerates_noise_and_blur():
  captions = _captions(200, 7)
  rng = np.random.default_rng(0)
  ok = 0
  for i, caption in enumerate(captions):
    image = shapes.render(caption, 64, i).astype(np.float32)
    image = ndimage.gaussian_filter(image, (0.7, 0.7, 0)) + rng.normal(0, 12, image.shape)
    ok += shapes.score(np.clip(image, 0, 255).astype(np.uint8), caption)['all']
  assert ok / len(captions) >= 0.97, f'oracle too brittle for noisy/blurry images: {ok}/200'


def test_oracle_reads_float_images_and_rejects_blank():
  caption = 'two green triangles'
  image = shapes.render(caption, 64, seed=1)
  as_float = image.astype(np.float32) / 127.5 - 1
  assert shapes.score(as_float, caption) == shapes.score(image, caption)
  assert shapes.score(image / np.float32(255), caption) == shapes.score(image, caption)
  assert shapes.score(image.astype(np.float64), caption) == shapes.score(image, caption)
  assert shapes.score(image, caption)['all']
  blank = np.full((64, 64, 3), 255, np.uint8)
  result = shapes.score(blank, caption)
  assert not any(result[k] for k in ('color', 'shape', 'count', 'all')), result
  specks = blank.copy()
  specks[10, 10] = shapes.COLORS['green']  # a single pixel is not an object
  assert shapes.detect(specks) == []


def test_score_batch():
  captions = _captions(100, 9)
  images = np.stack([shapes.render(c, 64, i) for i, c in enumerate(captions)])
  out = shapes.score_batch(images, captions)
  assert out['all'].shape == (100,) and out['all'].all()
  has_rel = np.array([shapes.parse(c).relation is not None for c in captions])
  assert np.isnan(out['relation'][~has_rel]).all() and (out['relation'][has_rel] == 1).all()
  wrong = [shapes.mismatched_caption(c, 'color', np.random.default_rng(i))
           for i, c in enumerate(captions)]
  assert not shapes.score_batch(images, wrong)['all'].any(), 'score_batch accepts wrong colours'


def test_binding_contrasts_pair_each_group_with_the_other_shape():
  rel = 'a red circle to the left of a blue square'
  assert shapes.binding_contrasts(rel) == [('a red circle', 'a red square'),
                                           ('a blue square', 'a blue circle')]
  assert shapes.binding_contrasts('two green triangles and a cyan diamond') == [
      ('two green triangles', 'two green diamonds'), ('a cyan diamond', 'a cyan triangle')]
  for caption in ('a red circle above a blue circle', 'three red squares', 'a red circle',
                  'not a shapes caption'):
    assert shapes.binding_contrasts(caption) == [], caption

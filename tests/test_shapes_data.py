"""projects.shapes.data: the Shapes dataset and caption rewrite, registered by name, read
through the library's pipeline from the project's input fields."""
from __future__ import annotations

import numpy as np
import pytest

from diffusion_jax.data import datasets, pipeline, registry
from projects.shapes import data as shapes_data
from projects.shapes import shapes


def test_registers_the_dataset_with_its_vocabulary_and_the_rewrite():
  entry = registry.dataset('shapes')
  assert entry.source_fn is shapes_data.source
  assert entry.vocabulary == tuple(shapes.VOCABULARY), 'the offline tokenizer needs every word'
  assert registry.caption_rewrite('shapes_canonical') is shapes.canonical_caption
  assert 'shapes_canonical' in registry.caption_rewrites()
  rewrite = pipeline.caption_rewrite({'caption_rewrite': 'shapes_canonical',
                                      'modules': ('projects.shapes.data',)})
  assert rewrite('a red circle to the right of a blue square') == \
      'a blue square to the left of a red circle'


def test_input_fields_and_their_defaults():
  default = pipeline.source_from_config({'dataset': 'shapes', 'image_size': 16})
  assert isinstance(default, shapes_data.ShapesSource)
  assert (len(default), default.image_size, default.seed) == (100_000, 16, 0)
  source = pipeline.source_from_config({'dataset': 'shapes', 'image_size': 24,
                                        'shapes_num_examples': 7, 'shapes_seed': 3})
  assert (len(source), source.image_size, source.seed) == (7, 24, 3)
  image, caption = shapes.random_example(3, 5, 24)
  np.testing.assert_array_equal(source[5]['image'], image)
  assert source[5]['captions'] == [caption] and source[5]['key'] == 'shapes/3/5'
  with pytest.raises(KeyError, match='image_size'):
    pipeline.source_from_config({'dataset': 'shapes'})


def test_shapes_source_is_deterministic_and_prepared_set_matches(tmp_path):
  source = shapes_data.ShapesSource(num_examples=6, image_size=32, seed=3)
  a, b = source[4], shapes_data.ShapesSource(6, 32, 3)[4]
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['captions'] == b['captions'] and a['captions'] != source[5]['captions']
  assert shapes.score(a['image'], a['captions'][0])['all']
  with pytest.raises(IndexError):
    source[6]
  fields = dict(data_dir=str(tmp_path), image_size=32, shapes_num_examples=6, shapes_seed=3,
                shapes_prepared=True)
  with pytest.raises(datasets.DatasetEmptyError, match='not prepared.*prepare_shapes'):
    datasets.get_source('shapes', **fields)
  shapes_data.prepare_shapes(str(tmp_path), image_size=32, num_examples=6, seed=3)
  prepared = datasets.get_source('shapes', **fields)
  assert len(prepared) == 6
  by_key = {prepared[i]['key']: prepared[i] for i in range(6)}
  record = by_key['00000004']
  assert record['captions'] == a['captions']
  np.testing.assert_array_equal(pipeline.decode_image(record['image']), a['image'])

"""The Shapes dataset and its caption rewrite, registered by name for the library's pipeline.

Importing this module (configs list it in `input.modules`) registers in
`diffusion_jax.data.registry`:

  dataset 'shapes'             the scenes of `shapes.random_example`, rendered on the fly and
                               deterministic from (seed, index) (`ShapesSource`), or read
                               from a prepared TFDS set (`shapes_captions`, `prepare_shapes`)
                               when a fixed file set is wanted; its vocabulary
                               (`shapes.VOCABULARY`) makes the offline word-level tokenizer
  rewrite 'shapes_canonical'   `shapes.canonical_caption`

Input fields the dataset reads besides the pipeline's (defaults in brackets):
  image_size           side of the rendered (or prepared) images
  shapes_num_examples  epoch length of the set [100_000]
  shapes_seed          content seed of the set (not the order seed) [0]
  shapes_prepared      read a prepared TFDS set from data_dir instead of rendering [False]
  data_dir, split      of the prepared set [None: $TFDS_DATA_DIR, 'train']
"""
from __future__ import annotations

import functools
import io
import os
from typing import Any

from diffusion_jax.data import datasets, registry
from projects.shapes import shapes

NUM_EXAMPLES, SEED = 100_000, 0  # defaults of input.shapes_num_examples, input.shapes_seed


class ShapesSource:
  """The Shapes dataset rendered on the fly: element i depends only on (seed, i)."""

  def __init__(self, num_examples: int = NUM_EXAMPLES, image_size: int = 64, seed: int = SEED):
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f'Shapes index {index} out of range [0, {self.num_examples})')
    image, caption = shapes.random_example(self.seed, index, self.image_size)
    return {'image': image, 'captions': [caption], 'key': f'shapes/{self.seed}/{index}'}

  def __repr__(self) -> str:
    return (f'ShapesSource(num_examples={self.num_examples}, image_size={self.image_size}, '
            f'seed={self.seed})')


@functools.cache
def shapes_builder_class():
  """`shapes_captions`: the Shapes dataset written to disk (PNG bytes + caption); defined
  lazily (importing TFDS costs seconds)."""
  tfds = datasets.import_tfds()

  class ShapesCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Procedural Shapes scenes; config name `<size>px_<num_examples>_seed<seed>`."""

    VERSION = tfds.core.Version('1.0.0')
    code_path = datasets.no_code_path(tfds)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self,
                                   description='Procedural Shapes scenes with exact captions.',
                                   features=datasets.record_features(tfds))

    def _split_generators(self, dl_manager):
      del dl_manager
      size, num, seed = _parse_shapes_config(self.builder_config.name)
      return {'train': self._generate_examples(size, num, seed)}

    def _generate_examples(self, size, num, seed):
      from PIL import Image  # noqa: PLC0415
      for i in range(num):
        image, caption = shapes.random_example(seed, i, size)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format='PNG')
        yield i, {'image': buf.getvalue(), 'captions': [caption], 'file': f'{i:08d}'}

  return ShapesCaptions


def _shapes_config_name(image_size: int, num_examples: int, seed: int) -> str:
  return f'{int(image_size)}px_{int(num_examples)}_seed{int(seed)}'


def _parse_shapes_config(name: str) -> tuple[int, int, int]:
  size, num, seed = name.split('_')
  return int(size.removesuffix('px')), int(num), int(seed.removeprefix('seed'))


def prepare_shapes(data_dir: str | None = None, *, image_size: int = 64,
                   num_examples: int = 10_000, seed: int = SEED) -> str:
  """Writes the set as array_record (read with input.shapes_prepared=True); returns its
  directory."""
  builder = datasets.tfds_builder(shapes_builder_class(),
                                  _shapes_config_name(image_size, num_examples, seed), data_dir)
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def source(input_cfg):
  """The registered dataset 'shapes': a source of raw records from the input fields above."""
  size = int(datasets.field(input_cfg, 'image_size'))
  num = int(datasets.field(input_cfg, 'shapes_num_examples', NUM_EXAMPLES))
  seed = int(datasets.field(input_cfg, 'shapes_seed', SEED))
  if not bool(datasets.field(input_cfg, 'shapes_prepared', False)):
    return ShapesSource(num, size, seed)
  return datasets.prepared_source(
      shapes_builder_class(), _shapes_config_name(size, num, seed), dataset='shapes',
      data_dir=datasets.field(input_cfg, 'data_dir', None),
      split=datasets.field(input_cfg, 'split', 'train'),
      hint='projects.shapes.data.prepare_shapes(...)')


registry.register_dataset('shapes', source, vocabulary=shapes.VOCABULARY)
registry.register_caption_rewrite('shapes_canonical', shapes.canonical_caption)

"""Prepares a local folder of captioned images as a TFDS dataset (array_record).

  python -m diffusion_jax.tools.prepare_folder --src=DIR --data_dir=DIR [--name=default]

DIR holds images (jpg, png, webp, bmp, gif; sub-folders allowed) and either a
`captions.jsonl` with {"file": "relative/path.jpg", "caption": "..."} (or "captions": [...])
per line, or one `.txt` next to each image (one caption per non-empty line). The images'
bytes are stored as they are; unreadable images and images without a caption are kept and
skipped (and counted) by the input pipeline, so one bad file never stops a run. Train on it
with `--config.input.dataset=folder --config.input.data_dir=DIR --config.input.folder_name=NAME`.
"""
from __future__ import annotations

import collections

from absl import app, flags

from diffusion_jax.data import datasets

_SRC = flags.DEFINE_string('src', None, 'Folder of images and captions.', required=True)
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir (default $TFDS_DATA_DIR).')
_NAME = flags.DEFINE_string('name', 'default', 'Config name: one per prepared folder.')


def main(argv):
  del argv
  items = datasets.list_folder(_SRC.value)
  if not items:
    raise app.UsageError(f'no images found in {_SRC.value}')
  caption_counts = collections.Counter(min(len(caps), 2) for _, caps in items)
  out = datasets.prepare_folder(_SRC.value, _DATA_DIR.value, _NAME.value)
  print(f'prepared {len(items)} images ({caption_counts[0]} without caption, '
        f'{caption_counts[2]} with several) in {out}')


if __name__ == '__main__':
  app.run(main)

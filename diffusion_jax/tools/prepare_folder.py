"""Prepares a local folder of captioned images as a TFDS dataset (array_record).

  python -m diffusion_jax.tools.prepare_folder --src=IMAGES --data_dir=DATA --name=NAME

IMAGES holds images (jpg, png, webp, bmp, gif; sub-folders allowed) and either a
`captions.jsonl` with {"file": "relative/path.jpg", "caption": "..."} (or "captions": [...])
per line, or one `.txt` next to each image (one caption per non-empty line). The images'
bytes are stored as they are; unreadable images and images without a caption are kept and
skipped (and counted) by the input pipeline, so one bad file never stops a run.

It writes DATA/captioned_folder/NAME/1.0.0/, with a word-level tokenizer of the captions in
its `tokenizer/` (the --vocab_size most frequent words; the rest map to unk), which a stage
trained on the folder uses unless its config names another (`text_encoder.tokenizer_path`,
or a pretrained encoder's `text_encoder.path`), and prints the flags that train on it:

  python -m diffusion_jax.train --config=configs/imagen.py:stage=base64,size=tiny \\
      --workdir=ROOT/base64 --config.input.dataset=folder --config.input.data_dir=DATA \\
      --config.input.folder_name=NAME

(unCLIP's CLIP stages want --tokenizer_style=clip). Run it again after changing the folder:
it prepares it again, replacing the old version, and says why; for an unchanged folder it
writes nothing and says so.
"""
from __future__ import annotations

from absl import flags

from diffusion_jax import cli, errors
from diffusion_jax.data import datasets


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  del sys_argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('src', None, 'Folder of images and captions (required).', **fv)
  flags.DEFINE_string('data_dir', None, 'TFDS data dir (default $TFDS_DATA_DIR, else '
                      '~/tensorflow_datasets).', **fv)
  flags.DEFINE_string('name', 'default', 'Config name: one per prepared folder '
                      '(--config.input.folder_name).', **fv)
  flags.DEFINE_enum('tokenizer_style', 't5', ['t5', 'clip'], 'Special tokens of the '
                    'word-level tokenizer: t5 (Imagen, GLIDE) or clip (unCLIP prior and '
                    'decoder64).', **fv)
  flags.DEFINE_integer('vocab_size', 64, 'Tokens of the word-level tokenizer, specials '
                       'included: at most the embedding size of the text encoder (64 for the '
                       'tiny configs).', **fv)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  if not F.src:
    raise errors.InputError('--src is required: a folder of images with captions.jsonl or '
                            '.txt captions')
  done = datasets.prepare_folder(F.src, F.data_dir, F.name, tokenizer_style=F.tokenizer_style,
                                 vocab_size=F.vocab_size)  # bad input: datasets.FolderError
  if done.status == 'unchanged':
    print(f'unchanged: {done.name!r} in {done.path} is already prepared from this folder '
          f'({done.num_images} images); nothing to do')
  else:
    why = f' because {done.reason}' if done.status == 're-prepared' else ''
    print(f'{done.status} {done.num_images} images ({done.without_caption} without caption, '
          f'{done.unreadable} unreadable: skipped and counted in training; '
          f'{done.several_captions} with several captions) in {done.path}{why}')
    print(f'tokenizer: {done.tokenizer_words} of {done.caption_words} caption words '
          f'(--vocab_size={F.vocab_size}; the rest map to unk) in {done.tokenizer_path}')
  print(f'train on it with:\n  {done.train_flags()}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)

"""GLIDE on Shapes (the CPU demo's cascade): base 32 px, upsampler 32->64 px, inpainting, noised
CLIP.

  python -m diffusion_jax.train --config=projects/shapes/configs/glide.py:stage=base64 --workdir=/tmp/run/base64
  python -m diffusion_jax.train --config=projects/shapes/configs/glide.py:stage=up256 --workdir=/tmp/run/up256
  python -m diffusion_jax.train --config=projects/shapes/configs/glide.py:stage=noised_clip --workdir=/tmp/run/noised_clip

Each stage is `configs/glide.py` at size `tiny` with the fields below (README.md beside this
file says why); the text transformer reads the ids of the Shapes word-level tokenizer.
"""
from __future__ import annotations

import ml_collections

from configs import common, glide

FILE = 'projects/shapes/configs/glide.py'
SIZE = 'shapes'
RES = {'base': (32, None), 'up': (64, 32)}  # (output, low-res input)
# text transformer: (vocab, context, width, layers, heads) for the base and the upsampler
XF = {'base': (128, 32, 64, 2, 4), 'up': (128, 32, 64, 1, 4)}
NOISED_CLIP_PRESET = 'small'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, upto='', stage='base64', size=SIZE)
  common.check_choice('stage', a.stage, glide.STAGES)
  common.check_choice('size', a.size, (SIZE,))
  if a.stage == 'cascade':
    return common.cascade_config('glide', FILE, SIZE, get_config, ('base64', 'up256'),
                                 extra=('inpaint64', 'inpaint256', 'noised_clip'),
                                 inpaint=('inpaint64', 'inpaint256'), clip='noised_clip')
  if a.stage == 'noised_clip':
    return glide.noised_clip_config(get_config('stage=base64'), NOISED_CLIP_PRESET)
  stage = a.stage
  kind = 'up' if stage.endswith('256') else 'base'
  res, low = RES[kind]
  vocab, ctx, width, depth, heads = XF[kind]
  c = glide.get_config(f'stage={stage},size=tiny')
  c.size = SIZE

  c.model.update(image_size=res, low_res_size=low or 0, text_len=ctx, vocab_size=vocab,
                 xf_width=width, xf_layers=depth, xf_heads=heads, model_channels=16,
                 channel_mult=(1, 2, 4, 8), num_res_blocks=1, attention_resolutions=(8,),
                 num_heads=4, head_channels=-1)
  c.input.update(batch_size=16, image_size=res, low_res_size=low, text_max_len=ctx)
  c.text_encoder.update(max_length=ctx, vocab_size=vocab)
  c.diffusion.parameterization = 'v'
  c.sampler.num_steps = 50
  c.total_steps = 2000
  return c

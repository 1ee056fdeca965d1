"""Imagen on Shapes (the CPU demo's cascade): base 32 px, SR 32->64 px, optional SR 64->128 px.

  python -m diffusion_jax.train --config=projects/shapes/configs/imagen.py:stage=base64 --workdir=/tmp/run/base64
  python -m diffusion_jax.train --config=projects/shapes/configs/imagen.py:stage=sr256 --workdir=/tmp/run/sr256
  python -m diffusion_jax.sample --config=projects/shapes/configs/imagen.py:stage=cascade \
      --workdir=/tmp/run --prompt="a red circle to the left of a blue square"

Each stage is `configs/imagen.py` at size `tiny` with the fields below (why each is what it
is: README.md beside this file).
"""
from __future__ import annotations

import ml_collections

from configs import common, imagen

FILE = 'projects/shapes/configs/imagen.py'
SIZE = 'shapes'
RES = {'base64': (32, None), 'sr256': (64, 32), 'sr1024': (128, 64)}  # (output, low-res input)
T5 = dict(preset='small', width=64, max_length=32)  # frozen, randomly initialised T5


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, upto='', stage='base64', size=SIZE)
  common.check_choice('stage', a.stage, imagen.STAGES)
  common.check_choice('size', a.size, (SIZE,))
  if a.stage == 'cascade':  # upto=sr1024 adds the 128 px stage
    optional = ('sr1024',) if a.upto == 'sr1024' else ()
    return common.cascade_config('imagen', FILE, SIZE, get_config, ('base64', 'sr256') + optional)
  stage = a.stage
  base = stage == 'base64'
  res, low = RES[stage]
  c = imagen.get_config(f'stage={stage},size=tiny')
  c.size = SIZE

  m = c.model
  m.update(image_size=res, text_len=T5['max_length'], text_dim=T5['width'], model_channels=16,
           channel_mult=(1, 2, 4, 8), num_heads=4, head_channels=-1, context_dim=64)
  m.text_position_embed = True  # the random T5's token states carry words, not their order
  if base:
    m.update(num_res_blocks=1, attention_resolutions=(16, 8))
    m.text_only_resolutions = (16,)  # text cross-attention without self-attention at 16x16
    m.text_attention = 'cross'       # a cross-attention layer of its own (Imagen's choice)
    m.coord_channels = True          # pixel coordinates as two input channels (CoordConv)
  else:
    m.update(low_res_size=low, num_res_blocks=(1, 1, 2, 2),
             self_attention=(False, False, False, stage == 'sr256'),
             cross_attention=(False, False, False, True))

  c.input.update(batch_size=16, image_size=res, low_res_size=low, text_max_len=T5['max_length'])
  c.input.train_crop_size = 32 if stage == 'sr256' else None  # the SR trains on 32 px crops
  c.input.caption_rewrite = 'shapes_canonical'  # relations read one way round (README.md)
  c.text_encoder.update(T5)

  c.diffusion.parameterization = 'v'
  c.diffusion.noise_aug_max = 0.3  # SR augmentation levels from U[0, 0.3]
  if base:
    c.diffusion.loss_weighting = 'min_snr'  # v-MSE capped above snr = 4
    c.diffusion.min_snr_gamma = 5.0
    c.diffusion.min_snr_offset = 1.0

  c.sampler.num_steps = 64
  c.sampler.threshold = 'static'  # clip x0 to [-1, 1]: dynamic greys the white backgrounds
  if not base:
    c.sampler.aug_level = 0.1

  if base:
    c.optimizer.lr = 1.5e-3
    c.optimizer.decay = 'cosine'
  c.total_steps = 2000
  return c

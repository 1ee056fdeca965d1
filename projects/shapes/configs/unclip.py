"""unCLIP on Shapes (the CPU demo's cascade): its own CLIP, prior, decoder 32 px, upsamplers
32->64 and 64->128 px.

  python -m diffusion_jax.train --config=projects/shapes/configs/unclip.py:stage=clip --workdir=/tmp/run/clip
  python -m diffusion_jax.tools.export_clip --workdir=/tmp/run/clip --out=/tmp/run/clip/export
  python -m diffusion_jax.train --config=projects/shapes/configs/unclip.py:stage=prior \
      --config.text_encoder.path=/tmp/run/clip/export --workdir=/tmp/run/prior

Each stage is `configs/unclip.py` at size `tiny` with the fields below (README.md beside this
file says why).
"""
from __future__ import annotations

import ml_collections

from configs import common, unclip

FILE = 'projects/shapes/configs/unclip.py'
SIZE = 'shapes'
RES = {'decoder64': (32, None), 'up256': (64, 32), 'up1024': (128, 64)}  # (output, low-res)
CLIP = dict(preset='small', width=64, embed_dim=64, text_len=32)  # the frozen CLIP
# the decoder's text transformer: vocab, context, width, layers, heads
XF = (128, 32, 64, 2, 4)
SAMPLER_STEPS = {'prior': 64, 'decoder64': 250, 'up256': 27, 'up1024': 15}  # Table 3's


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, upto='', stage='prior', size=SIZE)
  common.check_choice('stage', a.stage, unclip.STAGES)
  common.check_choice('size', a.size, (SIZE,))
  if a.stage == 'cascade':  # upto=up1024 adds the 128 px stage
    optional = ('up1024',) if a.upto == 'up1024' else ()
    return common.cascade_config('unclip', FILE, SIZE, get_config,
                                 ('prior', 'decoder64', 'up256') + optional)
  if a.stage == 'clip':
    return unclip.clip_config(get_config('stage=decoder64'), CLIP['preset'])
  stage = a.stage
  c = unclip.get_config(f'stage={stage},size=tiny')
  c.size = SIZE

  c.text_encoder.update(width=CLIP['width'], embed_dim=CLIP['embed_dim'],
                        text_len=CLIP['text_len'], max_length=CLIP['text_len'])
  if stage == 'prior':
    c.text_encoder.preset = CLIP['preset']
    c.model.update(embed_dim=CLIP['embed_dim'], text_len=CLIP['text_len'],
                   text_dim=CLIP['width'], text_embed_dim=CLIP['embed_dim'], width=128,
                   num_layers=6, num_heads=4)
    c.input.update(image_size=32, text_max_len=CLIP['text_len'])  # the CLIP's image input
  else:
    res, low = RES[stage]
    c.model.update(image_size=res, channel_mult=(1, 2, 4, 8))
    c.input.update(image_size=res, low_res_size=low, text_max_len=CLIP['text_len'])
    if stage == 'decoder64':
      vocab, ctx, width, depth, heads = XF
      c.text_encoder.preset = CLIP['preset']
      c.model.update(text_len=ctx, vocab_size=vocab, xf_width=width, xf_layers=depth,
                     xf_heads=heads, image_embed_dim=CLIP['embed_dim'], num_heads=4)
      c.input.text_max_len = ctx
    else:
      c.model.low_res_size = low
    c.diffusion.parameterization = 'v'

  c.input.batch_size = 16
  c.sampler.num_steps = SAMPLER_STEPS[stage]
  c.total_steps = 2000
  return c

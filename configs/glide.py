"""GLIDE (Nichol et al. 2022): ADM U-Nets with a jointly trained text transformer.

Run a stage:
  python -m diffusion_jax.train --config=configs/glide.py:stage=base64,size=tiny --workdir=/tmp/run/base64
  python -m diffusion_jax.train --config=configs/glide.py:stage=up256,size=tiny --workdir=/tmp/run/up256
  python -m diffusion_jax.train --config=configs/glide.py:stage=inpaint64,size=tiny --workdir=/tmp/run/inpaint64
  python -m diffusion_jax.train --config=configs/glide.py:stage=inpaint256,size=tiny --workdir=/tmp/run/inpaint256

Sizes: `tiny` (unit tests and smoke runs, < 1M parameters, 16-32 px, on the Shapes dataset of
`projects.shapes`), `paper` (published: base 3.5B including its 1.2B text transformer,
upsampler 1.5B, on COCO captions).
The text transformer reads raw token ids (`cond['text_ids']`); at `paper` size these are
GPT-2 BPE ids (vocabulary 50257; point `text_encoder.tokenizer_path` at a local tokenizer
directory), at `tiny` those of the offline word-level tokenizer of the dataset's vocabulary.
"""
from __future__ import annotations

import ml_collections

from configs import common
from diffusion_jax.models import unet

STAGES = ('base64', 'up256', 'inpaint64', 'inpaint256', 'noised_clip', 'cascade')
MODEL_STAGES = ('base64', 'up256', 'inpaint64', 'inpaint256')

_RES = {
    'tiny': {'base': (16, None), 'up': (32, 16)},
    'paper': {'base': (64, None), 'up': (256, 64)},
}
# text transformer: (vocab, context, width, layers, heads) for the base and the upsampler
_XF = {
    'tiny': {'base': (64, 16, 32, 2, 2), 'up': (64, 16, 32, 1, 2)},
    # Paper: 24 blocks of width 2048 for the base; the upsampler's is 1024 wide (Sec. 4).
    'paper': {'base': (50257, 128, 2048, 24, 32), 'up': (50257, 128, 1024, 24, 16)},
}


def _model(stage: str, size: str) -> ml_collections.ConfigDict:
  kind = 'up' if stage.endswith('256') else 'base'
  res, low = _RES[size][kind]
  vocab, ctx, width, depth, heads = _XF[size][kind]
  m = ml_collections.ConfigDict()
  m.name = 'unet'
  m.image_size = res
  m.in_channels = 3
  m.out_channels = 3
  m.learned_variance = True
  m.low_res_size = low or 0
  m.inpaint = stage.startswith('inpaint')
  m.text_source = 'transformer'
  m.text_len = ctx
  m.vocab_size = vocab
  m.xf_width = width
  m.xf_layers = depth
  m.xf_heads = heads
  m.text_attention = 'concat_kv'  # text tokens join every attention layer's keys/values
  m.use_scale_shift_norm = True
  m.resblock_updown = True
  common.model_numerics(m, size)
  m.update(unet.PRESETS['glide_tiny' if size == 'tiny' else f'glide_{kind}_paper'])
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, upto='', stage='base64', size='tiny')
  common.check_choice('stage', a.stage, STAGES)
  common.check_choice('size', a.size, common.SIZES)
  if a.stage == 'cascade':
    return _cascade_config(a)
  if a.stage == 'noised_clip':
    return noised_clip_config(get_config(f'stage=base64,size={a.size}'),
                              _NOISED_CLIP_PRESET[a.size])
  stage, size = a.stage, a.size
  paper = size == 'paper'
  kind = 'up' if stage.endswith('256') else 'base'
  c = common.base_config()
  c.family = 'glide'
  c.stage = stage
  c.size = size
  c.model = _model(stage, size)
  c.objective = 'diffusion'
  c.target = 'image'
  res, low = _RES[size][kind]

  c.input = ml_collections.ConfigDict()
  c.input.batch_size = {'tiny': 8, 'paper': 2048}[size]
  c.input.image_size = res
  c.input.low_res_size = low
  c.input.dataset = 'coco_captions' if paper else 'shapes'
  c.input.modules = () if paper else ('projects.shapes.data',)  # registers 'shapes'
  c.input.text_max_len = c.model.text_len

  c.text_encoder = ml_collections.ConfigDict()
  c.text_encoder.name = None  # the text transformer is part of the model and trained with it
  c.text_encoder.preset = None
  c.text_encoder.path = None
  c.text_encoder.tokenizer_path = None  # paper: a GPT-2 BPE tokenizer directory
  c.text_encoder.max_length = c.model.text_len
  c.text_encoder.vocab_size = c.model.vocab_size

  c.diffusion = ml_collections.ConfigDict()
  # improved-DDPM cosine for the base; the released upsampler uses the linear schedule.
  c.diffusion.schedule = 'squaredcos_cap_v2' if kind == 'base' else 'linear'
  c.diffusion.shift = 1.0
  c.diffusion.num_timesteps = 1000
  c.diffusion.parameterization = 'eps'
  c.diffusion.learned_variance = True
  c.diffusion.vlb_weight = 0.001  # hybrid loss L_simple + lambda * L_vlb
  c.diffusion.loss_weighting = 'none'
  c.diffusion.cond_drop_text = 0.2  # 20% empty captions for classifier-free guidance
  c.diffusion.cond_drop_image = 0.0
  c.diffusion.noise_aug = False

  c.sampler = ml_collections.ConfigDict()
  c.sampler.name = 'ddpm'
  c.sampler.num_steps = {'tiny': 16, 'paper': 100 if kind == 'base' else 27}[size]
  c.sampler.eta = 1.0
  c.sampler.guidance_scale = 3.0 if kind == 'base' else 1.0
  c.sampler.threshold = 'static'
  c.sampler.percentile = 99.5
  c.sampler.aug_level = 0.0

  c.optimizer = common.optimizer_config(name='adamw', lr=1.2e-4 if paper else 1e-3, paper=paper)

  c.total_steps = 2_500_000 if paper else 200
  c.mesh = common.mesh_config(data=1, fsdp=-1) if paper else common.mesh_config()
  return common.finalize(c)


_NOISED_CLIP_PRESET = {'tiny': 'tiny', 'paper': 'glide'}


def noised_clip_config(base: ml_collections.ConfigDict, preset_name: str
                       ) -> ml_collections.ConfigDict:
  """GLIDE's noised CLIP for CLIP guidance: trained contrastively on images noised with the
  base model's schedule, by the same trainer as every other stage. `base`: the base64 config
  whose data, schedule and optimizer it shares (changed in place); `preset_name`: a
  `models.clip.NOISED_PRESETS` entry.

    python -m diffusion_jax.train --config=configs/glide.py:stage=noised_clip,size=tiny --workdir=/tmp/run/noised_clip
  """
  from diffusion_jax.models import clip  # the presets are the single source of the sizes
  c = base
  preset = clip.NOISED_PRESETS[preset_name]
  c.stage = 'noised_clip'
  c.objective = 'noised_clip'
  c.model = ml_collections.ConfigDict({
      'name': 'noised_clip', 'text': dict(preset['text']), 'vision': dict(preset['vision']),
      'embed_dim': preset['embed_dim'],
      'dtype': 'bfloat16' if c.size == 'paper' else 'float32', 'param_dtype': 'float32'})
  c.input.image_size = preset['vision']['image_size']
  c.input.low_res_size = None
  c.input.text_max_len = preset['text']['max_length']
  c.text_encoder.max_length = c.input.text_max_len
  c.text_encoder.vocab_size = preset['text']['vocab_size']
  c.diffusion.cond_drop_text = 0.0
  c.diffusion.learned_variance = False
  c.sampler.guidance_scale = 1.0
  return common.finalize(c)


def _cascade_config(a) -> ml_collections.ConfigDict:
  """The sampling cascade (diffusion_jax.pipelines): each stage's config arg, its directory
  under ROOT and its sampler settings.

    python -m diffusion_jax.sample --config=configs/glide.py:stage=cascade,size=tiny \
        --workdir=ROOT --prompt="a red circle"
  """
  size = a.size
  return common.cascade_config('glide', 'configs/glide.py', size, get_config, ('base64', 'up256'),
                               extra=('inpaint64', 'inpaint256', 'noised_clip'),
                               inpaint=('inpaint64', 'inpaint256'), clip='noised_clip')

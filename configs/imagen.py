"""Imagen (Saharia et al. 2022): frozen T5 text encoder, base 64 px U-Net, two Efficient U-Net
super-resolution stages.

Run a stage:
  python -m diffusion_jax.train --config=configs/imagen.py:stage=base64,size=tiny --workdir=/tmp/run/base64
  python -m diffusion_jax.train --config=configs/imagen.py:stage=sr256,size=tiny --workdir=/tmp/run/sr256
  python -m diffusion_jax.train --config=configs/imagen.py:stage=sr1024,size=tiny --workdir=/tmp/run/sr1024

Sizes: `tiny` (unit tests and smoke runs, < 1M parameters, 16-64 px, on the Shapes dataset of
`projects.shapes`), `paper` (the published architecture: 2.0B / 600M / 400M, on COCO captions).
"""
from __future__ import annotations

import ml_collections

from configs import common
from diffusion_jax.models import efficient_unet, unet

STAGES = ('base64', 'sr256', 'sr1024', 'cascade')
MODEL_STAGES = ('base64', 'sr256', 'sr1024')

# image size of each stage's output (and its low-res input) per size preset
_RES = {
    'tiny': {'base64': (16, None), 'sr256': (32, 16), 'sr1024': (64, 32)},
    'paper': {'base64': (64, None), 'sr256': (256, 64), 'sr1024': (1024, 256)},
}
# frozen T5: preset, d_model, tokens kept
_T5 = {'tiny': ('tiny', 32, 16), 'paper': ('xxl', 4096, 128)}


def _model(stage: str, size: str) -> ml_collections.ConfigDict:
  res, low = _RES[size][stage]
  _, text_dim, text_len = _T5[size]
  m = ml_collections.ConfigDict()
  m.image_size = res
  m.in_channels = 3
  m.out_channels = 3
  m.learned_variance = False
  m.text_source = 'tokens'
  m.text_len = text_len
  m.text_dim = text_dim
  m.text_pool = 'attention'  # attention-pooled T5 tokens added to the time embedding
  m.text_position_embed = False  # learned position embeddings on the text tokens
  m.dropout = 0.0
  common.model_numerics(m, size)
  if stage == 'base64':
    m.name = 'unet'
    m.text_attention = 'concat_kv'
    m.use_scale_shift_norm = True
    m.resblock_updown = True
    m.update(unet.PRESETS[f'imagen_base64_{size}'])
  else:
    m.name = 'efficient_unet'
    m.low_res_size = low
    m.aug_cond = True  # noise-conditioning augmentation level
    m.scan_blocks = False  # a level's identical blocks under nn.scan (trade-off: docs/AOT.md)
    m.update(efficient_unet.PRESETS[f'imagen_{stage}_{size}'])  # no self-attention at 1024 px
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, upto='', stage='base64', size='tiny')
  common.check_choice('stage', a.stage, STAGES)
  common.check_choice('size', a.size, common.SIZES)
  if a.stage == 'cascade':
    return _cascade_config(a)
  stage, size = a.stage, a.size
  paper = size == 'paper'
  c = common.base_config()
  c.family = 'imagen'
  c.stage = stage
  c.size = size
  c.model = _model(stage, size)
  c.objective = 'diffusion'
  c.target = 'image'
  res, low = _RES[size][stage]

  c.input = ml_collections.ConfigDict()
  c.input.batch_size = {'tiny': 8, 'paper': 2048}[size]
  c.input.image_size = res
  c.input.low_res_size = low
  c.input.dataset = 'coco_captions' if paper else 'shapes'
  c.input.modules = () if paper else ('projects.shapes.data',)  # registers 'shapes'
  c.input.text_max_len = c.model.text_len
  # The 256->1024 model trains on 64->256 crops (Imagen paper), then samples whole images.
  c.input.train_crop_size = 256 if (paper and stage == 'sr1024') else None

  preset, width, _ = _T5[size]
  c.text_encoder = ml_collections.ConfigDict()
  c.text_encoder.name = 't5'
  c.text_encoder.preset = preset
  c.text_encoder.width = width
  c.text_encoder.path = None  # None: random init (tests, demo); else a transformers-layout dir
  c.text_encoder.tokenizer_path = None
  c.text_encoder.max_length = c.model.text_len
  c.text_encoder.dtype = 'bfloat16' if paper else 'float32'
  c.text_encoder.seed = 0

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = 'cosine'  # continuous-time cosine log-SNR
  c.diffusion.shift = 1.0
  c.diffusion.num_timesteps = 0    # continuous time
  c.diffusion.parameterization = 'eps'
  c.diffusion.learned_variance = False
  c.diffusion.vlb_weight = 0.0
  c.diffusion.loss_weighting = 'none'
  c.diffusion.cond_drop_text = 0.1
  c.diffusion.cond_drop_image = 0.0
  c.diffusion.noise_aug = stage != 'base64'
  c.diffusion.noise_aug_max = 1.0  # training augmentation levels from U[0, noise_aug_max]
  c.diffusion.low_res_blur_max = 0.0  # Gaussian-blur augmentation of low_res (0: none)

  c.sampler = ml_collections.ConfigDict()
  c.sampler.name = 'ddpm'
  c.sampler.num_steps = {'tiny': 16, 'paper': 256}[size]
  c.sampler.eta = 1.0
  c.sampler.guidance_scale = {'base64': 5.0, 'sr256': 5.0, 'sr1024': 5.0}[stage]
  c.sampler.threshold = 'dynamic'  # Imagen's dynamic thresholding at the 99.5th percentile
  c.sampler.percentile = 99.5
  c.sampler.aug_level = 0.0 if stage == 'base64' else 0.2

  # Adafactor for the base model, Adam for the super-resolution models (paper, Sec. 4.1).
  c.optimizer = common.optimizer_config(
      name='adafactor' if (paper and stage == 'base64') else 'adamw',
      lr=1e-4 if paper else 1e-3, paper=paper)

  c.total_steps = 2_500_000 if paper else 200
  c.mesh = common.mesh_config(data=1, fsdp=-1) if paper else common.mesh_config()
  return common.finalize(c)


def _cascade_config(a) -> ml_collections.ConfigDict:
  """The sampling cascade (diffusion_jax.pipelines): each stage's config arg, its directory
  under ROOT and its sampler settings. `upto=sr1024` adds the optional last stage at tiny.

    python -m diffusion_jax.sample --config=configs/imagen.py:stage=cascade,size=tiny \
        --workdir=ROOT --prompt="a red circle"
  """
  size = a.size
  optional = ('sr1024',) if a.upto == 'sr1024' or size == 'paper' else ()
  return common.cascade_config('imagen', 'configs/imagen.py', size, get_config, ('base64', 'sr256') + optional)

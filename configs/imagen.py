"""Imagen (Saharia et al. 2022): frozen T5 text encoder, base 64 px U-Net, two Efficient U-Net
super-resolution stages.

Run a stage:
  python -m diffusion_jax.train --config=configs/imagen.py:stage=base64,size=tiny --workdir=/tmp/run/base64
  python -m diffusion_jax.train --config=configs/imagen.py:stage=sr256,size=tiny --workdir=/tmp/run/sr256
  python -m diffusion_jax.train --config=configs/imagen.py:stage=sr1024,size=tiny --workdir=/tmp/run/sr1024

Sizes: `tiny` (unit tests, < 1M parameters, 16-64 px), `shapes` (the CPU demo on the Shapes
dataset, base at 32 px), `paper` (the published architecture: 2.0B / 600M / 400M).
"""
from __future__ import annotations

import ml_collections

from configs import common

STAGES = ('base64', 'sr256', 'sr1024', 'cascade')
MODEL_STAGES = ('base64', 'sr256', 'sr1024')

# image size of each stage's output (and its low-res input) per size preset
_RES = {
    'tiny': {'base64': (16, None), 'sr256': (32, 16), 'sr1024': (64, 32)},
    'shapes': {'base64': (32, None), 'sr256': (64, 32), 'sr1024': (128, 64)},
    'paper': {'base64': (64, None), 'sr256': (256, 64), 'sr1024': (1024, 256)},
}
# frozen T5: preset, d_model, tokens kept
_T5 = {'tiny': ('tiny', 32, 16), 'shapes': ('small', 64, 32), 'paper': ('xxl', 4096, 128)}


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
  # The demo's T5 is random and frozen: its tokens carry the words but not their order (a
  # caption and its colour-swapped twin give token states with cosine 0.99), so the U-Nets
  # learn one embedding per position to tell which colour goes with which shape, and which
  # object comes first.
  m.text_position_embed = size == 'shapes'
  m.dropout = 0.0
  common.model_numerics(m, size)
  if stage == 'base64':
    m.name = 'unet'
    m.text_attention = 'concat_kv'
    m.use_scale_shift_norm = True
    m.resblock_updown = True
    if size == 'tiny':
      m.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(8,), num_heads=2, head_channels=-1, context_dim=32)
    elif size == 'shapes':
      # CPU demo: few convolutions at full resolution, width at 8x8 (fast on 2 cores). Text
      # attention at 16x16 too: single objects come out single (count 0.42 -> 0.71 after 2000
      # steps, guidance 3). A cross-attention layer of its own (Imagen's choice) rather than
      # T5 tokens among the image keys: single-object count 0.46 -> 0.83 after 1500 steps.
      # No self-attention at 16x16: it was 30% of the step (366 -> 256 ms at batch 16), and
      # without it a base trained 3000 steps scores 0.74 single-object all-correct at 32 px
      # against 0.66 with it (96 samples, guidance 4).
      m.update(model_channels=16, channel_mult=(1, 2, 4, 8), num_res_blocks=1,
               attention_resolutions=(16, 8), text_only_resolutions=(16,), num_heads=4,
               head_channels=-1, context_dim=64, text_attention='cross')
      # Where a pixel is, as two input channels (CoordConv): without them the base put a
      # relation's first-named object on the named side at chance at training seeds 2, 3 and
      # 4 of 0-4 (32-35 of 63-68 samples); with them, in 58 of 61 and 44 of 62 at seeds 2, 3.
      m.coord_channels = True
    else:
      # ADM-style base (App. F): 512 channels, mults 1-2-3-4, 3 res blocks, attention at
      # 32/16/8 with 64 channels per head; T5 tokens join every attention layer's keys/values.
      m.update(model_channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
               attention_resolutions=(32, 16, 8), num_heads=8, head_channels=64,
               context_dim=512)
  else:
    m.name = 'efficient_unet'
    m.low_res_size = low
    m.aug_cond = True  # noise-conditioning augmentation level
    # True runs a level's identical blocks (up to 8) under nn.scan: at paper size libtpu's
    # compile of sr256 for 128 v4 chips took 26% less CPU time, but the step needs 25% more
    # temporary HBM (12.0 against 9.6 GiB per chip) and 3% more FLOPs (docs/AOT.md).
    m.scan_blocks = False
    self_attn = stage == 'sr256'  # no self-attention at 1024 px
    if size == 'tiny':
      m.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=(1, 2),
               self_attention=(False, self_attn), cross_attention=(False, True), num_heads=2,
               head_channels=-1, context_dim=32, ff_mult=2)
    elif size == 'shapes':
      m.update(model_channels=16, channel_mult=(1, 2, 4, 8), num_res_blocks=(1, 1, 2, 2),
               self_attention=(False, False, False, self_attn),
               cross_attention=(False, False, False, True), num_heads=4, head_channels=-1,
               context_dim=64, ff_mult=2)
    elif stage == 'sr256':
      # Efficient U-Net 64->256 (App. B.1, imagen-pytorch SRUnet256): 128 channels, mults
      # 1-2-4-8, (2, 4, 8, 8) res blocks, self- and cross-attention at the lowest level.
      m.update(model_channels=128, channel_mult=(1, 2, 4, 8), num_res_blocks=(2, 4, 8, 8),
               self_attention=(False, False, False, True),
               cross_attention=(False, False, False, True), num_heads=8, head_channels=-1,
               context_dim=1024, ff_mult=2)
    else:
      # 256->1024: the same layout without self-attention; the lowest level is 768 wide so
      # that the count matches the published 400M (1024 wide gives 565M).
      m.update(model_channels=128, channel_mult=(1, 2, 4, 6), num_res_blocks=(2, 4, 8, 8),
               self_attention=(False, False, False, False),
               cross_attention=(False, False, False, True), num_heads=8, head_channels=-1,
               context_dim=1024, ff_mult=2)
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
  c.input.batch_size = {'tiny': 8, 'shapes': 16, 'paper': 2048}[size]
  c.input.image_size = res
  c.input.low_res_size = low
  c.input.dataset = 'shapes'
  c.input.text_max_len = c.model.text_len
  # The 256->1024 model trains on 64->256 crops (Imagen paper); the fully convolutional
  # Efficient U-Net then samples whole images. The CPU demo's SR trains on 32 px crops of its
  # 64 px images: a step is 3.3x cheaper (163 vs 542 ms at batch 16) and after 600 steps
  # it scores as the whole-image model did on rendered 32 px inputs (0.99 all-correct on 96
  # captions, both), so the base gets the CPU back sooner.
  c.input.train_crop_size = {('paper', 'sr1024'): 256, ('shapes', 'sr256'): 32}.get(
      (size, stage))

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
  # The CPU-sized stages predict v (Salimans & Ho 2022; Imagen Video's choice). After a few
  # hundred steps an eps super-resolution model still ignores much of its low-res input, a
  # v-model follows it; after 2000 steps an eps base samples grey backgrounds and wrong
  # colours (single-object colour 0.21 at guidance 4), a v-base white ones and the named
  # colour (1.00 at guidance 3).
  c.diffusion.parameterization = 'v' if size == 'shapes' else 'eps'
  c.diffusion.learned_variance = False
  c.diffusion.vlb_weight = 0.0
  c.diffusion.loss_weighting = 'none'
  if size == 'shapes' and stage == 'base64':
    # The v-MSE capped above snr = 4 (Min-SNR-5 on v's own SNR); alone it scored as the plain
    # v-MSE did after 1500 steps. Plain Min-SNR (offset 0), which also mutes the noisiest
    # levels, drew clean shapes (single-object shape 0.25 -> 0.67) but scattered copies of
    # them (count 0.54 -> 0.13): the count is settled there. Offset 0.25 fell in between.
    c.diffusion.loss_weighting = 'min_snr'
    c.diffusion.min_snr_gamma = 5.0
    c.diffusion.min_snr_offset = 1.0
  c.diffusion.cond_drop_text = 0.1
  c.diffusion.cond_drop_image = 0.0
  c.diffusion.noise_aug = stage != 'base64'
  # Augmentation levels are drawn from U[0, noise_aug_max]. At the CPU demo's few hundred SR
  # steps, levels up to 1 teach the model to ignore its input (0.04-0.08 all-correct on
  # rendered low-res scenes, docs/claims); up to 0.3 keeps it following the input (0.73-0.94).
  c.diffusion.noise_aug_max = 0.3 if size == 'shapes' else 1.0
  c.diffusion.low_res_blur_max = 0.0  # Gaussian-blur augmentation of low_res (0: none)

  c.sampler = ml_collections.ConfigDict()
  c.sampler.name = 'ddpm'
  c.sampler.num_steps = {'tiny': 16, 'shapes': 64, 'paper': 256}[size]
  c.sampler.eta = 1.0
  c.sampler.guidance_scale = {'base64': 5.0, 'sr256': 5.0, 'sr1024': 5.0}[stage]
  # Dynamic thresholding divides x0 by its 99.5th percentile whenever that exceeds 1, which
  # greys the demo's white backgrounds and blurs its flat shapes. At the demo's guidance 3,
  # static clipping of the base lifts the cascade's single-object all-correct from 0.78 to
  # 0.92 (96 samples; 0.94 with the SR stage static too; count 0.82 -> 0.98); Imagen's
  # dynamic thresholding is for high guidance (docs/claims).
  c.sampler.threshold = 'static' if size == 'shapes' else 'dynamic'
  c.sampler.percentile = 99.5
  # The demo's SR follows its input best with little augmentation at sampling time too.
  c.sampler.aug_level = 0.0 if stage == 'base64' else (0.1 if size == 'shapes' else 0.2)

  # Adafactor for the base model, Adam for the super-resolution models (paper, Sec. 4.1).
  c.optimizer = common.optimizer_config(
      name='adafactor' if (paper and stage == 'base64') else 'adamw',
      lr=1e-4 if paper else 1e-3, paper=paper)
  if size == 'shapes' and stage == 'base64':
    # The CPU demo's base ends at a low learning rate rather than wherever a constant one
    # leaves it: after 2750 steps its cascade scores 0.80 single-object all-correct (96
    # samples, guidance 3) against 0.68 with lr 1e-3 held constant.
    c.optimizer.lr = 1.5e-3
    c.optimizer.decay = 'cosine'

  c.total_steps = 2_500_000 if paper else (200 if size == 'tiny' else 2000)
  c.mesh = common.mesh_config(data=1, fsdp=-1) if paper else common.mesh_config()
  return c


def _cascade_config(a) -> ml_collections.ConfigDict:
  """The sampling cascade (diffusion_jax.pipelines): each stage's config arg, its directory
  under ROOT and its sampler settings. `upto=` adds the optional last stage at tiny/shapes.

    python -m diffusion_jax.sample --config=configs/imagen.py:stage=cascade,size=tiny \
        --workdir=ROOT --prompt="a red circle"
  """
  size = a.size
  optional = ('sr1024',) if a.upto == 'sr1024' or size == 'paper' else ()
  return common.cascade_config('imagen', 'configs/imagen.py', size, get_config, ('base64', 'sr256') + optional)

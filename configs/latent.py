"""Latent diffusion (Rombach et al. 2022; Stable Diffusion, DiT): a frozen KL autoencoder, and a
diffusion network trained on its latents (a text-conditioned U-Net, or a DiT).

Run a stage (the diffusion stages read the autoencoder named by autoencoder.path, by default
the `autoencoder` stage beside their own directory, ROOT/autoencoder):
  python -m diffusion_jax.train --config=configs/latent.py:stage=autoencoder,size=tiny --workdir=/tmp/run/autoencoder
  python -m diffusion_jax.train --config=configs/latent.py:stage=unet,size=tiny --workdir=/tmp/run/unet
  python -m diffusion_jax.train --config=configs/latent.py:stage=dit,size=tiny --workdir=/tmp/run/dit

A released autoencoder replaces the first stage (a diffusers AutoencoderKL folder, or a
pipeline directory with vae/):
  python -m diffusion_jax.train --config=configs/latent.py:stage=unet,size=paper \
      --config.autoencoder.path=DIR/stable-diffusion-2-base --workdir=/tmp/run/unet

Sizes: `tiny` (unit tests and smoke runs, < 1M parameters, 16 px images and 8x8x4 latents, on
the Shapes dataset of `projects.shapes`), `small` (64 px, 16x16x4 latents, a few million
parameters, on Shapes), `paper` (on COCO captions: SD's VAE, 83.7M; SD 2's U-Net, 865.9M, at
512 px / 64x64x4 latents with the frozen OpenCLIP ViT-H/14 text tower; DiT-XL/2's backbone at
256 px / 32x32x4 latents, 607M). The data carry captions, not class labels, so the DiT stage
is text-conditioned by cross-attention to the frozen CLIP tokens with adaLN-single
(PixArt-alpha's form of DiT), not DiT's class-conditional adaLN-Zero.

Sample a trained stage (ROOT/unet or ROOT/dit, with ROOT/autoencoder beside it):
  python -m diffusion_jax.sample --config=configs/latent.py:stage=cascade,size=tiny \
      --workdir=/tmp/run --prompt="a red circle"          # net=dit for ROOT/dit

The autoencoder stage is trained with the reconstruction and KL terms of latent diffusion
(`loss.reconstruction`, `loss.kl_weight`); the perceptual (LPIPS) and adversarial terms of
the released autoencoders are not implemented.
"""
from __future__ import annotations

import ml_collections

from configs import common

STAGES = ('autoencoder', 'unet', 'dit', 'cascade')
MODEL_STAGES = ('autoencoder', 'unet', 'dit')
SIZES = ('tiny', 'small', 'paper')

# pixel side of the images each size trains on: (autoencoder and U-Net, DiT)
_PIXELS = {'tiny': (16, 16), 'small': (64, 64), 'paper': (512, 256)}
# the autoencoder: block_out_channels (downsample 2^(levels-1)), layers_per_block, groups
_VAE = {'tiny': ((8, 16), 1, 4), 'small': ((32, 64, 128), 1, 16),
        'paper': ((128, 256, 512, 512), 2, 32)}
LATENT_CHANNELS = 4
# frozen CLIP text tower: preset, width, embedding dim, context
_CLIP = {'tiny': ('tiny', 32, 32, 16), 'small': ('tiny', 32, 32, 16),
         'paper': ('vit_h14', 1024, 1024, 77)}
# the latent U-Net: channels, mults, res blocks, latent sides with attention, head channels
_UNET = {'tiny': (16, (1, 2), 1, (4,), 8), 'small': (64, (1, 2, 2), 2, (8, 4), 32),
         'paper': (320, (1, 2, 4, 4), 2, (64, 32, 16), 64)}
# DiT: patch, hidden, depth, heads
_DIT = {'tiny': (2, 32, 2, 2), 'small': (2, 192, 6, 3), 'paper': (2, 1152, 28, 16)}


def latent_side(size: str, stage: str) -> int:
  """The side of the latents a diffusion stage of `size` trains on."""
  pixels = _PIXELS[size][1 if stage == 'dit' else 0]
  return pixels // 2 ** (len(_VAE[size][0]) - 1)


def _numerics(m: ml_collections.ConfigDict, size: str, *, unet: bool):
  common.model_numerics(m, 'paper' if size == 'paper' else 'tiny', unet=unet)


def _autoencoder_model(size: str) -> ml_collections.ConfigDict:
  channels, blocks, groups = _VAE[size]
  m = ml_collections.ConfigDict()
  m.name = 'autoencoder'
  m.image_size = _PIXELS[size][0]
  m.in_channels = 3
  m.out_channels = 3
  m.block_out_channels = channels
  m.layers_per_block = blocks
  m.latent_channels = LATENT_CHANNELS
  m.norm_num_groups = groups
  m.use_quant_conv = True
  m.use_post_quant_conv = True
  m.mid_block_add_attention = True
  # the latent space the diffusion stages read it in (autoencoder.scaling_factor overrides):
  # SD's at paper size; set it to 1 / std of the trained latents before training on them
  m.scaling_factor = 0.18215 if size == 'paper' else 1.0
  m.sample_size = m.image_size
  m.dtype = 'float32'  # an autoencoder trains in float32 (its KL and log-variances)
  m.param_dtype = 'float32'
  m.cpu_kernels = size != 'paper'
  return m


def _diffusion_model(stage: str, size: str) -> ml_collections.ConfigDict:
  paper = size == 'paper'
  _, clip_width, _, clip_len = _CLIP[size]
  m = ml_collections.ConfigDict()
  m.image_size = latent_side(size, stage)  # the latents', not the images'
  m.in_channels = LATENT_CHANNELS
  m.out_channels = LATENT_CHANNELS
  m.learned_variance = False
  m.text_source = 'tokens'  # the frozen CLIP text tower's last hidden states
  m.text_len = clip_len
  m.text_dim = clip_width
  if stage == 'dit':
    patch, hidden, depth, heads = _DIT[size]
    m.name = 'dit'
    m.patch_size = patch
    m.hidden_size = hidden
    m.depth = depth
    m.num_heads = heads
    m.adaln = 'single'
    _numerics(m, size, unet=False)
    m.cpu_kernels = size != 'paper'
    return m
  channels, mults, blocks, attention, head_channels = _UNET[size]
  m.name = 'unet'
  m.model_channels = channels
  m.channel_mult = mults
  m.num_res_blocks = blocks
  m.attention_resolutions = attention
  m.num_heads = 1
  m.head_channels = head_channels
  m.norm_groups = min(32, channels)
  # Stable Diffusion 2's U-Net: transformer blocks (self-attention, cross-attention to the
  # CLIP tokens as they are, GEGLU MLP; linear projections), plain res blocks and resampling
  m.attention_block = 'transformer'
  m.transformer_depth = 1
  m.linear_projection = True
  m.attention_upcast = paper
  m.project_text = False
  m.text_mask_keys = False  # every token is visible, padding too
  # a dropped caption reads the empty prompt's encoding (SD), or learned null tokens where
  # the random tiny CLIP has no tokenizer of its own to encode the empty prompt with
  m.learned_null_text = not paper
  m.learned_null_tokens = not paper
  m.text_pool = 'none'
  m.use_scale_shift_norm = False
  m.resblock_updown = False
  m.time_embed_shift = -1.0  # t = (k + 1) / T embeds step k, as SD's U-Net
  m.dropout = 0.0
  _numerics(m, size, unet=True)
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, stage='unet', size='tiny', net='unet')
  common.check_choice('stage', a.stage, STAGES)
  common.check_choice('size', a.size, SIZES)
  if a.stage == 'cascade':
    return _cascade_config(a)
  stage, size = a.stage, a.size
  paper = size == 'paper'
  c = common.base_config()
  c.family = 'latent'
  c.stage = stage
  c.size = size
  preset, clip_width, clip_dim, clip_len = _CLIP[size]

  c.input = ml_collections.ConfigDict()
  c.input.image_size = _PIXELS[size][1 if stage == 'dit' else 0]  # pixels
  c.input.low_res_size = None
  c.input.batch_size = {'tiny': 8, 'small': 32, 'paper': 2048}[size]
  c.input.dataset = 'coco_captions' if paper else 'shapes'
  c.input.modules = () if paper else ('projects.shapes.data',)  # registers 'shapes'
  c.input.text_max_len = clip_len

  c.text_encoder = ml_collections.ConfigDict()
  c.text_encoder.name = None if stage == 'autoencoder' else 'clip'
  c.text_encoder.preset = None if stage == 'autoencoder' else preset
  c.text_encoder.width = clip_width
  c.text_encoder.embed_dim = clip_dim
  c.text_encoder.text_len = clip_len
  c.text_encoder.path = None  # None: random init (tests, demo); else a transformers-layout dir
  c.text_encoder.tokenizer_path = None
  c.text_encoder.tokenizer_style = 'clip'
  c.text_encoder.max_length = clip_len
  c.text_encoder.dtype = 'bfloat16' if paper else 'float32'
  c.text_encoder.seed = 0

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = 'scaled_linear'  # LDM's betas, sqrt-linear over 1000 steps
  c.diffusion.beta_start = 0.00085
  c.diffusion.beta_end = 0.012
  c.diffusion.shift = 1.0
  c.diffusion.num_timesteps = 1000
  c.diffusion.parameterization = 'eps'
  c.diffusion.learned_variance = False
  c.diffusion.vlb_weight = 0.0
  c.diffusion.loss_weighting = 'none'
  c.diffusion.cond_drop_text = 0.0 if stage == 'autoencoder' else 0.1
  c.diffusion.cond_drop_image = 0.0
  c.diffusion.noise_aug = False

  c.sampler = ml_collections.ConfigDict()
  c.sampler.name = 'ddim'
  c.sampler.num_steps = 50 if paper else 16
  c.sampler.eta = 0.0
  c.sampler.guidance_scale = 1.0 if stage == 'autoencoder' else 7.5
  c.sampler.threshold = 'none'  # latents are not bounded like pixels
  c.sampler.percentile = 99.5
  c.sampler.aug_level = 0.0

  if stage == 'autoencoder':
    c.model = _autoencoder_model(size)
    c.objective = 'autoencoder'
    c.target = 'image'
    c.loss = ml_collections.ConfigDict()
    c.loss.reconstruction = 'l1'  # 'l1' or 'l2', per pixel
    c.loss.kl_weight = 1e-6       # LDM's KL-f8 weight on KL(posterior || N(0, 1))
    if paper:  # LDM's KL-f8: 12 images on each of 8 GPUs, learning rate 4.5e-6 per image
      c.input.batch_size = 96
    c.optimizer = common.optimizer_config(name='adamw', lr=4.5e-6 * 96 if paper else 1e-3,
                                          paper=paper)
  else:
    c.model = _diffusion_model(stage, size)
    c.objective = 'diffusion'
    c.target = 'image'
    c.autoencoder = ml_collections.ConfigDict()
    # a diffusers AutoencoderKL folder, a pipeline directory with vae/, or a trained
    # autoencoder stage (its EMA weights); None: the `autoencoder` stage beside this one
    c.autoencoder.path = None
    c.autoencoder.sample_posterior = True  # train on posterior samples (False: its mean)
    c.autoencoder.scaling_factor = None    # None: the autoencoder's own latent space
    c.autoencoder.shift_factor = None
    c.optimizer = common.optimizer_config(name='adamw', lr=1e-4 if paper else 1e-3,
                                          paper=paper)

  c.total_steps = {'autoencoder': 500_000, 'unet': 1_000_000, 'dit': 400_000}[stage] \
      if paper else 200
  c.mesh = common.mesh_config(data=1, fsdp=-1) if paper else common.mesh_config()
  return common.finalize(c)


def _cascade_config(a) -> ml_collections.ConfigDict:
  """The sampling pipeline of a trained diffusion stage (`net`: unet or dit), which decodes
  with the autoencoder it trained on (pipelines.latent.LatentCascade)."""
  common.check_choice('net', a.net, ('unet', 'dit'))
  return common.cascade_config('latent', 'configs/latent.py', a.size, get_config, (a.net,))

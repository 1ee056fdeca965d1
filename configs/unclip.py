"""unCLIP / DALL-E 2 (Ramesh et al. 2022): frozen CLIP, diffusion prior, GLIDE-like decoder and
two upsamplers.

Run a stage:
  python -m diffusion_jax.train --config=configs/unclip.py:stage=prior,size=tiny --workdir=/tmp/run/prior
  python -m diffusion_jax.train --config=configs/unclip.py:stage=decoder64,size=tiny --workdir=/tmp/run/decoder64
  python -m diffusion_jax.train --config=configs/unclip.py:stage=up256,size=tiny --workdir=/tmp/run/up256
  python -m diffusion_jax.train --config=configs/unclip.py:stage=up1024,size=tiny --workdir=/tmp/run/up1024

Without a pretrained CLIP (offline, tiny), train one first and point the prior and
decoder at its export (stage 1 of the recipe; see `clip_config`):
  python -m diffusion_jax.train --config=configs/unclip.py:stage=clip,size=tiny --workdir=/tmp/run/clip
  python -m diffusion_jax.tools.export_clip --workdir=/tmp/run/clip --out=/tmp/run/clip/export
  python -m diffusion_jax.train --config=configs/unclip.py:stage=prior,size=tiny \
      --config.text_encoder.path=/tmp/run/clip/export --workdir=/tmp/run/prior

Sizes: `tiny` (unit tests and smoke runs, < 1M parameters, 16-64 px, on the Shapes dataset of
`projects.shapes`), `paper` (published: prior 1B, decoder 3.5B, upsamplers 700M and 300M;
hyperparameters of the paper's Table 3, Appendix C; on COCO captions).
"""
from __future__ import annotations

import ml_collections

from configs import common
from diffusion_jax.errors import InputError
from diffusion_jax.models import prior, unet

STAGES = ('clip', 'prior', 'decoder64', 'up256', 'up1024', 'cascade')
MODEL_STAGES = ('prior', 'decoder64', 'up256', 'up1024')

_RES = {
    'tiny': {'decoder64': (16, None), 'up256': (32, 16), 'up1024': (64, 32)},
    'paper': {'decoder64': (64, None), 'up256': (256, 64), 'up1024': (1024, 256)},
}
# frozen CLIP: preset, text width, embedding dim, context
_CLIP = {'tiny': ('tiny', 32, 32, 16), 'paper': ('vit_h14', 1024, 1024, 77)}
# decoder's own (GLIDE) text transformer over the CLIP tokenizer's ids: vocab (>= the
# tokenizer's), context, width, layers, heads
_XF = {'tiny': (64, 16, 32, 2, 2), 'paper': (50257, 256, 2048, 24, 32)}


def _model(stage: str, size: str) -> ml_collections.ConfigDict:
  _, clip_width, clip_dim, clip_len = _CLIP[size]
  m = ml_collections.ConfigDict()
  if stage == 'prior':
    m.name = 'prior'
    m.embed_dim = clip_dim
    m.text_len = clip_len
    m.text_dim = clip_width
    m.text_embed_dim = clip_dim
    m.update(prior.PRESETS[f'unclip_prior_{size}'])
    m.mlp_ratio = 4
    m.dropout = 0.0
    common.model_numerics(m, size, unet=False)
    return m

  res, low = _RES[size][stage]
  m.name = 'unet'
  m.image_size = res
  m.in_channels = 3
  m.out_channels = 3
  m.use_scale_shift_norm = True
  m.resblock_updown = True
  common.model_numerics(m, size)
  if stage == 'decoder64':
    vocab, ctx, width, depth, heads = _XF[size]
    m.learned_variance = True
    m.text_source = 'transformer'
    m.text_len = ctx
    m.vocab_size = vocab
    m.xf_width = width
    m.xf_layers = depth
    m.xf_heads = heads
    m.text_attention = 'concat_kv'
    m.image_embed_dim = clip_dim  # added to the time embedding and 4 extra context tokens
    m.image_embed_tokens = 4
    m.update(unet.PRESETS[f'unclip_decoder_{size}'])
    return m

  # Upsamplers: convolutions only (no attention, no text), conditioned on the low-res image.
  m.learned_variance = False
  m.low_res_size = low
  m.attention_resolutions = ()
  m.mid_attention = False
  m.num_heads = 1
  m.head_channels = -1
  m.update(unet.PRESETS['unclip_up_tiny' if size == 'tiny' else f'unclip_{stage}_paper'])
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, upto='', stage='prior', size='tiny')
  common.check_choice('stage', a.stage, STAGES)
  common.check_choice('size', a.size, common.SIZES)
  if a.stage == 'cascade':
    return _cascade_config(a)
  if a.stage == 'clip':
    if a.size == 'paper':
      raise InputError('stage=clip trains a small CLIP for size=tiny only; at paper size use a '
                       'pretrained CLIP: --config.text_encoder.path=DIR (a transformers '
                       'CLIPModel directory)')
    return clip_config(get_config(f'stage=decoder64,size={a.size}'), _CLIP[a.size][0])
  stage, size = a.stage, a.size
  paper = size == 'paper'
  c = common.base_config()
  c.family = 'unclip'
  c.stage = stage
  c.size = size
  c.model = _model(stage, size)
  c.objective = 'diffusion'
  # the prior denoises CLIP image embeddings, the other stages images
  c.target = 'image_embed' if stage == 'prior' else 'image'
  preset, clip_width, clip_dim, clip_len = _CLIP[size]

  c.input = ml_collections.ConfigDict()
  if stage == 'prior':
    c.input.image_size = {'tiny': 16, 'paper': 224}[size]  # CLIP image input
    c.input.low_res_size = None
  else:
    c.input.image_size, c.input.low_res_size = _RES[size][stage]
  c.input.batch_size = 8 if size == 'tiny' else {
      'prior': 4096, 'decoder64': 2048, 'up256': 1024, 'up1024': 512}[stage]
  c.input.dataset = 'coco_captions' if paper else 'shapes'
  c.input.modules = () if paper else ('projects.shapes.data',)  # registers 'shapes'
  # Corruption of the SR stages' low-res input: Gaussian blur (64->256), BSR (256->1024).
  c.input.low_res_degradation = {'up256': 'blur', 'up1024': 'bsr'}.get(stage, 'none')
  # The 256->1024 upsampler trains on random crops a quarter of the target size (the
  # unCLIP paper); convolutions only, it samples whole images.
  c.input.train_crop_size = 256 if (paper and stage == 'up1024') else None
  c.input.text_max_len = c.model.get('text_len', clip_len)

  c.text_encoder = ml_collections.ConfigDict()
  c.text_encoder.name = 'clip' if stage in ('prior', 'decoder64') else None
  c.text_encoder.preset = preset if stage in ('prior', 'decoder64') else None
  c.text_encoder.width = clip_width
  c.text_encoder.embed_dim = clip_dim
  c.text_encoder.text_len = clip_len
  c.text_encoder.path = None  # None: random init (tests, demo); else a transformers-layout dir
  c.text_encoder.tokenizer_path = None
  c.text_encoder.image_path = None  # a CLIP image tower beside a text-only `path` (Karlo's)
  c.text_encoder.raw_embeddings = False  # True: CLIP embeddings as they are (Karlo's networks)
  c.text_encoder.max_length = clip_len  # the CLIP text tower's context
  c.text_encoder.dtype = 'bfloat16' if paper else 'float32'
  c.text_encoder.seed = 0

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = 'linear' if stage == 'up1024' else 'squaredcos_cap_v2'
  c.diffusion.shift = 1.0
  c.diffusion.num_timesteps = 1000
  c.diffusion.parameterization = 'x0' if stage == 'prior' else 'eps'  # the prior predicts x0
  c.diffusion.learned_variance = stage == 'decoder64'
  c.diffusion.vlb_weight = 0.001 if stage == 'decoder64' else 0.0
  c.diffusion.loss_weighting = 'none'
  c.diffusion.cond_drop_text = {'prior': 0.1, 'decoder64': 0.5}.get(stage, 0.0)
  c.diffusion.cond_drop_image = 0.1 if stage == 'decoder64' else 0.0
  c.diffusion.noise_aug = False
  # the upsamplers are trained on corrupted low-res inputs (Sec. 2.1)

  c.sampler = ml_collections.ConfigDict()
  # Table 3: prior 64 steps, decoder 250, upsamplers 27 and 15 (DDIM for the upsamplers).
  c.sampler.name = 'ddim' if stage in ('up256', 'up1024') else 'ddpm'
  c.sampler.num_steps = (16 if size == 'tiny' else
                         {'prior': 64, 'decoder64': 250, 'up256': 27, 'up1024': 15}[stage])
  c.sampler.eta = 0.0 if stage in ('up256', 'up1024') else 1.0
  c.sampler.guidance_scale = {'prior': 4.0, 'decoder64': 3.0}.get(stage, 1.0)
  c.sampler.threshold = 'none' if stage == 'prior' else 'static'
  c.sampler.percentile = 99.5
  c.sampler.aug_level = 0.0
  c.sampler.best_of = 2 if stage == 'prior' else 1  # prior: keep the larger dot product

  c.optimizer = common.optimizer_config(
      name='adamw',
      lr=({'prior': 1.1e-4, 'decoder64': 1.2e-4, 'up256': 1.2e-4, 'up1024': 1e-4}[stage]
          if paper else 1e-3),
      paper=paper,
      b2=0.96 if stage == 'prior' else 0.999,
      weight_decay=6.0e-2 if stage == 'prior' else 0.0)

  c.total_steps = ({'prior': 600_000, 'decoder64': 800_000, 'up256': 1_000_000,
                    'up1024': 1_000_000}[stage] if paper else 200)
  c.mesh = common.mesh_config(data=1, fsdp=-1) if paper else common.mesh_config()
  return common.finalize(c)


def clip_config(decoder: ml_collections.ConfigDict, preset_name: str) -> ml_collections.ConfigDict:
  """Stage 1 of unCLIP where no pretrained CLIP is at hand: the CLIP that the prior and the
  decoder use (`preset_name`, a `models.clip.PRESETS` entry), trained from scratch with
  CLIP's contrastive loss on clean images and their captions, by the same trainer as every
  other stage. `decoder`: the decoder64 config whose image size, data and optimizer it
  shares (changed in place). Export it with `diffusion_jax.tools.export_clip` and set the
  other stages' `text_encoder.path` to it.

    python -m diffusion_jax.train --config=configs/unclip.py:stage=clip,size=tiny --workdir=/tmp/run/clip
  """
  from diffusion_jax.models import clip  # the presets are the single source of the sizes
  c = decoder
  preset = clip.PRESETS[preset_name]
  c.stage = 'clip'
  c.objective = 'clip'
  c.target = 'image'
  c.model = ml_collections.ConfigDict({
      'name': 'clip', 'text': dict(preset['text']), 'vision': dict(preset['vision']),
      'embed_dim': preset['embed_dim'], 'dtype': 'float32', 'param_dtype': 'float32'})
  c.input.image_size = preset['vision']['image_size']
  c.input.low_res_size = None
  c.input.text_max_len = preset['text']['max_length']
  # The CLIP is what this stage trains, not a frozen encoder; its captions are tokenized in
  # CLIP's conventions (bos ... eos, padded with eos) like those of the stages that use it.
  c.text_encoder.name = None
  c.text_encoder.preset = None
  c.text_encoder.max_length = c.input.text_max_len
  c.text_encoder.tokenizer_style = 'clip'
  c.diffusion.cond_drop_text = 0.0
  c.diffusion.cond_drop_image = 0.0
  c.diffusion.learned_variance = False
  c.diffusion.vlb_weight = 0.0
  c.sampler.guidance_scale = 1.0
  return common.finalize(c)


def _cascade_config(a) -> ml_collections.ConfigDict:
  """The sampling cascade (diffusion_jax.pipelines): each stage's config arg, its directory
  under ROOT and its sampler settings. `upto=up1024` adds the optional last stage at tiny.

    python -m diffusion_jax.sample --config=configs/unclip.py:stage=cascade,size=tiny \
        --workdir=ROOT --prompt="a red circle"
  """
  size = a.size
  optional = ('up1024',) if a.upto == 'up1024' or size == 'paper' else ()
  return common.cascade_config('unclip', 'configs/unclip.py', size, get_config, ('prior', 'decoder64', 'up256') + optional)

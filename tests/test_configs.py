"""Stage configs: every stage x size parses and builds, sizes stay in their budgets, the
sections the trainer reads carry the papers' values, and the cascade stages fit together."""
from __future__ import annotations

import importlib
import math

import jax
import flax.linen as nn
import pytest

from configs import common
from diffusion_jax import models
from diffusion_jax.diffusion import losses

FAMILIES = ('imagen', 'glide', 'unclip', 'latent')
SCHEDULES = ('cosine', 'shifted_cosine', 'linear', 'scaled_linear', 'squaredcos_cap_v2')
CASCADES = {'imagen': ('base64', 'sr256', 'sr1024'), 'glide': ('base64', 'up256'),
            'unclip': ('decoder64', 'up256', 'up1024')}


def family(name):
  return importlib.import_module(f'configs.{name}')


def sizes(name):
  return getattr(family(name), 'SIZES', common.SIZES)


ALL = [(f, s, z) for f in FAMILIES for s in family(f).MODEL_STAGES for z in sizes(f)]


def n_params(model_cfg):
  module = models.build(model_cfg)
  x, t, c = models.example_inputs(model_cfg, 1)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x, t, c))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes))


@pytest.mark.parametrize('fam,stage,size', ALL)
def test_config_sections_and_consistency(fam, stage, size):
  c = family(fam).get_config(f'stage={stage},size={size}')
  assert (c.family, c.stage, c.size) == (fam, stage, size)
  for section in ('model', 'input', 'text_encoder', 'diffusion', 'sampler', 'optimizer', 'mesh'):
    assert section in c, f'{fam}/{stage}/{size}: missing section {section!r}'
  m, d = c.model, c.diffusion
  assert d.schedule in SCHEDULES, f'unknown schedule {d.schedule}'
  assert d.parameterization in ('eps', 'x0', 'v')
  assert d.loss_weighting in losses.WEIGHTINGS
  assert c.sampler.name in ('ddpm', 'ddim', 'dpmpp_2m')
  assert c.sampler.threshold in ('none', 'static', 'dynamic')
  assert c.optimizer.name in ('adamw', 'adafactor')
  # tiny trains on the Shapes project's dataset (registered by the module it names), paper on
  # COCO (the library's own).
  if size == 'paper':
    assert (c.input.dataset, tuple(c.input.modules)) == ('coco_captions', ())
  else:
    assert (c.input.dataset, tuple(c.input.modules)) == ('shapes', ('projects.shapes.data',))
  assert c.input.batch_size > 0
  assert m.get('learned_variance', False) == d.learned_variance
  assert (d.vlb_weight > 0) == d.learned_variance, 'the hybrid loss goes with a learned variance'
  if m.name == 'prior':
    assert m.embed_dim == c.text_encoder.embed_dim, 'prior x width != CLIP embedding dim'
    assert m.text_dim == c.text_encoder.width, 'prior token width != CLIP text width'
    assert m.text_embed_dim == c.text_encoder.embed_dim
  elif 'autoencoder' in c:  # a latent stage: the network is built for the latents
    assert m.image_size == family(fam).latent_side(size, stage) < c.input.image_size
  else:
    assert c.input.image_size == m.image_size
    assert (c.input.low_res_size or 0) == m.get('low_res_size', 0)
    if m.get('text_source') == 'tokens':
      assert m.text_dim == c.text_encoder.width, 'T5 width and model text_dim disagree'
    if m.get('image_embed_dim', 0):
      assert m.image_embed_dim == c.text_encoder.embed_dim, 'CLIP embed dim disagrees'
  if m.get('text_len'):
    assert c.input.text_max_len == m.text_len
  if size == 'paper' and m.name != 'autoencoder':  # an autoencoder trains in float32
    assert m.dtype == 'bfloat16' and m.param_dtype == 'float32'
    # The AOT memory table was measured with XLA's own conv weight gradients and attention.
    assert not m.get('cpu_kernels', False), 'paper size must use the accelerators\' kernels'
  assert isinstance(models.build(m), nn.Module)


@pytest.mark.parametrize('fam', FAMILIES)
def test_tiny_budget(fam):
  for stage in family(fam).MODEL_STAGES:
    tiny = n_params(family(fam).get_config(f'stage={stage},size=tiny').model)
    assert tiny < 1_000_000, f'{fam}/{stage} tiny has {tiny} params (budget < 1M)'


def test_sizes_are_tiny_and_paper():
  assert common.SIZES == ('tiny', 'paper')
  for fam in FAMILIES:
    with pytest.raises(ValueError, match=f"size='shapes' is not one of {', '.join(sizes(fam))}"):
      family(fam).get_config(f'stage={family(fam).MODEL_STAGES[0]},size=shapes')


def test_paper_values():
  imagen = family('imagen').get_config('stage=base64,size=paper')
  assert imagen.diffusion.cond_drop_text == 0.1 and imagen.diffusion.schedule == 'cosine'
  assert imagen.text_encoder.name == 't5' and imagen.text_encoder.preset == 'xxl'
  assert imagen.text_encoder.width == 4096
  assert imagen.sampler.threshold == 'dynamic' and imagen.sampler.percentile == 99.5
  assert imagen.optimizer.name == 'adafactor' and imagen.optimizer.ema_decay == 0.9999
  sr = family('imagen').get_config('stage=sr256,size=paper')
  assert sr.diffusion.noise_aug and sr.model.aug_cond and sr.optimizer.name == 'adamw'
  glide = family('glide').get_config('stage=base64,size=paper')
  assert glide.diffusion.cond_drop_text == 0.2 and glide.diffusion.learned_variance
  assert glide.diffusion.schedule == 'squaredcos_cap_v2' and glide.diffusion.vlb_weight == 0.001
  assert glide.text_encoder.name is None and glide.model.xf_width == 2048
  assert glide.model.xf_layers == 24
  inpaint = family('glide').get_config('stage=inpaint64,size=paper')
  assert inpaint.model.inpaint and not glide.model.inpaint
  dec = family('unclip').get_config('stage=decoder64,size=paper')
  assert dec.diffusion.cond_drop_text == 0.5 and dec.diffusion.cond_drop_image == 0.1
  assert dec.model.image_embed_tokens == 4 and dec.text_encoder.preset == 'vit_h14'
  assert dec.text_encoder.width == 1024 and dec.text_encoder.embed_dim == 1024
  prior = family('unclip').get_config('stage=prior,size=paper')
  assert prior.diffusion.parameterization == 'x0' and prior.sampler.best_of == 2
  assert prior.target == 'image_embed' and dec.target == 'image' and imagen.target == 'image'
  assert [family('unclip').get_config(f'stage={s},size=paper').sampler.num_steps
          for s in ('prior', 'decoder64', 'up256', 'up1024')] == [64, 250, 27, 15]
  up = family('unclip').get_config('stage=up1024,size=paper')
  assert up.model.attention_resolutions == () and not up.model.mid_attention


@pytest.mark.parametrize('fam', tuple(CASCADES))
@pytest.mark.parametrize('size', common.SIZES)
def test_cascade_stages_chain(fam, size):
  stages = [family(fam).get_config(f'stage={s},size={size}') for s in CASCADES[fam]]
  for lo, hi in zip(stages, stages[1:]):
    assert hi.model.low_res_size == lo.model.image_size, (
        f'{fam}/{size}: {hi.stage} expects {hi.model.low_res_size} px from {lo.stage} '
        f'which makes {lo.model.image_size} px')


@pytest.mark.parametrize('fam', FAMILIES)
def test_bad_arguments_are_refused(fam):
  mod = family(fam)
  with pytest.raises(ValueError, match='stage'):
    mod.get_config('stage=nonsense')
  with pytest.raises(ValueError, match='size'):
    mod.get_config(f'stage={mod.MODEL_STAGES[0]},size=huge')
  with pytest.raises(ValueError, match='unknown config arg'):
    mod.get_config('stgae=base64')


@pytest.mark.parametrize('fam', FAMILIES)
def test_docstring_has_run_command_for_every_stage(fam):
  doc = family(fam).__doc__
  for stage in family(fam).MODEL_STAGES:
    cmd = f'python -m diffusion_jax.train --config=configs/{fam}.py:stage={stage},size=tiny'
    assert cmd in doc, f'configs/{fam}.py docstring lacks the run command for {stage}'


def test_model_config_typo_is_refused():
  c = family('imagen').get_config('stage=base64,size=tiny')
  c.model.model_chanels = 8
  with pytest.raises(ValueError, match='model_chanels'):
    models.build(c.model)
  c = family('imagen').get_config('stage=base64,size=tiny')
  c.model.name = 'nonexistent'
  with pytest.raises(ValueError, match='unknown model name'):
    models.build(c.model)

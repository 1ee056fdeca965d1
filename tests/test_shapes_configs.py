"""The Shapes project's configs (projects/shapes/configs): the `shapes` size of each family,
built on the library's `tiny` configs, and what the demo trains from them."""
from __future__ import annotations

import importlib
import math

import flax.linen as nn
import jax
import pytest

from diffusion_jax import config_util, models
from projects.shapes import demo

FAMILIES = ('imagen', 'glide', 'unclip')
CHAINS = {'imagen': ('base64', 'sr256', 'sr1024'), 'glide': ('base64', 'up256'),
          'unclip': ('decoder64', 'up256', 'up1024')}


def project(fam):
  return importlib.import_module(f'projects.shapes.configs.{fam}')


def library(fam):
  return importlib.import_module(f'configs.{fam}')


def n_params(model_cfg):
  module = models.build(model_cfg)
  x, t, c = models.example_inputs(model_cfg, 1)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x, t, c))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes))


@pytest.mark.parametrize('fam', FAMILIES)
def test_every_stage_builds_on_shapes_data(fam):
  for stage in library(fam).STAGES:
    if stage == 'cascade':
      continue
    c = project(fam).get_config(f'stage={stage}')
    assert (c.family, c.stage, c.size) == (fam, stage, 'shapes')
    assert c.input.dataset == 'shapes' and tuple(c.input.modules) == ('projects.shapes.data',)
    assert c.input.batch_size == 16 and c.total_steps == 2000
    assert c == project(fam).get_config(f'stage={stage},size=shapes'), 'size=shapes is the default'
    if c.objective == 'diffusion' and c.target == 'image':
      assert c.diffusion.parameterization == 'v', f'{fam}/{stage}: the CPU stages predict v'
      assert c.input.image_size == c.model.image_size
      assert (c.input.low_res_size or 0) == c.model.get('low_res_size', 0)
      assert c.input.text_max_len == c.model.get('text_len', c.input.text_max_len)
  with pytest.raises(ValueError, match='size'):
    project(fam).get_config('size=tiny')
  with pytest.raises(ValueError, match='stage'):
    project(fam).get_config('stage=nonsense')


@pytest.mark.parametrize('fam', FAMILIES)
def test_budgets_and_chains(fam):
  stages = [project(fam).get_config(f'stage={s}') for s in CHAINS[fam]]
  for lo, hi in zip(stages, stages[1:]):
    assert hi.model.low_res_size == lo.model.image_size, (hi.stage, lo.stage)
  assert stages[0].model.image_size == 32, 'the demo samples its first image stage at 32 px'
  for stage in library(fam).MODEL_STAGES:
    n = n_params(project(fam).get_config(f'stage={stage}').model)
    assert 1_000_000 <= n <= 10_000_000, f'{fam}/{stage} shapes has {n} params'


@pytest.mark.parametrize('fam', FAMILIES)
def test_cascade_entries_name_the_project_config(fam):
  upto = {'imagen': ',upto=sr1024', 'unclip': ',upto=up1024', 'glide': ''}[fam]
  cascade = project(fam).get_config('stage=cascade' + upto)
  assert cascade.size == 'shapes' and cascade.order[-1] == CHAINS[fam][-1]
  for name in cascade.order + cascade.extra:
    entry = cascade.stages[name]
    assert entry.config_file == f'projects/shapes/configs/{fam}.py'
    # The entry loads by path (as the train command and the pipelines read it) into the
    # project's stage config, not the library's.
    stage_cfg = config_util.load_config(entry.config_file, entry.config_arg)
    assert stage_cfg == project(fam).get_config(f'stage={name}')
    assert entry.num_steps == stage_cfg.sampler.num_steps
    assert entry.threshold == (stage_cfg.sampler.get('threshold', 'none') or 'none')


def test_demo_trains_and_samples_the_project_configs():
  plan = demo.default_plan('imagen')
  assert plan.size == 'shapes' and demo.config_module(plan) is project('imagen')
  base = demo.stage_config(plan, 'base64', 2750)
  want = project('imagen').get_config('stage=base64')
  # What the demo sets in code on top of the config, and nothing else.
  assert (base.total_steps, base.input.shapes_num_examples, base.input.shapes_seed,
          base.input.caption_rewrite) == (2750, plan.train_examples, plan.seed,
                                          'shapes_canonical')
  for section in ('model', 'diffusion', 'text_encoder'):
    assert base[section] == want[section], section
  # The fields the demo's results rest on (projects/shapes/configs/README.md).
  m = base.model
  assert (m.image_size, m.text_attention, m.coord_channels, m.text_position_embed,
          tuple(m.text_only_resolutions)) == (32, 'cross', True, True, (16,))
  assert base.diffusion.loss_weighting == 'min_snr' and base.optimizer.decay == 'cosine'
  assert base.sampler.threshold == 'static'
  sr = demo.stage_config(plan, 'sr256', 600)
  assert (sr.input.train_crop_size, sr.diffusion.noise_aug_max, sr.input.image_size) == (
      32, 0.3, 64)
  cascade = demo.cascade_config(plan)
  assert {cascade.stages[s].config_file for s in plan.order} == {
      'projects/shapes/configs/imagen.py'}
  unclip = demo.default_plan('unclip')
  clip = demo.stage_config(unclip, 'clip', 600, '/root')
  prior = demo.stage_config(unclip, 'prior', 1000, '/root')
  assert clip.model.embed_dim == prior.text_encoder.embed_dim == 64
  assert prior.text_encoder.path == '/root/clip/export', 'the prior reads the demo\'s own CLIP'

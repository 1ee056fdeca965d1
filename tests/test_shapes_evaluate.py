"""projects.shapes.evaluate: the Shapes alignment of a cascade on held-out captions, written in
the layout of the library's results and compared with them."""
from __future__ import annotations

import json
import os
import types

import ml_collections
import numpy as np

from diffusion_jax import evaluate as library_evaluate
from diffusion_jax import pipelines
from projects.shapes import alignment, shapes
from projects.shapes import evaluate


class _FakePipeline:
  """Renders each prompt exactly (Shapes) at `size`; records the guidance and the prompts it
  was asked for. Its stages read captions through `caption_rewrite`."""

  def __init__(self, size, caption_rewrite=None):
    self.size, self.guidance, self.prompts = size, [], []
    self.caption_rewrite = caption_rewrite

  def stage(self, name):
    del name
    return types.SimpleNamespace(config=ml_collections.ConfigDict(
        {'input': {'caption_rewrite': self.caption_rewrite}}))

  def generate(self, prompts, rng, **overrides):
    del rng
    self.guidance.append(overrides.get('guidance_scale'))
    self.prompts += list(prompts)
    return np.stack([shapes.render(p, self.size, seed=0) for p in prompts])


def _cascade():
  from projects.shapes.configs import imagen  # noqa: PLC0415
  return imagen.get_config('stage=cascade')


def test_alignment_per_guidance_scale_beside_the_library_results(tmp_path, monkeypatch):
  fake = _FakePipeline(64)
  monkeypatch.setattr(pipelines, 'load', lambda cfg, root: fake)
  config, root = _cascade(), str(tmp_path / 'root')
  results = evaluate.evaluate(config, root, guidance=[1.0, 4.0], samples=6,
                              train_examples=300, batch_size=4)
  assert sorted(results) == ['shapes_g1', 'shapes_g4']
  assert set(fake.guidance) == {1.0, 4.0}, 'the guidance scale must reach the pipeline'
  result = results['shapes_g4']
  assert result['alignment_all'] == 1.0 and result['heldout'] is True, result
  assert result['num_samples'] == 6 and result['metric'] == 'shapes_alignment'
  assert result['steps'] == {s: int(config.stages[s].num_steps) for s in config.order}
  with open(os.path.join(root, 'eval', 'shapes_g4', 'result.json')) as f:
    assert json.load(f) == result
  # The library's --compare tables a project's results as it does its own.
  out = str(tmp_path / 'cmp' / 'compare')
  compared = library_evaluate.compare([os.path.join(root, 'eval', '*', 'result.json')], out)
  assert sorted(r['name'] for r in compared) == ['shapes_g1', 'shapes_g4']
  with open(out + '.md') as f:
    table = f.read()
  assert 'shapes_g1' in table and '1.000' in table, table
  # Without guidance given, the first stage's own scale.
  fake.guidance.clear()
  evaluate.evaluate(config, root, samples=2, train_examples=300)
  assert fake.guidance == [config.stages[config.order[0]].guidance_scale]


def test_captions_are_held_out_as_the_first_stage_reads_them(tmp_path, monkeypatch):
  fake = _FakePipeline(32, caption_rewrite='shapes_canonical')
  monkeypatch.setattr(pipelines, 'load', lambda cfg, root: fake)
  results = evaluate.evaluate(_cascade(), str(tmp_path), guidance=[3.0], samples=40,
                              train_examples=3000, batch_size=20)
  assert results['shapes_g3']['caption_rewrite'] == 'shapes_canonical'
  said = shapes.canonical_caption
  seen = {said(c) for c in alignment.training_captions(0, 3000)}
  assert len(fake.prompts) == 40
  assert not [c for c in fake.prompts if said(c) in seen], (
      'evaluated a caption whose rewrite the first stage was trained on')


def test_falls_back_to_random_captions_when_training_saw_them_all():
  cfg = ml_collections.ConfigDict({'caption_rewrite': None})
  captions, rewrite, heldout = evaluate.captions_for(cfg, 5, caption_seed=0, train_seed=0,
                                                     train_examples=100_000)
  assert (len(captions), rewrite, heldout) == (5, None, False)
  assert all(shapes.parse(c) for c in captions)


def test_on_a_real_tiny_cascade(tmp_path):
  """End to end: tiny Imagen stages (the library's tiny configs train on Shapes) trained by
  the real trainer, sampled by the real pipelines and scored by the oracle."""
  import pipeline_fixtures  # the same module (and trained roots) the pipeline tests use
  root = pipeline_fixtures.trained_root('imagen', ('base64', 'sr256'))
  config = pipeline_fixtures.cascade_config('imagen', num_steps=2)
  results = evaluate.evaluate(config, root, samples=8, batch_size=8)
  (name, result), = results.items()
  assert name == f'shapes_g{config.stages.base64.guidance_scale:g}'
  assert result['num_samples'] == 8 and result['cascade'] == 'imagen:tiny'
  for key in ('alignment_all', 'alignment_color', 'alignment_shape', 'alignment_count'):
    assert 0.0 <= result[key] <= 1.0, f'{key} = {result.get(key)}'
  assert os.path.isfile(os.path.join(root, 'eval', name, 'result.json'))

"""The Shapes demo (projects.shapes.demo): captions, scoring, outputs, resume and re-run."""
import dataclasses
import json
import os

import numpy as np
import pytest

from projects.shapes import alignment, demo, shapes

import demo_fixtures


def test_caption_kinds_and_closed_sets():
  assert demo.caption_kind('a red circle') == 'single'
  assert demo.caption_kind('three blue squares') == 'count'
  assert demo.caption_kind('a red circle and two cyan diamonds') == 'conjunction'
  assert demo.caption_kind('a yellow square to the left of a purple circle') == 'relation'
  singles = demo.closed_captions('single')
  assert len(set(singles)) == 24 and all(demo.caption_kind(c) == 'single' for c in singles)
  counts = demo.closed_captions('count')
  assert len(set(counts)) == 48 and all(demo.caption_kind(c) == 'count' for c in counts)


def test_eval_captions_hold_out_multi_object_captions():
  per_kind = {'single': 24, 'count': 6, 'conjunction': 10, 'relation': 10}
  caps = demo.eval_captions(per_kind, train_seed=0, train_examples=2000)
  assert caps == demo.eval_captions(per_kind, train_seed=0, train_examples=2000), \
      'the evaluation captions must be a fixed set'
  kinds = [demo.caption_kind(c) for c in caps]
  assert kinds == sorted(kinds, key=demo.KINDS.index), 'captions must come grouped by kind'
  assert {k: kinds.count(k) for k in demo.KINDS} == per_kind
  assert set(caps[:24]) == set(demo.closed_captions('single')), \
      '24 single-object captions must cover every colour x shape once'
  seen = alignment.training_captions(0, 2000)
  multi = [c for c in caps if demo.caption_kind(c) in ('conjunction', 'relation')]
  assert len(set(multi)) == len(multi), 'held-out captions must be distinct'
  assert not set(multi) & seen, 'a held-out caption appears in the training set'


def test_eval_captions_are_held_out_after_the_caption_rewrite():
  per_kind = {'relation': 40}
  caps = demo.eval_captions(per_kind, train_seed=0, train_examples=2000,
                            rewrite=shapes.canonical_caption)
  said = [shapes.canonical_caption(c) for c in caps]
  seen = {shapes.canonical_caption(c) for c in alignment.training_captions(0, 2000)}
  assert not set(said) & seen, 'a held-out caption says a training scene in other words'
  assert len(set(said)) == len(said), 'two held-out captions say the same scene'
  assert caps != demo.eval_captions(per_kind, train_seed=0, train_examples=2000), \
      'the rewrite must narrow what counts as held out'
  assert {shapes.parse(c).relation[0] for c in caps} == set(shapes.RELATIONS), \
      'the captions themselves keep all four relations'


def test_rates_by_kind_on_ground_truth_and_on_wrong_captions():
  caps = demo.eval_captions({'single': 8, 'count': 4, 'conjunction': 4, 'relation': 8},
                            train_seed=0, train_examples=1000)
  images = np.stack([shapes.render(c, 64, seed=i) for i, c in enumerate(caps)])
  right = demo.rates_by_kind(images, caps)
  for kind in demo.KINDS:
    assert right[kind]['all'] == 1.0, f'oracle misjudges rendered {kind} captions: {right[kind]}'
  assert right['relation']['n_relation'] == 8 and right['single']['n_relation'] == 0
  assert right['single']['relation'] is None, 'no relation rate without relations (no NaN)'
  assert right['overall']['n'] == len(caps)
  # Every image scored against a caption of another colour: nothing may pass.
  colors = list(shapes.COLORS)
  wrong = []
  for c in caps:
    scene = shapes.parse(c)
    g = scene.groups[0]
    other = colors[(colors.index(g.color) + 1) % len(colors)]
    others = [x.color for x in scene.groups]
    while other in others:
      other = colors[(colors.index(other) + 1) % len(colors)]
    groups = (dataclasses.replace(g, color=other),) + scene.groups[1:]
    wrong.append(shapes.caption_of(dataclasses.replace(scene, groups=groups)))
  bad = demo.rates_by_kind(images, wrong)
  assert bad['overall']['all'] == 0.0 and bad['overall']['color'] == 0.0, bad['overall']


def test_captioned_grid_layout():
  images = np.zeros((5, 16, 16, 3), np.uint8)
  grid = demo.captioned_grid(images, ['a red circle'] * 5, columns=4, scale=2)
  assert grid.dtype == np.uint8 and grid.shape[2] == 3
  assert grid.shape[1] == 4 * (32 + 4) + 4, 'four columns of 2x-enlarged images'
  # Two rows, each an image and at least one caption line.
  assert grid.shape[0] >= 2 * (32 + 11 + 4)
  assert (grid == 0).sum() >= 5 * 32 * 32 * 3, 'every enlarged image is on the grid'


def _tiny_plan(**kw):
  return demo_fixtures.tiny_plan('imagen', (('base64', 3), ('sr256', 2)), **kw)


@pytest.fixture(scope='module')
def tiny_demo(tmp_path_factory):
  return demo_fixtures.run_tiny_demo(tmp_path_factory, 'demo', _tiny_plan())


def test_demo_writes_samples_captions_and_alignment(tiny_demo):
  root, plan, result = tiny_demo
  with open(os.path.join(root, 'alignment.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  assert set(saved['rates']) == {'guidance_1', 'guidance_3'}, 'with and without guidance'
  for rates in saved['rates'].values():
    assert rates['overall']['n'] == 8 and rates['relation']['n'] == 3
  with open(os.path.join(root, 'samples', 'captions.json')) as f:
    captions = json.load(f)
  assert len(captions) == 8
  assert list(captions.values()) == demo.plan_eval_captions(plan)
  from PIL import Image
  images = np.stack([np.asarray(Image.open(os.path.join(root, 'samples', n)))
                     for n in captions])
  assert images.shape == (8, 32, 32, 3), 'the cascade output of the tiny SR stage is 32 px'
  # The written samples are the guided ones, and the saved rates are theirs.
  rescored = demo.rates_by_kind(images, list(captions.values()))
  assert rescored == json.loads(json.dumps(saved['rates']['guidance_3']))
  for stage, steps in plan.stages:
    assert sorted(os.listdir(os.path.join(root, stage, 'checkpoints')))[-1] == str(steps)
  assert os.path.exists(os.path.join(root, 'samples', 'grid.png'))


def test_demo_stages_read_captions_through_the_rewrite(tiny_demo):
  root, plan, _ = tiny_demo
  assert plan.caption_rewrite == 'shapes_canonical'
  from diffusion_jax import pipelines
  cascade = pipelines.load(demo.cascade_config(plan, root), root)
  said = 'a red circle to the right of a blue square'
  same = 'a blue square to the left of a red circle'
  for name in plan.order:
    stage = cascade.stage(name)
    ids, mask = stage.tokenize([said, same, 'a red circle to the left of a blue square'])
    assert (ids[0] == ids[1]).all() and (mask[0] == mask[1]).all(), \
        f'{name}: sampling must tokenize a caption as its stage was trained on it (rewritten)'
    assert not (ids[0] == ids[2]).all(), f'{name}: the rewrite lost the objects\' order'


def test_demo_rerun_is_cached_and_a_longer_plan_resumes(tiny_demo, monkeypatch, capsys):
  root, plan, result = tiny_demo
  from diffusion_jax.train import loop

  def no_training(*a, **k):
    raise AssertionError('a finished demo must not train again')
  monkeypatch.setattr(loop, 'train', no_training)
  assert demo.run(root, plan, parallel=1) == result
  assert 'already finished' in capsys.readouterr().out
  monkeypatch.undo()
  # A stage config's sampler settings are part of the finished run: changed, it samples
  # again (the trained stages return at their last checkpoint) rather than returning the
  # old scores.
  real_cascade_config = demo.cascade_config

  def unthresholded(*a, **k):
    c = real_cascade_config(*a, **k)
    c.stages['base64'].threshold = 'none'
    return c
  monkeypatch.setattr(demo, 'cascade_config', unthresholded)
  cached = set(os.listdir(os.path.join(root, 'demo_cache')))
  resampled = demo.run(root, plan, parallel=1)
  new_samples = set(os.listdir(os.path.join(root, 'demo_cache'))) - cached
  assert len(new_samples) == 2, f'both guidance scales sample anew, not from cache: {new_samples}'
  assert 'already finished' not in capsys.readouterr().out
  assert resampled['sampling']['base64']['threshold'] == 'none'
  assert result['sampling']['base64']['threshold'] != 'none'
  assert resampled['plan_hash'] != result['plan_hash']
  for stage, steps in plan.stages:
    assert sorted(os.listdir(os.path.join(root, stage, 'checkpoints')))[-1] == str(steps)
  monkeypatch.undo()
  # One more base step: the base stage resumes from its checkpoint (not from scratch).
  calls = []
  real_train = loop.train

  def spy(config, workdir, **kw):
    calls.append((os.path.basename(workdir), int(config.total_steps)))
    return real_train(config, workdir, **kw)
  monkeypatch.setattr(loop, 'train', spy)
  longer = dataclasses.replace(plan, stages=(('base64', 4), ('sr256', 2)))
  # In this process (parallel=1), so the spy sees the calls; the fixture's run trained both
  # stages at once in worker processes, and their checkpoints are what resumes here.
  out = demo.run(root, longer, parallel=1)
  assert calls == [('base64', 4), ('sr256', 2)]
  assert out['plan_hash'] != result['plan_hash']
  assert sorted(os.listdir(os.path.join(root, 'base64', 'checkpoints')))[-1] == '4'


def test_guided_samples_get_the_shape_pairs_and_unguided_ones_do_not(tmp_path):
  calls = []

  class FakePipe:
    def generate(self, prompts, rng, **kw):
      calls.append(kw)
      return np.zeros((len(prompts), 4, 4, 3), np.uint8)
  plan = demo.default_plan('imagen')
  assert plan.contrast_scale > 0, 'the imagen demo guides with the shape pairs'
  caps = ['a red circle', 'a red circle to the left of a blue square']
  for scale in (1.0, 3.0):
    demo.sample_setting(FakePipe(), plan, {}, caps, scale, str(tmp_path))
  unguided, guided = calls
  assert unguided == {'guidance_scale': 1.0}, f'the unguided samples got {unguided}'
  assert guided == {'guidance_scale': 3.0, 'contrast_scale': plan.contrast_scale,
                    'contrasts': [[], shapes.binding_contrasts(caps[1])]}, guided
  recorded = demo.sampling_settings(demo.cascade_config(plan))
  assert (recorded['base64']['contrast_scale'], recorded['sr256']['contrast_scale']) == (
      plan.contrast_scale, 0.0), f'alignment.json would record other pair weights: {recorded}'
  with pytest.raises(ValueError, match='contrast_scale'):
    demo.default_plan('glide', contrast_scale=1.0)


def test_demo_cli_refuses_unknown_family(capsys):
  from diffusion_jax import cli
  with pytest.raises(SystemExit) as exit_:
    cli.call(demo, ['--workdir=/nonexistent', '--family=dalle'])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'value should be one of <glide|imagen|unclip>' in err[0], err


def test_demo_process_samples_on_one_cpu_device_per_core_unless_xla_flags_say():
  import subprocess
  import sys
  import jax
  from diffusion_jax import parallel
  # Here conftest's XLA_FLAGS fixed 8 devices: the demo leaves them alone.
  assert parallel.use_cpu_devices(3) == -1 and jax.device_count() == 8
  for bad in (0, -2):  # refused whatever XLA_FLAGS say, not read as "one per core"
    with pytest.raises(ValueError, match='positive device count'):
      parallel.use_cpu_devices(bad)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  # Stripped: XLA reads a blank XLA_FLAGS as a file name (an xdist worker inherits the flag
  # from the controller's conftest and adds its own, so both copies are removed here).
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '').replace(
      '--xla_force_host_platform_device_count=8', '').strip()
  code = ('from diffusion_jax import parallel; import jax; n = parallel.use_cpu_devices(3); '
          'print(n, jax.device_count())')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, f'exit {out.returncode}: {out.stderr[-3000:]}'
  assert out.stdout.split() == ['3', '3'], out.stdout + out.stderr[-2000:]


def test_longest_stage_of_a_parallel_wave_trains_on_one_cpu_device_per_core():
  imagen = demo.default_plan('imagen')
  assert demo.worker_cpu_devices(imagen.stages, 16, cores=2) == {'base64': 2, 'sr256': 1}, \
      'the base (most steps) shards its batch over both cores, the SR stage keeps one device'
  wave = (('prior', 1000), ('decoder64', 1500))
  assert demo.worker_cpu_devices(wave, 16, cores=4) == {'prior': 1, 'decoder64': 4}
  assert demo.worker_cpu_devices(wave, 6, cores=4) == {'prior': 1, 'decoder64': 1}, \
      'a batch the cores do not divide stays on one device'


def test_stage_waves_train_clip_before_its_readers():
  imagen = demo.default_plan('imagen')
  assert demo.stage_waves(imagen) == [imagen.stages], 'base and SR depend on nothing'
  unclip = demo.default_plan('unclip')
  assert demo.stage_waves(unclip) == [(('clip', 600),), (('prior', 1000), ('decoder64', 1500))]


def test_progress_lines_show_rate_eta_and_loss(capsys):
  printer = demo._Printer('base64', total=100, every=50)
  for step in (1, 25, 50):  # the first call only starts the clock (it includes compilation)
    printer(step, None, None, {'loss': np.float32(0.25)})
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1, f'one line per 50 steps, none for the first step: {lines}'
  assert 'base64 step 50/100' in lines[0] and 'steps/s' in lines[0] and 'ETA' in lines[0]
  assert lines[0].endswith('loss 0.2500'), f'the progress line must show the loss: {lines[0]}'

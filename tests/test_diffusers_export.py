"""Fine-tuning from a DeepFloyd IF pipeline directory, and exporting the trained stage back to
the diffusers layout (`python -m diffusion_jax.tools.export`): diffusers' IFPipeline loads the
export and its U-Net gives our stage's output; our reader gives it back; stages diffusers cannot
express are refused in one line."""
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

import test_diffusers_if
from test_diffusers_if import PROMPTS, torch, diffusers  # noqa: F401 - skips without them
from configs import imagen
from test_train import _restore_raw, tiny_config

from diffusion_jax import cli, conditioning, pipelines
from diffusion_jax.diffusers_io import pipeline as dio_pipeline
from diffusion_jax.diffusers_io import scheduler as dio_scheduler
from diffusion_jax.tools import export as export_main
from diffusion_jax.train import loop

STAGE = 'if_base'
STEPS = 2


@pytest.fixture(scope='module')
def source():
  return test_diffusers_if.if_dir()


@pytest.fixture(scope='module')
def root(source, tmp_path_factory):
  """ROOT with one stage fine-tuned for STEPS steps from the IF directory: the tiny Imagen
  base's run (Shapes at 16 px, as the IF U-Net) whose network, schedule, T5 and text length
  are adopted from the source."""
  out = tmp_path_factory.mktemp('root')
  cfg = tiny_config(imagen, 'base64', total_steps=STEPS, ckpt_steps=STEPS, log_steps=1,
                    init_from=source)
  metrics = loop.train(cfg, str(out / STAGE))
  assert metrics['step'] == STEPS and np.isfinite(metrics['loss'])
  return str(out)


@pytest.fixture(scope='module')
def exported(root, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('exported'))
  cli.call(export_main, [f'--workdir={root}', f'--out={out}', f'--stages={STAGE}'])
  return os.path.join(out, STAGE)


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def test_finetuning_starts_from_the_if_weights_trains_and_saves_what_they_mean(source, root,
                                                                               tmp_path):
  want = dio_pipeline.read_tensors(source)  # the IF U-Net converted into our tree
  src = loop.read_init_source(source)
  cfg = loop.adopt_weight_fields(_imagen_tiny(), src.config, 'test')
  state = loop.init_state(loop.build_trainer(cfg, str(tmp_path), src), src)
  assert int(state.step) == 0
  for name, tree in (('params', state.params), ('ema_params', state.ema_params)):
    got = _flat(tree)
    assert sorted(got) == sorted(want), f'{name}: other tensors than the IF U-Net\'s'
    for key, value in got.items():
      assert np.array_equal(value, want[key]), f'{name}/{key} is not the IF tensor'
  # Training ran: STEPS steps, and the parameters left the IF values.
  step, trained, _ = _restore_raw(os.path.join(root, STAGE))
  assert step == STEPS
  params = traverse_util.flatten_dict(trained['params'], sep='/')
  moved = [k for k in want if not np.array_equal(params[k], want[k])]
  assert len(moved) >= 0.9 * len(want), f'only {len(moved)} of {len(want)} tensors trained'
  assert all(np.isfinite(v).all() for v in params.values())
  # The checkpoint's config says what the weights mean: the IF network, schedule and T5.
  stage = conditioning.restore_stage(os.path.join(root, STAGE))
  released = conditioning.config_from_saved(dio_pipeline.stage_config(source))
  assert stage.config.init_from == os.path.abspath(source)
  assert not conditioning.meaning_changes(released, stage.config), (
      conditioning.meaning_changes(released, stage.config))
  assert stage.config.model.text_pool == 'attention_query_key'
  assert stage.config.diffusion.schedule == 'squaredcos_cap_v2'
  assert stage.config.text_encoder.path == os.path.join(source, 'text_encoder')
  assert stage.config.input.image_size == 16 and stage.config.input.text_max_len == 77
  assert stage.config.input.dataset == 'shapes', "the run's own data was lost"


def _imagen_tiny():
  return imagen.get_config('stage=base64,size=tiny')


def _our_stage(root: str):
  """Our fine-tuned stage as sampling restores it from its checkpoint (EMA)."""
  saved = conditioning.restore_stage(os.path.join(root, STAGE)).config.to_dict()
  cascade = pipelines.pretrained_cascade_config('imagen', {STAGE: saved})
  cascade.stages[STAGE].use_ema = True
  return pipelines.load(cascade, root).stages[STAGE]


def test_the_export_loads_in_diffusers_and_gives_our_stage_output(root, exported):
  with open(os.path.join(exported, 'model_index.json')) as f:
    assert json.load(f)['_class_name'] == 'IFPipeline'
  ref = diffusers.IFPipeline.from_pretrained(exported, safety_checker=None,
                                             feature_extractor=None, watermarker=None,
                                             requires_safety_checker=False)
  ours = _our_stage(root)
  rng = np.random.default_rng(0)
  x_t = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  t = np.array([999, 17])
  got = ours.model_output(x_t, t, PROMPTS)
  with torch.no_grad():
    embeds, _ = ref.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                  clean_caption=False)
    want = ref.unet(torch.from_numpy(x_t.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    encoder_hidden_states=embeds).sample.numpy().transpose(0, 2, 3, 1)
  assert got.shape == want.shape == (2, 16, 16, 6)
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max())
  print(f'export vs diffusers: max |diff| {err:.3g}, output scale {scale:.3g}')
  np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)
  # Our reader gives the export back: the same parameters bit for bit, the same outputs up to
  # float32 summation order (the read-back stage runs on the released config's mesh).
  back = pipelines.from_pretrained(exported).stages[STAGE]
  ours_params, back_params = _flat(ours.params), _flat(back.params)
  assert sorted(ours_params) == sorted(back_params)
  assert all(np.array_equal(ours_params[k], back_params[k]) for k in ours_params)
  again = back.model_output(x_t, t, PROMPTS)
  print(f'read back vs ours: max |diff| {float(np.abs(again - got).max()):.3g}')
  np.testing.assert_allclose(again, got, atol=1e-5 * scale, rtol=0)
  # The scheduler says what our stage's noise process and sampler are.
  with open(os.path.join(exported, 'scheduler', 'scheduler_config.json')) as f:
    sched = json.load(f)
  d = dio_scheduler.diffusion_section(sched)
  assert (d['schedule'], d['num_timesteps'], d['learned_variance']) == (
      'squaredcos_cap_v2', 1000, True)
  s = dio_scheduler.sampler_section(sched, ours.config.sampler.num_steps)
  assert (s['name'], s['threshold'], s['spacing']) == ('ddpm', 'dynamic', 'trailing')


def test_scheduler_config_inverts_the_mapping_and_refuses_continuous_time():
  sched = dict(test_diffusers_if.IF_SCHEDULER, _class_name='DDPMScheduler')
  diffusion = dio_scheduler.diffusion_section(sched)
  sampler = dio_scheduler.sampler_section(sched, 100)
  back = dio_scheduler.scheduler_config(diffusion, sampler)
  assert dio_scheduler.diffusion_section(back) == diffusion
  assert dio_scheduler.sampler_section(back, 100) == sampler
  imagen = _imagen_tiny()
  with pytest.raises(Exception) as e:
    dio_scheduler.scheduler_config(imagen.diffusion.to_dict(), imagen.sampler.to_dict())
  assert 'diffusion.schedule' in str(e.value) and '\n' not in str(e.value)


@pytest.fixture(scope='module')
def imagen_root(tmp_path_factory):
  """ROOT with the tiny Imagen base trained 1 step (its own attention pooling, random T5)."""
  out = tmp_path_factory.mktemp('imagen_root')
  loop.train(tiny_config(imagen, 'base64', total_steps=1, ckpt_steps=1), str(out / 'base64'))
  return str(out)


def test_a_stage_diffusers_cannot_express_is_refused_in_one_line(imagen_root, tmp_path,
                                                                 capsys):
  with pytest.raises(SystemExit) as e:
    cli.call(export_main, [f'--workdir={imagen_root}', f'--out={tmp_path / "out"}'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err and err[-1].startswith("error: stage 'base64': "), err[-3:]
  # The first field diffusers cannot express is named (its time embedding, then its pooling).
  assert 'time_embed_shift 0.0 is not supported' in err[-1], err[-1]
  assert not os.path.exists(tmp_path / 'out' / 'base64' / 'unet'), 'wrote before refusing'


def test_bad_workdir_and_stage_names_are_one_line(root, tmp_path, capsys):
  for args, needle in (([f'--workdir={tmp_path / "nope"}'], 'no such directory'),
                       ([f'--workdir={root}', '--stages=sr256'], 'sr256 not trained')):
    with pytest.raises(SystemExit) as e:
      cli.call(export_main, [*args, f'--out={tmp_path / "out"}'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith('error: ') and needle in err[-1], err[-3:]

"""Fine-tuning Karlo's networks (`--config.init_from=KARLO/decoder`, `KARLO/super_res_last`)
with the trainer, and exporting them back into the Karlo layout (`tools/export`): the fresh
state is the released weights, the trainer conditions the decoder as the Karlo pipeline samples
it, diffusers' UnCLIPPipeline loads the export and its networks give our trained stages'
outputs, and our reader gives the export back."""
import os
import types

import jax
import numpy as np
import pytest
from flax import traverse_util

import karlo_fixtures
from configs import unclip
from karlo_fixtures import D, PROMPTS
from test_train import _restore_raw, tiny_config

from diffusion_jax import cli, conditioning, errors, pipelines
from diffusion_jax.diffusers_io import karlo
from diffusion_jax.tools import export as export_main
from diffusion_jax.train import __main__ as train_main
from diffusion_jax.train import loop

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

STEPS = 2
# Our stage -> (the run's tiny config stage, the Karlo component it starts from).
RUNS = {'decoder': ('decoder64', 'decoder'), 'super_res': ('up256', 'super_res_last')}


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """(the text pipeline, the image variation pipeline): diffusers objects and directories."""
  root = str(tmp_path_factory.mktemp('karlo'))
  return karlo_fixtures.text_pipeline(root), karlo_fixtures.variation_pipeline(root)


def _run_config(stage, sources, image_tower: bool = True):
  (_, text_dir), (_, variation_dir) = sources
  run_stage, component = RUNS[stage]
  cfg = tiny_config(unclip, run_stage, total_steps=STEPS, ckpt_steps=STEPS, log_steps=1,
                    init_from=os.path.join(text_dir, component))
  cfg.stage = stage
  if stage == 'decoder' and image_tower:  # the text pipeline has none: the variations' one
    cfg.text_encoder.image_path = os.path.join(variation_dir, 'image_encoder')
  return cfg


@pytest.fixture(scope='module')
def root(sources, tmp_path_factory):
  """ROOT/decoder and ROOT/super_res, each trained STEPS steps on Shapes from Karlo."""
  out = tmp_path_factory.mktemp('root')
  for stage in RUNS:
    metrics = loop.train(_run_config(stage, sources), str(out / stage))
    assert metrics['step'] == STEPS and np.isfinite(metrics['loss'])
  return str(out)


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.device_get(tree), sep='/')


@pytest.mark.parametrize('stage', sorted(RUNS))
def test_finetuning_starts_from_the_karlo_network_and_trains_it(stage, sources, root,
                                                                tmp_path):
  component = os.path.join(sources[0][1], RUNS[stage][1])
  model = karlo.component_config(component)['model']
  want = _flat(karlo.component_params(component, model))
  src = loop.read_init_source(component)
  cfg = loop.adopt_weight_fields(_run_config(stage, sources), src.config, 'test')
  state = loop.init_state(loop.build_trainer(cfg, str(tmp_path), src), src)
  for name, tree in (('params', state.params), ('ema_params', state.ema_params)):
    got = _flat(tree)
    assert sorted(got) == sorted(want), f'{name}: other tensors than {component}\'s'
    assert all(np.array_equal(got[k], want[k]) for k in want), f'{name} is not {component}'
  step, trained, _ = _restore_raw(os.path.join(root, stage))
  params = traverse_util.flatten_dict(trained['params'], sep='/')
  moved = [k for k in want if not np.array_equal(params[k], want[k])]
  assert step == STEPS and len(moved) >= 0.9 * len(want), f'{len(moved)} of {len(want)} moved'
  saved = conditioning.restore_stage(os.path.join(root, stage)).config
  assert saved.init_from == os.path.abspath(component)
  released = conditioning.config_from_saved(karlo.component_config(component))
  changes = [line.split(':')[0] for line in conditioning.meaning_changes(released, saved)]
  assert changes == (['text_encoder.image_path'] if stage == 'decoder' else []), changes
  assert saved.input.dataset == 'shapes', "the run's own data was lost"
  if stage == 'decoder':
    assert saved.text_encoder.raw_embeddings and saved.text_encoder.name == 'clip'


def test_the_trainer_conditions_the_decoder_as_karlo_samples_it(sources, root):
  """The trainer's frozen CLIP (text tower + image tower) and conditioner give the decoder the
  inputs the Karlo pipeline gives it: raw image and text embeddings, tokens, mask."""
  (_, text_dir), (_, variation_dir) = sources
  trained = conditioning.restore_stage(os.path.join(root, 'decoder'))
  cfg = trained.config  # the conditioner's, with no caption or image dropped
  cfg.diffusion.cond_drop_text = cfg.diffusion.cond_drop_image = 0.0
  encoder = conditioning.build_encoder(cfg, trained.mesh, trained.rules)
  tokenizer = conditioning.build_tokenizer(cfg, encoder, os.path.join(root, 'decoder'))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  ids, mask = tokenizer(PROMPTS)
  batch = {'image': images, 'text_ids': ids, 'text_mask': mask}
  x0, cond = conditioning.Conditioner(cfg, encoder)(batch, encoder.params,
                                                    jax.random.PRNGKey(0))
  np.testing.assert_array_equal(x0, images)
  reference = pipelines.from_pretrained(variation_dir)
  want_embed = np.asarray(reference.image_embed(images))
  assert want_embed.shape == (2, D)
  np.testing.assert_allclose(cond['image_embed'], want_embed, atol=1e-5, rtol=0)
  x_t = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  k = np.array([999, 7])
  t_B = (k + 1.0) / trained.config.diffusion.num_timesteps
  ours = trained.model.apply({'params': trained.params}, x_t, t_B, cond, train=False)
  sampled = pipelines.from_pretrained(text_dir).stage('decoder')
  sampled.params = trained.params  # the Karlo stage's sampling path, on the trained weights
  want = sampled.model_output(x_t, k, PROMPTS, image_embed=want_embed)
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(np.asarray(ours) - want).max())
  print(f'trainer vs Karlo pipeline conditioning: max |diff| {err:.3g}, scale {scale:.3g}')
  np.testing.assert_allclose(ours, want, atol=1e-5 * scale, rtol=0)


@pytest.fixture(scope='module')
def exported(root, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('exported') / 'karlo')
  cli.call(export_main, [f'--workdir={root}', f'--out={out}'])
  return out


def test_the_export_is_a_karlo_pipeline_with_our_trained_networks(sources, root, exported):
  (pipe, text_dir), _ = sources
  ref = _load_karlo(exported)
  ours = {s: conditioning.restore_stage(os.path.join(root, s)) for s in RUNS}
  rng = np.random.default_rng(1)
  k = np.array([999, 0])
  t_B = (k + 1.0) / 1000.0
  # decoder (+ text_proj): the reference pipeline's own conditioning, our trained network.
  image_embed = rng.standard_normal((2, D)).astype(np.float32)
  x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  with torch.no_grad():
    embeds, hidden, mask = ref._encode_prompt(PROMPTS, 'cpu', 1, False)
    hid, additive = ref.text_proj(image_embeddings=torch.tensor(image_embed),
                                  prompt_embeds=embeds, text_encoder_hidden_states=hidden,
                                  do_classifier_free_guidance=False)
    dmask = torch.nn.functional.pad(mask, (3, 0), value=True)
    want = ref.decoder(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(k),
                       encoder_hidden_states=hid, class_labels=additive,
                       attention_mask=dmask).sample.numpy().transpose(0, 2, 3, 1)
  dec = ours['decoder']
  cond = {'text_tokens': hidden.numpy(), 'text_mask': mask.numpy(),
          'text_embed': embeds.numpy(), 'image_embed': image_embed}
  got = np.asarray(dec.model.apply({'params': dec.params}, x, t_B, cond, train=False))
  _close(got, want, 'exported decoder')
  # super_res: both exported networks are our trained one.
  small = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  up = torch.nn.functional.interpolate(torch.tensor(small.transpose(0, 3, 1, 2)), size=[16, 16],
                                       mode='bicubic', align_corners=False, antialias=True)
  sr = ours['super_res']
  got = np.asarray(sr.model.apply({'params': sr.params}, x, t_B, {'low_res': small},
                                  train=False))
  for name in ('super_res_first', 'super_res_last'):
    with torch.no_grad():
      inp = torch.cat([torch.tensor(x.transpose(0, 3, 1, 2)), up], 1)
      want = getattr(ref, name)(inp, torch.tensor(k)).sample.numpy().transpose(0, 2, 3, 1)
    _close(got, want, f'exported {name}')
  # The untouched components are the source's: the prior and the text encoder.
  for name in ('prior', 'text_encoder'):
    theirs, mine = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
    assert all(torch.equal(theirs[key], mine[key]) for key in theirs), name
  # Our reader gives the trained parameters back.
  back = pipelines.from_pretrained(exported)
  for stage in RUNS:
    want_params, got_params = _flat(ours[stage].params), _flat(back.stage(stage).params)
    assert sorted(want_params) == sorted(got_params), stage
    assert all(np.array_equal(want_params[k], got_params[k]) for k in want_params), stage


def _load_karlo(path):
  """UnCLIPPipeline of the components at `path`, each read by its class's from_pretrained
  (diffusers' pipeline loader cannot resolve the deprecated text_proj class it saves)."""
  from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  from transformers import AutoTokenizer, CLIPTextModelWithProjection
  classes = dict(prior=PriorTransformer, decoder=UNet2DConditionModel,
                 text_proj=UnCLIPTextProjModel, super_res_first=UNet2DModel,
                 super_res_last=UNet2DModel, text_encoder=CLIPTextModelWithProjection,
                 tokenizer=AutoTokenizer, prior_scheduler=UnCLIPScheduler,
                 decoder_scheduler=UnCLIPScheduler, super_res_scheduler=UnCLIPScheduler)
  parts = {name: cls.from_pretrained(os.path.join(path, name)) for name, cls in classes.items()}
  return diffusers.UnCLIPPipeline(**parts)


def _close(got, want, what):
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max())
  print(f'{what}: max |diff| {err:.3g}, output scale {scale:.3g}')
  np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)


def test_refusals_are_one_line(sources, tmp_path):
  (_, text_dir), _ = sources
  with pytest.raises(errors.InputError, match='prior is not supported'):
    loop.read_init_source(os.path.join(text_dir, 'prior'))
  with pytest.raises(errors.InputError, match='name the network to fine-tune'):
    loop.read_init_source(text_dir)
  cfg = _run_config('decoder', sources, image_tower=False)
  with pytest.raises(errors.InputError, match='text_encoder.image_path'):
    loop.train(cfg, str(tmp_path / 'decoder'))


def test_the_train_cli_takes_the_image_tower_flag(sources, tmp_path, capsys):
  (_, text_dir), _ = sources
  with pytest.raises(SystemExit) as e:
    cli.call(train_main, ['--config=configs/unclip.py:stage=decoder64,size=tiny',
                          f'--workdir={tmp_path / "w"}',
                          f'--config.init_from={os.path.join(text_dir, "decoder")}',
                          f'--config.text_encoder.image_path={tmp_path / "missing"}'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err and 'text_encoder.image_path' in err[-1] and 'no such directory' in err[-1], err[-3:]


def test_export_refusals_are_one_line(sources, root, tmp_path, capsys):
  other = tmp_path / 'notes'
  other.mkdir()
  (other / 'a.txt').write_text('mine')
  for out, needle in ((other, 'is not a Karlo directory'),
                      (sources[0][1], 'is the Karlo directory the stages started from')):
    with pytest.raises(SystemExit) as e:
      cli.call(export_main, [f'--workdir={root}', f'--out={out}'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith('error: ') and needle in err[-1], err[-3:]
  assert sorted(os.listdir(other)) == ['a.txt'], 'wrote before refusing'


def test_a_prior_and_decoder_of_different_embedding_spaces_are_refused():
  """A fine-tuned Karlo decoder reads raw CLIP embeddings: a prior of ours (l2-scaled ones)
  cannot feed it."""
  from diffusion_jax.pipelines import unclip as unclip_pipeline
  stage = lambda raw: types.SimpleNamespace(conditioner=types.SimpleNamespace(raw_embeddings=raw))
  pipe = object.__new__(unclip_pipeline.UnCLIPPipeline)
  pipe.order = ('prior', 'decoder', 'super_res')
  for prior_raw, decoder_raw in ((False, True), (True, False)):
    pipe.stage = {'prior': stage(prior_raw), 'decoder': stage(decoder_raw)}.get
    with pytest.raises(errors.InputError, match='pair a decoder with a prior'):
      pipe.check_embedding_spaces()
  pipe.stage = {'prior': stage(True), 'decoder': stage(True)}.get
  pipe.check_embedding_spaces()

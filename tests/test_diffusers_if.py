"""DeepFloyd IF pipeline directories (diffusers layout) through `pipelines.from_pretrained`:
a stage's raw output equals diffusers' U-Net fed exactly what the IF pipeline feeds it (its
prompt embeddings; for stage II also the low-res image upsampled and noised as
IFSuperResolutionPipeline does), and guided deterministic runs from the same noise, of stage
I alone and of the cascade stage I -> stage II, give diffusers' images."""
import functools
import json
import os

import numpy as np
import pytest

import jax

import hf_fixtures

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from diffusion_jax import errors, pipelines, pretrained  # noqa: E402
from diffusion_jax.tokenizer import build_word_tokenizer  # noqa: E402

WORDS = ('a', 'red', 'blue', 'circle', 'square', 'left', 'of', 'photo', 'cat', 'the')
PROMPTS = ['A red circle left of a blue square', 'photo of the cat']
# IF stage I's scheduler (DDPM, learned range, dynamic thresholding at 95% capped at 1.5).
IF_SCHEDULER = dict(beta_schedule='squaredcos_cap_v2', clip_sample=True,
                    dynamic_thresholding_ratio=0.95, num_train_timesteps=1000,
                    prediction_type='epsilon', sample_max_value=1.5, thresholding=True,
                    variance_type='learned_range')


def _unet(seed: int, stage: str = 'I'):
  """A tiny IF-I-shaped U-Net (3 channels in, eps + variance out), or IF-II-shaped (16 -> 32
  px: the upsampled low-res image as 3 more channels in, the noise level as a timestep class
  embedding), every weight random."""
  torch.manual_seed(seed)
  shape = (dict(sample_size=32, in_channels=6, class_embed_type='timestep') if stage == 'II'
           else dict(sample_size=16, in_channels=3))
  unet = diffusers.UNet2DConditionModel(
      **shape, out_channels=6, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=('ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D'),
      up_block_types=('SimpleCrossAttnUpBlock2D', 'ResnetUpsampleBlock2D'),
      mid_block_type='UNetMidBlock2DSimpleCrossAttn', attention_head_dim=8,
      cross_attention_dim=20, encoder_hid_dim=hf_fixtures.T5_TINY['d_model'],
      encoder_hid_dim_type='text_proj', addition_embed_type='text',
      addition_embed_type_num_heads=2, act_fn='gelu', resnet_time_scale_shift='scale_shift',
      resnet_skip_time_act=True, resnet_out_scale_factor=1.414, time_embedding_act_fn='gelu',
      norm_num_groups=8).eval()
  with torch.no_grad():
    for name, p in unet.named_parameters():  # zero-initialised ones included
      p.copy_(torch.randn_like(p) * (0.1 if 'norm' in name else 0.15) +
              (1.0 if 'norm' in name and name.endswith('weight') else 0.0))
  return unet


@functools.lru_cache(maxsize=None)
def if_dir(scheduler: str = 'ddpm') -> str:
  """An IFPipeline directory as save_pretrained writes it (no safety checker, no watermark)."""
  from transformers import AutoTokenizer, T5Config, T5EncoderModel
  out = hf_fixtures.path(f'if_{scheduler}')
  if os.path.isdir(out):
    return out
  tok_dir = build_word_tokenizer(WORDS, hf_fixtures.path('if_tokenizer'), style='t5')
  tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
  torch.manual_seed(1)
  text_encoder = T5EncoderModel(T5Config(feed_forward_proj='gated-gelu',
                                         **hf_fixtures.T5_TINY)).eval()
  pipe = diffusers.IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=_unet(2),
                              scheduler=_scheduler(scheduler), safety_checker=None,
                              feature_extractor=None,
                              watermarker=None, requires_safety_checker=False)
  pipe.save_pretrained(out, safe_serialization=True)
  return out


def _scheduler(scheduler: str):
  if scheduler == 'ddpm':
    return diffusers.DDPMScheduler(**IF_SCHEDULER)
  # deterministic, for comparing whole runs
  sched = diffusers.DDIMScheduler(beta_schedule='squaredcos_cap_v2', clip_sample=False,
                                  set_alpha_to_one=True, prediction_type='epsilon')
  sched.register_to_config(variance_type='fixed_small')  # read by the IF pipelines
  return sched


@functools.lru_cache(maxsize=None)
def if2_dir(scheduler: str = 'ddpm', noising_schedule: str = 'squaredcos_cap_v2') -> str:
  """An IFSuperResolutionPipeline directory (stage II, 16 -> 32 px) as save_pretrained
  writes it, with the same T5 and tokenizer as stage I's."""
  out = hf_fixtures.path(f'if2_{scheduler}_{noising_schedule}')
  if os.path.isdir(out):
    return out
  stage1 = _reference(if_dir(scheduler))
  noising = diffusers.DDPMScheduler(beta_schedule=noising_schedule, num_train_timesteps=1000,
                                    variance_type='fixed_small', clip_sample=True)
  pipe = diffusers.IFSuperResolutionPipeline(
      tokenizer=stage1.tokenizer, text_encoder=stage1.text_encoder, unet=_unet(3, 'II'),
      scheduler=_scheduler(scheduler), image_noising_scheduler=noising, safety_checker=None,
      feature_extractor=None, watermarker=None, requires_safety_checker=False)
  pipe.save_pretrained(out, safe_serialization=True)
  return out


@functools.lru_cache(maxsize=None)
def cascade_root(scheduler: str = 'ddpm') -> str:
  """ROOT/IF-I and ROOT/IF-II: the two pipeline directories of one cascade."""
  root = hf_fixtures.path(f'if_cascade_{scheduler}')
  if not os.path.isdir(root):
    os.makedirs(root)
    os.symlink(if_dir(scheduler), os.path.join(root, 'IF-I'))
    os.symlink(if2_dir(scheduler), os.path.join(root, 'IF-II'))
  return root


def _reference(path, cls=None):
  cls = cls or diffusers.IFPipeline
  pipe = cls.from_pretrained(path, safety_checker=None, feature_extractor=None,
                             watermarker=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(x):
  return x.numpy().transpose(0, 2, 3, 1)


def test_if_stage_output_equals_the_diffusers_unet_on_the_pipelines_prompt_embeddings():
  path = if_dir()
  pipe = pipelines.from_pretrained(path)
  name = os.path.basename(path)
  assert list(pipe.stages) == [name]
  stage = pipe.stages[name]
  ref = _reference(path)
  rng = np.random.default_rng(0)
  x_t = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  t = np.array([999, 17])
  got = stage.model_output(x_t, t, PROMPTS)
  with torch.no_grad():
    embeds, _ = ref.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                  clean_caption=False)
    want = ref.unet(torch.from_numpy(x_t.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    encoder_hidden_states=embeds).sample.numpy().transpose(0, 2, 3, 1)
  assert got.shape == want.shape == (2, 16, 16, 6)
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)


def test_if_config_maps_the_released_sampler_and_t5():
  config = pretrained.read_config(if_dir())
  s = config['sampler']
  assert (s['name'], s['num_steps'], s['guidance_scale']) == ('ddpm', 100, 7.0)
  assert (s['threshold'], s['percentile'], s['threshold_max']) == ('dynamic', 95.0, 1.5)
  assert config['diffusion']['learned_variance'] and config['diffusion']['parameterization'] == 'eps'
  te = config['text_encoder']
  assert te['max_length'] == 77 and te['zero_padding'] is False
  assert config['input']['caption_rewrite'] == 'lower_strip'


def test_pickled_unet_weights_are_refused(tmp_path):
  import shutil
  path = str(tmp_path / 'if')
  shutil.copytree(if_dir(), path)
  unet = os.path.join(path, 'unet')
  for name in os.listdir(unet):
    if name.endswith('.safetensors'):
      os.remove(os.path.join(unet, name))
  torch.save({'w': torch.zeros(1)}, os.path.join(unet, 'diffusion_pytorch_model.bin'))
  with pytest.raises(errors.InputError, match='pickle'):
    pipelines.from_pretrained(path).stages[os.path.basename(path)]


def test_unsupported_pipeline_class_is_one_line(tmp_path):
  (tmp_path / 'model_index.json').write_text(json.dumps({'_class_name': 'KandinskyPipeline'}))
  with pytest.raises(errors.InputError) as e:
    pipelines.from_pretrained(str(tmp_path))
  assert 'KandinskyPipeline' in str(e.value) and '\n' not in str(e.value)


def test_a_root_of_both_pipelines_is_a_two_stage_cascade():
  pipe = pipelines.from_pretrained(cascade_root())
  assert pipe.order == ('IF-I', 'IF-II') and list(pipe.stages) == ['IF-I', 'IF-II']
  assert pipe.stages['IF-II'].encoder is pipe.stages['IF-I'].encoder  # one T5, not two
  config = pretrained.read_config(if2_dir())
  s = config['sampler']
  assert (s['name'], s['num_steps'], s['guidance_scale']) == ('ddpm', 50, 4.0)
  # noise level 250 of 1000: noised as add_noise(250) and embedded as class label 250
  assert s['aug_level'] == pytest.approx(0.251)
  assert config['diffusion']['noise_aug'] and config['model']['low_res_upsampled']
  assert config['model']['low_res_resize'] == 'bilinear_align_corners'


@pytest.fixture(scope='module')
def sr_stage():
  return pipelines.from_pretrained(cascade_root()).stages['IF-II']


def test_sr_stage_output_equals_the_diffusers_unet_fed_as_the_sr_pipeline_feeds_it(sr_stage):
  ref = _reference(if2_dir(), diffusers.IFSuperResolutionPipeline)
  rng = np.random.default_rng(1)
  x_t = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  low_res = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  aug_noise = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  t = np.array([999, 17])
  got = sr_stage.model_output(x_t, t, PROMPTS, low_res=low_res, aug_noise=aug_noise)
  with torch.no_grad():  # IFSuperResolutionPipeline.__call__'s steps 3, 7 and 8
    embeds, _ = ref.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                  clean_caption=False)
    upscaled = torch.nn.functional.interpolate(_nchw(low_res), (32, 32), mode='bilinear',
                                               align_corners=True)
    level = torch.tensor([250, 250])
    upscaled = ref.image_noising_scheduler.add_noise(upscaled, _nchw(aug_noise), level)
    want = _nhwc(ref.unet(torch.cat([_nchw(x_t), upscaled], dim=1), torch.from_numpy(t),
                          encoder_hidden_states=embeds, class_labels=level).sample)
  assert got.shape == want.shape == (2, 32, 32, 6)
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)


def test_training_augments_the_low_res_input_as_stage_ii_samples_it(sr_stage):
  """Fine-tuning an IF stage II trains on what it samples: the low-res image upsampled
  (bilinear, corners aligned) to the output size, then noised at a drawn level."""
  rng = np.random.default_rng(3)
  low_res = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  noise = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  conditioner = sr_stage.conditioner
  drawn = conditioner.low_res_cond(low_res, jax.random.PRNGKey(0))  # training's random level
  assert drawn['low_res'].shape == (2, 32, 32, 3) and drawn['aug_t'].shape == (2,)
  level = float(drawn['aug_t'][0])
  got = conditioner.low_res_cond(low_res, jax.random.PRNGKey(0), level, aug_noise=noise)
  up = torch.nn.functional.interpolate(_nchw(low_res), (32, 32), mode='bilinear',
                                       align_corners=True).numpy().transpose(0, 2, 3, 1)
  from diffusion_jax.diffusion import process  # noqa: PLC0415
  want = process.q_sample(up, np.full((2,), level, np.float32), noise, sr_stage.schedule)
  np.testing.assert_allclose(got['low_res'], want, atol=1e-5)


def test_aug_noise_of_the_wrong_shape_is_one_line(sr_stage):
  with pytest.raises(errors.InputError, match=r'\(2, 32, 32, 3\)') as e:
    sr_stage.model_output(np.zeros((2, 32, 32, 3)), 5, PROMPTS, low_res=np.zeros((2, 16, 16, 3)),
                          aug_noise=np.zeros((2, 16, 16, 3)))
  assert '\n' not in str(e.value)


@pytest.fixture(scope='module')
def ddim_cascade():
  return pipelines.from_pretrained(cascade_root('ddim'))


STEPS, SCALE = 4, 4.0  # of the deterministic runs


def test_guided_deterministic_cascade_gives_the_diffusers_images(monkeypatch, ddim_cascade):
  """Stage I alone and stage I -> stage II, from the same initial and augmentation noise."""
  root = cascade_root('ddim')
  steps, scale = STEPS, SCALE
  torch_rng = torch.Generator().manual_seed(5)
  x_T1 = torch.randn((2, 3, 16, 16), generator=torch_rng)
  x_T2 = torch.randn((2, 3, 32, 32), generator=torch_rng)
  aug_noise = torch.randn((2, 3, 32, 32), generator=torch_rng)
  stage1 = _reference(os.path.join(root, 'IF-I'))
  stage2 = _reference(os.path.join(root, 'IF-II'), diffusers.IFSuperResolutionPipeline)
  from diffusers.pipelines.deepfloyd_if import pipeline_if, pipeline_if_superresolution
  draws = [x_T1, x_T2, aug_noise]  # in the order the two pipelines draw them

  def replay(shape, **_):
    x = draws.pop(0)
    assert tuple(x.shape) == tuple(shape)
    return x.clone()
  monkeypatch.setattr(pipeline_if, 'randn_tensor', replay)
  monkeypatch.setattr(pipeline_if_superresolution, 'randn_tensor', replay)
  with torch.no_grad():
    low_res = stage1(PROMPTS, num_inference_steps=steps, guidance_scale=scale,
                     output_type='pt', clean_caption=False).images
    want = stage2(PROMPTS, image=low_res, num_inference_steps=steps, guidance_scale=scale,
                  output_type='np', clean_caption=False).images
  assert not draws
  got, by_stage = ddim_cascade.generate(
      PROMPTS, jax.random.PRNGKey(0), return_stages=True,
      latents={'IF-I': _nhwc(x_T1), 'IF-II': _nhwc(x_T2)}, aug_noise={'IF-II': _nhwc(aug_noise)},
      num_steps=steps, guidance_scale=scale)
  want_low = np.round((np.clip(_nhwc(low_res), -1, 1) + 1) * 127.5).astype(np.int32)
  assert np.abs(by_stage['IF-I'].astype(np.int32) - want_low).max() <= 2
  want_uint8 = np.round(want * 255).astype(np.int32)
  diff = np.abs(got.astype(np.int32) - want_uint8)
  print(f'cascade: max uint8 diff {diff.max()}, mean {diff.mean():.3g}')
  assert got.shape == (2, 32, 32, 3) and diff.max() <= 2, 'within 2/255 of diffusers'


def test_a_noising_scheduler_of_another_schedule_is_refused():
  with pytest.raises(errors.InputError, match='image_noising_scheduler') as e:
    pretrained.read_config(if2_dir('ddpm', 'linear'))
  assert '\n' not in str(e.value)


def test_sample_cli_samples_the_cascade_root(ddim_cascade, tmp_path):
  from PIL import Image
  from diffusion_jax import cli, sample
  out = tmp_path / 'out'
  try:
    cli.call(sample, [f'--pretrained={cascade_root("ddim")}', f'--prompt={PROMPTS[0]}',
                      f'--prompt={PROMPTS[1]}', '--seed=5', f'--out={out}', '--quiet',
                      f'--set=num_steps={STEPS}', f'--set=guidance_scale={SCALE}'])
  except SystemExit as e:
    assert not e.code, e.code
  files = sorted(f for f in os.listdir(out) if f[0].isdigit())
  images = np.stack([np.asarray(Image.open(out / f)) for f in files])
  want = ddim_cascade.generate(PROMPTS, jax.random.PRNGKey(5), num_steps=STEPS,
                               guidance_scale=SCALE)
  assert images.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(images, want)
  caps = json.load(open(out / 'captions.json'))
  assert set(caps['stage_seconds']) == {'IF-I', 'IF-II'}


def test_a_stage_saved_without_its_t5_shares_its_siblings(tmp_path):
  import shutil
  os.symlink(if_dir(), tmp_path / 'IF-I')
  shutil.copytree(if2_dir(), tmp_path / 'IF-II', symlinks=True)
  for name in ('text_encoder', 'tokenizer'):  # as saved with text_encoder=None, tokenizer=None
    shutil.rmtree(tmp_path / 'IF-II' / name)
  pipe = pipelines.from_pretrained(str(tmp_path))
  te = pretrained.read_config(str(tmp_path / 'IF-II'))['text_encoder']
  assert te['path'] == str(tmp_path / 'IF-I' / 'text_encoder')
  assert te['tokenizer_path'] == str(tmp_path / 'IF-I' / 'tokenizer')
  assert pipe.stages['IF-II'].encoder is pipe.stages['IF-I'].encoder


def test_stages_holding_different_t5s_keep_their_own(tmp_path):
  import shutil
  os.symlink(if_dir(), tmp_path / 'IF-I')
  shutil.copytree(if2_dir(), tmp_path / 'IF-II', symlinks=True)
  weights = next((tmp_path / 'IF-II' / 'text_encoder').glob('*.safetensors'))
  data = bytearray(weights.read_bytes())
  data[-8:] = bytes(8)  # another T5 of the same shapes
  weights.write_bytes(bytes(data))
  pipe = pipelines.from_pretrained(str(tmp_path))
  assert pipe.stages['IF-II'].encoder is not pipe.stages['IF-I'].encoder
  te = pretrained.read_config(str(tmp_path / 'IF-II'))['text_encoder']
  assert te['path'] == str(tmp_path / 'IF-II' / 'text_encoder')

"""A DeepFloyd IF pipeline directory (diffusers layout) through `pipelines.from_pretrained`:
the stage's raw output equals diffusers' U-Net fed the IF pipeline's own prompt embeddings,
and a guided deterministic run from the same noise gives diffusers' images."""
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


def _unet(seed: int):
  """A tiny IF-I-shaped U-Net (3 channels in, eps + variance out), every weight random."""
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(
      sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32),
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
  if scheduler == 'ddpm':
    sched = diffusers.DDPMScheduler(**IF_SCHEDULER)
  else:  # deterministic, for comparing whole runs
    sched = diffusers.DDIMScheduler(beta_schedule='squaredcos_cap_v2', clip_sample=False,
                                    set_alpha_to_one=True, prediction_type='epsilon')
    sched.register_to_config(variance_type='fixed_small')  # read by the IF pipeline
  pipe = diffusers.IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=_unet(2),
                              scheduler=sched, safety_checker=None, feature_extractor=None,
                              watermarker=None, requires_safety_checker=False)
  pipe.save_pretrained(out, safe_serialization=True)
  return out


def _reference(path):
  pipe = diffusers.IFPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                              watermarker=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


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


def test_guided_deterministic_run_gives_the_diffusers_images():
  path = if_dir('ddim')
  ref = _reference(path)
  steps, scale = 6, 4.0
  generator = torch.Generator().manual_seed(0)
  x_T = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    want = ref(PROMPTS, num_inference_steps=steps, guidance_scale=scale, generator=generator,
               output_type='np', clean_caption=False).images
  pipe = pipelines.from_pretrained(path)
  name = os.path.basename(path)
  got = pipe.generate(PROMPTS, jax.random.PRNGKey(0), latents={name: x_T.numpy().transpose(0, 2, 3, 1)},
                      num_steps=steps, guidance_scale=scale)
  want_uint8 = np.round(want * 255).astype(np.int32)
  assert np.abs(got.astype(np.int32) - want_uint8).max() <= 2, 'within 2/255 of diffusers'


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

"""A Karlo directory (diffusers UnCLIPPipeline / UnCLIPImageVariationPipeline, tiny random
components saved with save_pretrained) through `pipelines.from_pretrained`: each stage's
network against the reference component fed what the reference pipeline feeds it, whole
runs against the reference pipeline with its noise replayed, and the sample CLI."""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from diffusion_jax import errors, pipelines, pretrained
from diffusion_jax.diffusers_io import karlo
import karlo_fixtures
from karlo_fixtures import D, PROMPTS, STEPS

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('karlo'))


@pytest.fixture(scope='module')
def text(root):
  pipe, path = karlo_fixtures.text_pipeline(root)
  return pipe, path, pipelines.from_pretrained(path)


def _tol(ref):
  return 1e-4 * max(1.0, float(np.abs(ref).max()))


def _check(ours, ref, what):
  diff = float(np.abs(np.asarray(ours) - ref).max())
  print(f'{what}: max|diff| {diff:.2e} (max|ref| {np.abs(ref).max():.2f})')
  assert diff <= _tol(ref), f'{what}: {diff}'


def test_stage_configs_and_order(text):
  _, path, ours = text
  assert ours.order == ('prior', 'decoder', 'super_res')
  configs = karlo.stage_configs(path)
  assert configs['prior']['diffusion']['parameterization'] == 'x0'
  assert configs['prior']['sampler']['threshold_max'] == 5.0
  assert configs['decoder']['diffusion']['learned_variance']
  assert configs['decoder']['sampler']['guidance_scale'] == 8.0
  assert configs['super_res']['model']['low_res_size'] == 8
  assert ours.stage('super_res').has_final  # super_res_last has weights of its own


def test_each_stage_equals_the_reference_component(text):
  pipe, _, ours = text
  rng = np.random.default_rng(0)
  with torch.no_grad():
    embeds, hidden, mask = pipe._encode_prompt(PROMPTS, 'cpu', 1, False)
  k = np.array([999, 3])
  # prior: projected text embeds, the last hidden states (padding kept) and the mask.
  x = rng.standard_normal((2, D)).astype(np.float32)
  with torch.no_grad():
    ref = pipe.prior(torch.tensor(x), timestep=torch.tensor(k), proj_embedding=embeds,
                     encoder_hidden_states=hidden, attention_mask=mask
                     ).predicted_image_embedding.numpy()
  prior = ours.stage('prior')
  _check(prior.model_output(x, k, PROMPTS), ref, 'prior')
  assert np.abs(prior.model_output(x, k, PROMPTS[::-1]) - ref).max() > 100 * _tol(ref)
  # decoder: text_proj of the image embedding, text embeds and hidden states; the mask with
  # the extra context tokens visible.
  image_embed = rng.standard_normal((2, D)).astype(np.float32)
  x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
  with torch.no_grad():
    hid, additive = pipe.text_proj(image_embeddings=torch.tensor(image_embed),
                                   prompt_embeds=embeds, text_encoder_hidden_states=hidden,
                                   do_classifier_free_guidance=False)
    dmask = torch.nn.functional.pad(mask, (3, 0), value=True)
    ref = pipe.decoder(torch.tensor(x), torch.tensor(k), encoder_hidden_states=hid,
                       class_labels=additive, attention_mask=dmask).sample.numpy()
  ref = ref.transpose(0, 2, 3, 1)
  decoder = ours.stage('decoder')
  out = decoder.model_output(x.transpose(0, 2, 3, 1), k, PROMPTS, image_embed=image_embed)
  _check(out, ref, 'decoder')
  # super_res: the decoder's image upsampled (bicubic, antialiased); super_res_last at step 0.
  small = rng.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
  x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
  up = torch.nn.functional.interpolate(torch.tensor(small), size=[16, 16], mode='bicubic',
                                       align_corners=False, antialias=True)
  k = np.array([600, 0])
  with torch.no_grad():
    inp = torch.cat([torch.tensor(x), up], 1)
    first = pipe.super_res_first(inp, torch.tensor(k)).sample.numpy().transpose(0, 2, 3, 1)
    last = pipe.super_res_last(inp, torch.tensor(k)).sample.numpy().transpose(0, 2, 3, 1)
  ref = np.stack([first[0], last[1]])
  out = ours.stage('super_res').model_output(x.transpose(0, 2, 3, 1), k,
                                             low_res=small.transpose(0, 2, 3, 1))
  _check(out, ref, 'super_res (first, last)')
  assert np.abs(first[1] - last[1]).max() > 100 * _tol(ref)


def _record_step_noise():
  """Patches the scheduler's randn_tensor; returns (draws, restore)."""
  from diffusers.schedulers import scheduling_unclip
  real = scheduling_unclip.randn_tensor
  draws = []

  def recording(*args, **kw):
    out = real(*args, **kw)
    draws.append(out.numpy().copy())
    return out
  scheduling_unclip.randn_tensor = recording
  return draws, lambda: setattr(scheduling_unclip, 'randn_tensor', real)


def _exact_schedules(pipe):
  """The reference schedulers' tables recomputed in float64 from their betas (test only).
  UnCLIPScheduler keeps alpha_bar as a float32 cumprod, and two of its step coefficients
  cancel there: at t = 999, 1 - beta = alpha_bar_999 / alpha_bar_prev ~ 1e-8 rounds to 0
  (dropping the x_t term of the first step's mean); at t = 0, beta_0 / (1 - alpha_bar_0)
  should be 1 but is 1 +- 1e-3 (scaling the final x0, e.g. the prior's embedding). Both are
  rounding, not the method; in float64 the reference computes its own formulas."""
  for name in ('prior_scheduler', 'decoder_scheduler', 'super_res_scheduler'):
    sched = getattr(pipe, name, None)
    if sched is not None:
      sched.betas = sched.betas.double()
      sched.alphas = 1.0 - sched.betas
      sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
      sched.one = torch.tensor(1.0, dtype=torch.float64)


def _nhwc(a):
  return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def _replay(draws, order, steps, n):
  """Our step_noise per stage: the draws of each stage's steps but the last, then zeros."""
  out, i = {}, 0
  for name in order:
    used = [_nhwc(d) for d in draws[i:i + steps[name] - 1]]
    i += steps[name] - 1
    out[name] = np.stack(used + [np.zeros_like(used[0])])
  assert i == len(draws) and all(len(v) == steps[k] for k, v in out.items())
  return out


def test_generate_equals_the_reference_pipeline(text):
  pipe, _, ours = text
  n = len(PROMPTS)
  rng = np.random.default_rng(1)
  latents = dict(prior=rng.standard_normal((n, D)), decoder=rng.standard_normal((n, 3, 8, 8)),
                 super_res=rng.standard_normal((n, 3, 16, 16)))
  latents = {k: v.astype(np.float32) for k, v in latents.items()}
  _exact_schedules(pipe)
  draws, restore = _record_step_noise()
  try:
    ref = pipe(PROMPTS, prior_num_inference_steps=STEPS['prior'],
               decoder_num_inference_steps=STEPS['decoder'],
               super_res_num_inference_steps=STEPS['super_res'],
               generator=torch.Generator().manual_seed(0),
               prior_latents=torch.tensor(latents['prior']),
               decoder_latents=torch.tensor(latents['decoder']),
               super_res_latents=torch.tensor(latents['super_res']), output_type='np').images
  finally:
    restore()
  step_noise = _replay(draws, ours.order, STEPS, n)
  overrides = {name: {'num_steps': steps} for name, steps in STEPS.items()}
  images = ours.generate(PROMPTS, jax.random.PRNGKey(0), step_noise=step_noise,
                         latents={k: _nhwc(v) for k, v in latents.items()}, **overrides)
  want = np.round(ref * 255).astype(np.int32)
  diff = int(np.abs(images.astype(np.int32) - want).max())
  print(f'generate: max |uint8 diff| {diff}, images span {want.min()}..{want.max()}')
  assert images.shape == want.shape and diff <= 2
  assert want.std() > 10  # not a constant image
  # The replayed noise matters: other step noise gives other images.
  other = {k: np.roll(v, 1, axis=1) for k, v in step_noise.items()}
  again = ours.generate(PROMPTS, jax.random.PRNGKey(0), step_noise=other,
                        latents={k: _nhwc(v) for k, v in latents.items()}, **overrides)
  assert np.abs(again.astype(np.int32) - want).max() > 2


def test_image_variations_equal_the_reference_pipeline(root):
  pipe, path = karlo_fixtures.variation_pipeline(root)
  ours = pipelines.from_pretrained(path)
  assert ours.order == ('decoder', 'super_res')
  from PIL import Image
  images = np.random.RandomState(0).randint(0, 256, (2, 16, 16, 3)).astype(np.uint8)
  rng = np.random.default_rng(2)
  latents = dict(decoder=rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
                 super_res=rng.standard_normal((2, 3, 16, 16)).astype(np.float32))
  steps = {k: STEPS[k] for k in ('decoder', 'super_res')}
  _exact_schedules(pipe)
  draws, restore = _record_step_noise()
  try:
    ref = pipe([Image.fromarray(im) for im in images],
               decoder_num_inference_steps=steps['decoder'],
               super_res_num_inference_steps=steps['super_res'], generator=torch.Generator().manual_seed(0),
               decoder_latents=torch.tensor(latents['decoder']),
               super_res_latents=torch.tensor(latents['super_res']), output_type='np').images
  finally:
    restore()
  got = ours.image_variations(images, jax.random.PRNGKey(0),
                              latents={k: _nhwc(v) for k, v in latents.items()},
                              step_noise=_replay(draws, ours.order, steps, 2),
                              **{k: {'num_steps': v} for k, v in steps.items()})
  diff = int(np.abs(got.astype(np.int32) - np.round(ref * 255).astype(np.int32)).max())
  print(f'image variations: max |uint8 diff| {diff}')
  assert diff <= 2
  with pytest.raises(errors.InputError, match='no prior'):
    ours.generate(['a red cube'], jax.random.PRNGKey(0))


def test_refusals(text, tmp_path):
  _, path, ours = text
  with pytest.raises(errors.InputError, match='UnCLIPImageVariationPipeline'):
    ours.variations(np.zeros((1, 16, 16, 3), np.uint8), jax.random.PRNGKey(0))
  with pytest.raises(errors.InputError, match='whole cascade'):
    pretrained.read_config(path)
  # super_res_last may differ from super_res_first in its weights only.
  copy = str(tmp_path / 'karlo')
  shutil.copytree(path, copy)
  last = os.path.join(copy, 'super_res_last', 'config.json')
  with open(last) as f:
    config = json.load(f)
  with open(last, 'w') as f:
    json.dump(dict(config, layers_per_block=2), f)
  with pytest.raises(errors.InputError, match="super_res_last.*num_res_blocks"):
    pipelines.from_pretrained(copy)


def test_sample_cli_text_diff(root, tmp_path):
  """--mode=text_diff: the image tower, the text direction, the decoder's DDIM inversion and
  decoding (what --mode=variations and interpolate run too)."""
  from diffusion_jax import sample
  from PIL import Image
  _, path = karlo_fixtures.variation_pipeline(root)
  image = tmp_path / 'in.png'
  Image.fromarray(np.random.RandomState(3).randint(0, 256, (16, 16, 3)).astype(np.uint8)).save(
      image)
  sets = ['decoder.num_steps=2', 'super_res.num_steps=2']
  out = sample.run(None, None, ['a red cube'], pretrained=path, sets=sets, mode='text_diff',
                   image=str(image), new_prompt='a blue cone', weights=['0', '0.5'],
                   out=str(tmp_path / 'diff'), progress=False)
  assert out.shape == (2, 16, 16, 3) and (tmp_path / 'diff' / 'grid.png').exists()
  assert np.abs(out[0].astype(int) - out[1].astype(int)).max() > 0  # the weight matters

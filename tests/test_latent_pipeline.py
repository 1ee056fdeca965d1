"""Latent pipelines read from diffusers directories (Stable Diffusion, DiT, PixArt-alpha):
tiny random reference pipelines saved with save_pretrained, loaded with
`pipelines.from_pretrained`, sampled with DDIM and classifier-free guidance from the same
initial latents (and the same posterior / noising draws for img2img and inpainting); the
final latents and uint8 images are compared with the reference's."""
from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest

from diffusion_jax import errors, pipelines
from diffusion_jax.pipelines import latent as latent_pipe
from diffusion_jax.tokenizer import build_word_tokenizer

import hf_fixtures

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

WORDS = 'a red green blue cube sphere cone on the left of right above small big'.split()
PROMPTS = ['a red cube above a small green sphere', 'blue cone']
L, D = 8, 16        # CLIP tokenizer length and width
STEPS = 10
VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
           latent_channels=4, down_block_types=['DownEncoderBlock2D'] * 2,
           up_block_types=['UpDecoderBlock2D'] * 2)


def _ddim():
  return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                                 beta_schedule='scaled_linear', beta_start=0.00085,
                                 beta_end=0.012)


def _randomise(model, seed, scale=0.2):
  """Every weight random; adaLN linears under 'norm1' (DiT) drawn at the same scale, not
  near 1 as norm weights."""
  hf_fixtures.randomise(model, seed, scale)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm1.' in name and 'transformer_blocks' in name:
        p.copy_(scale * torch.randn(p.shape, generator=gen))
  return model


def _vae(seed):
  torch.manual_seed(seed)
  return _randomise(diffusers.AutoencoderKL(**VAE).eval(), seed, 0.15)


def _clip(root):
  from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel
  tok_dir = build_word_tokenizer(WORDS, os.path.join(root, 'clip_tok'), 'clip', max_length=L)
  tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
  torch.manual_seed(0)
  text = CLIPTextModel(CLIPTextConfig(
      vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id, hidden_size=D, intermediate_size=24, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=L)).eval()
  return _randomise(text, 3), tok


def _sd_unet(in_channels=4, seed=4):
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, norm_num_groups=8, attention_head_dim=8, cross_attention_dim=D,
      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D')).eval()
  return _randomise(unet, seed)


@functools.lru_cache(maxsize=None)
def _sd(root, kind='text'):
  """(reference pipeline, directory): kind 'text' (4-channel U-Net) or 'inpaint' (9)."""
  text, tok = _clip(root)
  unet = _sd_unet(9 if kind == 'inpaint' else 4)
  cls = (diffusers.StableDiffusionInpaintPipeline if kind == 'inpaint'
         else diffusers.StableDiffusionPipeline)
  pipe = cls(vae=_vae(5), text_encoder=text, tokenizer=tok, unet=unet, scheduler=_ddim(),
             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  path = os.path.join(root, f'sd_{kind}')
  pipe.save_pretrained(path, safe_serialization=True)
  return pipe, path


@functools.lru_cache(maxsize=None)
def _dit(root):
  torch.manual_seed(6)
  transformer = _randomise(diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
      sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval(), 6)  # its null class: 1000
  pipe = diffusers.DiTPipeline(transformer=transformer, vae=_vae(7), scheduler=_ddim(),
                               id2label={0: 'cube, box', 3: 'sphere'})
  path = os.path.join(root, 'dit')
  pipe.save_pretrained(path, safe_serialization=True)
  # The released model_index.json carries id2label (save_pretrained leaves it out).
  index_file = os.path.join(path, 'model_index.json')
  with open(index_file) as f:
    index = json.load(f)
  with open(index_file, 'w') as f:
    json.dump({**index, 'id2label': {'0': 'cube, box', '3': 'sphere'}}, f)
  return pipe, path


@functools.lru_cache(maxsize=None)
def _pixart(root):
  from transformers import AutoTokenizer, T5Config, T5EncoderModel
  tok_dir = build_word_tokenizer(WORDS, os.path.join(root, 't5_tok'), style='t5')
  tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
  torch.manual_seed(8)
  t5 = _randomise(T5EncoderModel(T5Config(feed_forward_proj='gated-gelu',
                                          **hf_fixtures.T5_TINY)).eval(), 8, 0.1)
  transformer = _randomise(diffusers.PixArtTransformer2DModel(
      num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
      sample_size=8, patch_size=2, cross_attention_dim=16,
      caption_channels=hf_fixtures.T5_TINY['d_model']).eval(), 9)
  pipe = diffusers.PixArtAlphaPipeline(tokenizer=tok, text_encoder=t5, vae=_vae(10),
                                       transformer=transformer, scheduler=_ddim())
  path = os.path.join(root, 'pixart')
  pipe.save_pretrained(path, safe_serialization=True)
  return pipe, path


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  torch.set_num_threads(1)
  return str(tmp_path_factory.mktemp('latent_pipelines'))


def _record_decode(pipe):
  """Records the latents the reference decodes (scaled back by the VAE's factor)."""
  real = pipe.vae.decode
  seen = []

  def decode(z, *args, **kw):
    seen.append(z.detach().numpy().transpose(0, 2, 3, 1) * pipe.vae.config.scaling_factor)
    return real(z, *args, **kw)
  pipe.vae.decode = decode
  return seen


def _compare(ours_images, ours_z, ref_images, ref_z, what):
  want = np.round(np.asarray(ref_images) * 255).astype(np.int32)
  diff = int(np.abs(ours_images.astype(np.int32) - want).max())
  z_err = float(np.abs(ours_z - ref_z).max())
  z_scale = float(np.abs(ref_z).max())
  print(f'{what}: max |uint8 diff| {diff}; latents max |diff| {z_err:.3g} of {z_scale:.3g}')
  assert ours_images.shape == want.shape and diff <= 2
  assert z_err <= 2e-3 * z_scale
  unsaturated = float(np.mean((want > 0) & (want < 255)))
  print(f'{what}: {unsaturated:.0%} of the pixels unsaturated')
  assert unsaturated > 0.5  # not an image clipped to black and white
  return want


def _latents(n, seed=0):
  return np.random.default_rng(seed).standard_normal((n, 8, 8, 4)).astype(np.float32)


def _nchw(x):
  return torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_dit_generate_equals_the_reference(root):
  pipe, path = _dit(root)
  ours = pipelines.from_pretrained(path)
  assert isinstance(ours, latent_pipe.LatentPipeline)
  classes = ['box', 3, 7]
  labels = [0, 3, 7]
  seen = _record_decode(pipe)
  ref = pipe(labels, guidance_scale=3.0, num_inference_steps=STEPS,
             generator=torch.Generator().manual_seed(0), output_type='np').images
  # DiTPipeline draws its latents first from the generator.
  x_T = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()
  images, z = ours.generate(classes, jax.random.PRNGKey(0), latents=x_T.transpose(0, 2, 3, 1),
                            guidance_scale=3.0, num_steps=STEPS, return_latents=True)
  _compare(images, z, ref, seen[-1], 'DiT')
  with pytest.raises(errors.InputError, match='unknown'):
    ours.generate(['dragon'], jax.random.PRNGKey(0))
  with pytest.raises(errors.InputError, match='out of range'):
    ours.generate([1000], jax.random.PRNGKey(0))


def test_pixart_generate_equals_the_reference(root):
  pipe, path = _pixart(root)
  ours = pipelines.from_pretrained(path)
  x_T = _latents(2, 1)
  seen = _record_decode(pipe)
  ref = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.5, latents=_nchw(x_T),
             output_type='np', clean_caption=False, use_resolution_binning=False).images
  images, z = ours.generate(PROMPTS, jax.random.PRNGKey(0), latents=x_T, num_steps=STEPS,
                            return_latents=True)
  _compare(images, z, ref, seen[-1], 'PixArt')


def test_sd_generate_and_img2img_equal_the_reference(root):
  pipe, path = _sd(root)
  ours = pipelines.from_pretrained(path)
  x_T = _latents(2, 2)
  seen = _record_decode(pipe)
  ref = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, latents=_nchw(x_T),
             output_type='np').images
  images, z = ours.generate(PROMPTS, jax.random.PRNGKey(0), latents=x_T, num_steps=STEPS,
                            return_latents=True)
  want = _compare(images, z, ref, seen[-1], 'SD text-to-image')
  # Guidance matters: the conditional model alone gives other images.
  plain = ours.generate(PROMPTS, jax.random.PRNGKey(0), latents=x_T, num_steps=STEPS,
                        guidance_scale=1.0)
  assert np.abs(plain.astype(np.int32) - want).max() > 2

  img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
  seen = _record_decode(img2img)
  init = want.astype(np.uint8)
  ref = img2img(PROMPTS[::-1], image=init.astype(np.float32) / 255.0, strength=0.6,
                num_inference_steps=STEPS, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(3), output_type='np').images
  # The reference draws the posterior sample of the image's latents, then the noise.
  gen = torch.Generator().manual_seed(3)
  post = torch.randn((2, 4, 8, 8), generator=gen).numpy().transpose(0, 2, 3, 1)
  noise = torch.randn((2, 4, 8, 8), generator=gen).numpy().transpose(0, 2, 3, 1)
  images, z = ours.img2img(PROMPTS[::-1], init, 0.6, jax.random.PRNGKey(0), noise=noise,
                           posterior_noise=post, num_steps=STEPS, guidance_scale=5.0,
                           return_latents=True)
  _compare(images, z, ref, seen[-1], 'SD img2img')
  with pytest.raises(errors.InputError, match='strength'):
    ours.img2img(PROMPTS, init, 1.5, jax.random.PRNGKey(0))


def _image_and_mask(n=2):
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (n, 16, 16, 3)).astype(np.uint8)
  mask = np.zeros((n, 16, 16, 1), np.float32)
  mask[0, 4:12, 2:10] = 1.0
  mask[1, 8:, :] = 0.8   # binarised to 1
  return image, mask


def _inpaint_equals_the_reference(reference, ours, latents_seed: int, generator_seed: int,
                                  what: str):
  """Inpaints PROMPTS with diffusers' `reference` and with `ours` from the same latents and
  the same posterior draw (with latents given, the generator's first draw); compares them.
  Returns the image and mask used."""
  image, mask = _image_and_mask()
  x_T = _latents(2, latents_seed)
  seen = _record_decode(reference)
  ref = reference(PROMPTS, image=image.astype(np.float32) / 255.0, mask_image=mask,
                  latents=_nchw(x_T), num_inference_steps=STEPS, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(generator_seed),
                  output_type='np').images
  post = torch.randn((2, 4, 8, 8),
                     generator=torch.Generator().manual_seed(generator_seed)).numpy()
  images, z = ours.inpaint(PROMPTS, image, mask, jax.random.PRNGKey(0), latents=x_T,
                           posterior_noise=post.transpose(0, 2, 3, 1), num_steps=STEPS,
                           return_latents=True)
  _compare(images, z, ref, seen[-1], what)
  return image, mask


def test_sd_inpaint_blending_equals_the_reference(root):
  """A 4-channel U-Net: the known region reset to the image's noised latents each step."""
  pipe, path = _sd(root)
  inpaint = diffusers.StableDiffusionInpaintPipeline(**pipe.components)
  _inpaint_equals_the_reference(inpaint, pipelines.from_pretrained(path), 5, 6,
                                'SD inpaint (blending)')


def test_sd_inpainting_unet_equals_the_reference(root):
  """The 9-channel inpainting U-Net: mask and masked image's latents as extra channels."""
  pipe, path = _sd(root, 'inpaint')
  ours = pipelines.from_pretrained(path)
  image, mask = _inpaint_equals_the_reference(pipe, ours, 7, 8, 'SD inpainting U-Net')
  with pytest.raises(errors.InputError, match='masks'):
    ours.inpaint(PROMPTS, image, mask[:, :8], jax.random.PRNGKey(0))


def test_v_prediction_equals_the_reference(root):
  """SD 2.x: a v-predicting scheduler (the same networks, the parameterisation read from it)."""
  pipe, _ = _sd(root)
  v_sched = diffusers.DDIMScheduler.from_config(pipe.scheduler.config,
                                                prediction_type='v_prediction')
  v_pipe = diffusers.StableDiffusionPipeline(**{**pipe.components, 'scheduler': v_sched})
  path = os.path.join(root, 'sd_v')
  v_pipe.save_pretrained(path, safe_serialization=True)
  ours = pipelines.from_pretrained(path)
  assert ours.parameterization == 'v'
  x_T = _latents(2, 9)
  seen = _record_decode(v_pipe)
  ref = v_pipe(PROMPTS, num_inference_steps=STEPS, latents=_nchw(x_T), output_type='np').images
  images, z = ours.generate(PROMPTS, jax.random.PRNGKey(0), latents=x_T, num_steps=STEPS,
                            return_latents=True)
  _compare(images, z, ref, seen[-1], 'SD v-prediction')


@pytest.mark.parametrize('config, want', [
    (dict(_class_name='PNDMScheduler', beta_schedule='scaled_linear', beta_start=0.00085,
          beta_end=0.012, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True),
     dict(name='ddim', spacing='leading+1')),
    (dict(_class_name='DPMSolverMultistepScheduler', beta_schedule='linear',
          timestep_spacing='linspace', prediction_type='v_prediction'),
     dict(name='dpmpp_2m', spacing='dpm_linspace')),
])
def test_released_schedulers_map_to_our_samplers(tmp_path, config, want):
  from diffusion_jax.diffusers_io import latent_pipeline
  os.makedirs(tmp_path / 'scheduler')
  with open(tmp_path / 'scheduler' / 'scheduler_config.json', 'w') as f:
    json.dump(config, f)
  diffusion, sampler = latent_pipeline._scheduler_sections(str(tmp_path),
                                                           'StableDiffusionPipeline')
  assert diffusion['schedule'] == config['beta_schedule']
  assert diffusion['parameterization'] == ('v' if 'prediction_type' in config else 'eps')
  assert {k: sampler[k] for k in want} == want
  assert sampler['num_steps'] == 50 and sampler['guidance_scale'] == 7.5


def test_refusals(tmp_path):
  with open(tmp_path / 'model_index.json', 'w') as f:
    json.dump({'_class_name': 'StableDiffusionPipeline'}, f)
  with pytest.raises(errors.InputError, match='scheduler/'):
    pipelines.from_pretrained(str(tmp_path))

"""The latent space and the frozen-autoencoder codec (`diffusion_jax.latent`).

The codec's encode and decode are compared with diffusers' own AutoencoderKL used as latent
diffusion pipelines use it: `latent_dist.mean * scaling_factor` in, `decode(z /
scaling_factor)` out, on a tiny random VAE saved inside a pipeline directory.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import errors, latent

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from hf_fixtures import randomise  # noqa: E402

VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
           down_block_types=['DownEncoderBlock2D'] * 2, up_block_types=['UpDecoderBlock2D'] * 2,
           scaling_factor=0.37)


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def test_scale_and_unscale_are_the_closed_form_and_inverse():
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 4))
  shifted = latent.LatentSpace(0.5, shift_factor=0.25)
  np.testing.assert_allclose(shifted.scale(z), (z - 0.25) * 0.5, rtol=1e-6)
  mean, std = (0.1, -0.2, 0.3, 0.0), (1.0, 2.0, 0.5, 4.0)
  stats = latent.LatentSpace(0.7, latents_mean=mean, latents_std=std)
  expected = (np.asarray(z) - np.asarray(mean)) * 0.7 / np.asarray(std)
  np.testing.assert_allclose(stats.scale(z), expected, rtol=1e-5)
  for space in (shifted, stats, latent.LatentSpace(0.18215)):
    np.testing.assert_allclose(space.unscale(space.scale(z)), z, atol=1e-6)


@pytest.mark.parametrize('kw, words', [
    (dict(latents_mean=(0.0,) * 4), 'both latents_mean and latents_std'),
    (dict(shift_factor=0.1, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4), 'not both'),
    (dict(scaling_factor=0.0), 'must be positive'),
])
def test_bad_latent_spaces_are_refused(kw, words):
  with pytest.raises(errors.InputError, match=words):
    latent.LatentSpace(**{'scaling_factor': 1.0, **kw})


def test_per_channel_statistics_must_match_the_channels():
  space = latent.LatentSpace(1.0, latents_mean=(0.0,) * 3, latents_std=(1.0,) * 3)
  with pytest.raises(errors.InputError, match='3/3 entries for 4 latent channels'):
    space.scale(jnp.zeros((1, 2, 2, 4)))


@pytest.fixture(scope='module')
def vae_pipeline_dir(tmp_path_factory):
  """(diffusers AutoencoderKL, a pipeline directory holding it as vae/)."""
  torch.manual_seed(0)
  model = randomise(diffusers.AutoencoderKL(**VAE).eval(), seed=0, scale=0.15)
  root = str(tmp_path_factory.mktemp('pipe'))
  model.save_pretrained(os.path.join(root, 'vae'), safe_serialization=True)
  with open(os.path.join(root, 'model_index.json'), 'w') as f:
    json.dump({'_class_name': 'StableDiffusionPipeline', 'vae': ['diffusers', 'AutoencoderKL']},
              f)
  return model, root


def test_codec_encodes_and_decodes_as_diffusers_pipelines(vae_pipeline_dir):
  model, root = vae_pipeline_dir
  codec = latent.load_codec(root)
  assert codec.space == latent.LatentSpace(0.37) and codec.latent_size(16) == 8
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    ref_z = (model.encode(torch.tensor(x)).latent_dist.mean * 0.37).numpy()
    ref_x = model.decode(torch.tensor(z) / 0.37).sample.numpy()
  ours_z = np.asarray(codec.encode(codec.params, jnp.asarray(_nhwc(x))))
  ours_x = np.asarray(codec.decode(codec.params, jnp.asarray(_nhwc(z))))
  np.testing.assert_allclose(ours_z, _nhwc(ref_z), atol=1e-4 * max(1, np.abs(ref_z).max()))
  np.testing.assert_allclose(ours_x, _nhwc(ref_x), atol=1e-4 * max(1, np.abs(ref_x).max()))
  # With a key: a posterior sample, scaled the same way, differing from the mean.
  sampled = np.asarray(codec.encode(codec.params, jnp.asarray(_nhwc(x)), jax.random.PRNGKey(1)))
  assert sampled.shape == ours_z.shape and not np.allclose(sampled, ours_z, atol=1e-3)


def test_codec_refusals(vae_pipeline_dir, tmp_path):
  _, root = vae_pipeline_dir
  with pytest.raises(errors.InputError, match='no such directory'):
    latent.load_codec(str(tmp_path / 'missing'))
  with pytest.raises(errors.InputError, match='not a multiple'):
    latent.load_codec(root).latent_size(15)

"""The latent family trained by the one trainer: diffusion on a frozen autoencoder's latents
(the step's x0 is the diffusers VAE's posterior mean times its scaling factor), the
autoencoder stage's loss in closed form, both stages trained and resumed through the CLI, and
the one-line refusals of latents that do not fit the network."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import latent as latent_configs
from diffusion_jax import conditioning, errors, models, pipelines
from diffusion_jax.diffusion import reconstruction

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 16  # the tiny configs' pixels: 8x8x4 latents
SCALE = 0.37


@pytest.fixture(scope='module')
def vae_folder(tmp_path_factory):
  """(diffusers AutoencoderKL with every weight random, its save_pretrained folder), at the
  tiny configs' layout (two levels, 4-channel latents) and a scaling factor of its own."""
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  from hf_fixtures import randomise
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(
      block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=SIDE,
      scaling_factor=SCALE, down_block_types=['DownEncoderBlock2D'] * 2,
      up_block_types=['UpDecoderBlock2D'] * 2)
  model = randomise(model.eval(), seed=0, scale=0.15)
  folder = str(tmp_path_factory.mktemp('vae'))
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


def _unet_config(path, **autoencoder):
  cfg = latent_configs.get_config('stage=unet,size=tiny')
  cfg.autoencoder.path = path
  for key, value in autoencoder.items():
    cfg.autoencoder[key] = value
  return cfg


def _images(n=4, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, SIDE, SIDE, 3)).astype(np.float32)


def _batch(cfg, images):
  n, length = images.shape[0], cfg.input.text_max_len
  return {'image': images, 'text_ids': np.ones((n, length), np.int32),
          'text_mask': np.ones((n, length), bool)}


@pytest.fixture(scope='module')
def encoder():
  cfg = _unet_config(None)
  from diffusion_jax import parallel
  return conditioning.build_encoder(cfg, parallel.create_mesh(cfg.mesh),
                                    parallel.logical_rules(cfg.mesh))


def test_step_x0_is_the_diffusers_posterior_mean_times_scaling(vae_folder, encoder):
  import torch
  model, folder = vae_folder
  images = _images()
  with torch.no_grad():
    mean = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
  want = mean.permute(0, 2, 3, 1).numpy() * SCALE
  cfg = _unet_config(folder, sample_posterior=False)
  codec = conditioning.build_codec(cfg)
  assert codec.space.scaling_factor == pytest.approx(SCALE)
  conditioner = conditioning.Conditioner(cfg, encoder, codec)
  frozen = conditioning.latent_frozen(codec.params, encoder.params)
  x0, cond = jax.jit(conditioner)(_batch(cfg, images), frozen, jax.random.key(1))
  x0 = np.asarray(x0)
  assert x0.shape == (4, 8, 8, 4) and set(cond) >= {'text_tokens', 'text_mask', 'drop_text'}
  err = np.abs(x0 - want).max() / np.abs(want).max()
  print(f'x0 vs diffusers mean * scaling_factor: max diff {err:.2e} of the scale')
  assert err < 1e-4
  # A posterior sample: the mean plus the posterior's std times unit noise.
  cfg.autoencoder.sample_posterior = True
  sampled = np.asarray(conditioning.Conditioner(cfg, encoder, codec)(
      _batch(cfg, images), frozen, jax.random.key(1))[0])
  _, logvar = codec.module.apply({'params': codec.params}, images, method='encode')
  unit = (sampled - x0) / (SCALE * np.exp(0.5 * np.asarray(logvar)))
  assert 0.9 < unit.std() < 1.1 and abs(unit.mean()) < 0.1, (unit.mean(), unit.std())
  # autoencoder.scaling_factor overrides the autoencoder's latent space.
  cfg.autoencoder.scaling_factor = 2.0
  assert conditioning.build_codec(cfg).space.scaling_factor == 2.0


def test_autoencoder_loss_closed_form():
  cfg = latent_configs.get_config('stage=autoencoder,size=tiny')
  module = models.build(cfg.model)
  x, t, cond = models.example_inputs(cfg.model, 2)
  params = module.init(jax.random.key(0), x, t, cond)['params']
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape),
                        params)  # no zero-initialised leaf
  x = _images(2, seed=1)
  noise = np.random.default_rng(2).standard_normal(cond['posterior_noise'].shape)
  noise = noise.astype(np.float32)
  apply_fn = lambda p, x_t, t_B, c, rng: module.apply({'params': p}, x_t, t_B, c, train=True)
  mean, logvar = (np.asarray(a, np.float64) for a in module.apply(
      {'params': params}, x, method='encode'))
  recon = np.asarray(module.apply({'params': params}, (mean + np.exp(0.5 * logvar) * noise)
                                  .astype(np.float32), method='decode'), np.float64)
  pixels = math.prod(x.shape[1:])
  kl = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).reshape(2, -1).sum(1)
  for kind, err in (('l1', np.abs(x - recon)), ('l2', (x - recon)**2)):
    for weight in (0.0, 1e-6, 0.5):
      want = np.mean(err.reshape(2, -1).sum(1) / pixels + weight * kl / pixels)
      loss, aux = reconstruction.autoencoder_loss(
          apply_fn, params, {'x0': x, 'noise': noise}, None,
          {'reconstruction': kind, 'kl_weight': weight})
      assert float(loss) == pytest.approx(want, rel=1e-4), (kind, weight)
      assert float(aux['kl']) == pytest.approx(kl.mean(), rel=1e-4)
  assert kl.mean() > 1.0, 'a KL of ~0 would not test its weight'


def _train(config_arg, workdir, steps, *flags):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  cmd = [sys.executable, '-m', 'diffusion_jax.train',
         f'--config={REPO}/configs/latent.py:{config_arg}', f'--workdir={workdir}',
         f'--config.total_steps={steps}', '--config.ckpt_steps=1', '--config.log_steps=1',
         '--config.optimizer.warmup_steps=0', '--config.input.batch_size=8', *flags]
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):  # the session's (conftest), not ROOT's
    cmd.append(f'--compilation_cache={os.environ["JAX_COMPILATION_CACHE_DIR"]}')
  return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _trained(stage_dir, steps):
  stage = conditioning.restore_stage(str(stage_dir), use_ema=False)
  assert stage.step == steps
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(stage.params))
  return stage


def test_autoencoder_then_latent_unet_train_and_resume_through_the_cli(tmp_path):
  root = tmp_path / 'root'
  for stage in ('autoencoder', 'unet'):  # the unet reads ROOT/autoencoder (its default path)
    first = _train(f'stage={stage},size=tiny', root / stage, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _train(f'stage={stage},size=tiny', root / stage, 3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'restored checkpoint step 2' in resumed.stderr
    assert 'non-finite' not in resumed.stderr
    trained = _trained(root / stage, 3)
    if stage == 'autoencoder':
      assert isinstance(trained.model, models.autoencoder.AutoencoderKL)
  # The unet trains on the autoencoder stage's EMA weights, replicated, as `frozen`.
  cfg = latent_configs.get_config('stage=unet,size=tiny')
  codec = conditioning.build_codec(cfg, str(root / 'unet'))
  ema = conditioning.restore_stage(str(root / 'autoencoder')).params
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), codec.params, ema))
  # The cascade samples the unet's latents and decodes them with that same autoencoder.
  pipe = pipelines.load(latent_configs.get_config('stage=cascade,size=tiny'), str(root))
  stage = pipe.stage('unet')
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), stage.codec.params, ema))
  x_T = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  images, stages = pipe.generate(['a red circle', 'two blue squares'], jax.random.PRNGKey(0),
                                 latents={'unet': x_T}, num_steps=2, return_stages=True)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  again = pipe.generate(['a red circle', 'two blue squares'], jax.random.PRNGKey(1),
                        latents={'unet': x_T}, num_steps=2)
  np.testing.assert_array_equal(images, again)  # DDIM from the given x_T: deterministic
  other = pipe.generate(['a red circle', 'two blue squares'], jax.random.PRNGKey(0),
                        latents={'unet': x_T + 1.0}, num_steps=2)
  assert np.abs(other.astype(int) - images).max() > 0


def test_refusals(vae_folder, encoder, tmp_path):
  _, folder = vae_folder
  cfg = _unet_config(folder)
  codec = conditioning.build_codec(cfg)
  cfg.model.image_size = 16  # the pixels', not the latents'
  with pytest.raises(errors.InputError, match=r'model.image_size=16.*set model.image_size=8'):
    conditioning.Conditioner(cfg, encoder, codec)
  cfg = _unet_config(folder)
  cfg.model.in_channels = 3
  with pytest.raises(errors.InputError, match=r'in_channels=3.*8x8x4 latents'):
    conditioning.Conditioner(cfg, encoder, codec)
  cfg = _unet_config(folder)
  cfg.input.image_size = 15
  with pytest.raises(errors.InputError, match="image_size=15: must be a multiple of the "
                                              "autoencoder's downsample factor 2"):
    conditioning.Conditioner(cfg, encoder, codec)
  with pytest.raises(errors.InputError, match='no such directory'):
    conditioning.build_codec(_unet_config(str(tmp_path / 'missing')))
  with pytest.raises(errors.InputError, match='holds no checkpoint'):
    os.makedirs(tmp_path / 'empty' / 'checkpoints')
    conditioning.build_codec(_unet_config(str(tmp_path / 'empty')))
  with pytest.raises(ValueError, match='needs its frozen autoencoder'):
    conditioning.Conditioner(_unet_config(folder), encoder)
  # The command line: one line, before anything compiles.
  out = _train('stage=unet,size=tiny', tmp_path / 'unet', 1,
               f'--config.autoencoder.path={tmp_path / "missing"}')
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if 'autoencoder.path' in l]
  assert len(lines) == 1 and 'no such directory' in lines[0], out.stderr[-2000:]

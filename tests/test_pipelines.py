"""Sampling pipelines on tiny cascades trained for one step: shapes at every stage, seeds,
classifier-free guidance in one pass, unCLIP's prior selection, variations, interpolations
and text diffs, GLIDE's inpainting and CLIP guidance, and the errors for missing stages."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import io_util, pipelines
from diffusion_jax.pipelines import common, unclip as unclip_lib
import pipeline_fixtures as pf

PROMPTS = ['a red circle', 'a blue square to the left of a green triangle']
IMAGEN = ('base64', 'sr256')
UNCLIP = ('prior', 'decoder64', 'up256')
GLIDE = ('base64', 'up256', 'inpaint64', 'noised_clip')


def _mad(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


@pytest.fixture(scope='module')
def imagen_pipe():
  return pipelines.load(pf.cascade_config('imagen'), pf.trained_root('imagen', IMAGEN))


@pytest.fixture(scope='module')
def unclip_pipe():
  return pipelines.load(pf.cascade_config('unclip', num_steps=16),
                        pf.trained_root('unclip', UNCLIP))


@pytest.fixture(scope='module')
def glide_pipe():
  cfg = pf.cascade_config('glide', extra=('inpaint64', 'noised_clip'))
  return pipelines.load(cfg, pf.trained_root('glide', GLIDE))


def _check_cascade(pipe, expected):
  out0, stages0 = pipe.generate(PROMPTS, jax.random.PRNGKey(0), return_stages=True)
  again = pipe.generate(PROMPTS, jax.random.PRNGKey(0))
  other = pipe.generate(PROMPTS, jax.random.PRNGKey(1))
  assert {k: v.shape for k, v in stages0.items()} == expected, 'wrong shapes per stage'
  last = list(expected.values())[-1]
  assert out0.shape == last and out0.dtype == np.uint8, f'final output {out0.shape} {out0.dtype}'
  np.testing.assert_array_equal(out0, again, err_msg='same seed gave different images')
  assert _mad(out0, other) > 1.0, 'different seeds gave (nearly) the same images'
  assert _mad(out0[0], out0[1]) > 1.0, 'two prompts of one batch gave the same image'
  return stages0


def test_imagen_cascade_shapes_and_seeds(imagen_pipe):
  _check_cascade(imagen_pipe, {'base64': (2, 16, 16, 3), 'sr256': (2, 32, 32, 3)})
  assert set(imagen_pipe.timings) == set(IMAGEN), 'per-stage timing missing'


def test_unclip_cascade_shapes_and_seeds(unclip_pipe):
  _check_cascade(unclip_pipe, {'decoder64': (2, 16, 16, 3), 'up256': (2, 32, 32, 3)})


def test_glide_cascade_shapes_and_seeds(glide_pipe):
  _check_cascade(glide_pipe, {'base64': (2, 16, 16, 3), 'up256': (2, 32, 32, 3)})


def _perturbed(params, seed: int = 1):
  """One step of training leaves the zero-initialised output layers at ~0, so conditioning
  barely reaches the output; perturbed weights make the conditionings clearly differ."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize('scale', [1.0, 4.0])
def test_cfg_one_pass_equals_two_pass_formula(unclip_pipe, scale):
  """The decoder's guided denoiser (one batched pass over [cond; uncond] with both the
  caption and the image embedding dropped) against two separate passes."""
  dec = unclip_pipe.stage('decoder64')
  n = 8
  rng = np.random.default_rng(0)
  embed = jnp.asarray(rng.normal(size=(n, 32)), jnp.float32)
  cond = unclip_pipe._decoder_cond(embed, ['a red circle'] * n, n, jax.random.PRNGKey(0))
  x_t = jnp.asarray(rng.normal(size=(n, 16, 16, 3)), jnp.float32)
  t_B = jnp.linspace(0.1, 0.9, n)
  params = _perturbed(dec.params)
  with dec.context():
    guided = jax.jit(lambda p, x, t, c: dec.guided_denoise_fn(p, scale)(x, t, c))(
        params, x_t, t_B, cond)
    plain = jax.jit(lambda p, x, t, c: dec.denoise_fn(p, False)(x, t, c))
    out_c = plain(params, x_t, t_B, cond)
    uncond = dict(cond, drop_text=jnp.ones((n,), bool), drop_image=jnp.ones((n,), bool))
    out_u = plain(params, x_t, t_B, uncond)
  assert _mad(out_c[..., :3], out_u[..., :3]) > 1e-3, 'uncond equals cond: flags not read'
  want_mean = out_u[..., :3] + scale * (out_c[..., :3] - out_u[..., :3])
  np.testing.assert_allclose(guided[..., :3], want_mean, atol=2e-5, rtol=1e-4,
                             err_msg='guided mean != uncond + s * (cond - uncond)')
  np.testing.assert_allclose(guided[..., 3:], out_c[..., 3:], atol=2e-5, rtol=1e-4,
                             err_msg='learned variance should be the conditional one')


def test_prompt_pairs_push_their_own_prompt_only(imagen_pipe):
  """`generate(contrasts=)`: at contrast_scale 0 the samples are the plain ones; at 4 the
  prompt with pairs moves and the one without stays (its pair is padding, weighted 0)."""
  base = imagen_pipe.stage('base64')
  saved = base.params
  base.params = _perturbed(saved)
  key = jax.random.PRNGKey(5)
  pairs = [[], [('a blue square', 'a blue triangle'), ('a green triangle', 'a green square')]]
  try:
    def base_out(**kw):
      return imagen_pipe.generate(PROMPTS, key, return_stages=True, **kw)[1]['base64']
    plain = base_out()
    off = base_out(contrasts=pairs, contrast_scale=0.0)
    on = base_out(contrasts=pairs, contrast_scale=4.0)
    with pytest.raises(ValueError, match='one list per prompt'):
      base_out(contrasts=pairs[:1], contrast_scale=1.0)
  finally:
    base.params = saved
  np.testing.assert_array_equal(off, plain, err_msg='contrast_scale 0 changed the samples')
  assert _mad(on[0], plain[0]) < 0.05, 'a prompt without pairs was pushed by another\'s'
  assert _mad(on[1], plain[1]) > 1.0, 'the prompt pairs did not move their prompt\'s sample'


def test_prior_best_of_picks_larger_dot_product(unclip_pipe):
  chosen, index, cands, text = unclip_pipe.prior(PROMPTS, jax.random.PRNGKey(3),
                                                 return_candidates=True)
  assert cands.shape == (2, 2, 32), f'best_of=2 candidates per prompt, got {cands.shape}'
  dots = np.einsum('kbd,bd->kb', np.asarray(cands), np.asarray(text))
  np.testing.assert_array_equal(np.asarray(index), dots.argmax(0), 'not the larger dot product')
  np.testing.assert_allclose(chosen, np.asarray(cands)[dots.argmax(0), [0, 1]], atol=1e-6)
  # The pure selection on constructed candidates: candidate 1 wins row 0, candidate 0 row 1.
  c = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [3.0, 0.0]]])
  picked, idx = unclip_lib.best_of(c, jnp.asarray([[0.0, 1.0], [1.0, 0.0]]))
  np.testing.assert_array_equal(idx, [1, 1])
  np.testing.assert_array_equal(picked, [[0.0, 2.0], [3.0, 0.0]])


def test_slerp_keeps_norm_and_hits_endpoints():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 5, 64))
  b = b / np.linalg.norm(b, axis=-1, keepdims=True) * np.linalg.norm(a, axis=-1, keepdims=True)
  w = np.linspace(0, 1, 5)
  out = np.asarray(common.slerp(a, b, w))
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(a, axis=-1),
                             rtol=1e-5, err_msg='slerp changed the norm')
  np.testing.assert_allclose(out[0], a[0], atol=1e-5)
  np.testing.assert_allclose(out[-1], b[-1], atol=1e-5)
  # The angle moves linearly: the midpoint is equally far from both ends, on the great circle.
  mid = np.asarray(common.slerp(a[:1], b[:1], np.array([0.5])))[0]
  cos = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)
  assert abs(cos(mid, a[0]) - cos(mid, b[0])) < 1e-5, 'midpoint not equidistant'
  lerp = 0.5 * (a[0] + b[0])
  assert np.linalg.norm(mid) > np.linalg.norm(lerp) + 1e-3, 'this is lerp, not slerp'


@pytest.fixture(scope='module')
def unclip_sources(unclip_pipe):
  """Decoder-resolution images the decoder itself made (in its distribution)."""
  _, stages = unclip_pipe.generate(PROMPTS, jax.random.PRNGKey(5), return_stages=True)
  return stages['decoder64']


@pytest.fixture(scope='module')
def reconstructions(unclip_pipe, unclip_sources):
  _, stages = unclip_pipe.variations(unclip_sources, jax.random.PRNGKey(7), eta=0.0,
                                     return_stages=True)
  return stages['decoder64']


def test_variations_eta0_reconstruct_and_eta1_vary(unclip_pipe, unclip_sources,
                                                   reconstructions):
  err0 = _mad(reconstructions, unclip_sources)
  _, stages = unclip_pipe.variations(unclip_sources, jax.random.PRNGKey(7), eta=1.0,
                                     return_stages=True)
  err1 = _mad(stages['decoder64'], unclip_sources)
  other = _mad(unclip_sources[0], unclip_sources[1])
  assert err0 < 10.0, f'eta=0 DDIM inversion round trip is off by {err0:.1f} levels on average'
  assert err0 < 0.5 * other, f'reconstruction error {err0:.1f} vs {other:.1f} between images'
  assert err1 > err0 + 1.0, (f'eta=1 variations ({err1:.1f}) do not vary more than eta=0 '
                             f'({err0:.1f})')


def test_interpolation_endpoints_reproduce_reconstructions(unclip_pipe, unclip_sources,
                                                           reconstructions):
  out, stages = unclip_pipe.interpolate(unclip_sources[0], unclip_sources[1], 3,
                                        jax.random.PRNGKey(9), return_stages=True)
  frames = stages['decoder64']
  assert out.shape == (3, 32, 32, 3), f'interpolation output {out.shape}'
  assert np.abs(frames[0].astype(int) - reconstructions[0]).max() <= 1, 'first endpoint'
  assert np.abs(frames[2].astype(int) - reconstructions[1]).max() <= 1, 'last endpoint'
  assert _mad(frames[1], frames[0]) > 0.5 and _mad(frames[1], frames[2]) > 0.5, 'no midpoint'


def test_text_diff_weight_zero_is_the_reconstruction(unclip_pipe, unclip_sources,
                                                     reconstructions):
  out, stages = unclip_pipe.text_diff(unclip_sources[0], PROMPTS[0], 'a blue circle',
                                      [0.0, 0.75], jax.random.PRNGKey(11), return_stages=True)
  frames = stages['decoder64']
  assert out.shape == (2, 32, 32, 3)
  assert np.abs(frames[0].astype(int) - reconstructions[0]).max() <= 1, 'weight 0 != input'
  z = np.asarray(unclip_pipe.text_direction(PROMPTS[0], 'a blue circle'))
  e = np.asarray(unclip_pipe.text_embed([PROMPTS[0], 'a blue circle']))
  want = (e[1] - e[0]) / np.linalg.norm(e[1] - e[0]) * np.sqrt(32)
  np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-5,
                             err_msg='z_d != normalise(text(new) - text(old)) * sqrt(D)')
  image_embed = unclip_pipe.image_embed(unclip_sources[:1])[0]
  path = np.asarray(unclip_pipe.text_diff_embeddings(image_embed, PROMPTS[0], 'a blue circle',
                                                     [0.0, 0.5, 1.0]))
  np.testing.assert_allclose(path[0], image_embed, atol=1e-4, err_msg='weight 0: image embed')
  np.testing.assert_allclose(path[2], z, atol=1e-4, err_msg='weight 1: the text direction')
  np.testing.assert_allclose(np.linalg.norm(path, axis=-1), np.sqrt(32), rtol=1e-5,
                             err_msg='the text-diff path left the embedding sphere')


def test_inpainting_keeps_the_known_region(glide_pipe):
  _, stages = glide_pipe.generate(PROMPTS, jax.random.PRNGKey(2), return_stages=True)
  image = stages['base64']
  mask = np.ones((16, 16), np.float32)
  mask[4:12, 3:11] = 0  # fill a box
  out = glide_pipe.inpaint(image, mask, PROMPTS[0], jax.random.PRNGKey(4))
  assert out.shape == image.shape
  known = np.abs(out.astype(int) - image.astype(int))[:, mask > 0]
  assert known.max() <= 1, f'known pixels moved by up to {known.max()} levels'
  assert _mad(out[:, mask == 0], image[:, mask == 0]) > 2.0, 'the hole was not resampled'


def test_clip_guidance_raises_the_clip_score(glide_pipe):
  clip = glide_pipe.stage('noised_clip')
  plain = glide_pipe.generate(PROMPTS, jax.random.PRNGKey(6), base64={'guidance_scale': 1.0},
                              return_stages=True)[1]['base64']
  guided = glide_pipe.generate(PROMPTS, jax.random.PRNGKey(6), clip_guidance_scale=200.0,
                               return_stages=True)[1]['base64']
  ids, mask = clip.tokenize(PROMPTS)

  def score(images):
    x = jnp.asarray(io_util.to_float(images))
    t = jnp.zeros((x.shape[0],))
    img = clip.model.apply({'params': clip.params}, x, t, method='encode_image')
    txt = clip.model.apply({'params': clip.params}, ids, mask, method='encode_text')
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return np.asarray(jnp.sum(img * txt, -1))

  s_plain, s_guided = score(plain), score(guided)
  assert np.all(s_guided > s_plain), f'CLIP score guided {s_guided} vs unguided {s_plain}'


def test_missing_checkpoint_names_directory_and_train_command(tmp_path):
  root = pf.trained_root('imagen', IMAGEN)
  partial = tmp_path / 'root'
  shutil.copytree(os.path.join(root, 'base64'), partial / 'base64')
  with pytest.raises(pipelines.MissingCheckpointError) as e:
    pipelines.load(pf.cascade_config('imagen'), str(partial))
  msg = str(e.value)
  assert str(partial / 'sr256' / 'checkpoints') in msg, msg
  assert ('python -m diffusion_jax.train --config=configs/imagen.py:stage=sr256,size=tiny '
          f'--workdir={partial / "sr256"}') in msg, msg
  assert '\n' not in msg


def test_unknown_stage_and_override_are_refused(imagen_pipe):
  with pytest.raises(pipelines.UnknownStageError, match='sr512'):
    imagen_pipe.stage('sr512')
  with pytest.raises(ValueError, match='num_stepz'):
    imagen_pipe.generate(PROMPTS, jax.random.PRNGKey(0), num_stepz=3)
  with pytest.raises(ValueError, match='no prompts'):
    imagen_pipe.generate([], jax.random.PRNGKey(0))

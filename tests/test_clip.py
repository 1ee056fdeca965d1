"""CLIP: parity with transformers' CLIPModel (both EOS pooling conventions), paper sizes."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import hf_fixtures
from diffusion_jax.parallel import DEFAULT_LOGICAL_RULES
from diffusion_jax import convert, parallel
from diffusion_jax.models import clip


def _reference(model, ids, mask, pixels_BCHW):
  import torch
  with torch.no_grad():
    t = model.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    v = model.vision_model(pixel_values=torch.tensor(pixels_BCHW))
    return dict(
        text_hidden=t.last_hidden_state.numpy(), text_pooled=t.pooler_output.numpy(),
        text_embeds=model.text_projection(t.pooler_output).numpy(),
        image_hidden=v.last_hidden_state.numpy(), image_pooled=v.pooler_output.numpy(),
        image_embeds=model.visual_projection(v.pooler_output).numpy(),
        logit_scale=float(model.logit_scale))


def _pixels():
  return np.random.RandomState(2).randn(2, 3, 16, 16).astype(np.float32)


# eos_token_id=63: pooled at the first eos; eos_token_id=2: legacy configs, pooled at argmax(ids).
@pytest.mark.parametrize('eos,act', [(63, 'quick_gelu'), (2, 'gelu')])
def test_parity_with_transformers(eos, act):
  model, path = hf_fixtures.clip_model(eos, act)
  module, params = convert.load_clip(path)
  assert module.text['eos_token_id'] == eos and module.text['act'] == act
  ids, mask = hf_fixtures.clip_text_batch()
  px = _pixels()
  ref = _reference(model, ids, mask, px)
  tf = module.apply({'params': params}, ids, mask, method='text_features')
  vf = module.apply({'params': params}, px.transpose(0, 2, 3, 1), method='image_features')
  ours = dict(text_hidden=tf['last_hidden_state'], text_pooled=tf['pooled'],
              text_embeds=tf['embeds'], image_hidden=vf['last_hidden_state'],
              image_pooled=vf['pooled'], image_embeds=vf['embeds'])
  for name, value in ours.items():
    value = np.asarray(value)
    assert value.shape == ref[name].shape, f'{name}: shape {value.shape} vs {ref[name].shape}'
    err = np.abs(value - ref[name]).max()
    assert err < 1e-4, f'CLIP {name} differs from transformers by {err} (eos={eos}, act={act})'
  np.testing.assert_allclose(float(params['logit_scale']), ref['logit_scale'], rtol=1e-6)
  # The public methods return the projected embeddings.
  np.testing.assert_allclose(
      np.asarray(module.apply({'params': params}, ids, mask, method='encode_text')),
      ref['text_embeds'], atol=1e-4)
  np.testing.assert_allclose(
      np.asarray(module.apply({'params': params}, px.transpose(0, 2, 3, 1), method='encode_image')),
      ref['image_embeds'], atol=1e-4)


def test_pooling_conventions_pick_different_tokens():
  # With an eos id that is not the largest id, first-eos pooling and the legacy argmax
  # pooling (eos_token_id == 2) must pick different positions of the same hidden states.
  _, path = hf_fixtures.clip_model(63, 'quick_gelu')
  module, params = convert.load_clip(path)
  ids, mask = hf_fixtures.clip_text_batch()
  ids = np.where(ids == 40, 39, ids)
  ids[0, 5] = 40  # eos of row 0 under eos_token_id=40; its largest id (63) sits at 9
  first = module.clone(text={**module.text, 'eos_token_id': 40})
  legacy = module.clone(text={**module.text, 'eos_token_id': 2})
  f = first.apply({'params': params}, ids, mask, method='text_features')
  g = legacy.apply({'params': params}, ids, mask, method='text_features')
  hidden = np.asarray(f['last_hidden_state'])
  np.testing.assert_allclose(np.asarray(f['pooled'])[0], hidden[0, 5], atol=1e-6,
                             err_msg='first-eos pooling did not pool at the eos token')
  np.testing.assert_allclose(np.asarray(g['pooled'])[0], hidden[0, 9], atol=1e-6,
                             err_msg='legacy pooling did not pool at the largest token id')
  assert np.abs(hidden[0, 5] - hidden[0, 9]).max() > 1e-3


def test_logical_names_shard_params():
  module = clip.make('tiny')
  abstract = clip.abstract_params(module, boxed=True)
  mesh = parallel.create_mesh(dict(data=1, fsdp=2, tensor=4))
  flat = traverse_util.flatten_dict(parallel.logical_shardings(abstract, mesh, DEFAULT_LOGICAL_RULES))
  assert flat[('vision_model', 'encoder', 'layers', 'q', 'kernel')].spec == P(None, 'fsdp', 'tensor', None)
  assert flat[('text_model', 'encoder', 'layers', 'fc1', 'kernel')].spec == P(None, 'fsdp', 'tensor')


def test_noised_clip_init_under_mesh_context():
  import flax.linen as nn
  module = clip.make_noised('tiny')
  x, t, cond = clip.noised_clip_example_inputs(clip.NOISED_PRESETS['tiny'], 4)
  mesh = parallel.create_mesh(dict(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_LOGICAL_RULES):
    params = jax.jit(lambda k: nn.meta.unbox(module.init(k, x, t, cond)['params']))(
        jax.random.PRNGKey(0))
    img, txt, scale = jax.jit(module.apply)({'params': params}, x, t, cond)
  assert img.shape == txt.shape == (4, 32) and scale.shape == ()


@pytest.mark.parametrize('preset,vision,text', [
    ('vit_h14', 632.08e6, 354.03e6),  # OpenCLIP ViT-H-14 model profile
    ('vit_l14', 303.97e6, 123.65e6),  # openai/clip-vit-large-patch14 (427.6M in all)
])
def test_paper_sizes(preset, vision, text):
  shapes = clip.abstract_params(clip.make(preset))
  count = lambda *keys: sum(int(np.prod(x.shape)) for k in keys for x in jax.tree.leaves(shapes[k]))
  nv, nt = count('vision_model', 'visual_projection'), count('text_model', 'text_projection')
  assert abs(nv - vision) / vision < 0.01, f'{preset} image tower {nv / 1e6:.2f}M, expected {vision / 1e6:.2f}M'
  assert abs(nt - text) / text < 0.01, f'{preset} text tower {nt / 1e6:.2f}M, expected {text / 1e6:.2f}M'

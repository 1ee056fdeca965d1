"""unCLIP in the embedded demo: the `clip` stage (CLIP trained from scratch on Shapes by the
shared trainer), its export as a transformers CLIPModel directory, and the demo end to end."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import unclip
from diffusion_jax import checkpoint as ckpt_lib
from diffusion_jax import conditioning, convert, encoders, parallel
from diffusion_jax import tokenizer as tokenizer_lib
from diffusion_jax.models import clip
from diffusion_jax.tools import export_clip
from diffusion_jax.train import loop
from projects.shapes import demo, shapes
from projects.shapes.configs import unclip as shapes_unclip

import demo_fixtures

PROMPTS = ['a red circle', 'two blue squares and a green triangle', '']


def _trained_looking_params(module, seed=0):
  """Random init, then every tensor perturbed: LayerNorm ones and zero biases become
  distinct values, so a dropped or mis-transposed tensor cannot go unnoticed."""
  text, vision = module.text, module.vision
  px = np.zeros((1, vision['image_size'], vision['image_size'], 3), np.float32)
  ids = np.zeros((1, text['max_length']), np.int32)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(seed), px, ids))['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.device_get(jax.tree.unflatten(tree, [
      p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]))


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp('clip_export')
  tok_dir = tokenizer_lib.build_word_tokenizer(shapes.VOCABULARY, str(root / 'tok'), 'clip')
  module = clip.make('tiny')  # pools at the last unpadded token, as trained from scratch
  params = _trained_looking_params(module)
  out = convert.export_clip(params, module, str(root / 'export'), tokenizer_dir=tok_dir,
                            image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
  return module, params, out


def _images(n=3, size=16):
  return np.stack([shapes.render(c or 'a red circle', size, seed=i)
                   for i, c in enumerate(PROMPTS[:n])])


def test_export_reads_back_identically(exported):
  module, params, out = exported
  loaded_module, loaded = convert.load_clip(out)
  want, got = traverse_util.flatten_dict(params), traverse_util.flatten_dict(loaded)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg='/'.join(k))
  tok = tokenizer_lib.load_tokenizer(out, module.text['max_length'])
  ids, mask = tok(PROMPTS)
  enc = lambda m, p: m.apply({'params': p}, ids, mask, method='encode_text')
  np.testing.assert_array_equal(enc(loaded_module, loaded), enc(module, params))
  x = (_images().astype(np.float32) / 255.0 - 0.5) / 0.5
  img = lambda m, p: m.apply({'params': p}, x, method='encode_image')
  np.testing.assert_array_equal(img(loaded_module, loaded), img(module, params))


def test_config_to_hf_inverts_config_from_hf():
  fields = clip.PRESETS['small']
  fields = {**fields, 'text': {**fields['text'], 'eos_token_id': 127}, 'logit_scale_init': 2.0}
  assert clip.config_from_hf(clip.config_to_hf(fields)) == fields
  with pytest.raises(ValueError, match='eos'):
    clip.config_to_hf(clip.PRESETS['small'])  # pools at the last unpadded token


def test_export_is_what_build_encoder_loads(exported):
  module, params, out = exported
  cfg = encoders.encoder_config('clip', path=out, max_length=module.text['max_length'])
  enc = encoders.build_encoder(cfg)
  tokens, mask, pooled = enc.encode_text(PROMPTS)
  ids, _ = enc.tokenize(PROMPTS)
  want = module.apply({'params': params}, ids, mask, method='encode_text')
  np.testing.assert_allclose(pooled, want, rtol=1e-6, atol=1e-6)
  # The written pixel statistics (0.5, 0.5) map uint8 images to the [-1, 1] of training.
  images = _images()
  x = images.astype(np.float32) / 127.5 - 1.0
  want = module.apply({'params': params}, x, method='encode_image')
  np.testing.assert_allclose(enc.encode_image(images), want, rtol=1e-5, atol=1e-5)


def test_export_matches_transformers_clip(exported):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  module, params, out = exported
  model, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
  model.eval()
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  enc = tok(PROMPTS, padding='max_length', max_length=module.text['max_length'],
            return_tensors='np')
  ids, mask = enc['input_ids'], enc['attention_mask']
  x = (_images().astype(np.float32) / 255.0 - 0.5) / 0.5
  with torch.no_grad():
    t_txt = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                    attention_mask=torch.from_numpy(mask).long())
    t_img = model.get_image_features(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
  as_np = lambda t: (t.pooler_output if hasattr(t, 'pooler_output') else t).numpy()
  ours_txt = module.apply({'params': params}, ids, mask.astype(bool), method='encode_text')
  ours_img = module.apply({'params': params}, x, method='encode_image')
  np.testing.assert_allclose(as_np(t_txt), ours_txt, atol=1e-4)
  np.testing.assert_allclose(as_np(t_img), ours_img, atol=1e-4)
  np.testing.assert_allclose(model.logit_scale.item(), params['logit_scale'], rtol=1e-6)


def test_clip_stage_config():
  c = shapes_unclip.get_config('stage=clip')
  prior = shapes_unclip.get_config('stage=prior')
  # The stage trains exactly the CLIP the prior and the decoder read (their preset).
  assert dict(c.model.text) == clip.PRESETS[prior.text_encoder.preset]['text']
  assert c.model.embed_dim == prior.text_encoder.embed_dim
  assert c.input.image_size == prior.input.image_size
  assert c.input.text_max_len == prior.input.text_max_len
  assert c.objective == 'clip' and c.text_encoder.name is None
  with pytest.raises(ValueError, match='text_encoder.path'):
    unclip.get_config('stage=clip,size=paper')


CLIP_STEPS = 120  # past the ~50 steps at chance level with which contrastive training starts


def _tiny_plan(**kw):
  return demo_fixtures.tiny_plan(
      'unclip', (('clip', CLIP_STEPS), ('prior', 2), ('decoder64', 2)), **kw)


@pytest.fixture(scope='module')
def tiny_demo(tmp_path_factory):
  return demo_fixtures.run_tiny_demo(tmp_path_factory, 'unclip_demo', _tiny_plan())


def test_unclip_demo_end_to_end(tiny_demo):
  root, plan, result = tiny_demo
  assert plan.order == ('prior', 'decoder64')
  with open(os.path.join(root, 'alignment.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  assert saved['cascade'] == ['prior', 'decoder64'] and saved['image_size'] == 16
  assert set(saved['rates']) == {'guidance_1', 'guidance_3'}
  assert 'clip stage' in saved['text_encoder']
  with open(os.path.join(root, 'samples', 'captions.json')) as f:
    captions = json.load(f)
  assert len(captions) == 8 and os.path.exists(os.path.join(root, 'samples', 'grid.png'))
  for stage, steps in plan.stages:
    assert sorted(os.listdir(os.path.join(root, stage, 'checkpoints')))[-1] == str(steps)
  export = os.path.join(root, 'clip', 'export')
  for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json',
               'preprocessor_config.json'):
    assert os.path.isfile(os.path.join(export, name)), name
  assert export_clip.export_info(export)['step'] == CLIP_STEPS
  # The prior and the decoder trained, and sample, with that CLIP and its tokenizer.
  exported = tokenizer_lib.load_tokenizer(export, 16)
  for stage in ('prior', 'decoder64'):
    assert demo.stage_config(plan, stage, 2, root).text_encoder.path == export
    assert conditioning.restore_stage(os.path.join(root, stage)).config.text_encoder.path == export
    # The tokenizer the stage keeps is the export's, not one of its own.
    kept = tokenizer_lib.load_tokenizer(os.path.join(root, stage, 'tokenizer'), 16)
    assert kept.hf.get_vocab() == exported.hf.get_vocab(), stage
    captions = ['a red circle', 'two blue squares above a green triangle']
    np.testing.assert_array_equal(kept(captions)[0], exported(captions)[0])


def test_clip_export_is_skipped_when_done(tiny_demo, capsys):
  root, plan, _ = tiny_demo
  model = os.path.join(root, 'clip', 'export', 'model.safetensors')
  before = os.stat(model).st_mtime_ns
  demo.export_own_clip(demo.stage_config(plan, 'clip', CLIP_STEPS, root), root)
  assert os.stat(model).st_mtime_ns == before, 'the finished export was written again'
  assert f'step {CLIP_STEPS}' in capsys.readouterr().out
  # An export of another checkpoint (an extended clip stage) is replaced.
  export = os.path.join(root, 'clip', 'export')
  stale = {**export_clip.export_info(export), 'step': 1}
  with open(os.path.join(export, export_clip.EXPORT_INFO), 'w') as f:
    json.dump(stale, f)
  demo.export_own_clip(demo.stage_config(plan, 'clip', CLIP_STEPS, root), root)
  assert os.stat(model).st_mtime_ns != before
  assert export_clip.export_info(export)['step'] == CLIP_STEPS


def test_clip_stage_learned(tiny_demo):
  """The demo's clip stage (the shared trainer, objective 'clip'): on a fixed batch of its
  training captions, the contrastive loss falls well below its value at initialisation."""
  root, plan, _ = tiny_demo
  cfg = demo.stage_config(plan, 'clip', CLIP_STEPS, root)
  trainer = loop.build_trainer(cfg, os.path.join(root, 'clip'))
  from diffusion_jax.data import pipeline
  data = pipeline.make_train_iterator(cfg.input, tokenizer=trainer.tokenizer, seed=123)
  fixed = parallel.shard_batch(next(data), trainer.mesh)
  initial = loop.init_state(trainer)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(root, 'clip', 'checkpoints'))
  trained, step = checkpointer.restore_latest(trainer.abstract_state)
  assert step == CLIP_STEPS
  trained = trained.replace(rng=initial.rng)  # the same draws for both
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    loss = jax.jit(lambda s, b: trainer.train_step.loss_and_grads(s, b, None)[0])
    before, after = float(loss(initial, fixed)), float(loss(trained, fixed))
  assert after < 0.8 * before, f'the clip stage did not learn: {before} -> {after}'
  # CLIP's tokenizer conventions, as the prior and the decoder tokenize.
  with open(os.path.join(root, 'clip', 'tokenizer', 'word_tokenizer.json')) as f:
    assert json.load(f)['style'] == 'clip'


def test_steps_flags():
  plan = demo.default_plan('unclip')
  assert [s for s, _ in plan.stages] == ['clip', 'prior', 'decoder64']
  new = demo.with_steps(plan, None, None, demo.parse_steps('prior:7, clip:5'))
  assert dict(new.stages) == {**dict(plan.stages), 'prior': 7, 'clip': 5}
  glide = demo.default_plan('glide')
  assert demo.with_steps(glide, 11, None, {}).stages == (('base64', 11), glide.stages[1])
  with pytest.raises(ValueError, match='--steps=clip:N,prior:N,decoder64:N'):
    demo.with_steps(plan, 10, None, {})
  with pytest.raises(ValueError, match='no stage sr256'):
    demo.with_steps(plan, None, None, {'sr256': 3})
  with pytest.raises(ValueError, match='STAGE:N'):
    demo.parse_steps('prior=3')

"""glide-text2im's noised CLIP towers and tokenizer in our NoisedCLIP: parity with its own code.

`fixtures/make_glide_clip_reference.py` ran glide-text2im's CLIP (its encoders loaded with
`load_state_dict(strict=True)` from exactly the state dicts `random_state_dict` builds here,
and its SimpleTokenizer on a tiny BPE file) once and stored the outputs in
`fixtures/glide_clip_reference.npz`. Nothing here imports glide-text2im.
"""
from __future__ import annotations

import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax import convert, convert_glide_clip as gc, errors, tokenizer

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                       'glide_clip_reference.npz')

# Tiny config.yaml fields; the image width (3 x 8) differs from the text width (2 x 8).
TINY = dict(image_size=8, patch_size=2, n_vocab=1024, max_text_len=12, n_embd=16,
            n_head_state_text=8, n_head_text=2, n_xf_blocks_text=2, n_head_state_image=8,
            n_head_image=3, n_xf_blocks_image=2, n_timesteps=1000, logit_scale=100.0)
SEEDS = {'clip-image-enc': 11, 'clip-text-enc': 12}
PLAIN_SEED = 13  # the image tower without time (n_timesteps = 0)
# The first merges of the released BPE file make the tiny tokenizer (stored in the fixture).
TINY_MERGES = 300
# Timesteps (glide's integer k) of the image batch, one per row.
TIMESTEPS = (0, 1, 500, 999)
# One prompt per image row: a short one, one truncated at max_text_len, an empty one.
PROMPTS = ('a red circle', 'The quick brown fox jumps over the lazy dog near the river bank',
           '', 'an oil painting of a corgi!')
# Tokenizer cases: case, spacing, punctuation, digits, accents, curly quotes, HTML entities.
TOKENIZER_PROMPTS = PROMPTS + (
    'Hello  World!!  ', "it's a dog's life", 'café naïve Ünïcode', 'route 66, 1234 km?!',
    '\u201ccurly\u201d \u2018quotes\u2019',
    'salt &amp; pepper &lt;3 &quot;x&quot; &amp;amp; it&rsquo;s &amp;amp;lt;',
    '  tabs\tand\nnewlines ', 'emoji \U0001f600 ok', 'an astronaut riding a horse on mars, '
    'photorealistic, highly detailed, 8k, trending on artstation, by greg rutkowski')
GRAD_SCALE = 3.0


def random_state_dict(kind: str, options=None, seed: int | None = None) -> dict:
  """glide-text2im's names and shapes, every tensor random (LN gains around 1)."""
  shapes = gc.state_dict_shapes(kind, options or TINY)
  rng = np.random.RandomState(SEEDS[kind] if seed is None else seed)
  out = {}
  for name in sorted(shapes):
    shape = shapes[name]
    z = rng.standard_normal(shape)
    if name.endswith('.g'):
      a = 1.0 + 0.2 * z
    elif name.endswith('.b') or name.endswith('pred_state'):
      a = 0.2 * z
    elif name.endswith('.w'):
      a = z / np.sqrt(shape[1])
    elif name.endswith('patch_proj'):
      a = z / np.sqrt(np.prod(shape[1:]))
    else:  # embeddings: w_voc, w_pos, w_t
      a = 0.5 * z
    out[name] = a.astype(np.float32)
  return out


def checksum(state_dict) -> float:
  return float(sum(np.abs(v.astype(np.float64)).sum() * (i + 1)
                   for i, (_, v) in enumerate(sorted(state_dict.items()))))


def images_BCHW() -> np.ndarray:
  rng = np.random.RandomState(5)
  return rng.uniform(-1, 1, (len(TIMESTEPS), 3, TINY['image_size'], TINY['image_size'])
                     ).astype(np.float32)


def random_ids() -> tuple[np.ndarray, np.ndarray]:
  """(ids_BL, text_len_B) over the whole embedding table, glide's 0 after text_len."""
  rng = np.random.RandomState(6)
  lens = np.array([1, 7, TINY['max_text_len']])
  ids = rng.randint(0, TINY['n_vocab'], (3, TINY['max_text_len']))
  ids[np.arange(ids.shape[1])[None] >= lens[:, None]] = 0
  return ids.astype(np.int64), lens


# --- tests -------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def ref():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope='module')
def model():
  module = gc.build_model(TINY)
  params = gc.convert_noised_clip(random_state_dict('clip-image-enc'),
                                  random_state_dict('clip-text-enc'), TINY)
  return module, params


@pytest.fixture(scope='module')
def tiny_tokenizer(ref, tmp_path_factory):
  root = tmp_path_factory.mktemp('glide_clip_tok')
  bpe = os.path.join(root, 'bpe_tiny.txt.gz')
  with gzip.open(bpe, 'wb') as f:
    f.write(str(ref['bpe_tiny']).encode('utf-8'))
  n_vocab = gc.convert_clip_tokenizer(bpe, os.path.join(root, 'tok'), TINY['max_text_len'])
  return tokenizer.load_tokenizer(os.path.join(root, 'tok'), TINY['max_text_len']), n_vocab


def _close(got, want, name):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, f'{name}: shape {got.shape} vs {want.shape}'
  scale = float(np.abs(want).max())
  err = float(np.abs(got - want).max())
  assert scale > 0 and err <= 1e-4 * scale, f'{name}: max abs diff {err} > 1e-4 x {scale}'
  return err / scale


def test_state_dicts_are_the_fixtures(ref):
  # The fixture's outputs came from these very tensors, under glide's own names and shapes.
  for kind in gc.KINDS:
    sd = random_state_dict(kind)
    listed = json.loads(str(ref[f'{kind}_shapes']))
    assert {k: list(v.shape) for k, v in sd.items()} == listed, f'{kind}: names/shapes drifted'
    np.testing.assert_allclose(checksum(sd), float(ref[f'{kind}_checksum']), rtol=1e-12)
  np.testing.assert_array_equal(images_BCHW(), ref['x_BCHW'])
  np.testing.assert_array_equal(random_ids()[0], ref['rand_ids'])


def test_image_tower_matches_glide(model, ref):
  module, params = model
  x_BHWC = jnp.asarray(ref['x_BCHW'].transpose(0, 2, 3, 1))
  t_B = (jnp.asarray(TIMESTEPS, jnp.float32) + 1.0) / TINY['n_timesteps']
  got = jax.jit(lambda p, x, t: module.apply({'params': p}, x, t, method='encode_image'))(
      params, x_BHWC, t_B)
  _close(got, ref['image_emb'], 'image embeddings')
  # Each row's timestep matters: the same images at other steps give other embeddings.
  other = module.apply({'params': params}, x_BHWC, t_B[::-1], method='encode_image')
  assert float(jnp.abs(other - got).max()) > 1e-2 * float(jnp.abs(got).max())


def test_image_tower_without_time_matches_glide(ref):
  opts = dict(TINY, n_timesteps=0)
  sd = random_state_dict('clip-image-enc', opts, PLAIN_SEED)
  assert {k: list(v.shape) for k, v in sd.items()} == json.loads(str(ref['plain_shapes']))
  params = gc.convert_noised_clip(sd, random_state_dict('clip-text-enc'), opts)
  assert 'class_embedding' in params['clip']['vision_model']
  module = gc.build_model(opts)
  x_BHWC = jnp.asarray(ref['x_BCHW'].transpose(0, 2, 3, 1))
  got = module.apply({'params': params}, x_BHWC, jnp.zeros((4,)), method='encode_image')
  _close(got, ref['plain_image_emb'], 'image embeddings without time')


def test_text_tower_matches_glide_on_given_ids(model, ref):
  module, params = model
  ids, lens = random_ids()
  mask = np.arange(ids.shape[1])[None] < lens[:, None]
  # Our padding differs from glide's zeros: the tower never reads padded positions.
  ours = np.where(mask, ids, np.random.RandomState(7).randint(0, TINY['n_vocab'], ids.shape))
  got = module.apply({'params': params}, jnp.asarray(ours, jnp.int32), jnp.asarray(mask),
                     method='encode_text')
  _close(got, ref['rand_text_emb'], 'text embeddings of given ids')


def test_tokenizer_matches_glide(tiny_tokenizer, ref):
  tok, n_vocab = tiny_tokenizer
  assert n_vocab == 512 + TINY_MERGES + 2 and tok.eos_id == n_vocab - 1
  ids, mask = tok(list(TOKENIZER_PROMPTS))
  want, lens = ref['tok_ids'], ref['tok_lens']
  np.testing.assert_array_equal(mask.sum(1), lens)
  np.testing.assert_array_equal(mask, np.arange(want.shape[1])[None] < lens[:, None])
  for i, prompt in enumerate(TOKENIZER_PROMPTS):
    n = int(lens[i])
    assert ids[i, :n].tolist() == want[i, :n].tolist(), f'prompt {prompt!r}'
  # Padding: glide's 0 is '!' in the vocabulary; ours is the end token (see the converter).
  assert (ids[~mask] == tok.eos_id).all() and (want[~mask] == 0).all()


@pytest.mark.skipif(not os.environ.get('GLIDE_TEXT2IM'),
                    reason='set GLIDE_TEXT2IM to a glide-text2im checkout to test the full BPE')
def test_full_tokenizer_matches_glide(ref, tmp_path):
  gc.convert_clip_tokenizer(os.environ['GLIDE_TEXT2IM'], str(tmp_path / 'tok'), 77)
  ids, mask = tokenizer.load_tokenizer(str(tmp_path / 'tok'), 77)(list(TOKENIZER_PROMPTS))
  np.testing.assert_array_equal(mask.sum(1), ref['tok_lens_full'])
  np.testing.assert_array_equal(np.where(mask, ids, 0), ref['tok_ids_full'])


def test_text_tower_matches_glide_on_prompts(model, tiny_tokenizer, ref):
  module, params = model
  tok, _ = tiny_tokenizer
  ids, mask = tok(list(PROMPTS))
  got = module.apply({'params': params}, jnp.asarray(ids), jnp.asarray(mask),
                     method='encode_text')
  _close(got, ref['text_emb'], 'text embeddings of prompts')


def test_clip_guidance_gradient_matches_cond_fn(model, tiny_tokenizer, ref):
  module, params = model
  tok, _ = tiny_tokenizer
  ids, mask = tok(list(PROMPTS))
  t_B = (jnp.asarray(TIMESTEPS, jnp.float32) + 1.0) / TINY['n_timesteps']

  @jax.jit
  def grad(p, x):
    z_t = module.apply({'params': p}, ids, mask, method='encode_text')
    z_t = z_t / (jnp.linalg.norm(z_t, axis=-1, keepdims=True) + 1e-12)

    def score(x):  # glide's cond_fn: exp(logit_scale) <z_t, z_i>, both normalised
      z_i = module.apply({'params': p}, x, t_B, method='encode_image')
      z_i = z_i / (jnp.linalg.norm(z_i, axis=-1, keepdims=True) + 1e-12)
      return jnp.exp(p['clip']['logit_scale']) * jnp.sum(z_t * z_i)
    return GRAD_SCALE * jax.grad(score)(x)

  x_BHWC = jnp.asarray(ref['x_BCHW'].transpose(0, 2, 3, 1))
  got = grad(params, x_BHWC)
  _close(got, ref['guidance_grad_BCHW'].transpose(0, 2, 3, 1), 'guidance gradient')
  np.testing.assert_allclose(float(params['clip']['logit_scale']), np.log(100.0), rtol=1e-7)


def test_each_kind_fills_its_part_of_the_tree():
  template = jax.tree.map(lambda s: s.shape, gc.abstract_params(TINY))
  image = gc.convert_tower(random_state_dict('clip-image-enc'), 'clip-image-enc', TINY)
  text = gc.convert_tower(random_state_dict('clip-text-enc'), 'clip-text-enc', TINY)
  assert sorted(image['clip']) == ['logit_scale', 'vision_model', 'visual_projection']
  assert sorted(text['clip']) == ['text_model', 'text_projection']
  for tree in (image, text):
    for name, part in tree['clip'].items():
      assert jax.tree.map(np.shape, part) == template['clip'][name], name
  # Every glide tensor lands somewhere: the only zero parameters are our key biases.
  flat = {'/'.join(k): v for tree in (image, text)
          for k, v in traverse_util.flatten_dict(tree).items()}
  zeros = sorted(k for k, v in flat.items() if not np.any(v))
  assert zeros == ['clip/text_model/encoder/layers/k/bias',
                   'clip/vision_model/encoder/layers/k/bias']


def test_released_sizes():
  cfg = gc.clip_model_config({})
  assert cfg['vision']['width'] == 768 and cfg['text']['width'] == 512
  assert cfg['embed_dim'] == 512 and cfg['text']['vocab_size'] == 65536
  glide_count = sum(int(np.prod(s)) for kind in gc.KINDS
                    for s in gc.state_dict_shapes(kind, {}).values())
  ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(gc.abstract_params({})))
  key_biases = 12 * 768 + 12 * 512
  assert ours == glide_count + key_biases + 1  # + the logit scale


def test_bad_key_or_shape_is_one_line_naming_it():
  sd = random_state_dict('clip-image-enc')
  bad = dict(sd)
  bad['blocks.block_1.f_attn.f_qq.w'] = bad.pop('blocks.block_1.f_attn.f_q.w')
  with pytest.raises(convert.WeightImportError) as e:
    gc.convert_tower(bad, 'clip-image-enc', TINY)
  msg = str(e.value)
  assert '\n' not in msg and 'missing keys: blocks.block_1.f_attn.f_q.w' in msg
  assert 'unexpected keys: blocks.block_1.f_attn.f_qq.w' in msg
  bad = dict(sd)
  bad['blocks.input.w_pos'] = bad['blocks.input.w_pos'][:-1]
  with pytest.raises(convert.WeightImportError, match=r'shape mismatch: blocks\.input\.w_pos: '
                     r'file has shape \(16, 24\), model expects \(17, 24\)'):
    gc.convert_tower(bad, 'clip-image-enc', TINY)
  # A text state dict given as the image tower.
  with pytest.raises(convert.WeightImportError, match='missing keys: blocks.input.patch_proj'):
    gc.convert_tower(random_state_dict('clip-text-enc'), 'clip-image-enc', TINY)
  with pytest.raises(errors.InputError, match='clip-image-enc, clip-text-enc'):
    gc.convert_tower(sd, 'clip', TINY)
  with pytest.raises(errors.InputError, match=r"\['n_layers'\]; known: beta_schedule, "):
    gc.clip_model_config({'n_layers': 3})


def test_convert_file_writes_the_tower(ref, tmp_path):
  bpe = str(tmp_path / 'bpe.txt.gz')
  with gzip.open(bpe, 'wb') as f:
    f.write(str(ref['bpe_tiny']).encode('utf-8'))
  sd = random_state_dict('clip-text-enc')
  out = gc.convert_file('clip_text_enc.pt', 'clip-text-enc', str(tmp_path / 'text'), TINY,
                        lambda path: sd, bpe)
  tensors = convert.read_safetensors(os.path.join(out, 'model.safetensors'))
  want = traverse_util.flatten_dict(gc.convert_tower(sd, 'clip-text-enc', TINY))
  assert sorted(tensors) == sorted('/'.join(k) for k in want)
  for k, v in want.items():
    np.testing.assert_array_equal(tensors['/'.join(k)], v)
  with open(os.path.join(out, 'tower.json')) as f:
    assert json.load(f)['model'] == json.loads(json.dumps(gc.clip_model_config(TINY)))
  ids, _ = tokenizer.load_tokenizer(os.path.join(out, 'tokenizer'), 12)(['a red circle'])
  n = int(ref['tok_lens'][0])
  assert ids[0, :n].tolist() == ref['tok_ids'][0, :n].tolist()

"""The encoders of diffusers pipelines on our modules: tiny random transformers models and
word-level tokenizers saved as the pipelines keep them, loaded by `diffusers_io.encoders`,
compared with the pipelines' own `_encode_prompt` / `encode_prompt` / `_encode_image`."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import numpy as np
import pytest

from diffusion_jax import errors
from diffusion_jax.diffusers_io import encoders as denc
from diffusion_jax.tokenizer import build_word_tokenizer

torch = pytest.importorskip('torch')
pytest.importorskip('diffusers')

WORDS = 'a red green blue cube sphere cone on the left of right above below small big'.split()
PROMPTS = ['a red cube', '', 'A Small BLUE sphere  left of the big green cone',
           ' '.join(WORDS * 6)]  # the last one is truncated
# (model fields, tokenizer max_length): plain; an odd head count with projection != width;
# one head, three layers, and the legacy argmax pooling (eos_token_id 2).
CLIP_TEXT = {
    'plain': (dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=16, projection_dim=32), 16),
    'odd_heads': (dict(hidden_size=30, intermediate_size=44, num_hidden_layers=2,
                       num_attention_heads=3, max_position_embeddings=16, projection_dim=20,
                       hidden_act='gelu'), 12),
    'legacy_pool': (dict(hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=1, max_position_embeddings=20, projection_dim=24,
                         eos_token_id=2), 20),
}
CLIP_VISION = {
    'plain': dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4, projection_dim=24),
    'odd_heads': dict(hidden_size=27, intermediate_size=30, num_hidden_layers=2,
                      num_attention_heads=3, image_size=16, patch_size=8, projection_dim=10,
                      hidden_act='gelu'),
    'one_head': dict(hidden_size=16, intermediate_size=20, num_hidden_layers=3,
                     num_attention_heads=1, image_size=12, patch_size=4, projection_dim=32),
}
T5 = {
    'relu': dict(d_model=32, d_kv=6, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj='relu'),
    'odd_heads': dict(d_model=16, d_kv=5, d_ff=24, num_layers=2, num_heads=3,
                      feed_forward_proj='gated-gelu'),
    'one_head': dict(d_model=12, d_kv=8, d_ff=20, num_layers=3, num_heads=1,
                     feed_forward_proj='gated-gelu'),
}
_ROOT = tempfile.mkdtemp(prefix='diffusers_encoders_')
atexit.register(shutil.rmtree, _ROOT, True)


def _randomise(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if 'norm' in name and name.endswith('weight'):  # layer / RMS norm gains
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)


def _tol(ref):
  return 1e-4 * max(1.0, float(np.abs(ref).max()))


def _assert_close(ours, ref, what):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, f'{what}: shape {ours.shape} vs {ref.shape}'
  diff = float(np.abs(ours - ref).max())
  print(f'{what}: max|diff| {diff:.2e} (max|ref| {np.abs(ref).max():.2f})')
  assert diff <= _tol(ref), f'{what}: differs from diffusers by {diff}'


@functools.lru_cache(maxsize=None)
def karlo(name):
  """(UnCLIPPipeline with only its tokenizer and text encoder, pipeline folder)."""
  from diffusers import UnCLIPPipeline
  from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection
  fields, max_length = CLIP_TEXT[name]
  root = os.path.join(_ROOT, f'karlo_{name}')
  build_word_tokenizer(WORDS, os.path.join(root, 'tokenizer'), 'clip', max_length=max_length)
  tok = AutoTokenizer.from_pretrained(os.path.join(root, 'tokenizer'))
  fields = dict(dict(eos_token_id=tok.eos_token_id), **fields)
  torch.manual_seed(0)
  te = CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=len(tok), bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
      **fields)).eval()
  _randomise(te, seed=len(name))
  te.save_pretrained(os.path.join(root, 'text_encoder'), safe_serialization=True)
  none = dict.fromkeys(('prior', 'decoder', 'text_proj', 'super_res_first', 'super_res_last',
                        'prior_scheduler', 'decoder_scheduler', 'super_res_scheduler'))
  return UnCLIPPipeline(text_encoder=te, tokenizer=tok, **none), root


@functools.lru_cache(maxsize=None)
def deepfloyd(name):
  """(IFPipeline with only its tokenizer and text encoder, pipeline folder)."""
  from diffusers import IFPipeline
  from transformers import AutoTokenizer, T5Config, T5EncoderModel
  root = os.path.join(_ROOT, f'if_{name}')
  build_word_tokenizer(WORDS, os.path.join(root, 'tokenizer'), 't5', max_length=512)
  tok = AutoTokenizer.from_pretrained(os.path.join(root, 'tokenizer'))
  torch.manual_seed(0)
  te = T5EncoderModel(T5Config(vocab_size=len(tok) + 3, relative_attention_num_buckets=8,
                               relative_attention_max_distance=20, **T5[name])).eval()
  _randomise(te, seed=len(name))
  te.save_pretrained(os.path.join(root, 'text_encoder'), safe_serialization=True,
                     max_shard_size='20KB' if name == 'relu' else '1GB')
  pipe = IFPipeline(tokenizer=tok, text_encoder=te, unet=None, scheduler=None,
                    safety_checker=None, feature_extractor=None, watermarker=None,
                    requires_safety_checker=False)
  return pipe, root


@functools.lru_cache(maxsize=None)
def image_variation(name):
  from diffusers import UnCLIPImageVariationPipeline
  from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
  fields = CLIP_VISION[name]
  root = os.path.join(_ROOT, f'karlo_iv_{name}')
  torch.manual_seed(0)
  enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**fields)).eval()
  _randomise(enc, seed=len(name))
  enc.save_pretrained(os.path.join(root, 'image_encoder'), safe_serialization=True)
  size = fields['image_size']
  fe = CLIPImageProcessor(size={'shortest_edge': size}, crop_size={'height': size, 'width': size},
                          image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
  fe.save_pretrained(os.path.join(root, 'feature_extractor'))
  none = dict.fromkeys(('decoder', 'text_encoder', 'tokenizer', 'text_proj', 'super_res_first',
                        'super_res_last', 'decoder_scheduler', 'super_res_scheduler'))
  return UnCLIPImageVariationPipeline(feature_extractor=fe, image_encoder=enc, **none), root


@pytest.mark.parametrize('name', list(CLIP_TEXT))
def test_karlo_text_encoder_matches_pipeline(name):
  pipe, root = karlo(name)
  with torch.no_grad():
    embeds, hidden, mask = pipe._encode_prompt(PROMPTS, 'cpu', 1, True)
  enc = denc.load_text_encoder(os.path.join(root, 'text_encoder'), 'clip')
  assert enc.tokenizer.max_length == CLIP_TEXT[name][1]
  cond = denc.encode_prompts(enc, PROMPTS)
  uncond = denc.encode_prompts(enc, [''] * len(PROMPTS))
  both = {k: np.concatenate([uncond[k], cond[k]]) for k in cond}
  np.testing.assert_array_equal(both['text_mask'], mask.numpy())
  assert both['text_mask'][-1].all() and not both['text_mask'][0].all()  # truncated, padded
  _assert_close(both['text_embed'], embeds.numpy(), f'karlo {name} text_embeds')
  _assert_close(both['text_tokens'], hidden.numpy(), f'karlo {name} last_hidden_state')
  # Distinct prompts give distinct embeddings: the comparison is not of constants.
  assert np.abs(cond['text_embed'][0] - cond['text_embed'][2]).max() > 1e-2


@pytest.mark.parametrize('name', list(T5))
def test_if_text_encoder_matches_pipeline(name):
  pipe, root = deepfloyd(name)
  with torch.no_grad():
    embeds, negative = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                          device='cpu', clean_caption=False)
  enc = denc.load_text_encoder(os.path.join(root, 'text_encoder'), 't5')
  assert enc.tokenizer.max_length == denc.IF_MAX_LENGTH
  cond = denc.encode_prompts(enc, PROMPTS)
  uncond = denc.encode_prompts(enc, [''] * len(PROMPTS))
  _assert_close(cond['text_tokens'], embeds.numpy(), f'IF {name} prompt_embeds')
  _assert_close(uncond['text_tokens'], negative.numpy(), f'IF {name} negative_prompt_embeds')
  assert cond['text_mask'].shape == (len(PROMPTS), 77) and cond['text_mask'][3].all()
  assert np.abs(cond['text_tokens'][0] - cond['text_tokens'][2]).max() > 1e-2
  # Lower-casing and stripping is the pipeline's, not the tokenizer's alone.
  assert denc.preprocess_prompts('t5', [' A Red ']) == ['a red']


@pytest.mark.parametrize('name', list(CLIP_VISION))
def test_karlo_image_encoder_matches_pipeline(name):
  pipe, root = image_variation(name)
  size = CLIP_VISION[name]['image_size']
  images = np.random.RandomState(0).randint(0, 256, (3, size, size, 3)).astype(np.uint8)
  from PIL import Image
  with torch.no_grad():
    ref = pipe._encode_image([Image.fromarray(im) for im in images], 'cpu', 1, None).numpy()
  enc = denc.load_image_encoder(os.path.join(root, 'image_encoder'))
  assert enc.image_mean == (0.4, 0.5, 0.6)
  ours = denc.encode_images(enc, images)
  _assert_close(ours, ref, f'karlo {name} image_embeds')
  assert np.abs(ours[0] - ours[1]).max() > 1e-2


def test_bad_folders_are_refused():
  _, root = karlo('plain')
  _, if_root = deepfloyd('relu')
  with pytest.raises(errors.InputError, match="model_type='clip_text_model'"):
    denc.load_text_encoder(os.path.join(root, 'text_encoder'), 't5')
  with pytest.raises(errors.InputError, match="model_type='t5'"):
    denc.load_text_encoder(os.path.join(if_root, 'text_encoder'), 'clip')
  with pytest.raises(errors.InputError, match='kind'):
    denc.load_text_encoder(os.path.join(root, 'text_encoder'), 'bert')
  with pytest.raises(errors.InputError, match='tokenizer_folder'):
    denc.load_text_encoder(os.path.join(root, 'text_encoder'), 'clip',
                           tokenizer_folder=os.path.join(root, 'nowhere'))
  enc = denc.load_text_encoder(os.path.join(if_root, 'text_encoder'), 't5')
  with pytest.raises(errors.InputError, match='clean_caption=False'):
    denc.encode_prompts(enc, ['a'], clean_caption=True)

"""A tiny Karlo: diffusers UnCLIPPipeline / UnCLIPImageVariationPipeline directories of random
components saved with save_pretrained, shared by the Karlo tests (each built once per root)."""
from __future__ import annotations

import functools
import json
import os

from diffusion_jax.tokenizer import build_word_tokenizer
import hf_fixtures

WORDS = 'a red green blue cube sphere cone on the left of right above small big'.split()
PROMPTS = ['a red cube above a small green sphere', 'blue cone']
L, D = 8, 16          # tokenizer length (= prior positions), CLIP width (tokens and embeddings)
# The pipelines' defaults. With fewer steps the second time is low enough that the first
# step's x0 (x_t - eps scaled by 1 / sqrt(alpha_bar_999) = 2e4) carries float32 rounding of
# these random networks into the images (5 decoder steps: up to 9/255 apart).
STEPS = dict(prior=25, decoder=25, super_res=7)


def components(root):
  """The components both pipelines share (decoder, text_proj, upsamplers, text CLIP)."""
  import torch
  from diffusers import UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection
  build_word_tokenizer(WORDS, os.path.join(root, 'tok'), 'clip', max_length=L)
  tok = AutoTokenizer.from_pretrained(os.path.join(root, 'tok'))
  torch.manual_seed(0)
  text = CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id, hidden_size=D, intermediate_size=24, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=L, projection_dim=D)).eval()
  decoder = UNet2DConditionModel(
      sample_size=8, in_channels=3, out_channels=6, block_out_channels=(16, 32),
      layers_per_block=1, norm_num_groups=8, attention_head_dim=8, cross_attention_dim=20,
      class_embed_type='identity', resnet_time_scale_shift='scale_shift',
      mid_block_type='UNetMidBlock2DSimpleCrossAttn',
      down_block_types=['ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D'],
      up_block_types=['SimpleCrossAttnUpBlock2D', 'ResnetUpsampleBlock2D']).eval()
  text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=3, clip_embeddings_dim=D,
                                  time_embed_dim=64, cross_attention_dim=20).eval()
  sr = dict(sample_size=16, in_channels=6, out_channels=3, block_out_channels=(8, 16),
            layers_per_block=1, norm_num_groups=4, add_attention=False,
            resnet_time_scale_shift='scale_shift',
            down_block_types=['ResnetDownsampleBlock2D'] * 2,
            up_block_types=['ResnetUpsampleBlock2D'] * 2)
  models = dict(text_encoder=text, decoder=decoder, text_proj=text_proj,
                super_res_first=UNet2DModel(**sr).eval(), super_res_last=UNet2DModel(**sr).eval())
  for seed, model in enumerate(models.values()):
    hf_fixtures.randomise(model, seed + 1, scale=0.2)
  return dict(models, tokenizer=tok,
              decoder_scheduler=UnCLIPScheduler(variance_type='learned_range'),
              super_res_scheduler=UnCLIPScheduler(variance_type='fixed_small_log'))


@functools.lru_cache(maxsize=None)
def text_pipeline(root):
  from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler
  parts = components(root)
  prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                           embedding_dim=D, num_embeddings=L).eval()
  hf_fixtures.randomise(prior, 9, scale=0.2)
  pipe = UnCLIPPipeline(prior=prior, prior_scheduler=UnCLIPScheduler(
      variance_type='fixed_small_log', prediction_type='sample', clip_sample_range=5.0), **parts)
  path = os.path.join(root, 'karlo')
  pipe.save_pretrained(path, safe_serialization=True)
  # As released, super_res_last/config.json leaves its sample_size null.
  config_file = os.path.join(path, 'super_res_last', 'config.json')
  with open(config_file) as f:
    config = json.load(f)
  with open(config_file, 'w') as f:
    json.dump({**config, 'sample_size': None}, f)
  return pipe, path


@functools.lru_cache(maxsize=None)
def variation_pipeline(root):
  import torch
  from diffusers import UnCLIPImageVariationPipeline
  from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
  parts = components(root)
  torch.manual_seed(1)
  image_encoder = hf_fixtures.randomise(CLIPVisionModelWithProjection(CLIPVisionConfig(
      hidden_size=12, intermediate_size=20, num_hidden_layers=2, num_attention_heads=3,
      image_size=16, patch_size=8, projection_dim=D)).eval(), 11, scale=0.2)
  fe = CLIPImageProcessor(size={'shortest_edge': 16}, crop_size={'height': 16, 'width': 16})
  pipe = UnCLIPImageVariationPipeline(image_encoder=image_encoder, feature_extractor=fe,
                                      **parts)
  path = os.path.join(root, 'karlo_variations')
  pipe.save_pretrained(path, safe_serialization=True)
  return pipe, path

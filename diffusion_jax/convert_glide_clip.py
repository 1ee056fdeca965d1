"""glide-text2im's noised CLIP (`clip_image_enc.pt`, `clip_text_enc.pt`) in our `NoisedCLIP`.

The released towers are a `models.clip.NoisedCLIP` with the options that express
glide-text2im's choices:
- image tower: the class token is a learned row per timestep (`time_embedding='class_table'`;
  its integer step k is our t = (k + 1) / n_timesteps), pixels x in [-1, 1] are read as
  ((x + 1) * 127.5 - mean) / std with CLIP's channel statistics (`input_mean`, `input_std`),
  pre-LN after the positions, LN on the class token, projection without bias;
- text tower: causal, every position embedded (`max_length = max_text_len`), pooled at the
  last prompt token (`eos_token_id=None`: the last True of the mask, its `text_len - 1`);
- both: exact-GELU MLPs 4x wide, widths n_head * n_head_state, no key bias (ours is set to
  zero: a key bias adds the same q.b to every logit of a query, which softmax ignores), and
  the logit scale log(logit_scale) from config.yaml (no tensor holds it).

`clip_model_config` builds our model config from config.yaml's field names, `convert_tower`
maps one tower's state dict (name -> numpy array) onto our tree, `convert_clip_tokenizer`
writes glide-text2im's CLIP BPE as a transformers tokenizer directory. Reading the `.pt` file
is the CLI's (`tools/convert_glide`), the one place that unpickles.
"""
from __future__ import annotations

import functools
import gzip
import json
import math
import os
import shutil
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from diffusion_jax import convert, errors
from diffusion_jax.models import clip

KINDS = ('clip-image-enc', 'clip-text-enc')

# glide_text2im/clip/config.yaml of the released noised CLIP.
GLIDE_CLIP_DEFAULTS: dict[str, Any] = dict(
    logit_scale=100.0, beta_schedule='squaredcos_cap_v2', n_timesteps=1000, image_size=64,
    patch_size=4, n_vocab=65536, max_text_len=77, n_embd=512, n_head_state_text=64,
    n_head_text=8, n_xf_blocks_text=12, n_head_state_image=64, n_head_image=12,
    n_xf_blocks_image=12)

# CLIP's pixel statistics in 0..255 units, as glide-text2im's image embedding normalises.
IMAGE_CHANNEL_MEANS = (122.77093945, 116.74601272, 104.09373519)
IMAGE_CHANNEL_STDS = (68.50053285, 66.63215831, 70.32316309)

# Which top-level parts of our tree each kind fills (the image kind also sets logit_scale).
TOWER_KEYS = {'clip-image-enc': ('vision_model', 'visual_projection', 'logit_scale'),
              'clip-text-enc': ('text_model', 'text_projection')}
_OURS = {'clip-image-enc': ('vision_model', 'visual_projection'),
         'clip-text-enc': ('text_model', 'text_projection')}

# glide-text2im's CLIP BPE file and how many merges its tokenizer keeps.
BPE_FILE = 'bpe_simple_vocab_16e6.txt.gz'
_MAX_MERGES = 49152 - 256 - 2
SOT, EOT = '<|startoftext|>', '<|endoftext|>'
# The pre-tokenizer pattern of its tokenizer (CLIP's).
_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
          r"""[^\s\p{L}\p{N}]+""")
# ftfy.fix_text's quote uncurling, which its cleaning runs first.
_QUOTES = ((r'[\u02bc\u2018-\u201b]', "'"), (r'[\u201c-\u201f]', '"'))
# The HTML entities that captions carry, unescaped as its cleaning does: ftfy once (curly
# quotes then straightened), html.unescape twice. '&amp;' last, so one pass of these is one
# unescape; three passes (ftfy skips a text with a literal '<', which then gets two).
_ENTITIES = (('&quot;', '"'), ('&#39;', "'"), ('&#x27;', "'"), ('&apos;', "'"),
             ('&lsquo;', "'"), ('&rsquo;', "'"), ('&ldquo;', '"'), ('&rdquo;', '"'),
             ('&lt;', '<'), ('&gt;', '>'), ('&nbsp;', '\u00a0'), ('&amp;', '&'))
_ENTITY_PASSES = 3


def glide_clip_options(options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The released config.yaml values updated by `options` (its field names), checked."""
  opts = dict(GLIDE_CLIP_DEFAULTS)
  options = dict(options or {})
  unknown = sorted(set(options) - set(opts))
  if unknown:
    raise errors.InputError(f'--options: unknown glide-text2im CLIP option(s) {unknown}; '
                            f'known: {", ".join(sorted(opts))}')
  for key, value in options.items():
    if key == 'beta_schedule':
      if not isinstance(value, str):
        raise errors.InputError(f'--options: beta_schedule={value!r} must be a string')
    elif key == 'logit_scale':
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise errors.InputError(f'--options: logit_scale={value!r} must be a number > 0')
    else:
      low = 0 if key == 'n_timesteps' else 1
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise errors.InputError(f'--options: {key}={value!r} must be an integer >= {low}')
    opts[key] = value
  if opts['image_size'] % opts['patch_size']:
    raise errors.InputError(f'--options: image_size={opts["image_size"]} must be a multiple of '
                            f'patch_size={opts["patch_size"]}')
  return opts


def clip_model_config(options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Our `model` section (`models.build`, name 'noised_clip') for glide's config fields."""
  o = glide_clip_options(options)
  text_width = o['n_head_text'] * o['n_head_state_text']
  image_width = o['n_head_image'] * o['n_head_state_image']
  text = dict(vocab_size=o['n_vocab'], width=text_width, layers=o['n_xf_blocks_text'],
              heads=o['n_head_text'], mlp=4 * text_width, max_length=o['max_text_len'],
              act='gelu', eos_token_id=None, layer_norm_eps=1e-5)
  vision = dict(image_size=o['image_size'], patch_size=o['patch_size'], width=image_width,
                layers=o['n_xf_blocks_image'], heads=o['n_head_image'], mlp=4 * image_width,
                act='gelu', channels=3, layer_norm_eps=1e-5, time_embedding='class_table',
                num_timesteps=max(1, o['n_timesteps']), input_mean=IMAGE_CHANNEL_MEANS,
                input_std=IMAGE_CHANNEL_STDS)
  # n_timesteps = 0: a plain CLIP image tower with a learned class token (`pred_state`).
  return dict(name='noised_clip', text=text, vision=vision, embed_dim=o['n_embd'],
              logit_scale_init=float(np.float32(np.log(o['logit_scale']))),
              time_conditioned=o['n_timesteps'] > 0)


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise errors.InputError(f'--kind={kind}: not a glide-text2im CLIP tower; choose one of '
                            f'{", ".join(KINDS)}')


def state_dict_shapes(kind: str, options: Mapping[str, Any] | None = None
                      ) -> dict[str, tuple[int, ...]]:
  """glide-text2im's state-dict names and shapes of one tower at `options`."""
  _check_kind(kind)
  o = glide_clip_options(options)
  side = 'image' if kind == 'clip-image-enc' else 'text'
  d = o[f'n_head_{side}'] * o[f'n_head_state_{side}']
  if side == 'image':
    p, n = o['patch_size'], o['image_size'] // o['patch_size']
    shapes = {'blocks.input.patch_proj': (d, 3, p, p), 'blocks.input.w_pos': (1 + n * n, d),
              'blocks.input.ln.g': (d,), 'blocks.input.ln.b': (d,)}
    if o['n_timesteps']:
      shapes['blocks.input.w_t'] = (o['n_timesteps'], d)
    else:
      shapes['blocks.input.pred_state'] = (d,)
  else:
    shapes = {'blocks.input.w_voc': (o['n_vocab'], d),
              'blocks.input.w_pos': (o['max_text_len'], d)}
  for i in range(o[f'n_xf_blocks_{side}']):
    b = f'blocks.block_{i}'
    for ln in ('f_attn.ln', 'f_mlp.ln'):
      shapes.update({f'{b}.{ln}.g': (d,), f'{b}.{ln}.b': (d,)})
    for f in ('f_q', 'f_k', 'f_v', 'f_c'):
      shapes[f'{b}.f_attn.{f}.w'] = (d, d)
      if f != 'f_k':
        shapes[f'{b}.f_attn.{f}.b'] = (d,)
    shapes.update({f'{b}.f_mlp.f_1.w': (4 * d, d), f'{b}.f_mlp.f_1.b': (4 * d,),
                   f'{b}.f_mlp.f_2.w': (d, 4 * d), f'{b}.f_mlp.f_2.b': (d,)})
  shapes.update({'blocks.output.ln.g': (d,), 'blocks.output.ln.b': (d,),
                 'blocks.output.f.w': (o['n_embd'], d)})
  return shapes


def _block_rules(tower: str) -> list[convert.Rule]:
  """Our scanned blocks of `tower` from glide's blocks.block_{i} (no key bias there)."""
  pre = ('clip', tower, 'encoder', 'layers')

  def rule(ours, theirs, kind='same', n_in=1):
    return convert.Rule(pre + ours, (f'blocks.block_{{i}}.{theirs}',), kind, n_in, stacked=True)
  rules = []
  for ours, theirs in (('ln1', 'f_attn.ln'), ('ln2', 'f_mlp.ln')):
    rules += [rule((ours, 'scale'), f'{theirs}.g'), rule((ours, 'bias'), f'{theirs}.b')]
  for ours, theirs in (('q', 'f_q'), ('k', 'f_k'), ('v', 'f_v')):
    rules.append(rule((ours, 'kernel'), f'f_attn.{theirs}.w', 'linear'))
  rules += [rule(('q', 'bias'), 'f_attn.f_q.b', 'flat'),
            rule(('v', 'bias'), 'f_attn.f_v.b', 'flat'),
            rule(('o', 'kernel'), 'f_attn.f_c.w', 'linear', 2),
            rule(('o', 'bias'), 'f_attn.f_c.b')]
  for ours, theirs in (('fc1', 'f_1'), ('fc2', 'f_2')):
    rules += [rule((ours, 'kernel'), f'f_mlp.{theirs}.w', 'linear'),
              rule((ours, 'bias'), f'f_mlp.{theirs}.b')]
  return rules


def tower_rules(kind: str, time_conditioned: bool = True) -> list[convert.Rule]:
  """The `convert.Rule`s from glide's names to our tree for one tower."""
  _check_kind(kind)
  R = convert.Rule
  if kind == 'clip-image-enc':
    v = ('clip', 'vision_model')
    cls = (R(v + ('time_table',), ('blocks.input.w_t',)) if time_conditioned
           else R(v + ('class_embedding',), ('blocks.input.pred_state',)))
    return [R(v + ('patch_embedding', 'kernel'), ('blocks.input.patch_proj',), 'conv'), cls,
            R(v + ('position_embedding',), ('blocks.input.w_pos',)),
            R(v + ('pre_ln', 'scale'), ('blocks.input.ln.g',)),
            R(v + ('pre_ln', 'bias'), ('blocks.input.ln.b',)),
            R(v + ('post_ln', 'scale'), ('blocks.output.ln.g',)),
            R(v + ('post_ln', 'bias'), ('blocks.output.ln.b',)),
            R(('clip', 'visual_projection', 'kernel'), ('blocks.output.f.w',), 'linear'),
            ] + _block_rules('vision_model')
  t = ('clip', 'text_model')
  return [R(t + ('token_embedding', 'embedding'), ('blocks.input.w_voc',)),
          R(t + ('position_embedding',), ('blocks.input.w_pos',)),
          R(t + ('final_ln', 'scale'), ('blocks.output.ln.g',)),
          R(t + ('final_ln', 'bias'), ('blocks.output.ln.b',)),
          R(('clip', 'text_projection', 'kernel'), ('blocks.output.f.w',), 'linear'),
          ] + _block_rules('text_model')


def build_model(options: Mapping[str, Any] | None = None) -> clip.NoisedCLIP:
  """Our `NoisedCLIP` for glide's config fields."""
  cfg = clip_model_config(options)
  return clip.NoisedCLIP(**{k: v for k, v in cfg.items() if k != 'name'})


@functools.lru_cache(maxsize=8)
def _template(options_json: str) -> dict:
  """Flattened abstract params (path -> ShapeDtypeStruct) of the model at these options."""
  return traverse_util.flatten_dict(clip.abstract_params(build_model(json.loads(options_json))))


def abstract_params(options: Mapping[str, Any] | None = None) -> dict:
  """Nested parameter shapes of the model at glide's config fields, nothing allocated."""
  opts = glide_clip_options(options)
  return traverse_util.unflatten_dict(_template(json.dumps(opts, sort_keys=True)))


def convert_tower(state_dict: Mapping[str, np.ndarray], kind: str,
                  options: Mapping[str, Any] | None = None, *, what: str | None = None) -> dict:
  """Our params subtree for one glide-text2im CLIP tower's state dict (name -> array).

  'clip-image-enc' fills {'clip': {'vision_model', 'visual_projection', 'logit_scale'}}: the
  logit scale, log(options['logit_scale']) (config.yaml's, no tensor holds it), goes with the
  image tower. 'clip-text-enc' fills {'clip': {'text_model', 'text_projection'}}. Our key
  biases (glide has none) are zeros. Missing, unexpected, mis-shaped or non-finite tensors
  are one `convert.WeightImportError` line naming them.
  """
  _check_kind(kind)
  opts = glide_clip_options(options)
  template = _template(json.dumps(opts, sort_keys=True))
  ours = _OURS[kind]
  key_bias = ('clip', ours[0], 'encoder', 'layers', 'k', 'bias')
  mine = {p: s for p, s in template.items()
          if p[0] == 'clip' and p[1] in ours and p != key_bias}
  params = convert.assemble(state_dict, tower_rules(kind, opts['n_timesteps'] > 0), mine,
                            what=what or f'glide-text2im {kind} state dict')
  flat = traverse_util.flatten_dict(params)
  flat[key_bias] = np.zeros(template[key_bias].shape, np.float32)
  if kind == 'clip-image-enc':
    flat[('clip', 'logit_scale')] = np.asarray(np.log(opts['logit_scale']), np.float32)
  return traverse_util.unflatten_dict(flat)


def convert_noised_clip(image_state_dict: Mapping[str, np.ndarray],
                        text_state_dict: Mapping[str, np.ndarray],
                        options: Mapping[str, Any] | None = None) -> dict:
  """Our whole `NoisedCLIP` params from both towers' state dicts."""
  flat = traverse_util.flatten_dict(convert_tower(image_state_dict, 'clip-image-enc', options))
  flat.update(traverse_util.flatten_dict(convert_tower(text_state_dict, 'clip-text-enc', options)))
  template = _template(json.dumps(glide_clip_options(options), sort_keys=True))
  if set(flat) != set(template):  # a mapping bug, not a checkpoint problem
    raise AssertionError(f'towers fill {sorted(set(flat) ^ set(template))} wrongly')
  return traverse_util.unflatten_dict(flat)


# --- tokenizer ---------------------------------------------------------------------------------


def bpe_file(path: str) -> str:
  """glide-text2im's CLIP BPE file, given it, its tokenizer folder or a checkout."""
  if os.path.isfile(path):
    return path
  for folder in (path, os.path.join(path, 'glide_text2im', 'tokenizer')):
    for name in (BPE_FILE, BPE_FILE[:-len('.gz')]):
      if os.path.isfile(os.path.join(folder, name)):
        return os.path.join(folder, name)
  raise errors.InputError(f'--tokenizer={path}: holds no {BPE_FILE}; point it at '
                          'glide_text2im/tokenizer of a local glide-text2im checkout')


def read_bpe_merges(path: str) -> list[tuple[str, str]]:
  """The merges glide's tokenizer keeps: lines 2..48895 of the file (the first is a header)."""
  src = bpe_file(path)
  try:
    with (gzip.open if src.endswith('.gz') else open)(src, 'rb') as f:
      lines = f.read().decode('utf-8').split('\n')[1:1 + _MAX_MERGES]
  except (OSError, UnicodeDecodeError, EOFError) as e:
    raise errors.InputError(f'{src}: unreadable ({e}); use the file of a glide-text2im '
                            'checkout') from None
  merges = [tuple(line.split()) for line in lines]
  bad = [i for i, m in enumerate(merges) if len(m) != 2]
  if bad:
    raise errors.InputError(f'{src}: line {bad[0] + 2} ({lines[bad[0]]!r}) is not a merge pair '
                            '(a file shorter than the released one must not end with a newline)')
  return merges


def _byte_symbols() -> list[str]:
  """CLIP's 256 byte symbols in vocabulary order: printable Latin-1 bytes stand for
  themselves, then the other bytes, in byte order, for chr(256), chr(257), ..."""
  printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
  others = len([b for b in range(256) if b not in set(printable)])
  return [chr(b) for b in printable] + [chr(256 + n) for n in range(others)]


def bpe_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
  """Token -> id as glide's tokenizer numbers them: bytes, bytes ending a word, merges, then
  <|startoftext|> and <|endoftext|>."""
  symbols = _byte_symbols()
  tokens = symbols + [s + '</w>' for s in symbols] + [a + b for a, b in merges] + [SOT, EOT]
  return {tok: i for i, tok in enumerate(tokens)}


def convert_clip_tokenizer(bpe_path_or_dir: str, out_dir: str, max_length: int = 77) -> int:
  """Writes a transformers tokenizer directory that tokenizes as glide-text2im's CLIP side.

  Same ids as its SimpleTokenizer + `padded_tokens_and_len(tokens, max_length)`: NFC, curly
  quotes straightened and the common HTML entities unescaped as its ftfy/html cleaning
  does, whitespace collapsed, lower-cased, CLIP's split pattern, byte-level BPE,
  <|startoftext|> ... <|endoftext|>, truncated to `max_length` keeping the end token. Its
  padding id 0 ('!') cannot be a transformers pad token (every '!' in a prompt would become
  it), so this pads with <|endoftext|>; the mask (True on its `text_len` tokens) is the same,
  and the text tower never reads padded positions. Writes vocab.json and merges.txt too.
  Returns the vocabulary size (the text tower's n_vocab must be at least that).
  """
  from tokenizers import Regex  # noqa: PLC0415 - heavy, only when converting
  from tokenizers import Tokenizer as RawTokenizer  # noqa: PLC0415
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors  # noqa: PLC0415
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

  merges = read_bpe_merges(bpe_path_or_dir)
  vocab = bpe_vocab(merges)
  raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix='',
                                end_of_word_suffix='</w>', fuse_unk=False))
  rules = [normalizers.NFC()]
  rules += [normalizers.Replace(Regex(p), r) for p, r in _QUOTES]
  rules += [normalizers.Replace(e, c) for _ in range(_ENTITY_PASSES) for e, c in _ENTITIES]
  rules += [normalizers.Replace(Regex(r'\s+'), ' '), normalizers.Lowercase()]
  raw.normalizer = normalizers.Sequence(rules)
  raw.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_SPLIT), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  # '</w>' becomes the byte-level space, decoded with the rest; the final one is stripped.
  raw.decoder = decoders.Sequence([decoders.Replace('</w>', '\u0120'), decoders.ByteLevel(),
                                   decoders.Strip(' ', 0, 1)])
  raw.post_processor = processors.TemplateProcessing(
      single=f'{SOT} $A {EOT}', special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])])
  fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=SOT, eos_token=EOT,
                                 pad_token=EOT, model_max_length=int(max_length),
                                 padding_side='right', truncation_side='right')
  tmp = out_dir.rstrip('/') + '.tmp'
  if os.path.isdir(tmp):
    shutil.rmtree(tmp)
  fast.save_pretrained(tmp)
  with open(os.path.join(tmp, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(tmp, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  if os.path.isdir(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return len(vocab)


# --- files -------------------------------------------------------------------------------------


def convert_file(checkpoint: str, kind: str, out_dir: str, options: Mapping[str, Any],
                 load_state_dict: Callable[[str], Mapping[str, np.ndarray]],
                 tokenizer: str | None = None) -> str:
  """Converts one tower file into `out_dir`: `model.safetensors` (our subtree, '/'-joined
  paths), `tower.json` (kind, glide options, our model config) and, for the text tower
  with `tokenizer`, `tokenizer/`. `load_state_dict` reads the .pt (the CLI's). Returns
  `out_dir`. Both towers' files together make one `NoisedCLIP` (`convert_noised_clip`)."""
  _check_kind(kind)
  opts = glide_clip_options(options)
  params = convert_tower(load_state_dict(checkpoint), kind, opts,
                         what=f'--checkpoint={checkpoint} (--kind={kind})')
  os.makedirs(out_dir, exist_ok=True)
  flat = {'/'.join(k): np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(params).items()}
  convert.write_safetensors(flat, os.path.join(out_dir, 'model.safetensors'))
  with open(os.path.join(out_dir, 'tower.json'), 'w') as f:
    json.dump({'kind': kind, 'options': opts, 'model': clip_model_config(opts),
               'source': os.path.basename(checkpoint)}, f, indent=1, sort_keys=True)
  if tokenizer and kind == 'clip-text-enc':
    convert_clip_tokenizer(tokenizer, os.path.join(out_dir, 'tokenizer'), opts['max_text_len'])
  count = sum(math.prod(np.shape(a)) for a in flat.values())
  print(f'wrote {out_dir} ({count:,} parameters)')
  return out_dir

"""glide-text2im's released U-Nets: converted from .pt state dicts with its key names, loaded
with `pipelines.from_pretrained`, equal to its own outputs (fixtures/glide_reference.npz,
made by fixtures/make_glide_reference.py with glide-text2im's code)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import glide_fixtures
from diffusion_jax import cli, convert, errors, pipelines
from diffusion_jax.tools import convert_glide as convert_glide_tool

torch = pytest.importorskip('torch')
REF = np.load(glide_fixtures.REFERENCE)
KINDS = tuple(glide_fixtures.CASES)


def _state(kind):
  keys = json.loads(str(REF[f'{kind}/keys']))
  return glide_fixtures.state_dict(keys, int(REF[f'{kind}/seed']))


def _save_pt(state, path):
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(path))
  return str(path)


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """The four kinds converted one by one into one directory (the tokenizer given once)."""
  tmp = tmp_path_factory.mktemp('glide')
  out = str(tmp / 'release')
  for i, kind in enumerate(KINDS):
    pt = _save_pt(_state(kind), tmp / f'{kind}.pt')
    convert_glide_tool.convert(pt, kind, out, options=glide_fixtures.CASES[kind],
                               tokenizer=glide_fixtures.TOKENIZER if i == 0 else None)
  return out


@pytest.fixture(scope='module')
def pipe(release):
  return pipelines.from_pretrained(release)


def test_release_directory_layout(release, pipe):
  assert set(KINDS) <= set(os.listdir(release))
  assert tuple(pipe.stages) == ('base', 'upsample', 'base-inpaint', 'upsample-inpaint')
  assert pipe.order == ('base', 'upsample')
  assert pipe.config.inpaint_stages == ('base-inpaint', 'upsample-inpaint')


@pytest.mark.parametrize('kind', KINDS)
def test_prompts_tokenize_as_glide_text2im(pipe, kind):
  ids, mask = pipe.stages[kind].tokenize(list(glide_fixtures.PROMPTS))
  np.testing.assert_array_equal(ids, REF[f'{kind}/tokens'])
  np.testing.assert_array_equal(mask, REF[f'{kind}/mask'])


@pytest.mark.parametrize('kind', KINDS)
def test_model_output_equals_glide_text2im(pipe, kind):
  data = glide_fixtures.inputs(kind, seed=KINDS.index(kind))
  out = pipe.stages[kind].model_output(data['x_t'], data['t'], data['prompts'], **data['cond'])
  ref = REF[f'{kind}/output']
  assert out.shape == ref.shape and out.dtype == np.float32
  scale = float(np.abs(ref).max())
  assert np.abs(out - ref).max() <= 1e-4 * scale, np.abs(out - ref).max()
  # The timestep and the prompt both matter: a wrong mapping of either would show here.
  shifted = pipe.stages[kind].model_output(data['x_t'], data['t'] + 1, data['prompts'],
                                           **data['cond'])
  assert np.abs(shifted - ref).max() > 1e-3 * scale


def test_wrong_state_dict_is_one_line_naming_the_keys(tmp_path):
  state = _state('base')
  state.pop('middle_block.1.qkv.weight')
  state['input_blocks.1.0.in_layers.2.weight'] = state['input_blocks.1.0.in_layers.2.weight'][:1]
  state['extra.weight'] = np.zeros(3, np.float32)
  pt = _save_pt(state, tmp_path / 'bad.pt')
  with pytest.raises(convert.WeightImportError) as e:
    convert_glide_tool.convert(pt, 'base', str(tmp_path / 'out'),
                               options=glide_fixtures.CASES['base'])
  message = str(e.value)
  assert '\n' not in message
  for name in ('middle_block.1.qkv.weight', 'input_blocks.1.0.in_layers.2.weight',
               'extra.weight'):
    assert name in message


def test_bad_options_and_kinds_are_refused(tmp_path):
  pt = _save_pt(_state('base'), tmp_path / 'base.pt')
  for options, needle in (({'num_chanels': 3}, 'num_chanels'),
                          ({'channel_mult': '1,2,3'}, 'channel_mult'),
                          ({'xf_padding': 'yes'}, 'xf_padding')):
    with pytest.raises(errors.InputError, match=needle):
      convert_glide_tool.convert(pt, 'base', str(tmp_path / 'out'),
                                 options=dict(glide_fixtures.CASES['base'], **options))
  with pytest.raises(errors.InputError, match='--kind'):
    convert_glide_tool.convert(pt, 'bass', str(tmp_path / 'out'))


def test_pickles_are_refused_outside_the_converter(release, tmp_path):
  """The converted directory is safetensors; a .pt put in its place is refused with how to
  convert, by the pretrained loader as everywhere else."""
  stage = os.path.join(str(tmp_path), 'release', 'base')
  os.makedirs(stage)
  with open(os.path.join(release, 'base', 'config.json')) as f:
    config = f.read()
  with open(os.path.join(stage, 'config.json'), 'w') as f:
    f.write(config)
  _save_pt(_state('base'), os.path.join(stage, 'model.safetensors'))
  with pytest.raises(convert.WeightImportError, match='pickle'):
    pipelines.from_pretrained(os.path.join(str(tmp_path), 'release')).stages['base']
  pt = _save_pt(_state('base'), tmp_path / 'base.pt')
  with pytest.raises(errors.InputError, match='convert_glide --checkpoint='):
    pipelines.from_pretrained(pt)


def test_cli_converts_and_reports_bad_input_in_one_line(tmp_path, capsys):
  pt = _save_pt(_state('base'), tmp_path / 'base.pt')
  args = [f'--checkpoint={pt}', '--kind=base', f'--out={tmp_path / "out"}',
          f'--tokenizer={glide_fixtures.TOKENIZER}',
          '--options=' + json.dumps(glide_fixtures.CASES['base'])]
  cli.call(convert_glide_tool, args)
  assert os.path.isfile(tmp_path / 'out' / 'base' / 'model.safetensors')
  assert os.path.isfile(tmp_path / 'out' / 'base' / 'tokenizer' / 'tokenizer_config.json')
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.call(convert_glide_tool, args[:-1] + ['--options={"num_channels": '])
  assert e.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith('error: --options')


@pytest.fixture(scope='module')
def clip_release(release, tmp_path_factory):
  """The release with glide-text2im's two noised CLIP towers converted beside the U-Nets, at
  the base's resolution (tiny sizes of test_glide_clip)."""
  import gzip
  import test_glide_clip as tgc
  tmp = tmp_path_factory.mktemp('clip')
  options = dict(tgc.TINY, image_size=glide_fixtures.CASES['base']['image_size'])
  bpe = str(tmp / 'bpe_tiny.txt.gz')
  with gzip.open(bpe, 'wb') as f:
    f.write(str(np.load(tgc.FIXTURE)['bpe_tiny']).encode('utf-8'))
  for kind in ('clip-image-enc', 'clip-text-enc'):
    pt = _save_pt(tgc.random_state_dict(kind, options), tmp / f'{kind}.pt')
    convert_glide_tool.convert(pt, kind, release, options=options,
                               tokenizer=bpe if kind == 'clip-text-enc' else None)
  return release


def test_generate_with_latents_and_clip_guidance(clip_release):
  pipe = pipelines.from_pretrained(clip_release)
  assert pipe.config.clip_stage == 'clip'
  rng = np.random.default_rng(0)
  latents = {'base': rng.standard_normal((1, 16, 16, 3)).astype(np.float32),
             'upsample': rng.standard_normal((1, 32, 32, 3)).astype(np.float32)}
  fast = dict(base=dict(spacing='3'), upsample=dict(spacing='2'))
  key = jax.random.PRNGKey(0)
  plain = pipe.generate(['a red circle'], key, latents=latents, **fast)
  assert plain.shape == (1, 32, 32, 3) and plain.dtype == np.uint8
  again = pipe.generate(['a red circle'], jax.random.PRNGKey(1), latents=latents, **fast)
  # DDPM base steps draw noise from the key, so only the DDIM upsampler's x_T is pinned:
  # same latents, different keys differ; a different base latent differs too.
  other = dict(latents, base=-latents['base'])
  assert not np.array_equal(pipe.generate(['a red circle'], key, latents=other, **fast), plain)
  assert np.array_equal(pipe.generate(['a red circle'], key, latents=latents, **fast), plain)
  del again
  guided = pipe.generate(['a red circle'], key, latents=latents, clip_guidance_scale=3.0,
                         **fast)
  assert guided.shape == plain.shape and not np.array_equal(guided, plain)
  with pytest.raises(errors.InputError, match='latents'):
    pipe.generate(['a red circle'], key, latents={'base': latents['upsample']}, **fast)
  with pytest.raises(errors.InputError, match='latents'):
    pipe.generate(['a red circle'], key, latents={'nope': latents['base']}, **fast)

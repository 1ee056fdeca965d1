"""The sample CLI on a tiny trained Imagen cascade: images, grid, captions, progress and
timing; one-line errors for a missing checkpoint, an unknown stage and an empty prompt file.
With --pretrained, on a tiny converted GLIDE release: the images of `pipelines.from_pretrained`
bit for bit, --set overrides, inpainting and one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import pipeline_fixtures as pf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = '--config=configs/imagen.py:stage=cascade,size=tiny'
FAST = ['--config.stages.base64.num_steps=4', '--config.stages.sr256.num_steps=4']


def _run(*args, timeout=300):
  proc = subprocess.run([sys.executable, '-m', 'diffusion_jax.sample', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
  return proc.returncode, proc.stdout, proc.stderr


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error:')]


@pytest.fixture(scope='module')
def root():
  return pf.trained_root('imagen', ('base64', 'sr256'))


def test_writes_images_grid_and_captions(root, tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a blue square\n\n')
  out = tmp_path / 'out'
  rc, stdout, stderr = _run(CONFIG, f'--workdir={root}', '--prompt=a red circle',
                            f'--prompts_file={prompts}', '--num_images=2', '--seed=3',
                            f'--out={out}', *FAST)
  assert rc == 0, stderr[-3000:]
  files = sorted(f for f in os.listdir(out) if f[0].isdigit())
  assert len(files) == 4, f'2 prompts x 2 images, got {files}'
  first = np.asarray(Image.open(out / files[0]))
  assert first.shape == (32, 32, 3), f'final stage is 32 px at tiny size, got {first.shape}'
  grid = np.asarray(Image.open(out / 'grid.png'))
  assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 3), f'2x2 grid of 32 px, got {grid.shape}'
  np.testing.assert_array_equal(grid[2:34, 2:34], first, 'grid does not hold the images')
  caps = json.load(open(out / 'captions.json'))
  assert [c['caption'] for c in caps['images']] == ['a red circle'] * 2 + ['a blue square'] * 2
  assert set(caps['stage_seconds']) == {'base64', 'sr256'}
  # Progress comes from inside the jitted loops: every stage reaches its last step.
  assert 'base64' in stderr and '4/4' in stderr, f'no progress bar in stderr: {stderr[-2000:]}'
  assert 'stage sr256:' in stderr, 'no per-stage timing'


def test_missing_checkpoint_is_one_line(tmp_path):
  rc, _, stderr = _run(CONFIG, f'--workdir={tmp_path}', '--prompt=a red circle')
  errors = _error_lines(stderr)
  assert rc == 2 and len(errors) == 1, stderr[-2000:]
  assert str(tmp_path / 'base64' / 'checkpoints') in errors[0]
  assert 'python -m diffusion_jax.train --config=configs/imagen.py:stage=base64' in errors[0]
  assert 'Traceback' not in stderr


def test_unknown_stage_is_one_line(tmp_path):
  rc, _, stderr = _run('--config=configs/imagen.py:stage=sr512,size=tiny',
                       f'--workdir={tmp_path}', '--prompt=x')
  assert rc == 2 and 'Traceback' not in stderr, stderr[-2000:]
  assert _error_lines(stderr) == [
      "error: stage='sr512' is not one of base64, sr256, sr1024, cascade"], stderr[-2000:]
  rc, _, stderr = _run(CONFIG, f'--workdir={tmp_path}', '--prompt=x', '--stages=base64,sr512')
  assert rc == 2 and len(_error_lines(stderr)) == 1, stderr[-2000:]
  assert "unknown stage 'sr512'" in stderr


def test_empty_prompt_file_is_one_line(tmp_path):
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n  \n')
  rc, _, stderr = _run(CONFIG, f'--workdir={tmp_path}', f'--prompts_file={empty}')
  assert rc == 2, stderr[-2000:]
  assert _error_lines(stderr) == [f'error: --prompts_file={empty} is empty: write one prompt '
                                  'per line'], stderr[-2000:]


def _train(config, workdir, *overrides, timeout=600):
  proc = subprocess.run([sys.executable, '-m', 'diffusion_jax.train', f'--config={config}',
                         f'--workdir={workdir}', *overrides], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_samples_the_stage_as_it_was_trained(tmp_path):
  """A stage trained with a model override and its own tokenizer samples with both (the
  config saved in its checkpoint, the tokenizer kept in its directory), says how the
  caller's config differs, and loads neither the trainer nor TensorFlow on the way."""
  from diffusion_jax import conditioning, pipelines, tokenizer as tokenizer_lib
  from projects.shapes import shapes
  # Word ids in reverse order: the default tokenizer would read every prompt as other words.
  words = tmp_path / 'words'
  tokenizer_lib.build_word_tokenizer(tuple(reversed(shapes.VOCABULARY)), str(words))
  root = tmp_path / 'root'
  _train('configs/imagen.py:stage=base64,size=tiny', root / 'base64',
         '--config.total_steps=1', '--config.model.model_channels=8',
         f'--config.text_encoder.tokenizer_path={words}')
  trained_ids, _ = tokenizer_lib.load_tokenizer(str(words), 16)(['a red circle'])
  # The tokenizer directory changes after training (a folder prepared again): the stage
  # still reads prompts with the tokenizer it trained with.
  tokenizer_lib.build_word_tokenizer(shapes.VOCABULARY, str(words))
  assert not np.array_equal(tokenizer_lib.load_tokenizer(str(words), 16)(['a red circle'])[0],
                            trained_ids)

  code = ('import atexit, runpy, sys\n'
          'atexit.register(lambda: print("LOADED", sorted(m for m in sys.modules if '
          'm.split(".")[0] in ("tensorflow", "clu") or m.startswith("diffusion_jax.train"))))\n'
          'sys.argv = ["sample"] + sys.argv[1:]\n'
          'runpy.run_module("diffusion_jax.sample", run_name="__main__")\n')
  out = tmp_path / 'out'
  proc = subprocess.run([sys.executable, '-c', code, CONFIG, f'--workdir={root}',
                         '--stages=base64', '--prompt=a red circle', '--num_images=2',
                         f'--out={out}', '--config.stages.base64.num_steps=2'],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'LOADED []' in proc.stdout, proc.stdout
  assert len([f for f in os.listdir(out) if f[0].isdigit()]) == 2
  warning = [line for line in proc.stderr.splitlines() if 'config saved in its checkpoint' in line]
  assert len(warning) == 1, proc.stderr[-3000:]
  assert 'model.model_channels: 8 (trained) vs 16' in warning[0], warning[0]
  assert f"text_encoder.tokenizer_path: '{words}' (trained) vs None" in warning[0], warning[0]

  stage = pipelines.load(pf.cascade_config('imagen', order=('base64',)), str(root)).stage('base64')
  assert stage.model.model_channels == 8
  ids, _ = stage.tokenize(['a red circle'])
  np.testing.assert_array_equal(ids, trained_ids)
  saved = conditioning.restore_stage(str(root / 'base64')).config
  assert saved.text_encoder.tokenizer_path == str(words)


def test_restoring_a_stage_without_checkpoints_names_the_directory(tmp_path):
  from diffusion_jax import conditioning
  (tmp_path / 'base64' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='no checkpoint in .*base64/checkpoints'):
    conditioning.restore_stage(str(tmp_path / 'base64'))


def test_input_images_decode_as_training_images_and_bad_ones_are_input_errors(tmp_path):
  import struct
  import zlib

  from diffusion_jax import sample
  from diffusion_jax.errors import InputError
  grey16 = tmp_path / 'grey16.png'
  Image.fromarray(np.full((3, 5), 32768, np.uint16)).save(grey16)
  image = sample._load_image(str(grey16))
  assert image.shape == (3, 5, 3) and np.abs(image.astype(int) - 128).max() <= 1, image[0, 0]

  junk = tmp_path / 'junk.png'
  junk.write_bytes(b'\x89PNG not really')
  with pytest.raises(InputError, match=r"junk\.png.*undecodable_image") as e:
    sample._load_image(str(junk))
  assert '\n' not in str(e.value)

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  header = struct.pack('>IIBBBBB', 12000, 12000, 8, 0, 0, 0, 0)
  huge = tmp_path / 'huge.png'  # a 1x1 PNG whose header says 12000 x 12000
  huge.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
                   + chunk(b'IDAT', zlib.compress(b'\x00\x80')) + chunk(b'IEND', b''))
  with pytest.raises(InputError, match=r'huge\.png.*too_large.*shrink it'):
    sample._load_image(str(huge))
  with pytest.raises(InputError, match='no such file'):
    sample._load_image(str(tmp_path / 'missing.png'))


# --pretrained: a tiny converted GLIDE release -------------------------------------------------

PRETRAINED_FAST = ['--set=spacing=2', '--quiet']  # glide respacing '2': two model calls a stage


def _convert(kinds, out, tmp):
  """Converts glide_fixtures' seeded state dicts of `kinds` into `out` (as the release)."""
  torch = pytest.importorskip('torch')
  import glide_fixtures
  from diffusion_jax.tools import convert_glide
  ref = np.load(glide_fixtures.REFERENCE)
  for kind in kinds:
    state = glide_fixtures.state_dict(json.loads(str(ref[f'{kind}/keys'])),
                                      int(ref[f'{kind}/seed']))
    pt = str(tmp / f'{kind}.pt')
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pt)
    convert_glide.convert(pt, kind, str(out), options=glide_fixtures.CASES[kind],
                          tokenizer=glide_fixtures.TOKENIZER if kind == kinds[0] else None)
  return str(out)


@pytest.fixture(scope='module')
def plain(tmp_path_factory):
  """base + upsample: text-to-image only."""
  tmp = tmp_path_factory.mktemp('plain')
  return _convert(('base', 'upsample'), tmp / 'release', tmp)


@pytest.fixture(scope='module')
def full(plain, tmp_path_factory):
  """plain + the two inpainting stages."""
  import shutil
  tmp = tmp_path_factory.mktemp('full')
  shutil.copytree(plain, tmp / 'release')
  return _convert(('base-inpaint', 'upsample-inpaint'), tmp / 'release', tmp)


@pytest.fixture(scope='module')
def full_pipe(full):
  from diffusion_jax import pipelines
  return pipelines.from_pretrained(full)


def _call(args):
  """The CLI in this process: its exit status (0 when it returned)."""
  from diffusion_jax import cli, sample
  try:
    cli.call(sample, args)
  except SystemExit as e:
    return e.code
  return 0


def _pngs(out):
  files = sorted(f for f in os.listdir(out) if f[0].isdigit())
  return np.stack([np.asarray(Image.open(os.path.join(out, f))) for f in files])


def test_pretrained_writes_the_last_stage_without_trainer_or_tensorflow(plain, tmp_path):
  code = ('import atexit, runpy, sys\n'
          'atexit.register(lambda: print("LOADED", sorted(m for m in sys.modules if '
          'm.split(".")[0] in ("tensorflow", "clu") or m.startswith("diffusion_jax.train"))))\n'
          'sys.argv = ["sample"] + sys.argv[1:]\n'
          'runpy.run_module("diffusion_jax.sample", run_name="__main__")\n')
  out = tmp_path / 'out'
  proc = subprocess.run([sys.executable, '-c', code, f'--pretrained={plain}',
                         '--prompt=a red circle', '--num_images=2', '--seed=3',
                         '--set=spacing=2', '--set=base.guidance_scale=2.5', f'--out={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'LOADED []' in proc.stdout, proc.stdout
  images = _pngs(out)
  assert images.shape == (2, 32, 32, 3), f'upsample stage is 32 px, got {images.shape}'
  assert not np.array_equal(images[0], images[1]), 'two samples of one prompt are identical'
  caps = json.load(open(out / 'captions.json'))
  assert caps['pretrained'] == plain and caps['family'] == 'glide'
  assert set(caps['stage_seconds']) == {'base', 'upsample'}
  assert caps['settings']['base']['guidance_scale'] == 2.5
  assert caps['settings']['upsample']['guidance_scale'] == 1.0  # released setting kept
  assert caps['settings']['base']['steps'] == caps['settings']['upsample']['steps'] == 2
  assert 'upsample' in proc.stderr and '2/2' in proc.stderr, proc.stderr[-2000:]
  assert 'stage base:' in proc.stderr and '2 steps' in proc.stderr


# Overrides of the bit-exact test: every stage, one stage, and a traced setting of one stage.
SETS = ['--set=spacing=3', '--set=upsample.spacing=2', '--set=base.guidance_scale=4']
OVERRIDES = dict(spacing='3', upsample={'spacing': '2'}, base={'guidance_scale': 4.0})
ROWS = ['a red circle', 'a blue square']


@pytest.fixture(scope='module')
def reference(full_pipe):
  import jax
  return full_pipe.generate(ROWS, jax.random.PRNGKey(5), **OVERRIDES)


def test_pretrained_images_equal_from_pretrained_generate(full, reference, tmp_path):
  out = tmp_path / 'out'
  assert _call([f'--pretrained={full}', f'--prompt={ROWS[0]}', f'--prompt={ROWS[1]}',
                '--seed=5', f'--out={out}', '--quiet', *SETS]) == 0
  np.testing.assert_array_equal(_pngs(out), reference)
  settings = json.load(open(out / 'captions.json'))['settings']
  assert (settings['base']['steps'], settings['upsample']['steps']) == (3, 2)
  assert (settings['base']['spacing'], settings['upsample']['spacing']) == ('3', '2')


def test_pretrained_overrides_reach_the_sampler(full, full_pipe, reference, tmp_path):
  # Only base's guidance differs from the reference's settings: the images must too.
  out = tmp_path / 'out'
  assert _call([f'--pretrained={full}', f'--prompt={ROWS[0]}', f'--prompt={ROWS[1]}',
                '--seed=5', f'--out={out}', '--quiet', *SETS, '--set=base.guidance_scale=2']) == 0
  images = _pngs(out)
  assert images.shape == reference.shape
  assert np.abs(images.astype(int) - reference).max() > 8, 'guidance_scale did not reach base'
  import jax
  np.testing.assert_array_equal(images, full_pipe.generate(
      ROWS, jax.random.PRNGKey(5), **dict(OVERRIDES, base={'guidance_scale': 2.0})))
  assert json.load(open(out / 'captions.json'))['settings']['base']['guidance_scale'] == 2.0


def test_pretrained_inpaint_equals_pipeline_inpaint(full, full_pipe, tmp_path):
  import jax
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  mask = np.zeros((32, 32, 3), np.uint8)
  mask[:, :16] = 255  # keep the left half
  Image.fromarray(image).save(tmp_path / 'image.png')
  Image.fromarray(mask).save(tmp_path / 'mask.png')
  out = tmp_path / 'out'
  assert _call([f'--pretrained={full}', '--mode=inpaint', f'--image={tmp_path / "image.png"}',
                f'--mask={tmp_path / "mask.png"}', '--prompt=a red circle', '--seed=2',
                f'--out={out}', *PRETRAINED_FAST]) == 0
  got = _pngs(out)
  assert got.shape == (1, 32, 32, 3)
  want = full_pipe.inpaint(image[None], (mask[..., 0] > 127).astype(np.float32), 'a red circle',
                           jax.random.PRNGKey(2), spacing='2')
  np.testing.assert_array_equal(got, want)
  caps = json.load(open(out / 'captions.json'))
  assert set(caps['stage_seconds']) == {'base-inpaint', 'upsample-inpaint'}


def test_pretrained_bad_input_is_one_line(plain, tmp_path, capsys):
  empty = tmp_path / 'empty'
  empty.mkdir()
  prompt = '--prompt=a red circle'
  cases = [
      ([f'--pretrained={plain}', CONFIG, f'--workdir={tmp_path}', prompt], 'not both'),
      ([f'--pretrained={plain}', f'--workdir={tmp_path}', prompt], 'not both'),
      ([prompt], 'give --pretrained=DIR'),
      ([f'--pretrained={tmp_path / "missing"}', prompt],
       'no such directory; write one with python -m diffusion_jax.tools.convert_glide'),
      ([f'--pretrained={empty}', prompt],
       'holds no pretrained stage (a subdirectory with config.json and model.safetensors); '
       'write one with python -m diffusion_jax.tools.convert_glide --checkpoint=base.pt'),
      ([f'--pretrained={plain}', '--mode=inpaint', f'--image={tmp_path}/i.png',
        f'--mask={tmp_path}/m.png'], 'has no inpainting stage'),
      ([f'--pretrained={plain}', prompt, '--clip_guidance_scale=100'], 'no noised CLIP stage'),
      ([f'--pretrained={plain}', prompt, '--set=num_steps=2'],
       "stage 'base' samples with glide-text2im's respacing spacing=100"),
      ([f'--pretrained={plain}', prompt, '--set=upsample.num_steps=2'],
       'give --set=upsample.spacing=2'),
      ([f'--pretrained={plain}', prompt, '--set=guidance_scale'], 'give KEY=VALUE'),
      ([f'--pretrained={plain}', prompt, '--set=bse.eta=1'], "no stage 'bse'"),
      ([f'--pretrained={plain}', prompt, '--set=base.etta=1'], "unknown setting 'etta'"),
      ([f'--pretrained={plain}', prompt, '--set=eta=much'], 'eta takes a number'),
      ([f'--pretrained={plain}', prompt, '--set=base.eta=-1'], '--set=base.eta=-1: '),
      ([f'--pretrained={plain}', prompt, '--stages=base,sr'], "unknown stage 'sr'"),
      ([CONFIG, f'--workdir={tmp_path}', prompt, '--set=eta=1'], '--set is for --pretrained'),
  ]
  for args, needle in cases:
    capsys.readouterr()
    rc = _call(args)
    err = capsys.readouterr().err
    errors = _error_lines(err)
    assert rc == 2 and len(errors) == 1, (args, rc, err[-2000:])
    assert needle in errors[0], (args, errors[0])
    assert 'Traceback' not in err

"""Training on your own images, as the README documents it: `tools.prepare_folder` then the
trainer, run as commands; preparing again a folder that changed (and one that did not)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import datasets
from diffusion_jax.tools import prepare_folder as tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu')


def write_folder(src, captions: dict[str, str], seed=0):
  """16 px images `<name>.png` with a `<name>.txt` caption each."""
  src.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for name, caption in captions.items():
    if not (src / f'{name}.png').exists():
      Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(src / f'{name}.png')
    (src / f'{name}.txt').write_text(caption + '\n')


def prepared_captions(data_dir, name) -> dict[str, list[str]]:
  source = datasets.get_source('folder', data_dir=str(data_dir), folder_name=name)
  return {source[i]['key']: source[i]['captions'] for i in range(len(source))}


def run(args, **kw):
  return subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=REPO,
                        timeout=kw.pop('timeout', 300), **kw)


def prepare(src, data_dir, name='mine', *extra):
  return run([sys.executable, '-m', 'diffusion_jax.tools.prepare_folder', f'--src={src}',
              f'--data_dir={data_dir}', f'--name={name}', *extra])


def readme_commands() -> list[str]:
  """The commands of the README's "Your own images" bullet, continuation lines joined."""
  text = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
  bullet = text[text.index('- Your own images'):]
  block = re.search(r'```bash\n(.*?)```', bullet, re.S).group(1)
  return [line.strip() for line in block.replace('\\\n', ' ').splitlines() if line.strip()]


def _flags(text: str) -> list[str]:
  return re.findall(r'--config\.input\.\S+|--config\.text_encoder\.tokenizer_path=\S+', text)


def test_readme_journey_trains_on_a_prepared_folder(tmp_path):
  captions = {f'im{i}': f'a photo number {i}' for i in range(4)}
  write_folder(tmp_path / 'images', captions)
  values = {'IMAGES': tmp_path / 'images', 'DATA': tmp_path / 'data', 'NAME': 'mine',
            'ROOT': tmp_path / 'root'}
  fill = lambda s: re.sub(r'\b(IMAGES|DATA|NAME|ROOT)\b', lambda m: str(values[m.group(1)]), s)
  prepare_cmd, train_cmd = readme_commands()
  assert prepare_cmd.startswith('python -m diffusion_jax.tools.prepare_folder ')
  assert train_cmd.startswith('python -m diffusion_jax.train ')

  result = run([sys.executable] + shlex.split(fill(prepare_cmd))[1:])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'prepared 4 images' in result.stdout, result.stdout
  # The flags the tool prints, those its docstring gives and the README's train flags agree.
  readme_flags = _flags(train_cmd)
  assert len(readme_flags) == 3, train_cmd
  assert _flags(result.stdout.split('train on it with:')[-1]) == _flags(fill(train_cmd))
  assert _flags(' '.join(tool.__doc__.replace('\\\n', ' ').split())) == readme_flags
  assert prepared_captions(values['DATA'], 'mine') == {
      f'{k}.png': [v] for k, v in captions.items()}

  train = [sys.executable] + shlex.split(fill(train_cmd))[1:] + [
      '--config.total_steps=1', '--config.ckpt_steps=1']
  result = run(train, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  from diffusion_jax import conditioning  # noqa: PLC0415 - jax, only for this test
  saved = conditioning.restore_stage(str(values['ROOT'] / 'base64')).config.input
  assert (saved.dataset, saved.folder_name, saved.data_dir) == (
      'folder', 'mine', str(values['DATA']))
  # The stage trained with the folder's tokenizer and keeps it: every caption word is known.
  kept = (values['ROOT'] / 'base64' / 'tokenizer' / 'tokenizer.json').read_text()
  assert all(f'"{w}"' in kept for w in ('photo', 'number', '3')), kept[:500]


def test_prepare_again_replaces_a_changed_folder_and_skips_an_unchanged_one(tmp_path):
  src, data = tmp_path / 'images', tmp_path / 'data'
  write_folder(src, {'im0': 'red', 'im1': 'green', 'im2': 'blue'})
  first = prepare(src, data)
  assert first.returncode == 0 and first.stdout.startswith('prepared 3 images'), first

  prepared = data / 'captioned_folder' / 'mine' / '1.0.0'
  shard = next(prepared.glob('*.array_record*'))
  before = (shard.stat().st_ino, shard.stat().st_mtime_ns)
  same = prepare(src, data)
  assert same.returncode == 0 and same.stdout.startswith('unchanged'), same.stdout
  assert (shard.stat().st_ino, shard.stat().st_mtime_ns) == before, 'an unchanged folder was rewritten'

  # One caption edited, nothing else: the data must follow.
  write_folder(src, {'im1': 'turquoise'})
  edited = prepare(src, data)
  assert edited.returncode == 0, edited.stderr[-3000:]
  assert re.match(r're-prepared 3 images .* because captions changed', edited.stdout), edited.stdout
  assert prepared_captions(data, 'mine') == {
      'im0.png': ['red'], 'im1.png': ['turquoise'], 'im2.png': ['blue']}

  # An image added with its caption and a caption changed.
  write_folder(src, {'im2': 'navy', 'im3': 'yellow'}, seed=1)
  changed = prepare(src, data)
  assert changed.returncode == 0, changed.stderr[-3000:]
  line = changed.stdout.splitlines()[0]
  assert line.startswith('re-prepared 4 images') and 'images and captions changed' in line, line
  assert '3 -> 4 images' in line, line
  assert prepared_captions(data, 'mine') == {
      'im0.png': ['red'], 'im1.png': ['turquoise'], 'im2.png': ['navy'], 'im3.png': ['yellow']}
  tokenizer = (prepared / 'tokenizer' / 'tokenizer.json').read_text()
  assert '"yellow"' in tokenizer and '"navy"' in tokenizer, 'the tokenizer kept the old words'
  assert not [p for p in prepared.parent.iterdir() if p.name != '1.0.0'], 'leftovers'
  again = prepare(src, data)
  assert again.stdout.startswith('unchanged'), again.stdout


def test_a_killed_prepare_never_leaves_data_that_looks_complete(tmp_path, monkeypatch):
  src, data = tmp_path / 'images', tmp_path / 'data'
  write_folder(src, {'im0': 'red', 'im1': 'green'})
  assert datasets.prepare_folder(str(src), str(data), 'mine').status == 'prepared'
  write_folder(src, {'im1': 'violet'})

  # Killed while building the new version: the old one stays, complete and recorded as old.
  from diffusion_jax import tokenizer as tokenizer_lib  # noqa: PLC0415

  def killed(*args, **kw):
    raise KeyboardInterrupt
  with monkeypatch.context() as m:
    m.setattr(tokenizer_lib, 'build_word_tokenizer', killed)
    with pytest.raises(KeyboardInterrupt):
      datasets.prepare_folder(str(src), str(data), 'mine')
  assert prepared_captions(data, 'mine')['im1.png'] == ['green']
  # Killed between moving the old version out and the new one in: nothing looks prepared.
  parent = data / 'captioned_folder' / 'mine'
  real_rename = os.rename

  def rename(a, b):
    if os.fspath(b) == str(parent / '1.0.0'):  # the new version into place
      assert not os.path.exists(b), 'the old version must be out of the way first'
      raise KeyboardInterrupt
    real_rename(a, b)
  with monkeypatch.context() as m:
    m.setattr(datasets.os, 'rename', rename)
    with pytest.raises(KeyboardInterrupt):
      datasets.prepare_folder(str(src), str(data), 'mine')
  with pytest.raises(datasets.DatasetEmptyError, match='not prepared'):
    datasets.get_source('folder', data_dir=str(data), folder_name='mine')
  (parent / 'incomplete.prepare_folder.killed').mkdir()  # as a SIGKILL would leave it
  done = datasets.prepare_folder(str(src), str(data), 'mine')
  assert done.status == 'prepared', done
  assert prepared_captions(data, 'mine')['im1.png'] == ['violet']
  assert sorted(p.name for p in parent.iterdir()) == ['1.0.0'], 'leftovers of killed runs'


def test_bad_input_is_one_line_without_a_traceback(tmp_path):
  write_folder(tmp_path / 'images', {'im0': 'red'})
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'a_file').write_text('')
  cases = [
      ([], '--src is required'),
      ([f'--src={tmp_path / "missing"}'], 'does not exist'),
      ([f'--src={tmp_path / "empty"}'], 'no images'),
      ([f'--src={tmp_path / "images"}', f'--data_dir={tmp_path / "a_file"}'], 'cannot write'),
  ]
  for args, message in cases:
    result = run([sys.executable, '-m', 'diffusion_jax.tools.prepare_folder', *args])
    assert result.returncode == 2, (args, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
    assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert 'Traceback' not in result.stderr, result.stderr
  assert not (tmp_path / 'empty' / 'captioned_folder').exists()
  help_ = run([sys.executable, '-m', 'diffusion_jax.tools.prepare_folder', '--help'])
  assert help_.returncode == 0 and '--config.input.folder_name=NAME' in help_.stdout, help_

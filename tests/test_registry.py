"""diffusion_jax.data.registry: datasets and caption rewrites by name; the modules a config
lists in input.modules register theirs before they are looked up."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffusion_jax.data import pipeline, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_names_are_refused_in_one_line_naming_input_modules():
  for lookup, name, field in ((registry.dataset, 'no_such_set', 'input.dataset'),
                              (registry.caption_rewrite, 'no_such_rewrite',
                               'input.caption_rewrite')):
    with pytest.raises(ValueError) as info:
      lookup(name)
    message = str(info.value)
    assert '\n' not in message, message
    assert f'{field}={name!r} is not registered' in message, message
    assert 'input.modules' in message, f'the error must say where a project registers: {message}'
  with pytest.raises(ValueError) as info:
    registry.import_modules(['projects.no_such_project'])
  assert 'input.modules' in str(info.value) and '\n' not in str(info.value)
  assert registry.caption_rewrite(None) is None and registry.caption_rewrite('') is None


def test_registered_names_are_found():
  registry.register_dataset('test_registry_set', lambda cfg: [cfg], vocabulary=['b', 'a'])
  registry.register_caption_rewrite('test_registry_upper', str.upper)
  entry = registry.dataset('test_registry_set')
  assert entry.name == 'test_registry_set' and entry.vocabulary == ('b', 'a')
  assert entry.source_fn({'x': 1}) == [{'x': 1}]
  assert 'test_registry_set' in registry.datasets()
  assert pipeline.caption_rewrite({'caption_rewrite': 'test_registry_upper'})('ab') == 'AB'


def test_input_modules_are_imported_before_the_lookup():
  # A fresh process: the library alone registers no Shapes; a config naming the project's
  # module in input.modules gets its dataset and rewrite.
  code = (
      'from diffusion_jax.data import pipeline, registry\n'
      'assert "shapes" not in registry.datasets(), registry.datasets()\n'
      'try:\n'
      '  pipeline.source_from_config({"dataset": "shapes", "image_size": 8})\n'
      '  raise SystemExit("found without input.modules")\n'
      'except ValueError as e:\n'
      '  assert "input.modules" in str(e), e\n'
      'cfg = {"dataset": "shapes", "image_size": 8, "shapes_num_examples": 3,\n'
      '       "modules": ("projects.shapes.data",), "caption_rewrite": "shapes_canonical"}\n'
      'print(type(pipeline.source_from_config(cfg)).__name__, len(pipeline.source_from_config(cfg)),\n'
      '      pipeline.caption_rewrite(cfg)("a red circle below a blue square"))\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert out.stdout.split() == ['ShapesSource', '3', 'a', 'blue', 'square', 'above', 'a', 'red',
                                'circle'], out.stdout

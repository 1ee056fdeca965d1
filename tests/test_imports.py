"""The import order (docs/ARCHITECTURE.md), read from the source with function-local imports
included: no cycles, nothing reaches upward, and sampling never loads the trainer or
TensorFlow."""
import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ('diffusion_jax', 'configs', 'projects')


def _modules() -> dict[str, str]:
  mods = {}
  for root in ROOTS:
    for d, _, files in os.walk(os.path.join(REPO, root)):
      for f in files:
        if f.endswith('.py'):
          path = os.path.join(d, f)
          name = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
          mods[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
  return mods


def _imports(name: str, path: str, mods) -> set[str]:
  """The package's modules that `name` imports anywhere in its body (any depth)."""
  package = name if path.endswith('__init__.py') else name.rsplit('.', 1)[0]
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
      found |= {base} | {f'{base}.{a.name}' for a in node.names}
  out = set()
  for target in found:
    while target and target not in mods:
      target = target.rpartition('.')[0]
    if target and target != name and not target.startswith(name + '.'):
      out.add(target)
  return out


@pytest.fixture(scope='module')
def graph():
  mods = _modules()
  return {m: _imports(m, p, mods) for m, p in mods.items()}


def _reach(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for nxt in graph.get(todo.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_graph_reader_sees_function_local_imports(graph):
  # A module-level edge and one made inside a function (the sample CLI's `run`).
  assert 'diffusion_jax.conditioning' in graph['diffusion_jax.train.loop']
  assert 'diffusion_jax.pipelines' in graph['diffusion_jax.sample']


def test_no_import_cycles(graph):
  cycles = [m for m in graph if m in _reach(graph, m)]
  assert not cycles, f'modules on an import cycle: {sorted(cycles)}'


@pytest.mark.parametrize('prefix', ['diffusion_jax.pipelines', 'diffusion_jax.eval',
                                    'diffusion_jax.sample', 'diffusion_jax.evaluate',
                                    'diffusion_jax.conditioning', 'diffusion_jax.checkpoint',
                                    'diffusion_jax.tools.export_clip'])
def test_sampling_and_eval_never_reach_the_trainer(graph, prefix):
  for module in (m for m in graph if m == prefix or m.startswith(prefix + '.')):
    trainer = sorted(m for m in _reach(graph, module) if m.startswith('diffusion_jax.train'))
    assert not trainer, f'{module} reaches {trainer}'


def test_rooms_import_only_downward(graph):
  bad = []
  for module, targets in graph.items():
    for target in targets:
      if module.startswith(('diffusion_jax', 'configs')) and target.startswith('projects'):
        bad.append((module, target))  # the library never imports a project
      if module.startswith('diffusion_jax.diffusion') and not target.startswith(
          'diffusion_jax.diffusion'):
        bad.append((module, target))  # pure math
      if module.startswith('diffusion_jax.models') and not target.startswith(
          'diffusion_jax.models'):
        bad.append((module, target))  # networks never read weight files
      if module.startswith('configs') and not (
          target.startswith(('configs', 'diffusion_jax.models')) or
          target in ('diffusion_jax.parallel', 'diffusion_jax.data',
                     'diffusion_jax.errors')):
        bad.append((module, target))  # configs are data
  assert not bad, f'upward imports: {bad}'


def test_sampling_loads_neither_trainer_nor_tensorflow():
  # Import every module sampling and evaluation run, as their CLIs do, in a fresh process.
  code = ('import sys\n'
          'import diffusion_jax.sample, diffusion_jax.evaluate, diffusion_jax.pipelines\n'
          'import diffusion_jax.eval.protocol, diffusion_jax.eval.fid, diffusion_jax.eval.clip_score\n'
          'bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu")\n'
          '             or m.startswith("diffusion_jax.train"))\n'
          'print("LOADED", bad)\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ))
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'LOADED []' in out.stdout, out.stdout

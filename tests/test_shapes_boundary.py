"""The Shapes project sits beside the library: nothing under diffusion_jax/ or configs/
imports `projects` (module level, inside functions, through importlib, or as commented-out
code). The library's tiny configs name the project's module only as data (input.modules)."""
from __future__ import annotations

import ast
import io
import os
import re
import tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COMMENTED_IMPORT = re.compile(r'\b(from\s+projects\b|import\s+projects\b)')


def project_imports(source: str) -> list[str]:
  """'line N: what' for every import of `projects` in `source`, at any depth."""
  found = []
  for node in ast.walk(ast.parse(source)):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
      names = [node.module or '']
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and getattr(node.func, 'attr', getattr(node.func, 'id', '')) in (
              'import_module', '__import__')):
      names = [node.args[0].value]
    found += [f'line {node.lineno}: {n}' for n in names
              if n == 'projects' or n.startswith('projects.')]
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT and _COMMENTED_IMPORT.search(tok.string):
      found.append(f'line {tok.start[0]}: comment {tok.string.strip()}')
  return found


def test_the_reader_finds_every_kind_of_import():
  source = '''
import os
from projects.shapes import shapes
def f():
  import projects
  from projects.shapes.data import ShapesSource
  importlib.import_module('projects.shapes.data')
  return __import__('projects.shapes')
# from projects.shapes import demo
MODULES = ('projects.shapes.data',)  # a module named as data: not an import
from projectsx import y
'''
  found = project_imports(source)
  assert [f.split(':')[0] for f in found] == [
      'line 3', 'line 5', 'line 6', 'line 7', 'line 8', 'line 9'], found


def test_library_and_configs_never_import_projects():
  bad = []
  for root in ('diffusion_jax', 'configs'):
    for d, _, files in os.walk(os.path.join(REPO, root)):
      for f in sorted(files):
        if f.endswith('.py'):
          path = os.path.join(d, f)
          with open(path, encoding='utf-8') as fh:
            bad += [f'{os.path.relpath(path, REPO)} {x}' for x in project_imports(fh.read())]
  assert not bad, 'the library imports the Shapes project:\n' + '\n'.join(bad)
  # The scan saw the library (and the project is where the Shapes modules now live).
  assert os.path.isfile(os.path.join(REPO, 'diffusion_jax', 'data', 'registry.py'))
  assert not os.path.exists(os.path.join(REPO, 'diffusion_jax', 'data', 'shapes.py'))
  assert os.path.isfile(os.path.join(REPO, 'projects', 'shapes', 'shapes.py'))

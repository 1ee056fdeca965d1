"""The command-line tools' restart with glibc's huge-page tunable (diffusion_jax.hugepages)."""
import os
import subprocess
import sys

import pytest

from diffusion_jax import hugepages


@pytest.fixture
def modern_glibc(monkeypatch):
  monkeypatch.setattr(hugepages, 'glibc_version', lambda: (2, 36))
  monkeypatch.setattr(hugepages, 'kernel_allows_huge_pages', lambda: True)


def test_tunable_is_added_to_the_tunables_already_set(modern_glibc):
  assert hugepages.tunables_with_huge_pages({}) == 'glibc.malloc.hugetlb=1'
  assert (hugepages.tunables_with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
          == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'), 'the user\'s tunables were lost'


@pytest.mark.parametrize('tunables', ['glibc.malloc.hugetlb=0',
                                      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2'])
def test_an_explicit_choice_is_left_alone(modern_glibc, tunables):
  assert hugepages.tunables_with_huge_pages({'GLIBC_TUNABLES': tunables}) is None


def test_nothing_to_do_without_glibc_2_35_or_kernel_huge_pages(monkeypatch):
  monkeypatch.setattr(hugepages, 'kernel_allows_huge_pages', lambda: True)
  for version in (None, (2, 31)):
    monkeypatch.setattr(hugepages, 'glibc_version', lambda v=version: v)
    assert hugepages.tunables_with_huge_pages({}) is None, version
  monkeypatch.setattr(hugepages, 'glibc_version', lambda: (2, 36))
  monkeypatch.setattr(hugepages, 'kernel_allows_huge_pages', lambda: False)
  assert hugepages.tunables_with_huge_pages({}) is None


def test_glibc_version_is_parsed(monkeypatch):
  monkeypatch.setattr(os, 'confstr', lambda name: 'glibc 2.36')
  assert hugepages.glibc_version() == (2, 36)
  monkeypatch.setattr(os, 'confstr', lambda name: 'glibc 2.40.9000')
  assert hugepages.glibc_version() == (2, 40)

  def not_available(name):
    raise ValueError(name)
  monkeypatch.setattr(os, 'confstr', not_available)
  assert hugepages.glibc_version() is None


@pytest.mark.parametrize('setting,allowed', [('always [madvise] never', True),
                                             ('[always] madvise never', True),
                                             ('always madvise [never]', False)])
def test_kernel_setting_is_read(tmp_path, setting, allowed):
  path = tmp_path / 'enabled'
  path.write_text(setting + '\n')
  assert hugepages.kernel_allows_huge_pages(str(path)) is allowed
  assert hugepages.kernel_allows_huge_pages(str(tmp_path / 'missing')) is False


_PROGRAM = ('import os; from diffusion_jax import hugepages; print("start", flush=True); '
            'hugepages.reexec_with_huge_pages(); print(os.environ.get("GLIBC_TUNABLES"))')


def _run(tunables):
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  if tunables is not None:
    env['GLIBC_TUNABLES'] = tunables
  out = subprocess.run([sys.executable, '-c', _PROGRAM], env=env, capture_output=True,
                       text=True, timeout=60, check=True)
  return out.stdout.split()


@pytest.mark.skipif(hugepages.tunables_with_huge_pages({}) is None,
                    reason='needs glibc >= 2.35 and transparent huge pages in the kernel')
def test_process_restarts_once_with_the_tunable():
  assert _run(None) == ['start', 'start', 'glibc.malloc.hugetlb=1'], (
      'expected one restart with the tunable set, then no further restart')
  assert _run('glibc.malloc.hugetlb=0') == ['start', 'glibc.malloc.hugetlb=0'], (
      'an explicit choice must not restart the process')

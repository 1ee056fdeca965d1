"""Transparent huge pages for the large blocks XLA's CPU runtime mallocs (Linux, glibc).

XLA's CPU runtime mallocs each execution's temporaries as one block and frees it when the
execution ends (195 MB for the demo's base train step). glibc serves a block that large with
mmap and hands it back with munmap, so every step faults each 4 KB page back in and the kernel
zeroes it: 48k page faults and about 150 ms of kernel time per step, beside about 600 ms of
compute on 2 cores. With glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks
for transparent huge pages for such blocks: the same step makes about 1.1k faults and 45 ms of
kernel time. glibc reads its tunables when a process starts, so the command-line tools
restart themselves once with it set (`reexec_with_huge_pages`, before any work). A
GLIBC_TUNABLES that already says `glibc.malloc.hugetlb` is left as it is: set
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to keep 4 KB pages.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
_THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library this process runs on, or None when it is not glibc."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != 'glibc':
    return None
  try:
    major, minor = version.split('.')[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def kernel_allows_huge_pages(path: str = _THP_ENABLED) -> bool:
  """Whether transparent huge pages are on for regions that ask (`always` or `madvise`)."""
  try:
    with open(path) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def tunables_with_huge_pages(environ: Mapping[str, str]) -> str | None:
  """The GLIBC_TUNABLES value that adds `glibc.malloc.hugetlb=1` to `environ`'s, or None
  when there is nothing to do: not glibc >= 2.35, huge pages off in the kernel, or the
  environment already chose."""
  current = environ.get('GLIBC_TUNABLES', '')
  if any(item.split('=')[0] == TUNABLE for item in current.split(':')):
    return None
  version = glibc_version()
  if version is None or version < (2, 35) or not kernel_allows_huge_pages():
    return None
  return f'{current}:{TUNABLE}=1' if current else f'{TUNABLE}=1'


def reexec_with_huge_pages() -> None:
  """Restarts this process (same interpreter, same command line) with huge pages asked for;
  returns at once when there is nothing to do. Call it first thing in a command's
  `__main__`, never from a library function: it replaces the running process."""
  value = tunables_with_huge_pages(os.environ)
  if value is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, {**os.environ, 'GLIBC_TUNABLES': value})

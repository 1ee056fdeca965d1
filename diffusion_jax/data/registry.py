"""Datasets and caption rewrites, by name.

`input.dataset` and `input.caption_rewrite` name entries registered here. The library
registers `coco_captions` and `folder` (`data.datasets`); a project registers its own in a
module that its configs list in `input.modules` (as big_vision's `pp_modules`), which the
trainer and the pipelines import before they read the names:

    registry.register_dataset('shapes', source_fn, vocabulary=WORDS)
    registry.register_caption_rewrite('shapes_canonical', canonical_caption)

`source_fn(input_cfg)` returns a random-access source of raw records (`data.datasets`).
Where the config names no tokenizer directory, a stage tokenizes with the dataset's own:
`tokenizer_fn(input_cfg)`, the directory of a tokenizer that comes with the prepared data (a
captioned folder's), or else a word-level tokenizer of `vocabulary` (procedural captions).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Sequence

from diffusion_jax import errors


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  source_fn: Callable[[Any], Any]
  vocabulary: tuple[str, ...] | None = None
  tokenizer_fn: Callable[[Any], str | None] | None = None


_DATASETS: dict[str, Dataset] = {}
_CAPTION_REWRITES: dict[str, Callable[[str], str]] = {}


def register_dataset(name: str, source_fn: Callable[[Any], Any], *,
                     vocabulary: Sequence[str] | None = None,
                     tokenizer_fn: Callable[[Any], str | None] | None = None) -> None:
  _DATASETS[name] = Dataset(name, source_fn, None if vocabulary is None else tuple(vocabulary),
                            tokenizer_fn)


def register_caption_rewrite(name: str, fn: Callable[[str], str]) -> None:
  _CAPTION_REWRITES[name] = fn


def lower_strip(caption: str) -> str:
  """Lower case without surrounding whitespace: how DeepFloyd IF's pipelines prepare a
  prompt for T5 (their `clean_caption=False`)."""
  return caption.lower().strip()


register_caption_rewrite('lower_strip', lower_strip)


def import_modules(modules: Sequence[str] | None) -> None:
  """Imports the modules an `input.modules` field lists (they register by name)."""
  for module in modules or ():
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise errors.InputError(f'input.modules: cannot import {module!r} ({e}); it must be '
                              'importable from the working directory or installed') from None


def _hint() -> str:
  return ('a project registers its own in a module listed in input.modules '
          "(e.g. --config.input.modules=\"('projects.shapes.data',)\")")


def dataset(name: str) -> Dataset:
  if name not in _DATASETS:
    raise errors.InputError(f'input.dataset={name!r} is not registered (registered: '
                            f'{", ".join(sorted(_DATASETS))}); {_hint()}')
  return _DATASETS[name]


def caption_rewrite(name: str | None) -> Callable[[str], str] | None:
  """The rewrite registered as `name`; None for None or ''."""
  if not name:
    return None
  if name not in _CAPTION_REWRITES:
    raise errors.InputError(f'input.caption_rewrite={name!r} is not registered (registered: '
                            f'{", ".join(sorted(_CAPTION_REWRITES)) or "none"}); {_hint()}')
  return _CAPTION_REWRITES[name]


def datasets() -> tuple[str, ...]:
  return tuple(sorted(_DATASETS))


def caption_rewrites() -> tuple[str, ...]:
  return tuple(sorted(_CAPTION_REWRITES))

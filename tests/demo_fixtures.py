"""The tiny demo plans shared by the demo tests: a few train steps per stage at `tiny` size,
two sampler steps, eight evaluation captions."""
from __future__ import annotations

from projects.shapes import demo

TINY_PER_KIND = {'single': 3, 'count': 1, 'conjunction': 1, 'relation': 3}


def tiny_plan(family: str, stages: tuple[tuple[str, int], ...], **kw) -> demo.Plan:
  return demo.default_plan(family, size='tiny', stages=stages, train_examples=500,
                           batch_size=8, per_kind=dict(TINY_PER_KIND), sample_steps=2,
                           sr_sample_steps=2, guidance_scale=3.0, **kw)


def run_tiny_demo(tmp_path_factory, name: str, plan: demo.Plan):
  """(root, plan, result) of `demo.run` in a fresh directory."""
  root = str(tmp_path_factory.mktemp(name))
  return root, plan, demo.run(root, plan)

"""Paper-size parameter counts (shapes only, via jax.eval_shape) within 10% of the papers."""
from __future__ import annotations

import json
import math

import jax
import pytest

from diffusion_jax import cli
from diffusion_jax.tools import param_count

PUBLISHED = {
    ('imagen', 'base64'): 2.0e9, ('imagen', 'sr256'): 600e6, ('imagen', 'sr1024'): 400e6,
    ('glide', 'base64'): 3.5e9, ('glide', 'up256'): 1.5e9,
    ('unclip', 'prior'): 1.0e9, ('unclip', 'decoder64'): 3.5e9, ('unclip', 'up256'): 700e6,
    ('unclip', 'up1024'): 300e6,
}


@pytest.fixture(scope='module')
def table():
  return param_count.paper_table()


def test_every_paper_stage_within_10_percent(table):
  got = {(r['family'], r['stage']): r for r in table}
  assert set(got) == set(PUBLISHED), f'paper table covers {sorted(got)}'
  for key, published in PUBLISHED.items():
    row = got[key]
    assert row['published'] == int(published), f'{key}: published figure {row["published"]}'
    rel = abs(row['params'] - published) / published
    assert rel <= 0.10, f'{key}: {row["params"] / 1e6:.0f}M is {rel:.1%} off {published / 1e6:.0f}M'
    assert row['source'], f'{key}: no source'


def test_glide_text_transformer_is_about_1_2B():
  from configs import glide
  params = param_count.abstract_params(glide.get_config('stage=base64,size=paper').model)
  xf = sum(math.prod(p.shape) for p in jax.tree.leaves(params['text_transformer']))
  assert abs(xf - 1.2e9) / 1.2e9 <= 0.15, f'GLIDE text transformer has {xf / 1e9:.2f}B params'


def test_cli_prints_one_json_object_per_stage(capsys, monkeypatch, table):
  monkeypatch.setattr(param_count, 'paper_table', lambda: table)
  cli.call(param_count, ['--paper'])
  lines = capsys.readouterr().out.strip().splitlines()
  rows = [json.loads(line) for line in lines]
  assert len(rows) == len(PUBLISHED)
  for row in rows:
    assert set(row) == {'family', 'stage', 'params', 'published', 'source'}, row


def test_cli_counts_one_config_with_breakdown(capsys):
  cli.call(param_count, ['--config=configs/unclip.py:stage=prior,size=tiny'])
  row = json.loads(capsys.readouterr().out)
  assert row['family'] == 'unclip' and row['stage'] == 'prior'
  assert row['params'] == sum(row['modules'].values()) > 0
  assert 'transformer' in row['modules']

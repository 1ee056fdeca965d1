r"""Parameter counts of the denoising networks, from shapes only (`jax.eval_shape`, no memory).

  python -m diffusion_jax.tools.param_count --paper
      one JSON object per paper-size stage: {"family", "stage", "params", "published", "source"}
  python -m diffusion_jax.tools.param_count --config=configs/imagen.py:stage=base64,size=tiny \
      [--config.model.model_channels=32 ...]
      the count of one config (any config file, overrides applied), with a per-top-level-module
      breakdown
"""
from __future__ import annotations

import json
import math

from absl import flags

from diffusion_jax import cli, config_util

# (family, stage, published parameter count, what the architecture follows)
PAPER_STAGES = (
    ('imagen', 'base64', 2.0e9,
     'Imagen (arXiv 2205.11487) App. F.1: 2B base U-Net (NeMo base64-2b, 512 ch: 2.1B); '
     'mults 1-2-3-4, 3 res blocks, attention 32/16/8 with 64-ch heads, T5-XXL tokens as extra '
     'attention keys/values, attention-pooled text in the time embedding'),
    ('imagen', 'sr256', 600e6,
     'Imagen App. B.1/F.2 Efficient U-Net 64->256 (NeMo sr256-600m: 646M); imagen-pytorch '
     'SRUnet256: 128 ch, mults 1-2-4-8, res blocks 2-4-8-8, self+cross attention at the '
     'lowest level, one skip per level scaled 1/sqrt(2)'),
    ('imagen', 'sr1024', 400e6,
     'Imagen App. B.1/F.3 Efficient U-Net 256->1024 (NeMo: 427M): the sr256 layout without '
     'self-attention, cross-attention at the lowest level; that level is 768 ch here to reach '
     '400M (1024 ch gives 565M)'),
    ('glide', 'base64', 3.5e9,
     'GLIDE (arXiv 2112.10741) Sec. 4: ADM 64px 512 ch, 3 res blocks, attention 32/16/8, '
     '64-ch heads (2.3B) + text transformer 24 x 2048 (1.2B)'),
    ('glide', 'up256', 1.5e9,
     'GLIDE Sec. 4: 1.5B upsampler with a 1024-wide text transformer; ADM 256px layout '
     '(mults 1-1-2-2-4-4, attention 32/16/8), 320 ch, 3 res blocks'),
    ('unclip', 'prior', 1.0e9,
     'unCLIP (arXiv 2204.06125) Table 3: 1B diffusion prior; causal transformer width 2048, '
     '20 layers, 32 heads as in Karlo (kakaobrain) 1B prior'),
    ('unclip', 'decoder64', 3.5e9,
     'unCLIP Table 3: decoder 3.5B, 512 ch, depth 3, mults 1-2-3-4, 64-ch heads at 32/16/8, '
     'text encoder 24 x 2048, context 256; CLIP embedding -> time emb + 4 context tokens'),
    ('unclip', 'up256', 700e6,
     'unCLIP Table 3: 64->256 upsampler 700M, 320 ch, depth 3, mults 1-2-3-4, no attention'),
    ('unclip', 'up1024', 300e6,
     'unCLIP Table 3: 256->1024 upsampler 300M, 192 ch, depth 2, mults 1-1-2-2-4-4, no '
     'attention'),
)


def _family_config(family: str, arg: str):
  return config_util.load_config(f'configs/{family}.py', arg)


def abstract_params(model_cfg):
  """The parameter tree of `model_cfg` as ShapeDtypeStructs (nothing is allocated)."""
  import jax
  from diffusion_jax import models
  module = models.build(model_cfg)
  x, t, cond = models.example_inputs(model_cfg, 1)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, cond))
  from flax.linen import meta
  return meta.unbox(variables)['params']


def _size(tree) -> int:
  import jax
  return int(sum(math.prod(p.shape) for p in jax.tree.leaves(tree)))


def count_params(model_cfg) -> int:
  return _size(abstract_params(model_cfg))


def paper_table():
  rows = []
  for family, stage, published, source in PAPER_STAGES:
    cfg = _family_config(family, f'stage={stage},size=paper')
    rows.append({'family': family, 'stage': stage, 'params': count_params(cfg.model),
                 'published': int(published), 'source': source})
  return rows


def config_row(cfg) -> dict:
  """One config's count: {"family", "stage", "size", "params", "modules"} (per top-level
  module of the network)."""
  params = abstract_params(cfg.model)
  top = {k: _size(v) for k, v in params.items()}
  return {'family': cfg.family, 'stage': cfg.stage, 'size': cfg.size,
          'params': sum(top.values()), 'modules': top}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  flags.DEFINE_bool('paper', False, 'count every paper-size stage', flag_values=flag_values)
  cli.define_config(flag_values, sys_argv)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  if not F.paper and F.config is None:
    raise cli.CLIError('give --paper or --config=FILE:ARG')
  if F.config is not None and 'model' not in F.config:
    raise cli.CLIError(f'--config: stage={F.config.get("stage")!r} has no network to count '
                       '(a stage config, not the cascade)')
  if F.paper:
    for row in paper_table():
      print(json.dumps(row), flush=True)
  if F.config is not None:
    print(json.dumps(config_row(F.config)), flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main, config='stage')

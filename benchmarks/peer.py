r"""The peer, imagen-pytorch, timed in a process of its own (run by train_step.py and sample.py).

  python benchmarks/peer.py --kind=train|sample --batch=8 --steps=10 --warmup=2
      [--num_steps=50 --guidance=5.0]

Its own process, because importing torchvision beside TensorFlow (which the library's data
side loads) crashes the interpreter, and so that torch's and XLA's thread pools never share
a process. Prints one JSON line (`{"peer": "imagen-pytorch not importable"}` without it).
"""
from __future__ import annotations

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from absl import flags  # noqa: E402


def _import_peer_unet():
  """imagen-pytorch's `Unet` class, or None when the package is not importable.

  Importing imagen-pytorch asks the model hub for t5-v1_1-base's config, only to set a
  default text width that the matched benchmark overrides (text_embed_dim=128). Nothing may
  download here, so that lookup is answered with the published shape of t5-v1_1-base.
  """
  try:
    import transformers
  except ImportError:
    return None
  cls = transformers.T5Config
  own = cls.__dict__.get('from_pretrained')

  def published_t5_v1_1_base(name, *args, **kwargs):
    del name, args, kwargs
    return cls(d_model=768, d_ff=2048, d_kv=64, num_layers=12, num_heads=12,
               feed_forward_proj='gated-gelu')
  cls.from_pretrained = published_t5_v1_1_base
  try:
    from imagen_pytorch import Unet
  except ImportError:
    return None
  finally:
    if own is None:
      del cls.from_pretrained
    else:
      cls.from_pretrained = own
  return Unet


def _matched_unet():
  """(torch, imagen-pytorch's Unet laid out as `common.MATCHED_PEER_KW`, seeded 0), or None
  when imagen-pytorch is not importable."""
  Unet = _import_peer_unet()
  if Unet is None:
    return None
  import torch  # imported by imagen-pytorch already
  torch.manual_seed(0)
  return torch, Unet(**common.MATCHED_PEER_KW)


def counted_flops(fn) -> int:
  """Matmul and convolution FLOPs of one untimed call, counted by torch as ours are counted
  from the jaxpr (elementwise work left out), so that FLOP/s compare like for like."""
  from torch.utils.flop_counter import FlopCounterMode
  counter = FlopCounterMode(display=False)
  with counter:
    fn()
  return int(counter.get_total_flops())


def train_step(batch: int, steps: int, warmup: int) -> dict | None:
  """imagen-pytorch's Unet, same layout and step (eps MSE + Adam), fp32 on CPU."""
  peer = _matched_unet()
  if peer is None:
    return None
  torch, unet = peer
  opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
  s, length, dim = common.MATCHED_SIZE, common.MATCHED_TEXT_LEN, common.MATCHED_TEXT_DIM
  x = torch.randn(batch, 3, s, s)
  noise = torch.randn_like(x)
  text = torch.randn(batch, length, dim)
  mask = torch.ones(batch, length, dtype=torch.bool)

  def one():
    t = torch.rand(batch)
    out = unet(x, t, text_embeds=text, text_mask=mask, cond_drop_prob=0.1)
    loss = torch.nn.functional.mse_loss(out, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  times = common.time_calls(one, steps, warmup)
  median = statistics.median(times)
  step_flops = counted_flops(one)
  return {'peer': 'imagen-pytorch', 'peer_step_ms_median': median * 1e3,
          'peer_images_per_sec': batch / median,
          'peer_flops_per_step': step_flops, 'peer_achieved_gflops': step_flops / median / 1e9,
          'peer_params': sum(p.numel() for p in unet.parameters()),
          'peer_torch_threads': torch.get_num_threads()}


def sample(batch: int, steps: int, warmup: int, num_steps: int, guidance_scale: float):
  """imagen-pytorch's Unet: `num_steps` guided calls with a DDIM (eta = 0) update."""
  peer = _matched_unet()
  if peer is None:
    return None
  torch, unet = peer
  unet.eval()
  s, length, dim = common.MATCHED_SIZE, common.MATCHED_TEXT_LEN, common.MATCHED_TEXT_DIM
  text = torch.randn(batch, length, dim)
  mask = torch.ones(batch, length, dtype=torch.bool)
  times_grid = torch.linspace(1.0, 0.0, num_steps + 1)

  def alpha_sigma(t):  # cosine schedule, as ours
    return torch.cos(t * torch.pi / 2), torch.sin(t * torch.pi / 2)

  @torch.no_grad()
  def guided_eps(x, t):
    return unet.forward_with_cond_scale(x, t.expand(batch), text_embeds=text, text_mask=mask,
                                        cond_scale=guidance_scale)

  @torch.no_grad()
  def one():
    x = torch.randn(batch, 3, s, s)
    for i in range(num_steps):
      t, t_next = times_grid[i], times_grid[i + 1]
      eps = guided_eps(x, t)
      a, sg = alpha_sigma(t)
      a2, s2 = alpha_sigma(t_next)
      x0 = ((x - sg * eps) / a.clamp(min=1e-4)).clamp(-1, 1)
      x = a2 * x0 + s2 * eps

  times = common.time_calls(one, steps, warmup)
  median = statistics.median(times)
  # One guided call counted, times the chain's steps: counting the whole chain would double
  # the peer's run (the DDIM update's FLOPs are elementwise).
  chain_flops = num_steps * counted_flops(
      lambda: guided_eps(torch.randn(batch, 3, s, s), times_grid[0]))
  return {'peer': 'imagen-pytorch', 'peer_chain_ms_median': median * 1e3,
          'peer_images_per_sec': batch / median,
          'peer_flops_per_chain': chain_flops, 'peer_achieved_gflops': chain_flops / median / 1e9}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  del sys_argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum('kind', None, ('train', 'sample'), 'what to time', required=True, **fv)
  flags.DEFINE_integer('batch', common.MATCHED_BATCH, 'batch', **fv)
  flags.DEFINE_integer('steps', 10, 'timed iterations (median reported)', **fv)
  flags.DEFINE_integer('warmup', 2, 'untimed iterations first', **fv)
  flags.DEFINE_integer('num_steps', 50, 'sample: DDIM steps per chain', **fv)
  flags.DEFINE_float('guidance', 5.0, 'sample: guidance scale', **fv)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  if F.kind == 'train':
    out = train_step(F.batch, F.steps, F.warmup)
  else:
    out = sample(F.batch, F.steps, F.warmup, F.num_steps, F.guidance)
  print(json.dumps(out or {'peer': 'imagen-pytorch not importable'}))


if __name__ == '__main__':
  from diffusion_jax import cli, hugepages
  hugepages.reexec_with_huge_pages()
  define_flags()
  cli.run(main)

r"""Our U-Net against diffusers' own on the CPU: an IF-I-shaped and a Karlo-decoder-shaped
`UNet2DConditionModel` (the latter behind its `UnCLIPTextProjModel`), random weights.

  python benchmarks/diffusers_peer.py [--model=both|if1|karlo] [--steps=8] [--batch=2]
      [--repeats=3] [--guidance=5] [--quick]

For each model a child process (its own, so that torch's and XLA's thread pools never share
one) builds the diffusers model at random weights, saves it (`save_pretrained`), writes the
inputs and its guided output, and times diffusers (torch, float32, `torch.no_grad` for
sampling, `torch.set_num_threads` = the cores). This process then loads the folder into our
UNet (`diffusers_io.unet.load_unet`), checks that both outputs agree and times ours
(`jax.jit`, float32):

  sampling: `--steps` guided U-Net evaluations (classifier-free guidance: one forward pass
    at batch 2B, the two halves mixed, a fixed Euler-like update; the denoiser only, no
    scheduler), after a warm-up run; s per image = median chain time / B. Ours compiles one
    guided step (`ours_compile_s`, lower + compile) and calls it `--steps` times.
  train step: eps MSE (the first three output channels against the noise) at batch B,
    backward and an Adam update (`optax.adam` / `torch.optim.Adam`, lr 1e-4); median ms of
    `--repeats` steps (at least 3) after a warm-up step.

For Karlo the text projection runs inside every evaluation on both sides (ours holds it in
the UNet). Prints one JSON object as its last line: per model `ours_s_per_image`,
`theirs_s_per_image`, `ratio` (ours / theirs: below 1 is faster), `ours_compile_s`,
`ours_train_ms`, `theirs_train_ms`, `train_ratio`, `max_abs_diff`, `output_scale`, `config`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THEIRS_PREFIX = 'THEIRS '  # the child's result line

IF_OPTIONS = dict(act_fn='gelu', time_embedding_act_fn='gelu',
                  resnet_time_scale_shift='scale_shift', resnet_skip_time_act=True,
                  resnet_out_scale_factor=1.414, encoder_hid_dim_type='text_proj',
                  addition_embed_type='text', cross_attention_norm='group_norm',
                  mid_block_type='UNetMidBlock2DSimpleCrossAttn')


def _types(levels: int, quick: bool = False) -> dict:
  """IF's and Karlo's layout: res blocks at the first level, cross-attention below (--quick:
  one attending level, the fewest ops to compile)."""
  plain = 0 if quick else 1
  down = ['ResnetDownsampleBlock2D'] * plain + ['SimpleCrossAttnDownBlock2D'] * (levels - plain)
  up = ['SimpleCrossAttnUpBlock2D'] * (levels - plain) + ['ResnetUpsampleBlock2D'] * plain
  return dict(down_block_types=down, up_block_types=up)


def spec(name: str, quick: bool) -> dict:
  """The diffusers configs (unet, text_proj) and input sizes of one benchmark model."""
  if name == 'if1':
    # IF-I-XL's layout (64 px, learned variance, T5-XXL's 4096-wide tokens) at 1/5 width.
    unet = dict(IF_OPTIONS, sample_size=64, in_channels=3, out_channels=6,
                block_out_channels=(64, 128, 192, 256), layers_per_block=2,
                attention_head_dim=64, cross_attention_dim=256, encoder_hid_dim=4096,
                addition_embed_type_num_heads=4, **_types(4))
    text_len, text_proj = 77, None
    if quick:
      unet.update(sample_size=8, block_out_channels=(32,), layers_per_block=1,
                  norm_num_groups=8, attention_head_dim=16, cross_attention_dim=32,
                  encoder_hid_dim=48, addition_embed_type_num_heads=2, **_types(1, quick))
      text_len = 8
  elif name == 'karlo':
    # Karlo's decoder (64 px, learned variance, CLIP ViT-L's 768-wide embeddings, 4 extra
    # context tokens, context wider than the deepest level) at 1/5 width.
    unet = dict(sample_size=64, in_channels=3, out_channels=6,
                block_out_channels=(64, 128, 192, 256), layers_per_block=2,
                attention_head_dim=64, cross_attention_dim=320, class_embed_type='identity',
                resnet_time_scale_shift='scale_shift',
                mid_block_type='UNetMidBlock2DSimpleCrossAttn', **_types(4))
    text_proj = dict(clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim=256,
                     cross_attention_dim=320)
    text_len = 77
    if quick:
      unet.update(sample_size=8, block_out_channels=(32,), layers_per_block=1,
                  norm_num_groups=8, attention_head_dim=16, cross_attention_dim=32,
                  **_types(1, quick))
      text_proj.update(clip_embeddings_dim=24, time_embed_dim=128, cross_attention_dim=32)
      text_len = 8
  else:
    raise ValueError(f'--model={name}: use if1, karlo or both')
  return dict(unet=unet, text_proj=text_proj, text_len=text_len)


def make_inputs(s: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """The benchmark's inputs (NCHW, as diffusers takes them): x, the guided pair's text, a
  train batch, and for Karlo the CLIP embeddings and a padded token mask."""
  rng = np.random.default_rng(seed)
  size, text_len = s['unet']['sample_size'], s['text_len']
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  data = dict(x=f32(batch, 3, size, size), x0=rng.uniform(-1, 1, (batch, 3, size, size)).astype(
      np.float32), noise=f32(batch, 3, size, size), k_train=rng.integers(0, 1000, batch))
  # x_t of a linear-beta schedule at the train step's steps
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[data['k_train']][:, None, None, None]
  data['x_t'] = (np.sqrt(abar) * data['x0'] + np.sqrt(1 - abar) * data['noise']).astype(
      np.float32)
  if s['text_proj'] is None:
    data['text'] = 0.5 * f32(2 * batch, text_len, s['unet']['encoder_hid_dim'])
  else:
    dim = s['text_proj']['clip_embeddings_dim']
    data.update(image=f32(batch, dim), pooled=f32(2 * batch, dim),
                tokens=f32(2 * batch, text_len, dim))
    # prompts of different lengths: the padding is masked
    lengths = rng.integers(2, text_len + 1, 2 * batch)
    data['mask'] = np.arange(text_len)[None] < lengths[:, None]
  return data


def sampling_ks(steps: int) -> np.ndarray:
  return np.linspace(999, 0, steps).round().astype(np.int64)


CHECK_K = 500  # the step of the agreement check
UPDATE = 0.05  # the chain's x <- x - UPDATE * guided eps


# ------------------------------------------------------------------------------------------
# theirs: diffusers in a child process


def _randomise(modules, seed: int):
  """Perturbs the constant tensors of diffusers' init (norms, zero biases, the null image
  embedding) so that every tensor carries random values."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in modules:
      for name, p in module.named_parameters():
        if p.numel() > 1 and float(p.std()) > 0:
          continue
        base = 1.0 if name.endswith('weight') and 'norm' in name else 0.0
        p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))


def theirs(args) -> dict:
  import torch
  import diffusers
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  s = spec(args.model, args.quick)
  karlo = s['text_proj'] is not None
  unet = diffusers.UNet2DConditionModel(**s['unet'])
  text_proj = None
  modules = [unet]
  if karlo:
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    text_proj = UnCLIPTextProjModel(**s['text_proj'])
    modules.append(text_proj)
  _randomise(modules, seed=1)
  unet.save_pretrained(os.path.join(args.dir, 'unet'))
  if karlo:
    text_proj.save_pretrained(os.path.join(args.dir, 'text_proj'))
  B = args.batch
  data = make_inputs(s, B)
  T = {k: torch.from_numpy(np.asarray(v)) for k, v in data.items()}
  extra = s['text_proj']['clip_extra_context_tokens'] if karlo else 0

  def forward(x, k, rows: slice, guided: bool):
    """The U-Net's output (and Karlo's text projection) at timestep(s) k."""
    if not karlo:
      return unet(x, k, encoder_hidden_states=T['text'][rows]).sample
    hidden, additive = text_proj(image_embeddings=T['image'], prompt_embeds=T['pooled'][rows],
                                 text_encoder_hidden_states=T['tokens'][rows],
                                 do_classifier_free_guidance=guided)
    mask = torch.nn.functional.pad(T['mask'][rows], (extra, 0), value=True)
    return unet(x, k, encoder_hidden_states=hidden, class_labels=additive,
                attention_mask=mask).sample

  def guided_step(x, k):
    out = forward(torch.cat([x, x]), torch.full((2 * B,), int(k)), slice(None), True)
    uncond, cond = out[:B, :3], out[B:, :3]
    return x - UPDATE * (uncond + args.guidance * (cond - uncond)), out

  unet.eval()
  if karlo:
    text_proj.eval()
  with torch.no_grad():
    _, out = guided_step(T['x'], CHECK_K)
    np.savez(os.path.join(args.dir, 'data.npz'), reference=out.numpy(), **data)

    def chain():
      x = T['x']
      for k in sampling_ks(args.steps):
        x, _ = guided_step(x, k)
      return x

    chain()  # warm-up
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      chain()
      times.append(time.perf_counter() - t0)

  # train step: eps MSE, backward, Adam
  unet.train()
  params = [p for m in modules for p in m.parameters()]
  opt = torch.optim.Adam(params, lr=1e-4)

  def train_step():
    opt.zero_grad(set_to_none=True)
    out = forward(T['x_t'], T['k_train'], slice(B, None), False)
    loss = torch.nn.functional.mse_loss(out[:, :3], T['noise'])
    loss.backward()
    opt.step()
    return float(loss)

  train_step()  # warm-up
  train_times = []
  for _ in range(max(3, args.repeats)):
    t0 = time.perf_counter()
    loss = train_step()
    train_times.append(time.perf_counter() - t0)
  return {'theirs_s_per_image': statistics.median(times) / B,
          'theirs_chain_s': times,
          'theirs_train_ms': 1000 * statistics.median(train_times),
          'theirs_loss_finite': bool(np.isfinite(loss)),
          'params': sum(p.numel() for p in params),
          'torch': torch.__version__, 'torch_threads': torch.get_num_threads()}


# ------------------------------------------------------------------------------------------
# ours: the saved folder in our UNet


def _ours_inputs(data: dict, karlo: bool, B: int) -> tuple[dict, dict]:
  """Our (guided, train) cond dicts: NHWC images, the guided pair's null rows first."""
  import jax.numpy as jnp
  if not karlo:
    text = jnp.asarray(data['text'])
    mask = jnp.ones(text.shape[:2], bool)
    return (dict(text_tokens=text, text_mask=mask),
            dict(text_tokens=text[B:], text_mask=mask[B:]))
  image = jnp.asarray(data['image'])
  guided = dict(text_tokens=jnp.asarray(data['tokens']), text_mask=jnp.asarray(data['mask']),
                text_embed=jnp.asarray(data['pooled']),
                image_embed=jnp.concatenate([image, image]),
                drop_image=jnp.arange(2 * B) < B)
  train = {k: v[B:] for k, v in guided.items() if k != 'drop_image'}
  return guided, train


def ours(folder: str, karlo: bool, args) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from diffusion_jax.diffusers_io import unet as du
  module, params = du.load_unet(os.path.join(folder, 'unet'),
                                text_proj_folder=os.path.join(folder, 'text_proj')
                                if karlo else None)
  params = jax.device_put(params)
  with np.load(os.path.join(folder, 'data.npz')) as f:
    data = {k: f[k] for k in f.files}
  B, g = args.batch, args.guidance
  guided_cond, train_cond = _ours_inputs(data, karlo, B)
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))

  def guided_step(params, x, k, cond):
    t = jnp.full((2 * B,), (k + 1) / 1000, jnp.float32)
    out = module.apply({'params': params}, jnp.concatenate([x, x]), t, cond)
    uncond, c = out[:B, ..., :3], out[B:, ..., :3]
    return x - UPDATE * (uncond + g * (c - uncond)), out

  x = nhwc(data['x'])
  t0 = time.perf_counter()
  step = jax.jit(guided_step).lower(params, x, jnp.float32(0), guided_cond).compile()
  compile_s = time.perf_counter() - t0
  _, out = step(params, x, jnp.float32(CHECK_K), guided_cond)
  ref = data['reference'].transpose(0, 2, 3, 1)
  diff = float(np.abs(np.asarray(out) - ref).max())
  scale = float(np.abs(ref).max())

  def chain():
    y = x
    for k in sampling_ks(args.steps):
      y, _ = step(params, y, jnp.float32(k), guided_cond)
    return y.block_until_ready()

  chain()  # warm-up
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    final = chain()
    times.append(time.perf_counter() - t0)

  tx = optax.adam(1e-4)

  def train_step(params, opt_state, x_t, t, noise, cond):
    def loss_fn(p):
      out = module.apply({'params': p}, x_t, t, cond)
      return jnp.mean((out[..., :3] - noise) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  train_args = (nhwc(data['x_t']), jnp.asarray((data['k_train'] + 1) / 1000, jnp.float32),
                nhwc(data['noise']), train_cond)
  opt_state = tx.init(params)
  t0 = time.perf_counter()
  train = jax.jit(train_step, donate_argnums=(0, 1)).lower(
      params, opt_state, *train_args).compile()
  train_compile_s = time.perf_counter() - t0
  params, opt_state, loss = train(params, opt_state, *train_args)  # warm-up
  loss.block_until_ready()
  train_times = []
  for _ in range(max(3, args.repeats)):
    t0 = time.perf_counter()
    params, opt_state, loss = train(params, opt_state, *train_args)
    loss.block_until_ready()
    train_times.append(time.perf_counter() - t0)
  return {'ours_s_per_image': statistics.median(times) / B, 'ours_chain_s': times,
          'ours_compile_s': compile_s, 'ours_train_compile_s': train_compile_s,
          'ours_train_ms': 1000 * statistics.median(train_times),
          'ours_loss_finite': bool(np.isfinite(float(loss))),
          'output_finite': bool(np.isfinite(np.asarray(final)).all()),
          'max_abs_diff': diff, 'output_scale': scale, 'jax': jax.__version__}


def run_theirs(name: str, folder: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--side=theirs', f'--model={name}',
         f'--dir={folder}', f'--steps={args.steps}', f'--batch={args.batch}',
         f'--repeats={args.repeats}', f'--guidance={args.guidance}',
         f'--threads={args.threads}'] + (['--quick'] if args.quick else [])
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(THEIRS_PREFIX)]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    raise RuntimeError(f'diffusers process for {name} failed (exit {proc.returncode}): {tail}')
  return json.loads(lines[-1][len(THEIRS_PREFIX):])


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='both', choices=('both', 'if1', 'karlo'))
  p.add_argument('--steps', type=int, default=None, help='guided evaluations per sampling '
                 'chain (default 8; --quick: 1)')
  p.add_argument('--batch', type=int, default=None, help='images B (default 2; --quick: 1)')
  p.add_argument('--repeats', type=int, default=None, help='timed chains and train steps '
                 '(at least 3 train steps; default 3; --quick: 1)')
  p.add_argument('--guidance', type=float, default=5.0)
  p.add_argument('--threads', type=int, default=os.cpu_count() or 1,
                 help="torch's intra-op threads (default: the cores)")
  p.add_argument('--quick', action='store_true', help='8 px, one level, 8 text tokens: '
                 'checks the whole path in seconds')
  p.add_argument('--side', default='ours', choices=('ours', 'theirs'), help=argparse.SUPPRESS)
  p.add_argument('--dir', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for field, full, quick in (('steps', 8, 1), ('batch', 2, 1), ('repeats', 3, 1)):
    if getattr(args, field) is None:
      setattr(args, field, quick if args.quick else full)
    if getattr(args, field) < 1:
      p.error(f'--{field} must be at least 1')
  return args


def main(argv=None) -> None:
  args = parse(sys.argv[1:] if argv is None else argv)
  if args.side == 'theirs':
    print(THEIRS_PREFIX + json.dumps(theirs(args)), flush=True)
    return
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  names = ('if1', 'karlo') if args.model == 'both' else (args.model,)
  result = {'steps': args.steps, 'batch': args.batch, 'repeats': args.repeats,
            'guidance': args.guidance, 'quick': args.quick, 'dtype': 'float32',
            'cpu_count': os.cpu_count(), 'load_average': list(os.getloadavg())}
  for name in names:
    with tempfile.TemporaryDirectory() as folder:
      peer = run_theirs(name, folder, args)
      mine = ours(folder, name == 'karlo', args)
    s = spec(name, args.quick)
    r = dict(mine, **peer)
    r['ratio'] = r['ours_s_per_image'] / r['theirs_s_per_image']
    r['train_ratio'] = r['ours_train_ms'] / r['theirs_train_ms']
    r['config'] = dict(s['unet'], text_len=s['text_len'], **(
        {'text_proj': s['text_proj']} if s['text_proj'] else {}))
    print(f"{name}: {r['params']:,} params, max abs diff {r['max_abs_diff']:.3g} "
          f"(output scale {r['output_scale']:.3g}); sampling {r['ours_s_per_image']:.3f} s/image "
          f"ours vs {r['theirs_s_per_image']:.3f} theirs (ratio {r['ratio']:.2f}); train step "
          f"{r['ours_train_ms']:.0f} ms vs {r['theirs_train_ms']:.0f} ms "
          f"(ratio {r['train_ratio']:.2f}); ours compiles in {r['ours_compile_s']:.1f} s",
          flush=True)
    result[name] = r
  result['load_average_end'] = list(os.getloadavg())
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()

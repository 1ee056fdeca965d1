r"""The peer of glide_release.py: glide-text2im's own sampler, timed in a process of its own.

  python benchmarks/glide_peer.py --glide_text2im=DIR [--base_steps=100] [--up_steps=27]
      [--options=JSON] [--up_options=JSON] [--prompt=...]

Its text2im notebook's recipe on the CPU: `create_model_and_diffusion` with
`model_and_diffusion_defaults()` (and `..._upsampler()`), `use_fp16=False` (CPU), the
networks' own random init (no checkpoint), the base sampled by `p_sample_loop` at respacing
'100' through the notebook's classifier-free guidance `model_fn` (scale 3, batch 1 = two rows),
then the upsampler by `ddim_sample_loop` at 'fast27' with upsample_temp 0.997. The model
construction, a first run and a second run are timed; torch uses its default intra-op threads
(one per core). DIR is a glide-text2im checkout, put on sys.path here only: the library never
imports it. Prints one JSON line (`{"peer": "glide-text2im not importable"}` without it).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time


def flag(name: str, default: str) -> str:
  for arg in sys.argv[1:]:
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
  return default


def emit(result: dict) -> None:
  print(json.dumps(result), flush=True)


def main() -> None:
  root = flag('glide_text2im', '')
  base_steps, up_steps = int(flag('base_steps', '100')), int(flag('up_steps', '27'))
  prompt = flag('prompt', 'an oil painting of a corgi')
  options = json.loads(flag('options', '{}') or '{}')
  up_options = json.loads(flag('up_options', '{}') or '{}')
  repeats = int(flag('repeats', '2'))
  if root:
    sys.path.insert(0, os.path.abspath(root))
  try:
    import torch as th
    from glide_text2im.model_creation import (create_model_and_diffusion,
                                              model_and_diffusion_defaults,
                                              model_and_diffusion_defaults_upsampler)
  except ImportError:
    emit({'peer': 'glide-text2im not importable'})
    return
  up_options = dict(up_options)
  up_options.pop('low_res_size', None)  # glide-text2im resizes the low-res input itself
  th.manual_seed(0)
  t0 = time.perf_counter()
  opts = model_and_diffusion_defaults()
  opts.update(options, use_fp16=False, timestep_respacing=str(base_steps))
  model, diffusion = create_model_and_diffusion(**opts)
  model.eval()
  opts_up = model_and_diffusion_defaults_upsampler()
  opts_up.update(up_options, use_fp16=False,
                 timestep_respacing='fast27' if up_steps == 27 else f'ddim{up_steps}')
  model_up, diffusion_up = create_model_and_diffusion(**opts_up)
  model_up.eval()
  build_s = time.perf_counter() - t0
  guidance_scale, upsample_temp, batch_size = 3.0, 0.997, 1

  def tokens_mask(m, o, text):
    toks = m.tokenizer.encode(text) if text else []
    return m.tokenizer.padded_tokens_and_mask(toks, o['text_ctx'])

  def model_fn(x_t, ts, **kwargs):  # the notebook's classifier-free guidance
    half = x_t[: len(x_t) // 2]
    combined = th.cat([half, half], dim=0)
    model_out = model(combined, ts, **kwargs)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = th.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
    eps = th.cat([half_eps, half_eps], dim=0)
    return th.cat([eps, rest], dim=1)

  def sample():
    timings = {}
    t = time.perf_counter()
    tokens, mask = tokens_mask(model, opts, prompt)
    uncond_tokens, uncond_mask = tokens_mask(model, opts, '')
    kwargs = dict(tokens=th.tensor([tokens] * batch_size + [uncond_tokens] * batch_size),
                  mask=th.tensor([mask] * batch_size + [uncond_mask] * batch_size,
                                 dtype=th.bool))
    model.del_cache()
    size = opts['image_size']
    samples = diffusion.p_sample_loop(model_fn, (2 * batch_size, 3, size, size),
                                      device=th.device('cpu'), clip_denoised=True,
                                      progress=False, model_kwargs=kwargs,
                                      cond_fn=None)[:batch_size]
    model.del_cache()
    timings['base'] = time.perf_counter() - t
    t = time.perf_counter()
    tokens, mask = tokens_mask(model_up, opts_up, prompt)
    kwargs = dict(low_res=((samples + 1) * 127.5).round() / 127.5 - 1,
                  tokens=th.tensor([tokens] * batch_size),
                  mask=th.tensor([mask] * batch_size, dtype=th.bool))
    model_up.del_cache()
    up_shape = (batch_size, 3, opts_up['image_size'], opts_up['image_size'])
    up = diffusion_up.ddim_sample_loop(model_up, up_shape,
                                       noise=th.randn(up_shape) * upsample_temp,
                                       device=th.device('cpu'), clip_denoised=True,
                                       progress=False, model_kwargs=kwargs,
                                       cond_fn=None)[:batch_size]
    model_up.del_cache()
    timings['upsample'] = time.perf_counter() - t
    return up, timings

  runs, stage_timings = [], []
  with th.no_grad():
    for _ in range(max(1, repeats)):
      t0 = time.perf_counter()
      up, timings = sample()
      runs.append(time.perf_counter() - t0)
      stage_timings.append(timings)
  last = stage_timings[-1]
  emit({'peer': 'glide-text2im', 'peer_torch': th.__version__,
        'peer_threads': th.get_num_threads(),
        'peer_params': {'base': sum(p.numel() for p in model.parameters()),
                        'upsample': sum(p.numel() for p in model_up.parameters())},
        'peer_build_s': build_s, 'peer_generate_s': runs, 'peer_s_per_image': runs[-1],
        'peer_timings': stage_timings,
        'peer_base_s_per_step': last['base'] / base_steps,
        'peer_upsample_s_per_step': last['upsample'] / up_steps,
        'peer_output_shape': list(up.shape),
        'peer_output_finite': bool(th.isfinite(up).all()),
        'peer_peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0})


if __name__ == '__main__':
  main()

r"""Converts pytorch-fid's Inception weights (.pth) to safetensors, once.

    python -m diffusion_jax.tools.convert_inception \
        --src=pt_inception-2015-12-05-6726825d.pth --out=pt_inception-2015-12-05.safetensors

This is the only place in the library that unpickles anything. It calls
`torch.load(..., weights_only=True)`, which restricts unpickling to tensors and plain
containers (no arbitrary code), and it still should only be run on a file you trust, e.g.
the one pytorch-fid publishes as its `FID_WEIGHTS_URL` release asset. The file is never
downloaded here: fetch it yourself.

The state dict is written unchanged (torch names and layouts, float32) so that
`diffusion_jax.convert.load_inception` maps it name by name. The output's sha256 is printed;
every evaluation result records it, since FIDs from different weights are not comparable.
When the source name carries torch hub's hash prefix (`...-6726825d.pth`), the source
file's sha256 is checked against it.
"""
from __future__ import annotations

import os
import re
import sys

from absl import flags

from diffusion_jax import cli, errors


def convert(src: str, out: str) -> str:
  """Writes `out` from `src`; returns the sha256 of `out`."""
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415 - only this tool needs torch
  from safetensors.numpy import save_file  # noqa: PLC0415

  from diffusion_jax import convert as convert_lib  # noqa: PLC0415

  if os.path.isdir(out):
    raise errors.InputError(f'{out}: is a directory; give the .safetensors file to write')
  src_sha = convert_lib.file_sha256(src)
  m = re.search(r'-([0-9a-f]{8,})\.pth?$', os.path.basename(src))
  if m and not src_sha.startswith(m.group(1)):
    raise errors.InputError(f'{src}: sha256 {src_sha} does not start with the {m.group(1)} in '
                            'its name: the file is corrupt or not the published one')
  print(f'loading {src} with torch.load(weights_only=True): tensors only, no code runs',
        file=sys.stderr)
  state = _load_state_dict(src)
  tensors = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in state.items()
             if isinstance(v, torch.Tensor)}
  tensors = {k: v.astype(np.float32) if v.dtype.kind == 'f' else v for k, v in tensors.items()}
  save_file(tensors, out, metadata={'format': 'pytorch-fid FID InceptionV3 state dict',
                                    'source': os.path.basename(src), 'source_sha256': src_sha})
  convert_lib.load_inception(out)  # Every tensor the FID graph needs is there, with the right shape.
  return convert_lib.file_sha256(out)


def _load_state_dict(src: str) -> dict:
  """The state dict in `src`, unpickled by torch with weights_only=True (tensors only)."""
  import torch  # noqa: PLC0415
  try:
    state = torch.load(src, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 - what torch raises on garbage varies (IndexError, ...)
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise errors.InputError(f'{src}: not a torch checkpoint of tensors ({first_line}); give '
                            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth") from None
  if isinstance(state, dict) and 'state_dict' in state:
    state = state['state_dict']
  if not isinstance(state, dict):
    raise errors.InputError(f'{src}: holds a {type(state).__name__}, not a state dict; give '
                            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  return state


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  if not os.path.isfile(F.src):
    raise cli.CLIError(f'--src={F.src}: no such file (fetch pytorch-fid\'s weights yourself)')
  digest = convert(F.src, F.out)  # an errors.InputError is one line and exit status 2
  print(f'wrote {F.out}')
  print(f'sha256 {digest}')


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """Flags exist only when run as a program, so importing `convert` defines none."""
  del sys_argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('src', None, "pytorch-fid's pt_inception-2015-12-05-*.pth", required=True,
                      **fv)
  flags.DEFINE_string('out', None, 'output .safetensors file', required=True, **fv)


if __name__ == '__main__':
  define_flags()
  cli.run(main)

"""InceptionV3 FID graph: parity with pytorch-fid's network in torch, resize, loader, converter.

torchvision is not a dependency, so its InceptionV3 blocks and pytorch-fid's FIDInception
replacements are re-implemented below in torch, following their published source.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_jax import convert
from diffusion_jax.models import inception

torch = pytest.importorskip('torch')
nn = torch.nn
F = torch.nn.functional


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class FIDInceptionA(nn.Module):
  def __init__(self, cin, pool_features, count_include_pad=False):
    super().__init__()
    self.count_include_pad = count_include_pad
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1,
                      count_include_pad=self.count_include_pad)
    return torch.cat([b1, b5, b3, self.branch_pool(bp)], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      bd = layer(bd)
    bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([b1, b7, bd, self.branch_pool(bp)], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    if self.max_pool:  # FIDInceptionE_2
      bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:  # FIDInceptionE_1
      bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([b1, b3, bd, self.branch_pool(bp)], 1)


class TorchFIDInception(nn.Module):
  """torchvision's Inception3(num_classes=1008, aux_logits=False) with pytorch-fid's blocks,
  run as pytorch-fid's InceptionV3(output_blocks=[3]) (resize, normalise, pool3)."""

  def __init__(self, torchvision_5b=False):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    # torchvision_5b: the unpatched torchvision block (padding counted in the average).
    self.Mixed_5b = FIDInceptionA(192, 32, count_include_pad=torchvision_5b)
    self.Mixed_5c = FIDInceptionA(256, 64)
    self.Mixed_5d = FIDInceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, 128)
    self.Mixed_6c = FIDInceptionC(768, 160)
    self.Mixed_6d = FIDInceptionC(768, 160)
    self.Mixed_6e = FIDInceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, x):
    x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
      x = getattr(self, f'Mixed_{name}')(x)
    return F.adaptive_avg_pool2d(x, (1, 1))[:, :, 0, 0]


def _randomise(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
  return model.eval()


@pytest.fixture(scope='module')
def torch_model():
  torch.manual_seed(0)
  return _randomise(TorchFIDInception(), 0)


@pytest.fixture(scope='module')
def weights_file(torch_model, tmp_path_factory):
  from safetensors.torch import save_file
  path = str(tmp_path_factory.mktemp('inception') / 'fid_inception.safetensors')
  save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, path)
  return path


@pytest.fixture(scope='module')
def images():
  # Non-square and smaller than 299: exercises the upsampling resize too.
  return np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)


def _torch_features(model, images_uint8):
  x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0  # ToTensor
  with torch.no_grad():
    return model(x).numpy()


@pytest.mark.parametrize('hw_in', [(64, 64), (48, 40), (512, 380), (299, 600), (2000, 1024)])
def test_resize_matches_torch_bilinear(hw_in):
  x = np.random.default_rng(1).random((1, *hw_in, 3)).astype(np.float32)
  ours = np.asarray(inception.resize_bilinear(x, 299))
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode='bilinear',
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  err = np.abs(ours - ref).max()
  assert err < 2e-6, f'bilinear resize {hw_in} -> 299 differs from torch by {err}'


def test_features_match_pytorch_fid_graph(torch_model, weights_file, images):
  import jax
  module, params = convert.load_inception(weights_file)
  ours = np.asarray(jax.jit(lambda p, x: module.apply({'params': p}, x))(
      params, images.astype(np.float32) / 255.0))
  ref = _torch_features(torch_model, images)
  assert ours.shape == ref.shape == (2, 2048)
  err = np.abs(ours - ref).max()
  scale = np.abs(ref).max()
  print(f'inception parity: max abs error {err:.3g}, feature scale {scale:.3g}')
  assert scale > 0.1 and np.std(ref) > 0.1 * np.abs(ref).mean(), 'degenerate random features'
  assert err < 1e-4, f'pool3 features differ from torch by {err} (scale {scale})'
  # The comparison is sharp enough to see the FID patches: torchvision's unpatched average
  # pool (padding counted) in a single block already moves the features far more.
  plain = TorchFIDInception(torchvision_5b=True)
  plain.load_state_dict(torch_model.state_dict())
  moved = np.abs(_torch_features(plain.eval(), images) - ref).max()
  assert moved > 100 * err, f'count_include_pad changed features by only {moved}'


def test_load_refuses_pickles_and_names_bad_keys(weights_file, tmp_path):
  with pytest.raises(convert.WeightImportError, match='convert_inception'):
    convert.load_inception(str(tmp_path / 'pt_inception-2015-12-05-6726825d.pth'))
  from safetensors.numpy import save_file
  tensors = dict(convert.read_safetensors(weights_file))
  del tensors['Mixed_6c.branch7x7_2.conv.weight']
  tensors['Mixed_6c.branch7x7_3.bn.weight'] = np.ones(7, np.float32)
  tensors['extra.weight'] = np.ones(1, np.float32)
  bad = str(tmp_path / 'bad.safetensors')
  save_file({k: np.asarray(v) for k, v in tensors.items()}, bad)
  with pytest.raises(convert.WeightImportError) as info:
    convert.load_inception(bad)
  msg = str(info.value)
  for part in ('Mixed_6c.branch7x7_2.conv.weight', 'Mixed_6c.branch7x7_3.bn.weight',
               'extra.weight'):
    assert part in msg, f'{part} not named in: {msg}'


def test_params_round_trip_through_torch_names(tmp_path):
  params = inception.random_params(3)
  path = str(tmp_path / 'r.safetensors')
  digest = convert.save_inception(path, params)
  assert digest == hashlib.sha256(open(path, 'rb').read()).hexdigest()
  _, back = convert.load_inception(path)
  import jax
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), back, params)
  assert all(jax.tree.leaves(same)), 'save/load changed some parameter'


def test_converter_writes_loadable_safetensors_and_checks_hash(torch_model, tmp_path):
  tmp = str(tmp_path / 'x.pth')
  torch.save(torch_model.state_dict(), tmp)
  digest = hashlib.sha256(open(tmp, 'rb').read()).hexdigest()
  src = str(tmp_path / f'pt_inception-2015-12-05-{digest[:8]}.pth')
  os.rename(tmp, src)
  out = str(tmp_path / 'out.safetensors')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  run = subprocess.run([sys.executable, '-m', 'diffusion_jax.tools.convert_inception',
                        f'--src={src}', f'--out={out}'], capture_output=True, text=True, env=env,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'weights_only=True' in run.stderr, 'the converter must say how it unpickles'
  out_sha = hashlib.sha256(open(out, 'rb').read()).hexdigest()
  assert f'sha256 {out_sha}' in run.stdout, run.stdout
  tensors = convert.read_safetensors(out)
  ref = torch_model.state_dict()
  assert np.array_equal(tensors['Mixed_7c.branch_pool.conv.weight'],
                        ref['Mixed_7c.branch_pool.conv.weight'].numpy())
  wrong = str(tmp_path / 'pt_inception-2015-12-05-00000000.pth')
  os.rename(src, wrong)
  from diffusion_jax.tools import convert_inception
  with pytest.raises(ValueError, match='does not start with'):
    convert_inception.convert(wrong, str(tmp_path / 'never.safetensors'))

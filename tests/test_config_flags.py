"""Every config field the README sets on a command line parses there, those whose default is
None included (typed placeholders), and the stage configs are complete."""
import os
import re

from absl import flags
from ml_collections import config_flags
import pytest

from configs import glide, imagen, unclip
from diffusion_jax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALUES = {'DIR': '/models/t5', 'DATA': '/data/tfds', 'NAME': 'mine', 'ROOT': '/runs'}


def _readme_overrides():
  """(config spec, field, value) for each `--config.<field>=<value>` in the README, with the
  `--config=` of its command (the tiny Imagen base where the text names none)."""
  text = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
  out = []
  for command in re.split(r'\n(?!\s)', text.replace('\\\n', ' ')):
    spec = re.search(r'--config=(\S+?\.py:\S+?)[`\s]', command + ' ')
    spec = spec.group(1) if spec else 'configs/imagen.py:stage=base64,size=tiny'
    for field, value in re.findall(r'--config\.([\w.<>*]+)=([^\s`]+)', command):
      # Cascade fields on the cascade config, stage fields on a stage config.
      cascade = field.startswith('stages.')
      if cascade != ('stage=cascade' in spec):
        spec = ('configs/imagen.py:stage=cascade,size=tiny' if cascade else
                'configs/imagen.py:stage=base64,size=tiny')
      out.append((spec.replace('size=...', 'size=tiny'), field, value))
  return out


def _parse(spec, *overrides):
  """The config the train/sample CLIs would get for these arguments."""
  argv = ['prog', f'--config={spec}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_readme_names_the_none_default_fields():
  fields = {field for _, field, _ in _readme_overrides()}
  # The fields a user sets first: their own data and a pretrained encoder.
  assert {'text_encoder.path', 'input.data_dir', 'input.dataset'} <= fields, fields
  none_default = _parse('configs/imagen.py:stage=base64,size=tiny')
  assert none_default.text_encoder.path is None and none_default.input.data_dir is None


@pytest.mark.parametrize('spec,field,value', _readme_overrides())
def test_every_readme_field_sets_from_the_command_line(spec, field, value):
  if '<' in field or '*' in field:  # a pattern such as stages.<stage>.num_steps
    field = field.replace('<stage>', 'base64').replace('*', 'model_channels')
    value = '8' if value in ('...', '') else value
  value = VALUES.get(value, value).rstrip('.,')
  if value == '...':
    value = '8'
  config = _parse(spec, f'--config.{field}={value}')
  got = config
  for key in field.split('.'):
    got = got[key]
  assert str(got) == value, f'--config.{field}={value} gave {got!r}'


@pytest.mark.parametrize('family,stage', [(f.__name__.split('.')[-1], s) for f in
                                          (imagen, glide, unclip) for s in f.STAGES
                                          if s not in ('cascade',)])
def test_stage_configs_are_complete(family, stage):
  """Every input field is present (one place for its default), and no field is a bare None:
  unset fields are typed placeholders that the command line can set."""
  module = {'imagen': imagen, 'glide': glide, 'unclip': unclip}[family]
  config = module.get_config(f'stage={stage},size=tiny')
  assert set(data.INPUT_DEFAULTS) | {'batch_size', 'image_size'} <= set(config.input.keys())
  unset = []

  def walk(cfg, prefix):
    for key in cfg.keys():
      ref = cfg.get_ref(key)
      value = ref.get()
      if hasattr(value, 'keys'):
        walk(value, f'{prefix}{key}.')
      elif value is None:
        unset.append((f'{prefix}{key}', ref.get_type()))
  walk(config, '')
  assert all(t is not type(None) for _, t in unset), unset

"""Bad input on every command line is one line on stderr (`error: ...`) and exit status 2,
before any work starts (no training, restore, sampling or compilation); the Python API raises
`errors.InputError` with the same message. Each case runs its CLI in this process
(`cli.call`), with the functions where work would begin replaced by ones that fail the test.
"""
from __future__ import annotations

import os

from absl import flags
import pytest

from diffusion_jax import cli, errors, validation

IMAGEN = '--config=configs/imagen.py:stage=base64,size=tiny'
IMAGEN_SR = '--config=configs/imagen.py:stage=sr256,size=tiny'
GLIDE = '--config=configs/glide.py:stage=base64,size=tiny'
GLIDE_UP = '--config=configs/glide.py:stage=up256,size=tiny'
SHAPES = '--config=projects/shapes/configs/imagen.py:stage=base64'
CASCADE = '--config=configs/imagen.py:stage=cascade,size=tiny'
GLIDE_CASCADE = '--config=configs/glide.py:stage=cascade,size=tiny'
SHAPES_CASCADE = '--config=projects/shapes/configs/imagen.py:stage=cascade'


def _modules():
  from diffusion_jax import evaluate, sample
  from diffusion_jax.tools import aot, export_clip, gaussian_demo, param_count, prepare_folder
  from diffusion_jax.train import __main__ as train
  from projects.shapes import demo
  from projects.shapes import evaluate as shapes_evaluate
  return {'train': train, 'sample': sample, 'evaluate': evaluate, 'aot': aot,
          'param_count': param_count, 'export_clip': export_clip,
          'gaussian_demo': gaussian_demo, 'prepare_folder': prepare_folder, 'demo': demo,
          'shapes_evaluate': shapes_evaluate}


@pytest.fixture
def no_work(monkeypatch):
  """Where each CLI's work begins: reaching any of these fails the test."""
  from diffusion_jax import conditioning
  from diffusion_jax.pipelines import common
  from diffusion_jax.tools import aot, gaussian_demo, param_count
  from diffusion_jax.train import loop
  from projects.shapes import demo

  def started(*args, **kw):
    raise AssertionError('work started on bad input')
  for owner, name in [(loop, 'build_trainer'), (common, 'Stage'),
                      (conditioning, 'restore_stage'), (aot, 'compile_train_step'),
                      (param_count, 'abstract_params'), (gaussian_demo, 'run'),
                      (demo, 'train_stages')]:
    monkeypatch.setattr(owner, name, started)
  # The aot CLI sets XLA_FLAGS for its topology; keep the session's.
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))


@pytest.fixture
def paths(tmp_path):
  """A missing root, a file, an empty directory and a folder with one captioned image."""
  from PIL import Image
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  (tmp_path / 'empty').mkdir()
  images = tmp_path / 'images'
  images.mkdir()
  Image.new('RGB', (8, 8)).save(images / 'im0.png')
  (images / 'im0.txt').write_text('red\n')
  (tmp_path / 'binary').write_bytes(bytes(range(128, 256)))
  (tmp_path / 'results').mkdir()
  (tmp_path / 'results' / 'bad.json').write_text('{bad')
  return {'ROOT': str(tmp_path / 'root'), 'FILE': str(a_file), 'EMPTY': str(tmp_path / 'empty'),
          'IMAGES': str(images), 'OUT': str(tmp_path / 'out'), 'TMP': str(tmp_path),
          'BINARY': str(tmp_path / 'binary'), 'RESULTS': str(tmp_path / 'results')}


def _cli_error(module, args, capsys) -> str:
  """Runs the CLI; returns its one error line (after checking status 2 and no traceback)."""
  with pytest.raises(SystemExit) as exit_:
    cli.call(module, args)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert exit_.value.code == errors.INPUT_EXIT_STATUS, (exit_.value.code, err[-2000:])
  assert 'Traceback' not in err, err[-3000:]
  said = [line for line in lines if line.startswith('error: ')]
  assert len(said) == 1 and lines[-1] == said[0], err[-2000:]
  return said[0]


# (case id, CLI, arguments, words the error line must contain); ROOT, FILE, ... are `paths`.
CASES = [
    # train: every stage-config field in range, related fields consistent, before building
    ('train-total_steps-negative', 'train', [IMAGEN, '--config.total_steps=-5'],
     ['--config.total_steps=-5', '>= 1']),
    ('train-lr-negative', 'train', [IMAGEN, '--config.optimizer.lr=-1'],
     ['--config.optimizer.lr=-1', '> 0']),
    ('train-lr-nan', 'train', [IMAGEN, '--config.optimizer.lr=nan'], ['optimizer.lr=nan']),
    ('train-schedule-unknown', 'train', [IMAGEN, '--config.diffusion.schedule=bogus'],
     ['diffusion.schedule=bogus', 'linear', 'squaredcos_cap_v2']),
    ('train-image_size-odd', 'train', [IMAGEN, '--config.input.image_size=17'],
     ['input.image_size=17', 'multiple of 2', 'downsamples', '16 or 18']),
    ('train-image_size-vs-model', 'train', [IMAGEN, '--config.input.image_size=24'],
     ['input.image_size=24', 'model.image_size=16']),
    ('train-model-image_size', 'train', [SHAPES, '--config.model.image_size=36'],
     ['model.image_size=36', 'multiple of 8', '3 times', '32 or 40']),
    ('train-batch_size-zero', 'train', [IMAGEN, '--config.input.batch_size=0'],
     ['input.batch_size=0', '>= 1']),
    ('train-dataset-unknown', 'train', [IMAGEN, '--config.input.dataset=bogus'],
     ['input.dataset=bogus', 'not registered', 'coco_captions', 'folder', 'shapes']),
    ('train-caption_rewrite-unknown', 'train', [IMAGEN, '--config.input.caption_rewrite=bogus'],
     ['input.caption_rewrite=bogus', 'shapes_canonical']),
    ('train-modules-unimportable', 'train', [IMAGEN, "--config.input.modules=('no_such.mod',)"],
     ['input.modules', 'no_such.mod']),
    ('train-degradation-unknown', 'train', [IMAGEN, '--config.input.low_res_degradation=jpeg'],
     ['input.low_res_degradation=jpeg', 'blur', 'bsr']),
    ('train-caption_choice-unknown', 'train', [IMAGEN, '--config.input.caption_choice=last'],
     ['input.caption_choice=last', 'random', 'first']),
    ('train-crop-on-base', 'train', [IMAGEN, '--config.input.train_crop_size=8'],
     ['input.train_crop_size=8', 'super-resolution']),
    ('train-crop-odd', 'train', [IMAGEN_SR, '--config.input.train_crop_size=15'],
     ['input.train_crop_size=15', 'multiple of 2']),
    ('train-low_res-vs-model', 'train', [IMAGEN_SR, '--config.input.low_res_size=8'],
     ['input.low_res_size=8', 'model.low_res_size=16']),
    ('train-low_res-too-big', 'train',
     [IMAGEN_SR, '--config.input.low_res_size=32', '--config.model.low_res_size=32'],
     ['input.low_res_size=32', 'smaller', 'input.image_size=32']),
    ('train-percentile-fraction', 'train', [IMAGEN, '--config.sampler.percentile=0.995'],
     ['sampler.percentile=0.995', 'percent', '99.5']),
    ('train-guidance-negative', 'train', [IMAGEN, '--config.sampler.guidance_scale=-3'],
     ['sampler.guidance_scale=-3', '>= 0']),
    ('train-sampler-unknown', 'train', [IMAGEN, '--config.sampler.name=bogus'],
     ['sampler.name=bogus', 'ddpm', 'ddim', 'dpmpp_2m']),
    ('train-threshold-unknown', 'train', [IMAGEN, '--config.sampler.threshold=bogus'],
     ['sampler.threshold=bogus', 'dynamic']),
    ('train-sampler-steps-zero', 'train', [IMAGEN, '--config.sampler.num_steps=0'],
     ['sampler.num_steps=0', '>= 1']),
    ('train-sampler-steps-over-schedule', 'train', [GLIDE_UP, '--config.sampler.num_steps=2000'],
     ['sampler.num_steps=2000', '1000 timesteps']),
    ('train-parameterization-unknown', 'train', [IMAGEN, '--config.diffusion.parameterization=mu'],
     ['diffusion.parameterization=mu', 'eps', 'x0', 'v']),
    ('train-loss_weighting-unknown', 'train', [IMAGEN, '--config.diffusion.loss_weighting=snr'],
     ['diffusion.loss_weighting=snr', 'min_snr']),
    ('train-cond_drop-above-1', 'train', [IMAGEN, '--config.diffusion.cond_drop_text=1.5'],
     ['diffusion.cond_drop_text=1.5', '[0, 1]']),
    ('train-num_timesteps-negative', 'train', [IMAGEN, '--config.diffusion.num_timesteps=-1'],
     ['diffusion.num_timesteps=-1']),
    ('train-learned_variance-vs-model', 'train',
     [GLIDE, '--config.diffusion.learned_variance=False'],
     ['diffusion.learned_variance=False', 'model.learned_variance=True']),
    ('train-optimizer-unknown', 'train', [IMAGEN, '--config.optimizer.name=sgd'],
     ['optimizer.name=sgd', 'adamw', 'adafactor']),
    ('train-ema_decay-above-1', 'train', [IMAGEN, '--config.optimizer.ema_decay=2.0'],
     ['optimizer.ema_decay=2.0', '[0, 1]']),
    ('train-lr-decay-unknown', 'train', [SHAPES, '--config.optimizer.decay=linear'],
     ['optimizer.decay=linear', 'constant', 'cosine']),
    ('train-ckpt_steps-zero', 'train', [IMAGEN, '--config.ckpt_steps=0'], ['ckpt_steps=0']),
    ('train-keep_checkpoints-zero', 'train', [IMAGEN, '--config.keep_checkpoints=0'],
     ['keep_checkpoints=0']),
    ('train-max_nonfinite-zero', 'train', [IMAGEN, '--config.max_nonfinite_steps=0'],
     ['max_nonfinite_steps=0']),
    ('train-workdir-is-file', 'train', [IMAGEN, '--workdir=FILE'], ['is a file']),
    ('train-workdir-empty', 'train', [IMAGEN, '--workdir='], ['--workdir is empty']),
    ('train-seed-negative', 'train', [IMAGEN, '--config.seed=-1'], ['seed=-1', '>= 0']),
    ('train-parallelism-unknown', 'train', [IMAGEN, '--config.parallelism=pmap'],
     ['parallelism=pmap', 'gspmd', 'shard_map']),
    ('train-mesh-zero', 'train', [IMAGEN, '--config.mesh.data=0'], ['mesh.data=0', '-1']),
    ('train-mesh-two-fill', 'train', [IMAGEN, '--config.mesh.data=-1', '--config.mesh.fsdp=-1'],
     ['mesh.data, mesh.fsdp', 'at most one']),
    ('train-dtype-unknown', 'train', [IMAGEN, '--config.model.dtype=float64'],
     ['model.dtype=float64', 'bfloat16']),
    ('train-remat-unknown', 'train', [IMAGEN, '--config.model.remat_policy=bogus'],
     ['model.remat_policy=bogus', 'nothing_saveable']),
    ('train-channel_mult-zero', 'train', [IMAGEN, '--config.model.channel_mult=(1, 0)'],
     ['model.channel_mult', 'multipliers >= 1']),
    ('train-num_heads', 'train', [IMAGEN, '--config.model.num_heads=3'],
     ['model.num_heads=3', 'divide', '32']),
    ('train-text_len-vs-input', 'train', [GLIDE, '--config.model.text_len=32'],
     ['input.text_max_len=16', 'model.text_len=32']),
    ('train-t5-preset-unknown', 'train', [IMAGEN, '--config.text_encoder.preset=huge'],
     ['text_encoder.preset=huge', 'xxl']),
    ('train-encoder-path-missing', 'train', [IMAGEN, '--config.text_encoder.path=ROOT/t5'],
     ['text_encoder.path=', 'no such directory']),
    ('train-config-arg-typo', 'train', ['--config=configs/imagen.py:stage=base64,sise=tiny'],
     ["'sise'", 'size', 'stage']),
    ('train-unknown-stage', 'train', ['--config=configs/imagen.py:stage=base32,size=tiny'],
     ["'base32'", 'base64', 'sr256']),
    ('train-unknown-size', 'train', ['--config=configs/glide.py:stage=base64,size=huge'],
     ["'huge'", 'tiny', 'paper']),
    ('train-unknown-family', 'train', ['--config=configs/dalle.py:stage=base64'],
     ['configs/dalle.py']),
    ('train-unknown-field', 'train', [IMAGEN, '--config.model.no_field=2'],
     ["no field 'no_field'"]),
    ('train-bad-literal', 'train', [IMAGEN, '--config.total_steps=x'], ['total_steps=x']),
    ('train-cascade-config', 'train', [CASCADE], ['stage=cascade', 'stage config']),
    ('train-unknown-flag', 'train', [IMAGEN, '--no_such_flag=1'], ['no_such_flag']),
    ('train-clip-paper', 'train', ['--config=configs/unclip.py:stage=clip,size=paper'],
     ['stage=clip', 'text_encoder.path']),
    # sample: the cascade's settings, then the directories, before any stage is restored
    ('sample-num_steps-zero', 'sample', [CASCADE, '--config.stages.base64.num_steps=0'],
     ['stages.base64.num_steps=0', '>= 1']),
    ('sample-sampler-unknown', 'sample', [CASCADE, '--config.stages.base64.sampler=bogus'],
     ['stages.base64.sampler=bogus', 'ddim']),
    ('sample-threshold-unknown', 'sample', [CASCADE, '--config.stages.sr256.threshold=bogus'],
     ['stages.sr256.threshold=bogus', 'static', 'dynamic']),
    ('sample-percentile-fraction', 'sample', [CASCADE, '--config.stages.base64.percentile=0.995'],
     ['stages.base64.percentile=0.995', 'percent']),
    ('sample-guidance-negative', 'sample', [CASCADE, '--config.stages.base64.guidance_scale=-3'],
     ['stages.base64.guidance_scale=-3', '>= 0']),
    ('sample-aug_level-above-1', 'sample', [CASCADE, '--config.stages.sr256.aug_level=2.0'],
     ['stages.sr256.aug_level=2.0', '[0, 1]']),
    ('sample-eta-negative', 'sample', [CASCADE, '--config.stages.sr256.eta=-1.0'],
     ['stages.sr256.eta=-1.0']),
    ('sample-best_of-zero', 'sample', [CASCADE, '--config.stages.base64.best_of=0'],
     ['stages.base64.best_of=0']),
    ('sample-contrast-negative', 'sample',
     [GLIDE_CASCADE, '--config.stages.base64.contrast_scale=-1.0'],
     ['stages.base64.contrast_scale=-1.0']),
    ('sample-order-unknown', 'sample', [CASCADE, "--config.order=('base64', 'sr512')"],
     ['order', "'sr512'", 'base64, sr256']),
    ('sample-order-empty', 'sample', [CASCADE, '--config.order=()'], ['order', 'name the stages']),
    ('sample-unknown-stage-field', 'sample', [CASCADE, '--config.stages.bogus.num_steps=3'],
     ["no field 'bogus'"]),
    ('sample-stage-config', 'sample', [IMAGEN], ['stage=base64', 'cascade']),
    ('sample-out-is-file', 'sample', [CASCADE, '--out=FILE'], ['--out=', 'is a file']),
    ('sample-out-read-only', 'sample', [CASCADE, '--out=EMPTY/out'],
     ['--out=', 'not writable']),
    ('sample-workdir-is-file', 'sample', [CASCADE, '--workdir=FILE'], ['--workdir=', 'is a file']),
    ('sample-untrained', 'sample', [CASCADE], ['no checkpoint', 'python -m diffusion_jax.train']),
    ('sample-num_images-zero', 'sample', [CASCADE, '--num_images=0'], ['--num_images=0']),
    ('sample-unknown-stage-flag', 'sample', [CASCADE, '--stages=base64,sr512'],
     ["unknown stage 'sr512'"]),
    ('sample-prompts_file-missing', 'sample', [CASCADE, '--prompts_file=ROOT/p.txt'],
     ['--prompts_file=', 'no such file']),
    ('sample-mode-unknown', 'sample', [CASCADE, '--mode=paint'], ['--mode', 'paint']),
    # evaluate (FID) and the Shapes alignment: flags, then config, then directories
    ('evaluate-untrained', 'evaluate', [CASCADE, '--random_inception_seed=0'],
     ['no checkpoint', 'python -m diffusion_jax.train']),
    ('evaluate-workdir-is-file', 'evaluate', [CASCADE, '--random_inception_seed=0',
                                              '--workdir=FILE'], ['--workdir=', 'is a file']),
    ('evaluate-guidance-negative', 'evaluate', [CASCADE, '--random_inception_seed=0',
                                                '--guidance=1,-3'], ['--guidance=1,-3', '>= 0']),
    ('evaluate-guidance-not-numbers', 'evaluate', [CASCADE, '--random_inception_seed=0',
                                                   '--guidance=a'], ['--guidance=a']),
    ('evaluate-metric-unknown', 'evaluate', [CASCADE, '--metrics=is'], ['--metrics=is', 'fid']),
    ('evaluate-no-weights', 'evaluate', [CASCADE], ['--inception_weights']),
    ('evaluate-weights-missing', 'evaluate', [CASCADE, '--inception_weights=ROOT/w.safetensors'],
     ['--inception_weights=', 'no such file']),
    ('evaluate-num_samples-zero', 'evaluate', [CASCADE, '--random_inception_seed=0',
                                               '--num_samples=0'], ['--num_samples=0']),
    ('evaluate-percentile', 'evaluate', [CASCADE, '--random_inception_seed=0',
                                         '--config.stages.base64.percentile=0.995'],
     ['stages.base64.percentile=0.995']),
    ('evaluate-compare-nothing', 'evaluate', ['--compare=ROOT/*.json'], ['no result files']),
    ('evaluate-compare-bad-json', 'evaluate', ['--compare=RESULTS/*.json', '--out=OUT/c'],
     ['bad.json', 'not a readable result JSON']),
    ('sample-prompts_file-binary', 'sample', [CASCADE, '--prompts_file=BINARY'],
     ['--prompts_file=', 'UTF-8']),
    ('shapes-evaluate-samples-zero', 'shapes_evaluate', [SHAPES_CASCADE, '--samples=0'],
     ['--samples=0']),
    ('shapes-evaluate-guidance-negative', 'shapes_evaluate', [SHAPES_CASCADE, '--guidance=-3'],
     ['--guidance=-3']),
    ('shapes-evaluate-untrained', 'shapes_evaluate', [SHAPES_CASCADE], ['no checkpoint']),
    ('shapes-evaluate-num_steps-zero', 'shapes_evaluate',
     [SHAPES_CASCADE, '--config.stages.base64.num_steps=0'], ['stages.base64.num_steps=0']),
    # the Shapes demo: its flags and the configs its plan makes, before anything trains
    ('demo-base_steps-negative', 'demo', ['--base_steps=-1'], ['--base_steps=-1']),
    ('demo-sr_steps-zero', 'demo', ['--sr_steps=0'], ['--sr_steps=0']),
    ('demo-steps-zero', 'demo', ['--steps=base64:0'], ['--steps', 'base64:0']),
    ('demo-sample_steps-zero', 'demo', ['--sample_steps=0'], ['--sample_steps=0']),
    ('demo-guidance-negative', 'demo', ['--guidance_scale=-3'], ['--guidance_scale=-3']),
    ('demo-train_examples-zero', 'demo', ['--train_examples=0'], ['--train_examples=0']),
    ('demo-per_kind-negative', 'demo', ['--per_kind=-1'], ['--per_kind', '-1']),
    ('demo-family-unknown', 'demo', ['--family=dalle'], ['glide|imagen|unclip']),
    ('demo-cpu_devices-zero', 'demo', ['--cpu_devices=0'], ['--cpu_devices=0']),
    ('demo-workdir-is-file', 'demo', ['--workdir=FILE'], ['--workdir=', 'is a file']),
    ('demo-text_encoder_path-missing', 'demo', ['--text_encoder_path=ROOT/t5'],
     ['text_encoder.path=', 'no such directory']),
    ('demo-caption_rewrite-unknown', 'demo', ['--caption_rewrite=bogus'],
     ['--caption_rewrite=bogus', 'shapes_canonical']),
    ('demo-steps-stage-unknown', 'demo', ['--family=glide', '--steps=prior:5'],
     ['--steps', 'prior']),
    # aot: the overrides it applies, and the mesh and batch against its topology's devices
    ('aot-topology-generation', 'aot', [IMAGEN, '--topology=v9:2x2'], ['--topology=v9:2x2']),
    ('aot-topology-zero', 'aot', [IMAGEN, '--topology=v4:0x8x4'], ['sizes >= 1']),
    ('aot-mesh-spelling', 'aot', [IMAGEN, '--mesh=1,2'], ['--mesh', '1,2']),
    ('aot-mesh-vs-devices', 'aot', [IMAGEN, '--topology=cpu:8', '--mesh=3,1,1'],
     ['mesh', 'needs 3 devices', '8']),
    ('aot-batch-vs-devices', 'aot', [IMAGEN, '--topology=cpu:8', '--batch=12'],
     ['input.batch_size=12', 'multiple of the 8 devices', '8 or 16']),
    ('aot-set-num_heads', 'aot', [IMAGEN, '--topology=cpu:8', '--set=model.num_heads=3'],
     ['model.num_heads=3']),
    ('aot-remat-unknown', 'aot', [IMAGEN, '--topology=cpu:8', '--remat=bogus'],
     ['model.remat_policy=bogus']),
    ('aot-config-field', 'aot', [IMAGEN, '--config.total_steps=0'], ['total_steps=0']),
    # param_count, export_clip, prepare_folder, gaussian_demo
    ('param_count-nothing', 'param_count', [], ['--paper', '--config']),
    ('param_count-cascade', 'param_count', [CASCADE], ['stage=cascade', 'stage config']),
    ('param_count-model-unknown', 'param_count', [IMAGEN, '--config.model.name=vit'],
     ['model.name=vit', 'unet']),
    ('export_clip-untrained', 'export_clip', ['--workdir=ROOT/clip', '--out=OUT'],
     ['no checkpoint']),
    ('export_clip-out-is-file', 'export_clip', ['--workdir=ROOT/clip', '--out=FILE'],
     ['--out=', 'is a file']),
    ('export_clip-out-required', 'export_clip', ['--workdir=ROOT/clip'], ['--out']),
    ('prepare_folder-no-src', 'prepare_folder', [], ['--src is required']),
    ('prepare_folder-src-missing', 'prepare_folder', ['--src=ROOT/images'], ['does not exist']),
    ('prepare_folder-no-images', 'prepare_folder', ['--src=EMPTY'], ['no images']),
    ('prepare_folder-vocab-too-small', 'prepare_folder',
     ['--src=IMAGES', '--data_dir=TMP/data', '--vocab_size=2'], ['vocab_size', '4']),
    ('prepare_folder-name-bad', 'prepare_folder', ['--src=IMAGES', '--name=a b'], ['--name']),
    ('gaussian_demo-sampler-unknown', 'gaussian_demo', ['--samplers=euler'],
     ['--samplers', 'euler', 'ddim']),
    ('gaussian_demo-num_steps-zero', 'gaussian_demo', ['--num_steps=0'], ['--num_steps=0']),
    ('gaussian_demo-num_steps-over-schedule', 'gaussian_demo',
     ['--schedule=linear', '--num_steps=5000'], ['--num_steps=5000', '1000 timesteps']),
    ('gaussian_demo-schedule-unknown', 'gaussian_demo', ['--schedule=sigmoid'], ['sigmoid']),
    ('gaussian_demo-dim-zero', 'gaussian_demo', ['--dim=0'], ['--dim=0']),
]
# Arguments every case of a CLI gets (a case's own come after and win).
BASE_ARGS = {
    'train': ['--workdir=ROOT/base64'],
    'sample': ['--workdir=ROOT', '--prompt=a red circle', '--out=OUT'],
    'evaluate': ['--workdir=ROOT'],
    'shapes_evaluate': ['--workdir=ROOT'],
    'demo': ['--workdir=ROOT'],
}


@pytest.mark.parametrize('name,tool,args,words', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(name, tool, args, words, paths, no_work, capsys,
                                            monkeypatch):
  if name == 'sample-out-read-only':  # root may write anywhere: pretend EMPTY is read-only
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode: False if os.path.abspath(p) == paths[
        'EMPTY'] else real_access(p, mode))
  spelled = [_fill(a, paths) for a in BASE_ARGS.get(tool, []) + args]
  line = _cli_error(_modules()[tool], spelled, capsys)
  for word in words:
    assert _fill(word, paths) in line, f'{word!r} not in {line!r}'


def _fill(arg: str, paths: dict[str, str]) -> str:
  for key, path in paths.items():
    arg = arg.replace(f'={key}', f'={path}')
  return arg


def test_silent_wrong_runs_are_refused_in_the_python_api_with_the_cli_line(capsys, no_work):
  """total_steps < 1, a negative learning rate, a negative guidance scale: the API raises
  InputError with the message the CLI prints."""
  from configs import imagen
  from diffusion_jax import pipelines
  from diffusion_jax import sample
  for field, value, args in [('total_steps', -5, [IMAGEN, '--config.total_steps=-5']),
                             ('optimizer.lr', -1.0, [IMAGEN, '--config.optimizer.lr=-1.0'])]:
    config = imagen.get_config('stage=base64,size=tiny')
    parent, _, leaf = ('.' + field).rpartition('.')
    (config if not parent else config[parent[1:]])[leaf] = value
    with pytest.raises(errors.InputError) as raised:
      validation.check_stage_config(config)
    line = _cli_error(_modules()['train'], args + ['--workdir=/nonexistent/run'], capsys)
    assert line == f'error: {raised.value}'
  cascade = imagen.get_config('stage=cascade,size=tiny')
  cascade.stages.base64.guidance_scale = -3.0
  with pytest.raises(errors.InputError) as raised:
    pipelines.load(cascade, '/nonexistent/root')
  assert str(raised.value).startswith('--config.stages.base64.guidance_scale=-3.0: ')
  with pytest.raises(errors.InputError, match='guidance_scale=-3.0'):
    sample.run(cascade, '/nonexistent/root', ['a red circle'])
  with pytest.raises(errors.InputError, match='guidance_scale=-2'):
    pipelines.common.Settings().replace(guidance_scale=-2)


def test_shapes_evaluate_refuses_zero_samples_before_loading(no_work):
  from projects.shapes import evaluate as shapes_evaluate
  from projects.shapes.configs import imagen
  with pytest.raises(errors.InputError, match='--samples=0'):
    shapes_evaluate.evaluate(imagen.get_config('stage=cascade'), '/nonexistent', samples=0)


def test_evaluate_api_refuses_before_loading(no_work, tmp_path):
  from configs import imagen
  from diffusion_jax import evaluate
  cascade = imagen.get_config('stage=cascade,size=tiny')
  with pytest.raises(errors.InputError, match='--guidance'):
    evaluate.evaluate(cascade, str(tmp_path), guidance=[-1.0], random_inception_seed=0)
  with pytest.raises(errors.InputError, match='--metrics'):
    evaluate.evaluate(cascade, str(tmp_path), metrics=('is',))


def test_device_checks_need_the_device_count():
  from configs import imagen
  config = imagen.get_config('stage=base64,size=tiny')
  config.mesh.data = 3
  validation.check_stage_config(config)  # no device count: not checked
  with pytest.raises(errors.InputError, match=r'needs 3 devices, 8 are available'):
    validation.check_stage_config(config, num_devices=8)
  config.mesh.data, config.mesh.fsdp = -1, 3
  with pytest.raises(errors.InputError, match='do not divide the 8 devices'):
    validation.check_stage_config(config, num_devices=8)
  config.mesh.fsdp, config.input.batch_size = 1, 12
  with pytest.raises(errors.InputError, match=r'batch_size=12: must be a multiple of the 8'):
    validation.check_stage_config(config, num_devices=8)
  config.input.batch_size = 16
  validation.check_stage_config(config, num_devices=8)


def test_every_shipped_config_passes():
  import importlib
  for family in ('imagen', 'glide', 'unclip'):
    library = importlib.import_module(f'configs.{family}')
    project = importlib.import_module(f'projects.shapes.configs.{family}')
    for stage in library.STAGES:
      check = (validation.check_cascade_config if stage == 'cascade' else
               validation.check_stage_config)
      for size in ('tiny', 'paper'):
        if (stage, size) != ('clip', 'paper'):
          check(library.get_config(f'stage={stage},size={size}'))
      check(project.get_config(f'stage={stage}'))
  from configs import latent
  for stage in latent.STAGES:
    check = (validation.check_cascade_config if stage == 'cascade' else
             validation.check_stage_config)
    for size in latent.SIZES:
      check(latent.get_config(f'stage={stage},size={size}'))


def test_the_linear_schedule_works_as_documented():
  """`--config.diffusion.schedule=linear` on a continuous-time config (num_timesteps 0):
  DDPM's 1000 linear betas."""
  from configs import imagen
  from diffusion_jax.diffusion import schedules
  config = imagen.get_config('stage=base64,size=tiny')
  config.diffusion.schedule = 'linear'
  validation.check_stage_config(config)
  schedule = schedules.from_config(config.diffusion)
  assert schedule.num_timesteps == 1000
  assert schedule.betas[0] == pytest.approx(1e-4) and schedule.betas[-1] == pytest.approx(0.02)
  config.diffusion.num_timesteps = 100
  assert schedules.from_config(config.diffusion).num_timesteps == 100


def test_names_agree_with_the_modules_that_define_them():
  import ml_collections
  from diffusion_jax import encoders, models, parallel
  from diffusion_jax.data import pipeline
  from diffusion_jax.diffusion import guidance, losses, process, samplers, schedules
  from diffusion_jax.models import clip, layers, t5
  from diffusion_jax.train import step
  assert validation.SCHEDULES == schedules.SCHEDULES
  assert validation.DISCRETE_SCHEDULES == schedules.DISCRETE_SCHEDULES
  assert validation.DEFAULT_NUM_TIMESTEPS == schedules.DEFAULT_NUM_TIMESTEPS
  assert validation.SAMPLERS == samplers.SAMPLERS
  assert validation.PARAMETERIZATIONS == process.PARAMETERIZATIONS
  assert validation.LOSS_WEIGHTINGS == losses.WEIGHTINGS
  assert set(validation.MODELS) == set(models._REGISTRY)
  assert validation.ENCODER_PRESETS == {'t5': tuple(t5.PRESETS), 'clip': tuple(clip.PRESETS)}
  assert set(validation.DTYPES) == set(encoders._DTYPES)
  assert validation.DEGRADATIONS == pipeline.DEGRADATIONS
  assert set(validation.OBJECTIVES) == set(step.OBJECTIVES)
  assert validation.PARALLELISMS == step.PARALLELISMS
  assert validation.MESH_AXES == tuple(parallel.MESH_AXES)
  assert validation.BATCH_AXES == tuple(parallel.BATCH_AXES)
  for name in validation.THRESHOLDS:
    guidance.get_threshold_fn(name)
  for name in validation.REMAT_POLICIES:
    layers.maybe_remat(layers.ResBlock, name)
  for name in validation.OPTIMIZERS:
    step.make_optimizer(ml_collections.ConfigDict(
        {'name': name, 'lr': 1e-3, 'b1': 0.9, 'b2': 0.99}), 10)
  for decay in validation.LR_DECAYS:
    step.learning_rate_schedule(ml_collections.ConfigDict({'lr': 1e-3, 'decay': decay}), 10)


class _Tool:
  """A CLI whose main raises what it is told to."""
  __name__ = 'tool'
  raised: BaseException = errors.InputError('bad\ninput')

  @classmethod
  def define_flags(cls, flag_values, sys_argv=None):
    del sys_argv
    flags.DEFINE_integer('n', 1, 'a number', flag_values=flag_values)

  @classmethod
  def main(cls, argv, F):
    del argv, F
    raise cls.raised


def test_input_error_from_anywhere_is_status_2_and_ctrl_c_is_130(capsys, monkeypatch):
  with pytest.raises(SystemExit) as exit_:
    cli.call(_Tool)
  assert exit_.value.code == 2 and capsys.readouterr().err.splitlines() == ['error: bad input']
  monkeypatch.setattr(_Tool, 'raised', KeyboardInterrupt())
  with pytest.raises(SystemExit) as exit_:
    cli.call(_Tool)
  assert exit_.value.code == 130 and capsys.readouterr().err.splitlines() == ['error: interrupted']
  assert cli.CLIError is errors.InputError


def test_a_folder_dataset_without_its_prepared_tokenizer_is_an_input_error(tmp_path):
  from configs import imagen
  from diffusion_jax import conditioning
  config = imagen.get_config('stage=base64,size=tiny')
  config.input.dataset = 'folder'
  config.input.data_dir = str(tmp_path / 'not_prepared')
  with pytest.raises(errors.InputError, match="input.dataset='folder'.*is it prepared"):
    conditioning.build_tokenizer(config, None, str(tmp_path / 'stage'), keep=True)

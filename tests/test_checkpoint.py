"""Checkpoint safety: array fingerprints, the workdir lock, the keep-count guard."""
import logging
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax import checkpoint as ckpt_lib
from diffusion_jax import errors


def _tree():
  x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) / 7
  return {'w': x, 'w16': x.astype(jnp.bfloat16), 'key': jax.random.key_data(jax.random.PRNGKey(0)),
          'step': jnp.int32(3), 'flags': jnp.array([True, False])}


def test_fingerprints_are_equal_on_any_sharding_and_change_with_one_bit():
  tree = _tree()
  saved = ckpt_lib.fingerprints(tree)
  mesh = jax.make_mesh((len(jax.devices()),), ('d',))
  sharded = dict(tree, w=jax.device_put(tree['w'], NamedSharding(mesh, P('d'))))
  assert ckpt_lib.fingerprints(sharded) == saved, 'a fingerprint depends on the sharding'
  assert ckpt_lib.fingerprint_mismatches(saved, tree) == []
  for key in ('w', 'w16', 'key', 'step', 'flags'):
    bits = np.array(tree[key]).copy()
    flat = bits.reshape(-1).view(np.uint8)
    flat[flat.size // 2] ^= 0x10  # one bit of one element
    changed = dict(tree, **{key: jnp.asarray(bits)})
    assert ckpt_lib.fingerprint_mismatches(saved, changed) == [key], key
  # Two elements swapped: same values, other positions.
  swapped = np.array(tree['w']).copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  assert ckpt_lib.fingerprint_mismatches(saved, dict(tree, w=jnp.asarray(swapped))) == ['w']


def test_a_checkpoint_whose_bytes_changed_is_refused_and_moved_aside(tmp_path, caplog):
  tree = {'w': jnp.arange(4096, dtype=jnp.float32), 'step': jnp.int32(0)}
  writer = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  writer.save(1, tree, force=True)
  writer.save(2, dict(tree, w=tree['w'] + 1), force=True)
  writer.wait()
  # 64 bytes flipped in the middle of step 2's largest data file.
  files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / 'checkpoints' / '2' / 'state')
           for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.seek(os.path.getsize(largest) // 2)
    chunk = f.read(64)
    f.seek(-len(chunk), 1)
    f.write(bytes(b ^ 0xFF for b in chunk))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  caplog.set_level(logging.ERROR)
  restored, step = writer.restore_latest(abstract)
  assert any('differ from the fingerprints saved' in r.getMessage() for r in caplog.records), \
      'the flipped bytes restored without a fingerprint mismatch'
  assert step == 1 and np.array_equal(restored['w'], tree['w'])
  assert writer.all_steps() == [1], 'the corrupt step must leave the manager\'s sight'
  aside = os.listdir(tmp_path / 'checkpoints_corrupt')
  assert len(aside) == 1 and aside[0].startswith('2-unreadable-'), aside
  writer.save(2, tree, force=True)  # the run saves that step again
  writer.wait()
  assert writer.all_steps() == [1, 2]
  writer.close()


def test_keep_checkpoints_below_one_is_refused(tmp_path):
  with pytest.raises(errors.InputError, match='keep_checkpoints=0 would delete every'):
    ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=0)


_HOLDER = textwrap.dedent('''
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b'{"pid": %d}' % os.getpid())
    print('held', flush=True)
    time.sleep(600)
''')


def test_workdir_lock_refuses_a_second_run_and_frees_itself_when_the_holder_dies(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, str(tmp_path / '.lock')],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(ckpt_lib.WorkdirLockedError, match=f'pid.*{holder.pid}.*another --workdir'):
      with ckpt_lib.WorkdirLock(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with ckpt_lib.WorkdirLock(str(tmp_path)):  # a killed holder leaves nothing stuck
    with pytest.raises(ckpt_lib.WorkdirLockedError):  # and this process now holds it
      with ckpt_lib.WorkdirLock(str(tmp_path)):
        pass
  with ckpt_lib.WorkdirLock(str(tmp_path)):  # released on exit
    pass

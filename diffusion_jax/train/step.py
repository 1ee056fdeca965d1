"""The train step: conditioning, loss, gradients, optimizer, EMA and the non-finite guard.

`make_train_step(config, model, encoder)` returns a pure `train_step(state, batch, frozen)
-> (state, metrics)` that the caller jits with shardings and donation (see `jit_train_step`).
Nothing here branches on the family: what the step feeds the network is read off the
network's own example inputs (`models.example_inputs`), and the config names the objective,
the target, the conditioning dropout and the noise augmentation.

All random draws (times, noise, dropout of conditioning, augmentation levels) are made on
global arrays before the loss, so with `jax_threefry_partitionable` the step computes the
same numbers on any mesh, and the shard_map data-parallel variant sees exactly the draws of
the GSPMD step.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax import conditioning, config_util, parallel
from diffusion_jax.diffusion import contrastive, losses, reconstruction
from diffusion_jax.train import state as state_lib

OBJECTIVES: dict[str, Callable] = {
    'diffusion': losses.diffusion_loss,
    'noised_clip': contrastive.noised_clip_loss,
    'clip': contrastive.clip_loss,
    'autoencoder': reconstruction.autoencoder_loss,
}
PARALLELISMS = ('gspmd', 'shard_map')
# apply_if_finite never gives up by itself; the loop stops after config.max_nonfinite_steps.
_NEVER = 2**30


# Optimizer -----------------------------------------------------------------------------------

def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then 'constant' (default) or 'cosine' decay to `final_lr_frac`."""
  lr = float(opt_cfg.lr)
  warmup = int(config_util.get(opt_cfg, 'warmup_steps', 0))
  decay = config_util.get(opt_cfg, 'decay', 'constant')
  if decay == 'constant':
    after = optax.constant_schedule(lr)
  elif decay == 'cosine':
    after = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1),
                                        alpha=float(config_util.get(opt_cfg, 'final_lr_frac', 0.0)))
  else:
    raise ValueError(f"optimizer.decay={decay!r}: choose 'constant' or 'cosine'")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """Gradient clipping + AdamW or Adafactor, wrapped in optax.apply_if_finite.

  A step with non-finite gradients leaves the optimizer state untouched and applies a zero
  update; apply_if_finite counts such steps (consecutive and total; the train step counts
  steps whose update makes a parameter non-finite too), and the loop stops the run after
  `max_nonfinite_steps` consecutive ones.
  """
  lr = learning_rate_schedule(opt_cfg, total_steps)
  name = opt_cfg.name
  if name == 'adamw':
    inner = optax.adamw(lr, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2),
                        eps=float(config_util.get(opt_cfg, 'eps', 1e-8)),
                        weight_decay=float(config_util.get(opt_cfg, 'weight_decay', 0.0)))
  elif name == 'adafactor':
    inner = optax.adafactor(lr, weight_decay_rate=float(config_util.get(opt_cfg, 'weight_decay', 0.0)) or None)
  else:
    raise ValueError(f"optimizer.name={name!r}: choose 'adamw' or 'adafactor'")
  clip = float(config_util.get(opt_cfg, 'grad_clip', 0.0))
  chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  return optax.apply_if_finite(optax.chain(*chain, inner), max_consecutive_errors=_NEVER)


def ema_decay_at(opt_cfg, step):
  """EMA decay at `step`: 0 before `ema_start_step` (the EMA tracks the parameters), then
  min(ema_decay, (1 + n) / (10 + n)) after n updates.

  The warm-up (TensorFlow's ExponentialMovingAverage with num_updates, diffusers' EMAModel)
  keeps the random initialisation out of the average: with a fixed 0.995 the EMA still
  holds 0.995^300 = 22% of the initial weights after 300 steps, which short runs sample as
  noise. `ema_warmup: False` gives the plain EMA (constant decay from the start step).
  """
  decay = float(config_util.get(opt_cfg, 'ema_decay', 0.9999))
  start = int(config_util.get(opt_cfg, 'ema_start_step', 0))
  if not bool(config_util.get(opt_cfg, 'ema_warmup', True)):  # a plain EMA
    return jnp.where(step >= start, decay, 0.0)
  n = jnp.maximum(jnp.asarray(step, jnp.float32) - start, 0.0)
  return jnp.where(step >= start, jnp.minimum(decay, (1.0 + n) / (10.0 + n)), 0.0)


# The step -------------------------------------------------------------------------------------

def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(config, model: nn.Module, encoder=None, *, mesh=None, rules=(), codec=None):
  """Returns (train_step, tx). `train_step(state, batch, frozen) -> (state, metrics)`.

  `config.parallelism`: 'gspmd' (default; shardings from the logical rules) or 'shard_map'
  (pure data parallelism: replicated parameters, per-device loss and an explicit gradient
  pmean over the batch axes; needs `mesh`).
  `codec`: a latent stage's frozen autoencoder (`conditioning.build_codec`); its parameters
  then come in `frozen` (`conditioning.latent_frozen`).
  """
  tx = make_optimizer(config.optimizer, int(config.total_steps))
  conditioner = conditioning.Conditioner(config, encoder, codec)
  objective_name = config_util.get(config, 'objective', 'diffusion')
  if objective_name not in OBJECTIVES:
    raise ValueError(f'config.objective={objective_name!r} is not one of {sorted(OBJECTIVES)}')
  objective = OBJECTIVES[objective_name]
  parallelism = config_util.get(config, 'parallelism', 'gspmd')
  if parallelism not in PARALLELISMS:
    raise ValueError(f'config.parallelism={parallelism!r} is not one of {PARALLELISMS}')
  if parallelism == 'shard_map':
    if mesh is None:
      raise ValueError("parallelism='shard_map' needs the mesh")
    if mesh.shape['tensor'] != 1:
      raise ValueError("parallelism='shard_map' is pure data parallelism: set mesh.tensor=1")
  # the autoencoder objective reads the stage's `loss` section, the others its diffusion
  diffusion_cfg = config.loss if objective_name == 'autoencoder' else config.diffusion

  def apply_fn(params, x_t, t_B, cond, rng):
    return model.apply({'params': params}, x_t, t_B, cond, train=True, rngs={'dropout': rng})

  def loss_fn(params, loss_batch, rng):
    return objective(apply_fn, params, loss_batch, rng, diffusion_cfg)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  if parallelism == 'shard_map':
    batch_spec = P(parallel.BATCH_AXES)

    def local_grads(params, loss_batch, rng):
      # Each device: its slice of the batch, the shared key (its draws are already made
      # globally); pmean of equal-sized shards = the global mean.
      with nn.logical_axis_rules(()):
        (loss, aux), grads = grad_fn(params, loss_batch, rng)
      mean = lambda x: jax.lax.pmean(x, parallel.BATCH_AXES)
      return (mean(loss), jax.tree.map(mean, aux)), jax.tree.map(mean, grads)

    def compute_grads(params, loss_batch, rng):
      specs = jax.tree.map(lambda _: batch_spec, loss_batch)
      return jax.shard_map(local_grads, mesh=mesh, in_specs=(P(), specs, P()),
                           out_specs=((P(), P()), P()), check_vma=False)(params, loss_batch, rng)
  else:
    compute_grads = grad_fn

  def loss_and_grads(state: state_lib.TrainState, batch, frozen):
    """(loss, aux, grads, next_rng) of one batch; no update. Exposed for tests and evals."""
    rng = jax.random.wrap_key_data(state.rng)
    rng, k_cond, k_t, k_noise, k_model = jax.random.split(rng, 5)
    x0, cond = conditioner(batch, frozen, k_cond)
    loss_batch = {'x0': x0, 'cond': cond}
    if objective_name == 'diffusion':
      # Drawn here, globally, so that every parallelism sees the same numbers.
      loss_batch['t'] = conditioner.schedule.sample_t(k_t, (x0.shape[0],))
      loss_batch['noise'] = jax.random.normal(k_noise, x0.shape, jnp.float32)
    elif objective_name == 'autoencoder':  # the posterior sample's standard-normal draw
      loss_batch['noise'] = jax.random.normal(k_noise, model.latent_shape(x0.shape), jnp.float32)
    (loss, aux), grads = compute_grads(state.params, loss_batch, k_model)
    return loss, aux, grads, rng

  def train_step(state: state_lib.TrainState, batch, frozen):
    loss, aux, grads, rng = loss_and_grads(state, batch, frozen)
    # A non-finite loss poisons the gradients so that apply_if_finite skips the step.
    loss_finite = jnp.isfinite(loss)
    grads = jax.tree.map(lambda g: jnp.where(loss_finite, g, jnp.nan), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Finite gradients can still make non-finite parameters (a huge learning rate): such a
    # step is skipped and counted like a non-finite gradient, and the state is unchanged.
    finite = loss_finite & _all_finite(grads) & _all_finite(params)
    keep_new = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params = keep_new(params, state.params)
    opt_state = keep_new(opt_state, state_lib.count_skipped(state.opt_state))
    decay = ema_decay_at(config.optimizer, state.step)
    ema = jax.tree.map(lambda e, p: jnp.where(finite, decay * e + (1.0 - decay) * p, e),
                       state.ema_params, params)
    consecutive, total = state_lib.nonfinite_counts(opt_state)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'lr': learning_rate_schedule(config.optimizer, int(config.total_steps))(state.step),
               'nonfinite_consecutive': consecutive, 'nonfinite_total': total,
               **{f'aux/{k}': v for k, v in aux.items() if k != 'loss'}}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema, rng=jax.random.key_data(rng))
    return new_state, metrics

  train_step.loss_and_grads = loss_and_grads
  return train_step, tx


# State initialisation and shardings ------------------------------------------------------------

def abstract_state(config, model: nn.Module, tx, rng):
  """(init, the boxed abstract TrainState): jax.eval_shape, no memory."""
  init_params = conditioning.init_params_fn(config, model)

  def init(key):
    return state_lib.create(init_params(key), tx, key)

  return init, jax.eval_shape(init, rng)


def state_shardings(abstract_boxed_state, mesh, rules, parallelism: str = 'gspmd'):
  """Shardings of the unboxed state: params/EMA/optimizer moments from their logical names
  (replicated for the shard_map variant); scalars replicated."""
  if parallelism == 'shard_map':
    unboxed = nn.meta.unbox(abstract_boxed_state)
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), unboxed)
  return parallel.logical_shardings(abstract_boxed_state, mesh, rules)


def init_state(config, model: nn.Module, tx, mesh, rules, rng):
  """A fresh TrainState initialised directly into its shardings. Returns (state, shardings)."""
  init, abstract = abstract_state(config, model, tx, rng)
  shardings = state_shardings(abstract, mesh, rules, config_util.get(config, 'parallelism', 'gspmd'))
  return init_into(init, shardings, rng), shardings


def init_into(init, shardings, rng):
  """`init(rng)` (abstract_state's) computed directly into `shardings`: out_shardings place
  the parameters, nothing is materialised unsharded."""
  return jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(rng)


def batch_shardings(batch_example, mesh):
  return jax.tree.map(lambda x: parallel.batch_sharding(mesh, x.ndim), batch_example)


def jit_train_step(train_step, state_sharding, batch_sharding, frozen_sharding, mesh):
  """jit with explicit in/out shardings; the state is donated."""
  return jax.jit(train_step,
                 in_shardings=(state_sharding, batch_sharding, frozen_sharding),
                 out_shardings=(state_sharding, NamedSharding(mesh, P())),
                 donate_argnums=0)

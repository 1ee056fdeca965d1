"""The train state: one pytree (step, params, opt_state, ema_params, rng)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: batches consumed (bad steps included)
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array           # PRNG key data (uint32[2]); split each step, never reused


def create(params, tx: optax.GradientTransformation, rng) -> TrainState:
  """A fresh state; EMA starts as a copy of the parameters."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params),
      rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
  )


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
  """(consecutive, total) skipped non-finite steps, from optax.apply_if_finite's state."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
      s, optax.ApplyIfFiniteState)) if isinstance(s, optax.ApplyIfFiniteState)]
  if not found:
    zero = jnp.zeros((), jnp.int32)
    return zero, zero
  return found[0].notfinite_count, found[0].total_notfinite


def count_skipped(opt_state):
  """`opt_state` with one more skipped step counted (apply_if_finite's counters), as
  apply_if_finite leaves it after non-finite gradients."""
  if not isinstance(opt_state, optax.ApplyIfFiniteState):
    return opt_state
  return opt_state._replace(
      notfinite_count=opt_state.notfinite_count + 1, last_finite=jnp.bool_(False),
      total_notfinite=opt_state.total_notfinite + 1)

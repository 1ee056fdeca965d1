"""The diffusion mathematics: pure functions of arrays, no networks."""
from diffusion_jax.diffusion import guidance, losses, process, samplers, schedules

__all__ = ['guidance', 'losses', 'process', 'samplers', 'schedules']

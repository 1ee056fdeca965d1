"""diffusion_jax: Imagen, GLIDE and unCLIP text-to-image diffusion cascades in JAX/Flax."""

__version__ = '0.1.0'

"""Projects built on the `diffusion_jax` library (big_vision's `proj/` pattern).

Each project is a package here that imports the library and registers what it adds (datasets,
caption rewrites) by name through `diffusion_jax.data.registry`; the library and its
`configs/` never import a project. A config reaches a project's registrations by listing its
module in `input.modules`.
"""

"""Imagen: frozen T5 -> base 64 px -> SR 256 (-> SR 1024), per-stage classifier-free guidance
and dynamic thresholding (the stages' `threshold: dynamic`), noise-conditioning augmentation
of every SR input at the stage's `aug_level`."""
from __future__ import annotations

from diffusion_jax.pipelines import common


class ImagenPipeline(common.Cascade):
  """`generate(prompts, rng, **overrides) -> uint8 [N, H, W, 3]`."""

  def generate(self, prompts, rng, *, contrasts=None, return_stages: bool = False,
               latents=None, aug_noise=None, **overrides):
    """Samples every stage of `config.order` in turn.

    overrides: sampler settings for every stage (`num_steps=8`, `guidance_scale=3.0`) or for
    one (`sr256={'aug_level': 0.1}`). `contrasts`: for each prompt a list of (positive,
    negative) prompt pairs that push the base towards the positive at its contrast_scale
    (`guidance.prompt_contrast`; `shapes.binding_contrasts` makes the demo's). With
    `return_stages`, also returns {stage: uint8}. `latents`: {stage: x_T} for the stages
    whose initial noise the caller gives (as diffusers' pipelines take it). `aug_noise`:
    {stage: N(0, I)} for the SR stages whose noise augmentation of the low-res input the
    caller gives (`Stage.aug_noise_shape`: the output's shape for DeepFloyd IF stage II,
    which noises the upsampled image), to replay a reference run.
    """
    prompts = common.check_prompts(prompts)
    self.check_overrides(overrides)
    common.check_latents(latents, self.order)
    common.check_latents(aug_noise, self.order, 'aug_noise', 'N(0, I) noise')
    collect: dict = {}
    x = self.image_chain(self.order, prompts, rng, overrides, collect=collect,
                         contrasts=contrasts, latents=latents, aug_noise=aug_noise)
    return common.uint8_result(x, collect, return_stages)

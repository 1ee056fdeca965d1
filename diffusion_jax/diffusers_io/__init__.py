"""Released diffusers-layout pipelines in and out: their components on our networks."""

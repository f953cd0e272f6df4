"""STDiT-style text-to-video diffusion: training on clips with captions and sampling to mp4."""

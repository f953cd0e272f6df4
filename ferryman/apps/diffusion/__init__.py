"""Stable Diffusion finetuning (sd-finetune) and memory-lean text-to-image (sd-generate) on diffusers models."""

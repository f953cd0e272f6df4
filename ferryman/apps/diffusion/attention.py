"""Attention back ends for diffusers' UNet and VAE: torch SDPA, ferryman.kernels, or eager.

``FerrymanAttnProcessor`` is a diffusers attention processor whose core is
``ferryman.kernels.attention`` (flash-style Triton on a GPU, the PyTorch reference elsewhere); the
projections around it are diffusers' own, so the same weights load with any processor.
"""

from __future__ import annotations

import torch


class FerrymanAttnProcessor:
    """softmax(q k^T / sqrt(d) + mask) v through ferryman.kernels, around diffusers' projections."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        from ferryman.kernels.attention import attention

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            batch, channels, height, width = image_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # [B, HW, C]
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])  # [B, H, Q|1, K]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                             for t in (query, key, value))  # [B, H, L, D]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = attention(query, key, value, biases=attention_mask, scale=attn.scale, backend=self.backend)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # [B, L, H*D]
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)  # [B, C, H, W]
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def set_attention(pipe, name: str) -> None:
    """Give every attention layer of the UNet and VAE the ``name`` back end."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    factory = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor, "ferryman": FerrymanAttnProcessor}.get(name)
    if factory is None:
        raise ValueError(f"attention={name!r} must be sdpa, ferryman or eager")
    for model in (pipe.unet, pipe.vae):
        model.set_attn_processor(factory())

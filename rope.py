"""Rotary position embeddings (RoPE) with Position Interpolation (PI): how LongQLoRA extends the context.

RoPE rotates every pair (x_i, x_{i+d/2}) of a query/key head of size d by the angle  m * w_i, where m is the
token position and w_i the inverse frequency of the pair ("rotate half" layout, as in HF LLaMA files, so no
permutation of q/k weights is needed):

    w_i = theta^(-2i/d),  i = 0 .. d/2-1                     theta the base (rope_theta)
    y = x * cos(m w) + rotate_half(x) * sin(m w),   rotate_half([a, b]) = [-b, a],
    with the d/2 angles written twice, [m w, m w], to cover both halves of the head.

Since q_m . k_n then depends on m - n only, a model trained on L positions has never seen a distance >= L.
PI (Chen et al. 2023) divides every position by a factor s instead of extrapolating:

    m -> m / s,   i.e.  w_i -> w_i / s                       (HF's "linear" rope scaling)

so 2L tokens with s = 2 fall inside the range the model was trained on; LongQLoRA then fine-tunes briefly at
the new length (LLaMA-2: 4096 -> 8192 tokens, s = 2).

Every table is computed in float32 from real cos/sin (no complex numbers), as HF does, and only then cast.
The rules some other checkpoints ship (dynamic NTK, YaRN, LLaMA-3.1) and the choice of s at inference live in
infra/rope_scaling.py: LongQLoRA does not use them.
"""
from __future__ import annotations

import math

import torch


def pi_factor(ctx: int, trained_ctx: int) -> float:
    """The PI factor for training at ctx tokens: s = ceil(ctx / trained_ctx) (2 for 8192 on a 4096 model)."""
    return float(max(1, math.ceil(ctx / trained_ctx)))


def linear_scaling(factor: float) -> dict | None:
    """PI with `factor` as a normalised scaling dict (None for factor 1: plain RoPE)."""
    if not (math.isfinite(factor) and factor >= 1):
        raise ValueError(f"the PI factor must be a finite number >= 1 (1: no interpolation), got {factor!r}")
    return None if factor == 1 else {"factor": float(factor), "rope_type": "linear"}


def pi_inv_freq(head_dim: int, theta, factor: float = 1.0) -> torch.Tensor:
    """w_i = theta^(-2i/d) / s, float32, i = 0 .. d/2-1 (s = 1: plain RoPE). theta may be a float32 0-d tensor."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta**exponents) / factor


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape positions.shape + (head_dim,), computed in float32, scaled, then cast.
    attention_factor is 1 except for YaRN, which scales both tables."""
    angles = positions[..., None].to(torch.float32) * inv_freq.to(device=positions.device, dtype=torch.float32)
    angles = torch.cat((angles, angles), dim=-1)  # same angle for pair (i, i + d/2)
    cos = angles.cos() * attention_factor
    sin = angles.sin() * attention_factor
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] on the last dimension: the 90-degree turn of every (x_i, x_{i+d/2}) pair."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the tables cos/sin of shape (T, D) or (B, T, D) (broadcast over heads)."""
    if cos.dim() == 3:  # per-sequence positions: add the head axis
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin

"""Rotary position embeddings (RoPE) and the context-extension rules LongQLoRA builds on.

LongQLoRA stretches a LLaMA-2 model from 4096 to 8192 tokens with Position Interpolation (PI): the
"linear" rule below. The other rules are here so that checkpoints that ship them (LLaMA-3.1, YaRN or
dynamic-NTK fine-tunes) load and run with the same numbers as HF transformers 5.

RoPE rotates every pair (x_i, x_{i+d/2}) of a query/key head of size d by the angle  m * w_i, where m
is the token position and w_i, i = 0 .. d/2-1, the inverse frequency of the pair ("rotate half" layout,
as in HF LLaMA files, so no permutation of q/k weights is needed):

    y = x * cos(m w) + rotate_half(x) * sin(m w),   rotate_half([a, b]) = [-b, a],
    with the d/2 angles written twice, [m w, m w], to cover both halves of the head.

Inverse frequencies, theta the base (rope_theta), s = `factor`, L = max_position_embeddings,
L0 = original_max_position_embeddings (falls back to L when absent, as in HF):

  default   w_i = theta^(-2i/d)
  linear    w_i = theta^(-2i/d) / s                                  (PI: position m -> m / s)
  dynamic   w_i = theta'^(-2i/d),  theta' = theta * (s * n / L - (s - 1))^(d / (d - 2)),
            n = max(seq_len, L) with seq_len = largest position + 1 of the forward; equals default while n <= L.
            (theta' is computed in float32, as HF's model forward does; unlike HF, nothing is cached between calls.)
  llama3    wavelength l_i = 2 pi / w_i (default w_i), l_low = L0 / low_freq_factor, l_high = L0 / high_freq_factor:
            l_i < l_high: w_i unchanged;  l_i > l_low: w_i / s;  otherwise a blend
            (1 - a) w_i / s + a w_i  with  a = (L0 / l_i - low_freq_factor) / (high_freq_factor - low_freq_factor).
  yarn      dimension index of a pair that turns r times over L0:  D(r) = d ln(L0 / (2 pi r)) / (2 ln theta);
            low = D(beta_fast), high = D(beta_slow) (floor / ceil unless truncate is False), clipped to [0, d-1];
            ramp_i = clamp((i - low) / (high - low), 0, 1) over i = 0 .. d/2-1;
            w_i = (theta^(-2i/d) / s) * ramp_i + theta^(-2i/d) * (1 - ramp_i)   (fast pairs kept, slow pairs interpolated);
            cos and sin are multiplied by attention_factor, default mscale(s) = 0.1 ln s + 1 (1 when s <= 1), or
            mscale(s, mscale) / mscale(s, mscale_all_dim) with mscale(s, m) = 0.1 m ln s + 1 when both are given.
            beta_fast defaults to 32, beta_slow to 1; a missing factor is L / L0.

Every table is computed in float32 from real cos/sin (no complex numbers), like HF, and only then cast.

Which PI factor a run uses, one rule for train.py, eval.py, generate.py and the merge (lora.py):
  training   factor = ceil(ctx / max_position_embeddings) (2 for 8192 on a 4096 model), or --rope-factor;
             it is saved with the adapter (longqlora.json);
  inference  the factor the weights were tuned for, at EVERY evaluation length (a LongQLoRA 8k adapter keeps
             factor 2 at 1k): --rope-factor, else the adapter's recorded factor, else the checkpoint's own
             config (a merged model carries it). An adapter with no record on a base whose config has no
             scaling is an error: guessing per length would silently evaluate the wrong model.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

# Keys each scaling rule cannot do without (HF raises on these too).
_REQUIRED_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": (),  # a missing factor is derived as L / L0
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


def pi_factor(ctx: int, trained_ctx: int) -> float:
    """Position Interpolation for training at ctx tokens: positions are divided by ceil(ctx / trained_ctx)."""
    return float(max(1, math.ceil(ctx / trained_ctx)))


def linear_scaling(factor: float) -> dict | None:
    """PI with `factor` as a normalised scaling dict (None for factor 1: plain RoPE)."""
    if not (math.isfinite(factor) and factor >= 1):
        raise ValueError(f"the PI factor must be a finite number >= 1 (1: no interpolation), got {factor!r}")
    return None if factor == 1 else {"factor": float(factor), "rope_type": "linear"}


def inference_scaling(rope_factor, base_scaling, adapter=None, training: dict | None = None):
    """(scaling, where it came from) for evaluating or generating; see the module docstring.
    training: the adapter's longqlora.json record, None when it has none."""
    if rope_factor is not None:
        return linear_scaling(rope_factor), "--rope-factor"
    if adapter is not None and training is not None:
        return training["rope_scaling"], f"{Path(adapter) / 'longqlora.json'}"
    if adapter is not None and base_scaling is None:
        raise ValueError(f"{adapter}: the RoPE scaling this adapter was trained with is unknown (no longqlora.json, "
                         "and the base config has none); pass --rope-factor F, e.g. 2 for a LongQLoRA 8k adapter "
                         "on LLaMA-2, 1 for an adapter trained without Position Interpolation")
    return base_scaling, "the checkpoint's config.json"


def usable_context(scaling: dict | None, max_position_embeddings: int) -> int:
    """Tokens a model with this scaling was made for: PI and dynamic NTK stretch max_position_embeddings by
    their factor (HF keeps the original length in the config); llama3 and yarn configs state the extended one."""
    if scaling is not None and scaling["rope_type"] in ("linear", "dynamic"):
        return int(max_position_embeddings * scaling["factor"])
    return max_position_embeddings


def describe_scaling(scaling: dict | None):
    """For logs and results: 1 for plain RoPE, the factor for PI, the dict for other rules."""
    if scaling is None:
        return 1
    if scaling["rope_type"] == "linear" and set(scaling) == {"rope_type", "factor"}:
        return scaling["factor"]
    return dict(scaling)


def normalize_rope_scaling(d: dict | None) -> dict | None:
    """Bring HF `rope_scaling` or transformers-5 `rope_parameters` to one form.

    Accepts {"type": ...} (old files), {"rope_type": ...} and rope_parameters, which also carries
    rope_theta (dropped here: the caller passes theta separately). Returns None when no scaling is
    applied ("default" or empty), else a new dict with "rope_type" and the rule's parameters.
    """
    if not d:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"rope scaling must be a JSON object, got {type(d).__name__}: {d!r}")
    # HF gives "rope_type" priority over the legacy "type" key.
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported RoPE scaling type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if d.get("partial_rotary_factor") not in (None, 1.0):
        # LLaMA rotates the whole head; a partial rotation would need a different attention layout.
        raise ValueError(f"partial_rotary_factor={d['partial_rotary_factor']} is not supported for LLaMA (only 1.0)")
    if rope_type == "default":
        return None
    missing = [key for key in _REQUIRED_KEYS[rope_type] if d.get(key) is None]
    if missing:
        raise ValueError(f"RoPE scaling type {rope_type!r} needs {', '.join(missing)}; got {d!r}")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        value, low = d.get(key), 0 if key.startswith("mscale") else None   # mscale 0 means "not given"
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value)
                                  or (value < low if low is not None else value <= 0)):
            raise ValueError(f"RoPE scaling {key} must be a finite positive number, got {value!r}")
    if rope_type in ("linear", "dynamic") and d["factor"] < 1:
        raise ValueError(f"RoPE scaling factor must be >= 1 for {rope_type!r}, got {d['factor']!r}")
    scaling = {k: v for k, v in d.items() if k not in ("type", "rope_type", "rope_theta", "partial_rotary_factor")}
    scaling["rope_type"] = rope_type
    return scaling


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """w_i = theta^(-2i/d), float32, i = 0 .. d/2-1."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def dynamic_ntk_theta(theta: float, factor: float, head_dim: int, max_position_embeddings: int, seq_len: int):
    """Dynamic NTK base for a forward whose largest position is seq_len - 1 (a float32 0-d tensor).

    Computed in float32 tensor arithmetic on purpose: HF's model forward does exactly that (the
    sequence length arrives as a tensor), and the rounding of the base shows in cos/sin at long range.
    """
    n = torch.tensor(max(seq_len, max_position_embeddings), dtype=torch.float32)
    return theta * ((factor * n / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict, original_max: int) -> torch.Tensor:
    """LLaMA-3.1 rule: keep short wavelengths, divide long ones by factor, blend in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    low_freq_wavelen = original_max / low_freq_factor
    high_freq_wavelen = original_max / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    blend = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * scaled / factor + blend * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def yarn_attention_factor(factor: float, scaling: dict) -> float:
    """YaRN's cos/sin magnitude: given attention_factor, else the mscale ratio, else 0.1 ln(s) + 1."""
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]

    def mscale(s: float, m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return float(mscale(factor, m) / mscale(factor, m_all))
    return mscale(factor)


def yarn_inv_freq(head_dim: int, theta: float, factor: float, scaling: dict, original_max: int) -> torch.Tensor:
    """YaRN "NTK-by-parts": pairs turning fast keep their frequency, slow ones are interpolated by factor."""
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The (fractional) pair index whose wavelength fits `rotations` times into the trained length.
        return (head_dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp

    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # weight of the original (extrapolated) frequency
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(torch.float32) / head_dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    return interpolated * (1 - keep) + extrapolated * keep


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 of shape (head_dim // 2,), attention_factor) for the scaling rule in `scaling`.

    `seq_len` only matters for "dynamic": pass the largest position id + 1 of the current forward
    (None means max_position_embeddings, i.e. no change).
    """
    scaling = normalize_rope_scaling(scaling)
    theta = float(theta)
    rope_type = "default" if scaling is None else scaling["rope_type"]

    if rope_type == "default":
        return default_inv_freq(head_dim, theta), 1.0
    if rope_type == "linear":
        return default_inv_freq(head_dim, theta) / scaling["factor"], 1.0
    if rope_type == "dynamic":
        if seq_len is None or int(seq_len) <= max_position_embeddings:
            return default_inv_freq(head_dim, theta), 1.0  # within the trained length nothing changes
        ntk_theta = dynamic_ntk_theta(theta, scaling["factor"], head_dim, max_position_embeddings, int(seq_len))
        return default_inv_freq(head_dim, ntk_theta), 1.0

    original_max = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if rope_type == "llama3":
        return llama3_inv_freq(default_inv_freq(head_dim, theta), scaling, original_max), 1.0
    # yarn (normalize_rope_scaling has rejected every other type)
    factor = scaling.get("factor")
    if factor is None:
        factor = max_position_embeddings / original_max
    return yarn_inv_freq(head_dim, theta, factor, scaling, original_max), yarn_attention_factor(factor, scaling)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape positions.shape + (head_dim,), computed in float32, scaled, then cast."""
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

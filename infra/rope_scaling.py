"""RoPE scaling as checkpoints and the command line state it: rules other than PI, and the PI factor of a run.

LongQLoRA needs only PI (rope.py). These rules let checkpoints that ship them run with HF transformers 5's numbers;
the loader (infra/hf.py) gives rope_inv_freq to the model as ModelArgs.rope_rule (model.py may not import infra).
w_i = theta^(-2i/d), s = `factor`, L = max_position_embeddings, L0 = original_max_position_embeddings (L if absent):

  dynamic  w_i = theta'^(-2i/d), theta' = theta (s n / L - (s - 1))^(d / (d - 2)) (float32, as HF's forward),
           n = largest position + 1 of the forward: plain RoPE while n <= L. Nothing is cached between calls.
  llama3   wavelength l_i = 2 pi / w_i, lo = low_freq_factor, hi = high_freq_factor: w_i if l_i < L0 / hi,
           w_i / s if l_i > L0 / lo, else (1 - a) w_i / s + a w_i with a = (L0 / l_i - lo) / (hi - lo).
  yarn     D(r) = d ln(L0 / (2 pi r)) / (2 ln theta), the pair index turning r times over L0; low = D(beta_fast = 32),
           high = D(beta_slow = 1), floor / ceil unless truncate is False, clipped to [0, d-1]; ramp_i =
           clamp((i - low) / (high - low), 0, 1): w_i -> (w_i / s) ramp_i + w_i (1 - ramp_i), s = L / L0 if absent.
           cos and sin are multiplied by attention_factor, else mscale(s, mscale) / mscale(s, mscale_all_dim) when
           both are given, else mscale(s, 1), where mscale(s, m) = 0.1 m ln s + 1 (1 when s <= 1).

The PI factor of a run (train.py, eval.py, generate.py, the merge): training uses s = ceil(ctx / L) (rope.pi_factor)
or --rope-factor and saves it with the adapter; inference uses the factor the weights were tuned for at EVERY length
(a LongQLoRA 8k adapter keeps s = 2 at 1k): --rope-factor, else the adapter's longqlora.json, else the checkpoint's
config (a merged model carries it). An adapter without a record on a base without scaling is an error, not a guess.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from rope import linear_scaling, pi_inv_freq

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_REQUIRED_KEYS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": (),  # yarn: factor L / L0 if missing
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def normalize_rope_scaling(d: dict | None) -> dict | None:
    """HF `rope_scaling` ({"type": ...} in old files, {"rope_type": ...}) or transformers-5 `rope_parameters` (minus
    its rope_theta) checked, as None ("default" or empty) or a new dict with "rope_type" and the rule's parameters."""
    if not d:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"rope scaling must be a JSON object, got {type(d).__name__}: {d!r}")
    rope_type = d.get("rope_type", d.get("type", "default"))  # HF gives "rope_type" priority over "type"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported RoPE scaling type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if d.get("partial_rotary_factor") not in (None, 1.0):
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
    return {**scaling, "rope_type": rope_type}


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int, seq_len=None):
    """(inv_freq float32 (head_dim // 2,), attention_factor); seq_len: the forward's largest position + 1 (dynamic)."""
    scaling, theta, L = normalize_rope_scaling(scaling), float(theta), max_position_embeddings
    if scaling is None or scaling["rope_type"] == "linear":
        return pi_inv_freq(head_dim, theta, 1.0 if scaling is None else scaling["factor"]), 1.0
    factor, original = scaling.get("factor"), scaling.get("original_max_position_embeddings") or L
    if scaling["rope_type"] == "dynamic":
        if seq_len is None or int(seq_len) <= L:
            return pi_inv_freq(head_dim, theta), 1.0  # within the trained length nothing changes
        n = torch.tensor(int(seq_len), dtype=torch.float32)
        return pi_inv_freq(head_dim, theta * ((factor * n / L) - (factor - 1)) ** (head_dim / (head_dim - 2))), 1.0
    if scaling["rope_type"] == "llama3":
        low, high, inv_freq = scaling["low_freq_factor"], scaling["high_freq_factor"], pi_inv_freq(head_dim, theta)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        blend = (original / wavelen - low) / (high - low)
        is_medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(is_medium, (1 - blend) * scaled / factor + blend * scaled, scaled), 1.0
    return yarn(head_dim, theta, factor or L / original, scaling, original)


def yarn(head_dim: int, theta: float, factor: float, scaling: dict, original: int) -> tuple[torch.Tensor, float]:
    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    low, high = ((head_dim * math.log(original / (r * 2 * math.pi))) / (2 * math.log(theta))     # D(r)
                 for r in (scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1))
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # weight of the original frequency (HF's form: 1 - keep is not always ramp's bits)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(torch.float32) / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = float(mscale(m) / mscale(m_all)) if m and m_all else mscale()
    return inv_freq, scaling.get("attention_factor") or attention_factor


def inference_scaling(rope_factor, base_scaling, adapter=None, training: dict | None = None):
    """(scaling, where it came from) for evaluating or generating; training: the adapter's longqlora.json record."""
    if rope_factor is not None:
        return linear_scaling(rope_factor), "--rope-factor"
    if adapter is not None and training is not None:
        return training["rope_scaling"], f"{Path(adapter) / 'longqlora.json'}"
    if adapter is not None and base_scaling is None:
        raise ValueError(f"{adapter}: the RoPE scaling this adapter was trained with is unknown (no longqlora.json, "
                         "and the base config has none); pass --rope-factor F, e.g. 2 for a LongQLoRA 8k adapter "
                         "on LLaMA-2, 1 for an adapter trained without Position Interpolation")
    return base_scaling, "the checkpoint's config.json"


def hf_rope_scaling(scaling: dict | None) -> dict | None:
    """A normalised scaling dict as config.json gets it: linear/dynamic in the legacy {"type", "factor"} form
    that transformers 4.31 through 5.x all read, other rules with "rope_type"."""
    if scaling is None:
        return None
    params = {k: v for k, v in scaling.items() if k != "rope_type"}
    if scaling["rope_type"] in ("linear", "dynamic") and set(params) == {"factor"}:
        return {"type": scaling["rope_type"], "factor": params["factor"]}
    return {"rope_type": scaling["rope_type"], **params}


def describe_scaling(scaling: dict | None):
    """For logs and results: 1 for plain RoPE, the factor for PI, the dict for other rules."""
    if scaling is not None and scaling["rope_type"] == "linear" and set(scaling) == {"rope_type", "factor"}:
        return scaling["factor"]
    return 1 if scaling is None else dict(scaling)

"""rope.py against HF transformers 5 (the reference): inverse frequencies, attention factors, cos/sin, rotation."""
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from infra.rope_scaling import normalize_rope_scaling, rope_inv_freq
from rope import apply_rope, linear_scaling, pi_factor, pi_inv_freq, rope_cos_sin

MAX_POS = 128
HEAD_DIMS = (16, 64, 128)
THETAS = (10000.0, 500000.0)

# Each rule with a few parameter sets; "yarn" covers mscale pairs, an explicit attention factor,
# truncate=False, a missing original_max_position_embeddings (falls back to max_position_embeddings)
# and factor None (derived as max_position_embeddings / original_max_position_embeddings).
SCALINGS = [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "linear", "factor": 3},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "truncate": False, "beta_fast": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "attention_factor": 0.8, "beta_slow": 2},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "truncate": False},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 2.0},  # alone: ignored
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 100},
]


def hf_config(head_dim, theta, scaling=None, max_pos=MAX_POS):
    params = {"rope_type": "default"} if scaling is None else dict(scaling)
    params["rope_theta"] = theta
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=params)


def assert_float32_equal(ours, ref):
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_default_inv_freq_matches_hf(head_dim, theta):
    ref, ref_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config(head_dim, theta))
    for scaling in (None, {"rope_type": "default"}):
        ours, factor = rope_inv_freq(head_dim, theta, scaling, MAX_POS)
        assert_float32_equal(ours, ref)
        assert factor == ref_factor == 1.0


@pytest.mark.parametrize("factor", [1.0, 2.0, 3])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_pi_inv_freq_is_hf_default_and_linear(head_dim, factor):
    """model.py computes plain RoPE and PI with rope.pi_inv_freq directly: HF's default and linear bits."""
    scaling = linear_scaling(factor)
    config = hf_config(head_dim, 10000.0, scaling)
    ref, _ = (LlamaRotaryEmbedding.compute_default_rope_parameters(config) if scaling is None
              else ROPE_INIT_FUNCTIONS["linear"](config, "cpu"))
    assert_float32_equal(pi_inv_freq(head_dim, 10000.0, factor), ref)
    assert pi_factor(8192, 4096) == 2.0 and pi_factor(4096, 4096) == pi_factor(100, 4096) == 1.0
    assert pi_factor(8193, 4096) == 3.0


@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items())[:60])
def test_scaled_inv_freq_matches_hf_init_functions(scaling, head_dim, theta):
    ref, ref_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config(head_dim, theta, scaling), "cpu")
    ours, factor = rope_inv_freq(head_dim, theta, scaling, MAX_POS)
    assert_float32_equal(ours, ref)
    assert factor == pytest.approx(ref_factor, rel=1e-12, abs=0)
    # the scaled rule must actually differ from plain RoPE (otherwise the test proves nothing)
    assert not torch.equal(ours, rope_inv_freq(head_dim, theta, None, MAX_POS)[0])


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_correction_range_clipped_like_hf(truncate):
    """A small theta and a long trained context push the slow end of the ramp past d/2 (HF clips at d - 1)."""
    scaling = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024, "truncate": truncate}
    config = hf_config(32, 100.0, scaling, max_pos=2048)
    ref, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours, factor = rope_inv_freq(32, 100.0, scaling, 2048)
    assert_float32_equal(ours, ref)
    assert factor == ref_factor


def test_test_configs_reach_every_llama3_band_and_yarn_factor():
    """The llama3 parameters above hit all three wavelength bands; yarn's attention factor is not 1."""
    inv_freq, _ = rope_inv_freq(64, 10000.0, None, MAX_POS)
    wavelen = 2 * math.pi / inv_freq
    assert (wavelen < 64 / 4).any() and (wavelen > 64 / 1).any() and ((wavelen >= 16) & (wavelen <= 64)).any()
    _, factor = rope_inv_freq(64, 10000.0, SCALINGS[2], MAX_POS)
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1.0, rel=1e-15)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("factor", [2.0, 3.0])
@pytest.mark.parametrize("seq_len", [40, MAX_POS, MAX_POS + 1, 300, 1000])
def test_dynamic_ntk_matches_hf_forward(seq_len, factor, head_dim):
    """HF recomputes dynamic NTK inside the model forward from max(position_ids) + 1; so do we via seq_len."""
    scaling = {"rope_type": "dynamic", "factor": factor}
    rotary = LlamaRotaryEmbedding(hf_config(head_dim, 10000.0, scaling))
    positions = torch.arange(seq_len)[None]
    ref_cos, ref_sin = rotary(torch.zeros(1), positions)

    ours, attention_factor = rope_inv_freq(head_dim, 10000.0, scaling, MAX_POS, seq_len=seq_len)
    assert_float32_equal(ours, rotary.inv_freq)
    assert attention_factor == rotary.attention_scaling == 1.0
    cos, sin = rope_cos_sin(ours, positions, attention_factor)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)

    default, _ = rope_inv_freq(head_dim, 10000.0, None, MAX_POS)
    assert torch.equal(ours, default) == (seq_len <= MAX_POS)


def test_dynamic_ntk_without_seq_len_is_plain_rope():
    default, _ = rope_inv_freq(64, 10000.0, None, MAX_POS)
    ours, _ = rope_inv_freq(64, 10000.0, {"rope_type": "dynamic", "factor": 4.0}, MAX_POS)
    assert torch.equal(ours, default)


@pytest.mark.parametrize("scaling", [None, SCALINGS[0], SCALINGS[5], SCALINGS[8]], ids=["default", "linear", "yarn", "llama3"])
@pytest.mark.parametrize("batched_positions", [False, True])
def test_cos_sin_and_apply_rope_match_hf(scaling, batched_positions):
    torch.manual_seed(0)
    head_dim, batch, heads, length = 64, 2, 3, 20
    rotary = LlamaRotaryEmbedding(hf_config(head_dim, 10000.0, scaling))
    if batched_positions:  # e.g. left-padded batches: every row has its own positions
        positions = torch.stack([torch.arange(length) + 7, torch.arange(length) * 3])
    else:
        positions = torch.arange(length) + 100
    q = torch.randn(batch, heads, length, head_dim)
    k = torch.randn(batch, 1, length, head_dim)
    hf_positions = positions if batched_positions else positions[None].expand(batch, length)
    ref_cos, ref_sin = rotary(q, hf_positions)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, ref_cos, ref_sin)

    inv_freq, attention_factor = rope_inv_freq(head_dim, 10000.0, scaling, MAX_POS)
    cos, sin = rope_cos_sin(inv_freq, positions, attention_factor)
    assert cos.shape == positions.shape + (head_dim,)
    torch.testing.assert_close(cos.expand_as(ref_cos), ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin.expand_as(ref_sin), ref_sin, rtol=0, atol=0)
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q, rtol=0, atol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k, rtol=0, atol=0)


def test_cos_sin_are_computed_in_float32_then_cast():
    inv_freq, _ = rope_inv_freq(64, 10000.0, None, MAX_POS)
    positions = torch.arange(3000)
    cos32, sin32 = rope_cos_sin(inv_freq, positions)
    cos16, sin16 = rope_cos_sin(inv_freq, positions, dtype=torch.bfloat16)
    assert cos16.dtype == sin16.dtype == torch.bfloat16
    assert torch.equal(cos16, cos32.to(torch.bfloat16)) and torch.equal(sin16, sin32.to(torch.bfloat16))
    x = torch.randn(1, 2, 3000, 64, dtype=torch.bfloat16)
    assert apply_rope(x, cos32, sin32).dtype == torch.bfloat16


def test_rotation_preserves_norm_and_relative_angle():
    """RoPE is a rotation: norms are kept and q.k depends only on the position difference."""
    torch.manual_seed(0)
    inv_freq, _ = rope_inv_freq(32, 10000.0, None, MAX_POS)
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def rotated(x, position):
        cos, sin = rope_cos_sin(inv_freq, torch.tensor([position]), dtype=torch.float64)
        return apply_rope(x, cos, sin)

    torch.testing.assert_close(rotated(q, 37).norm(), q.norm(), rtol=1e-6, atol=0)
    dot_a = (rotated(q, 50) * rotated(k, 45)).sum()
    dot_b = (rotated(q, 105) * rotated(k, 100)).sum()
    torch.testing.assert_close(dot_a, dot_b, rtol=1e-5, atol=1e-5)


def test_linear_scaling_is_position_interpolation():
    """PI: linear scaling by s at position m equals plain RoPE at position m / s."""
    torch.manual_seed(0)
    default, _ = rope_inv_freq(64, 10000.0, None, MAX_POS)
    x = torch.randn(1, 2, 256, 64)
    for factor in (2.0, 4.0):  # powers of two: m * (w / s) and (m / s) * w round identically
        linear, _ = rope_inv_freq(64, 10000.0, {"type": "linear", "factor": factor}, MAX_POS)
        positions = torch.arange(256) * int(factor)
        scaled = apply_rope(x, *rope_cos_sin(linear, positions))
        interpolated = apply_rope(x, *rope_cos_sin(default, positions // int(factor)))
        assert torch.equal(scaled, interpolated)
    linear, _ = rope_inv_freq(64, 10000.0, {"type": "linear", "factor": 3.0}, MAX_POS)
    positions = torch.arange(256)
    cos, sin = rope_cos_sin(linear, positions)
    cos_pi, sin_pi = rope_cos_sin(default, positions.double() / 3.0)  # fractional positions
    torch.testing.assert_close(cos, cos_pi, rtol=0, atol=2e-5)
    torch.testing.assert_close(sin, sin_pi, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "given, expected",
    [
        (None, None),
        ({}, None),
        ({"type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0}),
        ({"rope_type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0}),
        # transformers 5 `rope_parameters`: rope_theta inside, "default" means no scaling
        ({"rope_theta": 10000.0, "rope_type": "default"}, None),
        ({"rope_theta": 10000.0, "type": "default"}, None),
        ({"rope_theta": 5e5, "rope_type": "dynamic", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}),
        # "rope_type" wins over the legacy "type", as in HF
        ({"type": "dynamic", "rope_type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0}),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 5e5},
         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}),
    ],
)
def test_normalize_rope_scaling(given, expected):
    original = None if given is None else dict(given)
    assert normalize_rope_scaling(given) == expected
    assert given == original  # the caller's dict is not modified
    assert normalize_rope_scaling(expected) == expected  # idempotent


@pytest.mark.parametrize("legacy", [{"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 4.0}])
def test_normalize_agrees_with_hf_standardization(legacy):
    hf = LlamaConfig(rope_scaling=dict(legacy), rope_theta=10000.0).rope_parameters
    hf = {k: v for k, v in hf.items() if k not in ("rope_theta", "type")}
    assert normalize_rope_scaling(legacy) == hf


@pytest.mark.parametrize("bad", [{"type": "longrope", "factor": 2.0}, {"rope_type": "ntk-by-parts", "factor": 2.0}])
def test_unknown_rope_type_is_a_clear_error(bad):
    name = bad.get("rope_type", bad.get("type"))
    with pytest.raises(ValueError, match=f"unsupported RoPE scaling type '{name}'.*supported: default, linear, dynamic, yarn, llama3"):
        normalize_rope_scaling(bad)
    with pytest.raises(ValueError, match="unsupported RoPE scaling type"):
        rope_inv_freq(64, 10000.0, bad, MAX_POS)


def test_missing_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="'linear' needs factor"):
        normalize_rope_scaling({"type": "linear"})
    with pytest.raises(ValueError, match="'llama3' needs low_freq_factor, high_freq_factor"):
        normalize_rope_scaling({"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5 is not supported"):
        normalize_rope_scaling({"rope_type": "default", "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="must be a JSON object"):
        normalize_rope_scaling("linear")

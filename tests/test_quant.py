"""quant.py: NF4 bytes and values identical to bitsandbytes, state conversion, Linear4bit autograd contract;
infra/bnb.py's reader of bitsandbytes' serialised NF4 state."""
import dataclasses
import glob
import json
import sys

import pytest
import torch

from conftest import ROOT
from infra import hf
import quant
from infra import bnb as bnb_format

sys.path.insert(0, str(ROOT / "bench"))
from benchlib import state_to_bnb  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = [
    (1,), (2,), (3,), (63,), (64,), (65,), (127,),  # single / partial blocks, odd counts
    (7, 9), (33, 64), (128, 130), (17, 31, 5),      # 2-D, 3-D, row ends off the block grid
    (300, 64),                                      # > 256 blocks: two nested blocks
    (64 * 257 + 5,),                                # > 256 blocks and a partial block
]


@pytest.fixture(autouse=True, scope="module")
def no_torch_compile():
    # bitsandbytes' odd-shape dequantize fallback is wrapped in torch.compile; compiling it per shape
    # takes seconds and changes nothing numerically.
    with torch._dynamo.config.patch(disable=True):
        yield


def weight(shape, dtype, seed=0):
    """Gaussian weight with a zero block and, for fp32, a block of subnormal magnitude (absmax < 1e-38)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float32)
    flat = w.view(-1)
    if flat.numel() >= 192:
        flat[64:128] = 0.0
        if dtype == torch.float32:
            flat[128:192] *= 1e-39
    return w.to(dtype)


def bnb_quantize(w, double_quant=True):
    return BF.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)


def assert_same_state(state, qs):
    assert torch.equal(state.absmax, qs.absmax)
    assert torch.equal(state.code, qs.code)
    assert state.dtype == qs.dtype and tuple(state.shape) == tuple(qs.shape) and state.blocksize == qs.blocksize
    if qs.nested:
        assert state.offset == qs.offset.item()
        assert torch.equal(state.nested_absmax, qs.state2.absmax)
        assert torch.equal(state.nested_code, qs.state2.code)
        assert state.nested_blocksize == qs.state2.blocksize == 256
    else:
        assert not state.double_quant


def state_from_bnb(qs) -> quant.NF4State:
    """Our NF4State holding the tensors of a bitsandbytes QuantState."""
    state = quant.NF4State(shape=tuple(qs.shape), dtype=qs.dtype, blocksize=qs.blocksize, absmax=qs.absmax,
                           code=qs.code)
    if qs.nested:
        state = dataclasses.replace(state, offset=float(qs.offset), nested_absmax=qs.state2.absmax,
                                    nested_blocksize=qs.state2.blocksize, nested_code=qs.state2.code)
    return state


def bnb_dequantize(packed, qs):
    """bitsandbytes' dequantized values, flattened (its shape conventions for 1-D / one-row input differ).

    bitsandbytes 0.50's CPU C kernel takes block scales per row (absmax[row * (n // blocksize) + col //
    blocksize]) and so is wrong when the last dim is even but not a multiple of the blocksize; there we
    compare with bitsandbytes' own pure-torch kernel, which uses flat blocks like quantize_4bit and CUDA.
    """
    last = qs.shape[-1]
    if len(qs.shape) == 1 or last % 2 or last % qs.blocksize == 0:
        return BF.dequantize_4bit(packed, qs).reshape(-1)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    return _dequantize_4bit_compute(packed.view(-1), absmax, qs.code, qs.blocksize, qs.shape, qs.dtype).reshape(-1)


# ------------------------------------------------------------------------------- code books

def test_code_books_match_bitsandbytes():
    assert torch.equal(quant.NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(quant.dynamic_code_8bit(), BF.create_dynamic_map(signed=True))
    assert quant.NF4_CODE[quant.NF4_ZERO_INDEX] == 0.0


# ------------------------------------------------------------------- quantize: bytes and values

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_matches_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    packed, state = quant.quantize_nf4(w)
    ref_packed, ref_state = bnb_quantize(w)
    assert packed.shape == ref_packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(packed, ref_packed)
    assert_same_state(state, ref_state)
    out = quant.dequantize_nf4(packed, state)
    assert out.shape == w.shape and out.dtype == dtype
    assert torch.equal(out.reshape(-1), bnb_dequantize(ref_packed, ref_state))


def test_small_chunks_give_the_same_bytes(monkeypatch):
    """Chunk boundaries (every 3 blocks here) must not show in the result."""
    w = weight((37, 101), torch.bfloat16, seed=3)  # odd numel, rows off the block grid
    packed, state = quant.quantize_nf4(w)
    dense = quant.dequantize_nf4(packed, state, torch.float32)
    monkeypatch.setattr(quant, "CHUNK_BLOCKS", 3)
    packed3, state3 = quant.quantize_nf4(w)
    assert torch.equal(packed3, packed) and torch.equal(state3.absmax, state.absmax)
    assert torch.equal(quant.dequantize_nf4(packed3, state3, torch.float32), dense)


@pytest.mark.parametrize("blocksize", [64, 4096])          # 4096: work buffers too large to keep
@pytest.mark.parametrize("chunk_blocks", [3, quant.CHUNK_BLOCKS])
def test_fast_decode_gives_the_bits_of_the_plain_rule(monkeypatch, blocksize, chunk_blocks):
    """The one-gather decoder (and its reused work buffers) against code[index] * absmax written out."""
    monkeypatch.setattr(quant, "CHUNK_BLOCKS", chunk_blocks)
    for shape, dtype in (((37, 101), torch.bfloat16), ((300, 64), torch.float16), ((64 * 257 + 5,), torch.float32)):
        packed, state = quant.quantize_nf4(weight(shape, dtype), blocksize=blocksize)
        fast = [quant.dequantize_nf4(packed, state, d) for d in DTYPES]
        monkeypatch.setattr(quant, "FAST_DECODE", False)
        assert all(torch.equal(quant.dequantize_nf4(packed, state, d), f) for d, f in zip(DTYPES, fast))
        monkeypatch.setattr(quant, "FAST_DECODE", True)


def test_without_double_quant_matches_bitsandbytes():
    w = weight((96, 80), torch.float16, seed=1)
    packed, state = quant.quantize_nf4(w, double_quant=False)
    ref_packed, ref_state = bnb_quantize(w, double_quant=False)
    assert torch.equal(packed, ref_packed)
    assert_same_state(state, ref_state)
    assert state.absmax.dtype == torch.float32
    assert torch.equal(quant.dequantize_nf4(packed, state).reshape(-1), bnb_dequantize(ref_packed, ref_state))


def test_values_on_midpoints_take_the_lower_code():
    code = quant.NF4_CODE
    mids = (code[:-1] + code[1:]) / 2
    for scale in (1.0, 2.0, 0.25):  # powers of two: x / absmax is exact
        block = torch.zeros(64)
        block[0] = scale  # absmax
        block[1:16] = mids * scale
        block[16:31] = torch.nextafter(mids, torch.tensor(2.0)) * scale  # just above: upper code
        block[31] = -scale
        packed, state = quant.quantize_nf4(block, double_quant=False)
        ref_packed, _ = bnb_quantize(block, double_quant=False)
        assert torch.equal(packed, ref_packed)
        idx = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)
        assert idx[0] == 15 and idx[31] == 0 and idx[63] == quant.NF4_ZERO_INDEX
        assert idx[1:16].tolist() == list(range(15))
        assert idx[16:31].tolist() == list(range(1, 16))


def test_zero_blocks():
    w = torch.zeros(3 * 64 + 10)  # three full zero blocks and a partial zero block
    w[64:128] = torch.linspace(-1, 1, 64)
    packed, state = quant.quantize_nf4(w, double_quant=False)
    ref_packed, ref_state = bnb_quantize(w, double_quant=False)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
    assert state.absmax[0] == 0 and state.absmax[-1] == torch.tensor(1e-38)  # bnb clamps the partial block only
    assert torch.equal(quant.dequantize_nf4(packed, state)[:64], torch.zeros(64))
    assert (packed.view(-1)[:32] == 0x77).all()  # index 7 (0.0) in both nibbles
    all_zero = torch.zeros(5, 64)
    packed, state = quant.quantize_nf4(all_zero)
    ref_packed, ref_state = bnb_quantize(all_zero)
    assert torch.equal(packed, ref_packed)
    assert_same_state(state, ref_state)
    assert torch.equal(quant.dequantize_nf4(packed, state), all_zero)


def test_odd_count_pads_the_last_low_nibble_with_zero_code():
    w = torch.linspace(-1, 1, 65)
    packed, _ = quant.quantize_nf4(w)
    assert packed.shape == (33, 1) and int(packed[-1, 0]) & 15 == quant.NF4_ZERO_INDEX


def test_dynamic_8bit_quantizer_matches_bitsandbytes():
    """The 8-bit rule of the double quantization on many values (partial block and a zero block included)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256 * 3000 + 77, generator=g) * torch.rand(256 * 3000 + 77, generator=g) ** 4
    x[256:512] = 0.0
    code = quant.dynamic_code_8bit()
    q, absmax = quant.quantize_dynamic_8bit(x, code, 256)
    ref_q, ref_state = BF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(absmax, ref_state.absmax)
    assert torch.equal(q, ref_q)
    # The 65536-point grid matters: plain nearest-code search would disagree with bitsandbytes somewhere.
    scaled = x / absmax.repeat_interleave(256)[: x.numel()].clamp(min=1e-30)
    nearest = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    nearest[256:512] = 0
    assert (nearest != ref_q).any()


def test_large_weight_matches_bitsandbytes():
    w = weight((512, 4096), torch.bfloat16, seed=7)  # 32768 blocks, 128 second-level blocks
    packed, state = quant.quantize_nf4(w)
    ref_packed, ref_state = bnb_quantize(w)
    assert torch.equal(packed, ref_packed)
    assert_same_state(state, ref_state)
    assert torch.equal(quant.dequantize_nf4(packed, state).view(-1), bnb_dequantize(ref_packed, ref_state))


def test_storage_is_4_127_bits_per_parameter():
    w_numel = 4096 * 4096
    packed, state = quant.quantize_nf4(torch.randn(4096, 4096, dtype=torch.bfloat16))
    assert packed.dtype == state.absmax.dtype == torch.uint8 and state.nested_absmax.dtype == torch.float32
    assert packed.numel() == 4096 * 4096 // 2 and state.absmax.numel() == 4096 * 4096 // 64
    assert state.nested_absmax.numel() == 4096 * 4096 // (64 * 256)
    bits = (packed.numel() * 8 + state.absmax.numel() * 8 + state.nested_absmax.numel() * 32 + 32) / w_numel
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 4096**2, abs=1e-12)
    assert round(bits, 3) == 4.127


# --------------------------------------------------------------------- bitsandbytes interop

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_through_bnb_quant_state(dtype):
    w = weight((70, 130), dtype, seed=2)
    packed, state = quant.quantize_nf4(w)
    # ours -> bnb dequantize
    assert torch.equal(bnb_dequantize(packed, state_to_bnb(state)), quant.dequantize_nf4(packed, state).view(-1))
    # bnb quantize -> ours
    ref_packed, ref_state = bnb_quantize(w)
    back = state_from_bnb(ref_state)
    assert_same_state(back, ref_state)
    assert torch.equal(quant.dequantize_nf4(ref_packed, back).view(-1), bnb_dequantize(ref_packed, ref_state))
    assert state_to_bnb(back) == ref_state  # QuantState.__eq__


def test_reads_bnb_serialized_state():
    """bitsandbytes' QuantState.as_dict(packed=True), as *-bnb-4bit checkpoints store it, reads back exactly."""
    w = weight((96, 200), torch.bfloat16, seed=4)
    packed, state = quant.quantize_nf4(w)
    prefix = "model.layers.0.mlp.up_proj."
    ref = {prefix + "weight." + k: v for k, v in bnb_quantize(w)[1].as_dict(packed=True).items()}
    meta = json.loads(bytes(ref[prefix + "weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["shape"] == [96, 200] and meta["dtype"] == "bfloat16" and meta["nested_blocksize"] == 256
    back = bnb_format.nf4_state_from_tensors({prefix + "weight": packed, **ref}, prefix)
    assert torch.equal(quant.dequantize_nf4(packed, back), quant.dequantize_nf4(packed, state))
    assert_same_state(back, bnb_quantize(w)[1])


def test_reads_bnb_serialized_state_without_double_quant():
    w = weight((8, 64), torch.float32)
    packed, state = quant.quantize_nf4(w, double_quant=False)
    tensors = {"weight." + k: v for k, v in bnb_quantize(w, double_quant=False)[1].as_dict(packed=True).items()}
    assert set(tensors) == {"weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    back = bnb_format.nf4_state_from_tensors({"weight": packed, **tensors})
    assert not back.double_quant
    assert torch.equal(quant.dequantize_nf4(packed, back), quant.dequantize_nf4(packed, state))


def test_reads_a_transformers_bnb_4bit_checkpoint(tmp_path):
    """A `*-bnb-4bit` directory written by transformers + bitsandbytes: every linear reads back bit-exactly."""
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from conftest import make_hf_checkpoint

    src = make_hf_checkpoint(tmp_path / "fp32", max_shard_size="10MB")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    LlamaForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu",
                                     dtype=torch.float32).save_pretrained(tmp_path / "bnb-4bit")
    dense, quantized = {}, {}
    for f in glob.glob(str(src / "*.safetensors")):
        dense.update(load_file(f))
    for f in glob.glob(str(tmp_path / "bnb-4bit" / "*.safetensors")):
        quantized.update(load_file(f))
    prefixes = [k[: -len("weight.quant_state.bitsandbytes__nf4")] for k in quantized if k.endswith("bitsandbytes__nf4")]
    assert len(prefixes) == 2 * 7
    for prefix in prefixes:
        state = bnb_format.nf4_state_from_tensors(quantized, prefix)
        packed, ours = quant.quantize_nf4(dense[prefix + "weight"])
        assert torch.equal(quantized[prefix + "weight"], packed), prefix
        assert torch.equal(quant.dequantize_nf4(packed, state), quant.dequantize_nf4(packed, ours))
        layer = quant.Linear4bit(quantized[prefix + "weight"], state, compute_dtype=torch.float32)
        assert torch.equal(layer.dequantize(), quant.dequantize_nf4(packed, ours))
    # and the whole directory loads as our model, in NF4 or dequantized, with the logits of the source
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        ref = hf.load_model(src, dtype=torch.float32, quantize="nf4")(ids)
        for kept in ("nf4", None):
            assert torch.equal(hf.load_model(tmp_path / "bnb-4bit", dtype=torch.float32, quantize=kept)(ids), ref)


# ------------------------------------------------------------------------------ bad input

def test_wrong_shapes_give_clear_errors():
    packed, state = quant.quantize_nf4(weight((64, 128), torch.float32))
    with pytest.raises(ValueError, match=r"weight\.absmax has 127 values but shape \(64, 128\).*needs 128"):
        quant.Linear4bit(packed, dataclasses.replace(state, absmax=state.absmax[:-1]))
    with pytest.raises(ValueError, match=r"weight holds 4096 packed bytes but shape \(64, 130\).*needs 4160"):
        quant.check_state(packed, dataclasses.replace(state, shape=(64, 130)))
    with pytest.raises(ValueError, match=r"weight\.nested_absmax has 2 values"):
        quant.check_state(packed, dataclasses.replace(state, nested_absmax=torch.ones(2)))
    tensors = {"q_proj.weight." + k: v
               for k, v in bnb_quantize(weight((64, 128), torch.float32))[1].as_dict(packed=True).items()}
    tensors["q_proj.weight"] = packed
    meta = json.loads(bytes(tensors["q_proj.weight.quant_state.bitsandbytes__nf4"].tolist()))
    meta["shape"] = [32, 128]
    blob = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    tensors["q_proj.weight.quant_state.bitsandbytes__nf4"] = blob
    with pytest.raises(ValueError, match=r"q_proj\.weight holds 4096 packed bytes but shape \(32, 128\)"):
        bnb_format.nf4_state_from_tensors(tensors, "q_proj.")
    tensors.pop("q_proj.weight.nested_absmax")
    with pytest.raises(ValueError, match=r"missing q_proj\.weight\.nested_absmax"):
        bnb_format.nf4_state_from_tensors(tensors, "q_proj.")
    with pytest.raises(ValueError, match="2-D"):
        quant.Linear4bit(*quant.quantize_nf4(torch.randn(64)))
    with pytest.raises(ValueError, match="quant backend must be one of"):
        quant.Linear4bit.from_weight(torch.randn(8, 64), backend="cuda")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quant.quantize_nf4(torch.ones(64, dtype=torch.float64))


# ------------------------------------------------------------------------------- Linear4bit

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear4bit_matches_dense_linear_on_dequantized_weight(dtype):
    torch.manual_seed(0)
    w, b = torch.randn(96, 160), torch.randn(96)
    layer = quant.Linear4bit.from_weight(w, bias=b, compute_dtype=dtype)
    dense = torch.nn.Linear(160, 96, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantize())
        dense.bias.copy_(b.to(dtype))
    dense.requires_grad_(False)
    x = torch.randn(2, 5, 160, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), dense(x2)
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    assert torch.equal(y, y_ref)  # same dense weight, same F.linear
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x2.grad)
    assert list(layer.parameters()) == []
    assert not layer.weight.requires_grad and layer.weight.grad is None


def test_linear4bit_output_has_input_dtype():
    layer = quant.Linear4bit.from_weight(torch.randn(16, 64), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, torch.nn.functional.linear(x.bfloat16(), layer.dequantize()).float())


def test_linear4bit_saves_no_dense_weight_for_backward():
    out_f, in_f = 48, 192
    layer = quant.Linear4bit.from_weight(torch.randn(out_f, in_f), compute_dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(7, in_f, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert (torch.uint8, out_f * in_f // 2) in saved  # the packed weight
    assert not [s for s in saved if s[0].is_floating_point and s[1] >= out_f * in_f]
    assert x.grad is not None and layer.weight.grad is None


def test_to_dtype_leaves_quant_state_alone():
    layer = quant.Linear4bit.from_weight(torch.randn(16, 64), bias=torch.randn(16), compute_dtype=torch.float32)
    x = torch.randn(2, 64)
    y = layer(x)
    layer.half()
    assert layer.nested_absmax.dtype == layer.quant_map.dtype == layer.nested_quant_map.dtype == torch.float32
    assert layer.weight.dtype == layer.absmax.dtype == torch.uint8 and layer.bias.dtype == torch.float16
    assert layer.compute_dtype == torch.float32
    torch.testing.assert_close(layer(x), y, rtol=1e-3, atol=1e-3)  # only the bias got rounded


def test_backends():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    auto = quant.Linear4bit.from_weight(w, compute_dtype=torch.bfloat16)
    assert auto.backend == "auto" and auto.active_backend() == "torch" and "auto->torch" in repr(auto)
    with_bnb = quant.Linear4bit.from_weight(w, compute_dtype=torch.bfloat16, backend="bnb")
    assert with_bnb.active_backend() == "bnb" and "backend=bnb" in repr(with_bnb)
    assert torch.equal(with_bnb.dequantize(), auto.dequantize())
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = auto(x), with_bnb(x2)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(x.grad, x2.grad)


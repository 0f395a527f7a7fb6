"""bitsandbytes' serialised NF4 state -> quant.NF4State: what a `*-bnb-4bit` checkpoint stores beside each
quantized weight (QuantState.as_dict(packed=True)). The bytes themselves need no conversion: quant.py makes
bitsandbytes' exact layout (bench/benchlib.py's state_to_bnb hands a state to bitsandbytes for the parity tests)."""
import json
import math

import torch

from quant import BLOCKSIZES, NF4State, check_state

_NF4_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def nf4_state_from_tensors(tensors: dict, prefix: str = "") -> NF4State:
    """The NF4State serialised beside `<prefix>weight`: `weight.absmax`, `weight.quant_map`,
    `weight.nested_absmax`, `weight.nested_quant_map`, and the other fields as JSON bytes in a uint8 tensor
    `weight.quant_state.bitsandbytes__nf4`. Everything is checked: one ValueError naming the tensor."""
    name = prefix + "weight"
    meta_key = name + ".quant_state.bitsandbytes__nf4"
    if meta_key not in tensors:
        other = [k for k in tensors if k.startswith(name + ".quant_state.")]
        raise ValueError(f"{other[0]}: only nf4 is supported" if other else f"missing {meta_key}")
    try:
        meta = json.loads(bytes(tensors[meta_key].to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_key} does not hold quantization JSON: {e}") from None

    def need(suffix):
        if name + suffix not in tensors:
            raise ValueError(f"missing {name + suffix}")
        return tensors[name + suffix]

    shape = meta.get("shape") if isinstance(meta, dict) else None
    if (not isinstance(meta, dict) or meta.get("quant_type") != "nf4" or meta.get("dtype") not in _NF4_DTYPES
            or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"{meta_key}: expected nf4 with a float dtype and a shape, got {meta}")
    state = NF4State(shape=tuple(shape), dtype=_NF4_DTYPES[meta["dtype"]], blocksize=meta.get("blocksize"),
                     absmax=need(".absmax"), code=need(".quant_map"))
    if "nested_offset" in meta:
        state.offset = float(meta["nested_offset"])
        state.nested_absmax, state.nested_code = need(".nested_absmax"), need(".nested_quant_map")
        state.nested_blocksize = meta.get("nested_blocksize")
    # What quant.check_state leaves to a reader: the block sizes and tensor types bitsandbytes writes.
    packed = tensors.get(name)
    if state.blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}: blocksize {state.blocksize} is not one of {BLOCKSIZES}")
    if packed is not None and packed.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8 packed NF4, got {packed.dtype}")
    if state.code.numel() != 16:
        raise ValueError(f"{name}.quant_map has {state.code.numel()} values, NF4 needs 16")
    # The fp32 statistics: a NaN or inf in one would spread to every weight of its block (or of 256 blocks).
    stats = {".nested_absmax": state.nested_absmax, ".nested_quant_map": state.nested_code} if state.double_quant \
        else {".absmax": state.absmax}
    for suffix, t in {".quant_map": state.code, **stats}.items():
        if not t.is_floating_point():
            raise ValueError(f"{name}{suffix} must be floating point, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}{suffix} holds NaN or inf values")
    if state.double_quant:
        if not math.isfinite(state.offset):
            raise ValueError(f"{meta_key}: nested_offset is {state.offset}")
        if state.absmax.dtype != torch.uint8:
            raise ValueError(f"{name}.absmax must be uint8 when double-quantized, got {state.absmax.dtype}")
        if not isinstance(state.nested_blocksize, int) or state.nested_blocksize <= 0:
            raise ValueError(f"{name}: nested_blocksize must be a positive int, got {state.nested_blocksize!r}")
        if state.nested_code.numel() != 256:
            raise ValueError(f"{name}.nested_quant_map has {state.nested_code.numel()} values, the 8-bit code "
                             "needs 256")
    check_state(packed, state, name)
    return state

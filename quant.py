"""NF4 quantization of the frozen base weights: the "Q" of QLoRA (Dettmers et al. 2023), as used by LongQLoRA.

Byte for byte bitsandbytes' format (`quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)`),
so bitsandbytes' kernels run on these bytes and a `*-bnb-4bit` checkpoint loads here (infra/bnb.py). The rules:

1. 4-bit NormalFloat. The flattened tensor is cut into blocks of 64 (the last may be shorter); a block stores
   its absmax in fp32 and each value the index of the nearest of the 16 NF4 codes (`NF4_CODE`, -1 .. 1) to
   value / absmax: index = #{k : m_k < x} over the 15 fp32 midpoints m_k = (c_k + c_{k+1}) / 2, so a value on
   a midpoint takes the lower code. Values are clipped to [-1, 1]; an all-zero block maps to code 7 (0.0).
2. Packing. Two indices per byte, the even flat index in the HIGH nibble; an odd count is padded with
   index 7 in the last low nibble. Shape `(ceil(numel / 2), 1)`, uint8.
3. Double quantization: offset = absmax.mean(), and absmax - offset is quantized in blocks of 256 with the
   signed dynamic 8-bit code (`dynamic_code_8bit()`), one fp32 absmax2 per 256-block.
4. Dequantize: absmax = code8[q8] * absmax2[block // 256] + offset, then w = NF4_CODE[idx] * absmax, in fp32
   (two roundings: product, then sum), cast once to the requested dtype.
5. Cost per parameter: 4 bits + 8 / 64 (uint8 scale) + 32 / (64 * 256) (fp32 second-level scale) = 4.127 bits.

`Linear4bit` is the frozen layer LoRA adapters sit on: forward dequantizes W and multiplies, backward
dequantizes W again (only the packed W is saved). Quantize and dequantize go chunk by chunk, so no fp32 copy
of a whole weight exists. The last section only makes it faster: a one-gather decoder, bitsandbytes' kernel.
"""
import dataclasses
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_ZERO_INDEX = 7  # NF4_CODE[7] == 0.0
NESTED_BLOCKSIZE = 256
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the ones bitsandbytes accepts
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Blocks quantized / dequantized at a time: small temporaries (4 MB of fp32 at 64, cache-sized), on GPU 4x more.
CHUNK_BLOCKS = 16384
CHUNK_BLOCKS_CUDA = 65536
_GRID_POINTS = 65536  # bitsandbytes' CPU 8-bit quantizer rounds normalised values to this grid first


def dynamic_code_8bit() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code (create_dynamic_map(signed=True)), 256 sorted fp32 values: for
    e = 0..6, the 2**e midpoints of linspace(0.1, 1, 2**e + 1) times +-10**(e - 6), plus 0 and 1."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        means = 10.0 ** (e - 6) * (edges[:-1] + edges[1:]) / 2.0
        values += means.tolist() + (-means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclasses.dataclass
class NF4State:
    """What dequantizes the packed indices (bitsandbytes' QuantState). absmax is uint8 (indices into nested_code)
    when double-quantized, else fp32 block maxima; offset and the nested_* fields are None without."""
    shape: tuple
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor
    code: torch.Tensor
    offset: float | None = None
    nested_absmax: torch.Tensor | None = None
    nested_blocksize: int | None = None
    nested_code: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def check_state(packed: torch.Tensor | None, state: NF4State, name: str = "weight") -> None:
    """Raise ValueError naming the offending tensor (`<name>.absmax`, ...) when a size does not follow from the
    shape and the block sizes. (infra/bnb.py checks the rest of a state read from a file.)"""
    n, shape = math.prod(state.shape), tuple(state.shape)
    blocks = -(-n // state.blocksize)
    if packed is not None and packed.numel() != (n + 1) // 2:
        raise ValueError(f"{name} holds {packed.numel()} packed bytes but shape {shape} ({n} values) "
                         f"needs {(n + 1) // 2}")
    if state.absmax.numel() != blocks:
        raise ValueError(f"{name}.absmax has {state.absmax.numel()} values but shape {shape} in blocks of "
                         f"{state.blocksize} needs {blocks}")
    if state.double_quant:
        nested = -(-blocks // state.nested_blocksize)
        if state.nested_absmax.numel() != nested:
            raise ValueError(f"{name}.nested_absmax has {state.nested_absmax.numel()} values but {blocks} block "
                             f"scales in blocks of {state.nested_blocksize} need {nested}")


# -------------------------------------------------------------------------------------------- quantize

def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """`w` (fp32 / fp16 / bf16, any shape) in NF4 (rules 1-3): (packed uint8 (ceil(n/2), 1), NF4State)."""
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_nf4 needs a float32, float16 or bfloat16 tensor, got {w.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not one of {BLOCKSIZES}")
    n = w.numel()
    if n == 0:
        raise ValueError("quantize_nf4: cannot quantize an empty tensor")
    flat, full = w.reshape(-1), n // blocksize * blocksize
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    midpoints = ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).to(w.device)
    step = (CHUNK_BLOCKS_CUDA if w.is_cuda else CHUNK_BLOCKS) * blocksize
    for start in range(0, full, step):  # full blocks: x * (1 / absmax)
        x = flat[start:min(start + step, full)].float().view(-1, blocksize)
        am = x.abs().amax(dim=1)
        absmax[start // blocksize:start // blocksize + am.numel()] = am
        packed[start // 2:(start + x.numel()) // 2] = _nf4_bytes(x * (1.0 / am.clamp(min=1e-38))[:, None], midpoints)
    if full < n:  # the partial block: x / absmax (may differ in the last bit), a zero absmax stored as 1e-38
        x = flat[full:].float()
        absmax[-1] = am = x.abs().amax().clamp(min=1e-38)
        packed[full // 2:] = _nf4_bytes(x / am, midpoints)
    # Own copy of the code book: layers must not share storage (safetensors refuses shared tensors).
    state = NF4State(shape=tuple(w.shape), dtype=w.dtype, blocksize=blocksize, absmax=absmax,
                     code=NF4_CODE.to(w.device, copy=True))
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_code_8bit().to(w.device)
        q8, absmax2 = quantize_dynamic_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        state = dataclasses.replace(state, absmax=q8, offset=offset.item(), nested_absmax=absmax2,
                                    nested_blocksize=NESTED_BLOCKSIZE, nested_code=nested_code)
    return packed.view(-1, 1), state


def _nf4_bytes(scaled: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """Rules 1-2 for scaled values: clip, index of the nearest code, two per byte (an odd count padded with 0.0)."""
    scaled = F.pad(scaled.reshape(-1), (0, scaled.numel() % 2)).clamp_(-1.0, 1.0)
    idx = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    return (idx[0::2] << 4) | idx[1::2]


def quantize_dynamic_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """Blockwise 8-bit quantization of 1-D x with a sorted 256-entry code as bitsandbytes' CPU kernel does it:
    (uint8 indices like x, fp32 absmax per block). v = x / absmax goes to a grid of 65536 points, i = trunc(((v
    + 1) * 0.5) * 65535 + 0.5), each holding its nearest code: "nearest code" except within ~1.5e-5 of a midpoint
    (where bitsandbytes' CUDA kernel may differ by one code step; dequantization is exact in both cases)."""
    n = x.numel()
    blocks = -(-n // blocksize)
    padded = F.pad(x.float(), (0, blocks * blocksize - n)).view(blocks, blocksize)  # zeros change no max
    absmax = padded.abs().amax(dim=1)
    zero = absmax == 0
    inv = torch.where(zero, torch.zeros_like(absmax), 1.0 / absmax)  # all-zero blocks store index 0
    v = (padded * inv[:, None]).clamp(-1.0, 1.0)
    grid_index = (((v + 1.0) * 0.5) * (_GRID_POINTS - 1) + 0.5).to(torch.int64)  # truncation, v + 1 >= 0
    grid = -1.0 + (2.0 * torch.arange(_GRID_POINTS, dtype=torch.float32, device=code.device)) / (_GRID_POINTS - 1)
    q = torch.bucketize(grid, 0.5 * (code[:-1] + code[1:])).to(torch.uint8)[grid_index]
    q[zero] = 0
    return q.view(-1)[:n], absmax


# ------------------------------------------------------------------------------------------ dequantize

def dequantize_absmax(state: NF4State) -> torch.Tensor:
    """fp32 block scales: stored directly, or code8[q8] * absmax2[block // 256] + offset."""
    if not state.double_quant:
        return state.absmax.float()
    vals = state.nested_code[state.absmax.long()]
    return _scale_blocks(vals, state.nested_absmax, state.nested_blocksize) + state.offset


def _scale_blocks(vals: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """In place: vals (1-D fp32) times the absmax of the block each value sits in (last block may be partial)."""
    full = vals.numel() // blocksize * blocksize
    vals[:full].view(-1, blocksize).mul_(absmax[:full // blocksize, None])
    if full < vals.numel():
        vals[full:].mul_(absmax[full // blocksize])
    return vals


def _decode(packed: torch.Tensor, code: torch.Tensor, n: int) -> torch.Tensor:
    """fp32 code values of the first n 4-bit indices in `packed` (high nibble first)."""
    idx = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:n]
    return code.float()[idx.long()]


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_nf4 (rule 4): tensor of state.shape in `dtype` (default: the original dtype)."""
    n, bs = math.prod(state.shape), state.blocksize
    out = torch.empty(n, dtype=dtype or state.dtype, device=packed.device)
    absmax = dequantize_absmax(state)
    decode = _decode_fast if FAST_DECODE else _decode
    step = (CHUNK_BLOCKS_CUDA if packed.is_cuda else CHUNK_BLOCKS) * bs
    for start in range(0, n, step):
        end = min(start + step, n)
        vals = decode(packed.reshape(-1)[start // 2:(end + 1) // 2], state.code, end - start)
        out[start:end] = _scale_blocks(vals, absmax[start // bs:-(-end // bs)], bs)  # the one cast
    return out.view(state.shape)


# --------------------------------------------------------------------------------------- the layer

class _NF4Linear(torch.autograd.Function):
    """y = x W^T + b, W dequantized on the fly: saves the packed W, never W; W and b get no gradient."""

    @staticmethod
    def forward(ctx, x, packed, bias, state, backend):
        ctx.save_for_backward(packed)
        ctx.state, ctx.backend = state, backend
        return F.linear(x, _dequantize_with(backend, packed, state, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):  # only x can need a gradient: the rest are buffers
        w = _dequantize_with(ctx.backend, ctx.saved_tensors[0], ctx.state, grad_out.dtype)
        return grad_out @ w, None, None, None, None


class Linear4bit(nn.Module):
    """Frozen NF4 linear layer: y = x W^T + b computed in compute_dtype, returned in x's dtype. Buffers: `weight`
    (packed uint8), `absmax`, `quant_map`, `nested_absmax`, `nested_quant_map` (+ `bias`). backend: "torch"
    (dequantize_nf4), "bnb" (bitsandbytes' kernel), or "auto" (bnb for a CUDA weight when bitsandbytes imports,
    else torch: bitsandbytes 0.50's CPU kernel takes block scales per row, wrong when in_features is even but
    not a multiple of the blocksize). The matmul is torch's in both."""

    def __init__(self, packed, state: NF4State, bias=None, compute_dtype=torch.bfloat16, backend="auto"):
        super().__init__()
        check_state(packed, state)
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        if backend not in ("auto", "torch", "bnb"):
            raise ValueError(f"quant backend must be one of ('auto', 'torch', 'bnb'), got {backend!r}")
        if backend == "bnb" and not _bnb_available():
            raise ValueError("quant backend 'bnb' needs bitsandbytes, which cannot be imported")
        self.compute_dtype, self.backend = compute_dtype, backend
        # The tensors are buffers (device moves apply to them), the rest of the state stays in self._meta.
        self._meta = dataclasses.replace(state, absmax=None, code=None, nested_absmax=None, nested_code=None)
        self.register_buffer("weight", packed.reshape(-1, 1))
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.code)
        self.register_buffer("nested_absmax", state.nested_absmax)
        self.register_buffer("nested_quant_map", state.nested_code)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_weight(cls, w, bias=None, compute_dtype=torch.bfloat16, backend="auto"):
        return cls(*quantize_nf4(w.detach()), bias=bias, compute_dtype=compute_dtype, backend=backend)

    @property
    def state(self) -> NF4State:
        return dataclasses.replace(self._meta, absmax=self.absmax, code=self.quant_map,
                                   nested_absmax=self.nested_absmax, nested_code=self.nested_quant_map)

    def active_backend(self) -> str:
        """What "auto" resolves to for the current device."""
        if self.backend != "auto":
            return self.backend
        return "bnb" if self.weight.is_cuda and _bnb_available() else "torch"

    def dequantize(self) -> torch.Tensor:
        """Dense (out, in) weight in compute_dtype."""
        return _dequantize_with(self.active_backend(), self.weight, self.state, self.compute_dtype)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _NF4Linear.apply(x.to(self.compute_dtype), self.weight, bias, self.state, self.active_backend())
        return y.to(x.dtype)

    def extra_repr(self):
        backend = self.backend if self.backend != "auto" else f"auto->{self.active_backend()}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self._meta.blocksize}, double_quant={self.nested_absmax is not None}, "
                f"compute_dtype={self.compute_dtype}, backend={backend}")

    def _apply(self, fn, recurse=True):
        kept = {k: t for k, t in self._buffers.items() if k not in ("weight", "bias") and t is not None}
        super()._apply(fn, recurse)  # .half() etc. must not cast the fp32 scales and codes: only move them
        for k, t in kept.items():
            self._buffers[k] = t.to(self.weight.device)  # the uint8 weight was moved, never cast
        return self


# ------------------------------------------------------------------- speed: the same values, faster
# FAST_DECODE picks _decode_fast over _decode, Linear4bit's backend "bnb" bitsandbytes' kernel over dequantize_nf4:
# the same bits (tested). bitsandbytes is imported only when used: it probes for CUDA, which takes seconds.

FAST_DECODE = True
_WORK = threading.local()
_WORK_MAX_BYTES = 16 << 20     # larger work buffers (blocksizes above 256 on CPU) are not kept


def _decode_fast(packed: torch.Tensor, code: torch.Tensor, n: int) -> torch.Tensor:
    """_decode as one 1-D gather: byte -> its two fp32 codes as one int64 word (no nibble unpacking, no stack)."""
    pairs = _decode(torch.arange(256, dtype=torch.uint8, device=code.device), code, 512).view(torch.int64)
    nbytes = packed.numel()
    if packed.is_cuda or nbytes * 12 > _WORK_MAX_BYTES:  # CUDA's caching allocator already reuses memory
        byte_idx, vals = torch.empty_like(packed, dtype=torch.int32), torch.empty_like(packed, dtype=torch.int64)
    else:
        # CPU: kept from call to call (one pair per thread, 6 MB at blocksize 64): fresh memory would be mapped
        # in page by page on every call, which costs more than the gather itself (bench/README.md).
        if getattr(_WORK, "bufs", None) is None or _WORK.bufs[0].numel() < nbytes:
            _WORK.bufs = (torch.empty(nbytes, dtype=torch.int32), torch.empty(nbytes, dtype=torch.int64))
        byte_idx, vals = _WORK.bufs[0][:nbytes], _WORK.bufs[1][:nbytes]
    byte_idx.copy_(packed)
    torch.index_select(pairs, 0, byte_idx, out=vals)
    return vals.view(torch.float32)[:n]  # a view of the work buffer: valid until the next call


def _bnb_available() -> bool:
    try:  # bitsandbytes raises various errors when its native library is unusable
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def _dequantize_with(backend: str, packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    if backend != "bnb":
        return dequantize_nf4(packed, state, dtype)
    from bitsandbytes.functional import QuantState, dequantize_4bit
    # Our fp32 block scales and the compute dtype: one rounding from fp32, as in dequantize_nf4.
    qs = QuantState(absmax=dequantize_absmax(state), shape=torch.Size(state.shape), code=state.code,
                    blocksize=state.blocksize, quant_type="nf4", dtype=dtype)
    return dequantize_4bit(packed, qs)

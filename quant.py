"""NF4 quantization of the frozen base weights: the "Q" of QLoRA (Dettmers et al. 2023), as used by LongQLoRA.

Everything on the quantize / dequantize path is plain PyTorch. The result is byte-for-byte the format of
bitsandbytes (`quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)`), so weights
quantized here can be handed to bitsandbytes' CUDA kernels, and a `*-bnb-4bit` checkpoint loads here
(hf.py reads its serialised state).

The rules, exactly as bitsandbytes applies them:

1. 4-bit NormalFloat. The tensor is flattened and cut into blocks of 64 values (the last block may be
   shorter). Each block stores its absolute maximum `absmax` in fp32 and each value the index of the nearest
   of the 16 NF4 codes (`NF4_CODE`, sorted, -1 .. 1) to `value / absmax`. "Nearest" is decided against the
   15 midpoints m_k = (c_k + c_{k+1}) / 2 computed in fp32: index = #{k : m_k < x}, so a value exactly on a
   midpoint takes the lower code. Full blocks are scaled by `x * (1 / absmax)`, the trailing partial block
   by `x / absmax` (bitsandbytes does both; the two can differ in the last bit), the result is clipped to
   [-1, 1]. An all-zero block maps to code 7 (0.0); a zero absmax is stored as 0 for full blocks and as
   1e-38 for the trailing partial block (bitsandbytes clamps only there when it stores it).
2. Packing. Two indices per byte, the element with the even flat index in the HIGH nibble. An odd count
   is padded with the index of 0.0 (7) in the last low nibble. Shape `(ceil(numel / 2), 1)`, uint8.
3. Double quantization of the block scales: `offset = absmax.mean()`, and `absmax - offset` is quantized
   in blocks of 256 with the signed dynamic 8-bit code (`dynamic_code_8bit()`), one fp32 absmax per
   256-block. The 8-bit index follows bitsandbytes' CPU kernel: the normalised value v in [-1, 1] is first
   put on a grid of 65536 points, i = trunc(((v + 1) * 0.5) * 65535 + 0.5), and each grid point holds the
   code nearest to it (midpoint rule again). This equals "nearest code" except within ~1.5e-5 of a
   midpoint, where it follows the grid; bitsandbytes' CUDA kernel searches the code directly and can
   differ there by one code step of one block scale. Dequantization is exact in both cases.
   Dequantize: `absmax = code8[q8] * absmax2[block // 256] + offset`, then `w = NF4_CODE[idx] * absmax`,
   computed in fp32 (two roundings: product, then sum) and cast once to the requested dtype.
4. Cost per parameter: 4 bits + 8 / 64 (uint8 scale) + 32 / (64 * 256) (fp32 second-level scale)
   = 4.127 bits.

`Linear4bit` is the frozen quantized linear layer LoRA adapters sit on: forward dequantizes the weight to the
compute dtype (chunk by chunk, so no fp32 copy of a whole weight ever exists) and multiplies; its autograd
function saves only the packed weight and its state and recomputes the dequantization for the input
gradient; the weight itself never gets a gradient.
"""
import dataclasses
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
NF4_ZERO_INDEX = 7  # NF4_CODE[7] == 0.0
NESTED_BLOCKSIZE = 256
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the ones bitsandbytes accepts
# Quantize/dequantize work on this many blocks at a time, so temporaries stay small whatever the size of
# the weight: on CPU 16384 blocks of 64 (4 MB of fp32: the passes over a chunk mostly hit cache, and there
# are few enough chunks that thread start-up per op does not dominate), on GPU 4x more (fewer launches).
CHUNK_BLOCKS = 16384
CHUNK_BLOCKS_CUDA = 65536
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_GRID_POINTS = 65536  # bitsandbytes' CPU 8-bit quantizer rounds normalised values to this grid first


def dynamic_code_8bit() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code (create_dynamic_map(signed=True)): 256 sorted fp32 values.

    For exponent e = 0..6, 2**e fraction values: the midpoints of linspace(0.1, 1, 2**e + 1) scaled by
    10**(e - 6), with both signs (2 * 127 values), plus 0 and 1.
    """
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (e - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclasses.dataclass
class NF4State:
    """Everything besides the packed indices that is needed to dequantize (bitsandbytes' QuantState).

    absmax is uint8 (indices into nested_code) when double-quantized, else fp32 block maxima.
    offset / nested_absmax / nested_code are None without double quantization.
    """
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

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ----------------------------------------------------------------------------------------------- checks

def check_state(packed: torch.Tensor | None, state: NF4State, name: str = "weight") -> None:
    """Raise ValueError naming the offending tensor (`<name>.absmax`, ...) when sizes do not fit the shape."""
    if state.blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}: blocksize {state.blocksize} is not one of {BLOCKSIZES}")
    if state.dtype not in _DTYPE_NAMES:
        raise ValueError(f"{name}: dtype {state.dtype} is not float32, float16 or bfloat16")
    n = state.numel
    blocks = -(-n // state.blocksize)
    if packed is not None and packed.numel() != (n + 1) // 2:
        raise ValueError(f"{name} holds {packed.numel()} packed bytes but shape {tuple(state.shape)} "
                         f"({n} values) needs {(n + 1) // 2}")
    if packed is not None and packed.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8 packed NF4, got {packed.dtype}")
    if state.absmax.numel() != blocks:
        raise ValueError(f"{name}.absmax has {state.absmax.numel()} values but shape {tuple(state.shape)} "
                         f"in blocks of {state.blocksize} needs {blocks}")
    if state.code.numel() != 16:
        raise ValueError(f"{name}.quant_map has {state.code.numel()} values, NF4 needs 16")
    if state.double_quant:
        if state.absmax.dtype != torch.uint8:
            raise ValueError(f"{name}.absmax must be uint8 when double-quantized, got {state.absmax.dtype}")
        if not isinstance(state.nested_blocksize, int) or state.nested_blocksize <= 0:
            raise ValueError(f"{name}: nested_blocksize must be a positive int, got {state.nested_blocksize!r}")
        nested = -(-blocks // state.nested_blocksize)
        if state.nested_absmax.numel() != nested:
            raise ValueError(f"{name}.nested_absmax has {state.nested_absmax.numel()} values but {blocks} "
                             f"block scales in blocks of {state.nested_blocksize} need {nested}")
        if state.nested_code is None or state.nested_code.numel() != 256:
            got = None if state.nested_code is None else state.nested_code.numel()
            raise ValueError(f"{name}.nested_quant_map has {got} values, the 8-bit code needs 256")
        if state.offset is None:
            raise ValueError(f"{name}: double-quantized state without nested_offset")


# -------------------------------------------------------------------------------------------- quantize

def _chunk_blocks(device) -> int:
    return CHUNK_BLOCKS_CUDA if torch.device(device).type == "cuda" else CHUNK_BLOCKS


def _nf4_midpoints(device) -> torch.Tensor:
    code = NF4_CODE.to(device)
    return (code[:-1] + code[1:]) / 2


def _nf4_indices(scaled: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 code: the number of midpoints strictly below the value."""
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


def _pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, even element in the high nibble (len(idx) must be even)."""
    return (idx[0::2] << 4) | idx[1::2]


def quantize_dynamic_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """Blockwise 8-bit quantization of a 1-D fp32 tensor with a sorted 256-entry code (bitsandbytes' CPU rule).

    Returns (uint8 indices like x, fp32 absmax per block). See rule 3 of the module docstring.
    """
    n = x.numel()
    blocks = -(-n // blocksize)
    padded = F.pad(x.float(), (0, blocks * blocksize - n)).view(blocks, blocksize)  # zeros change no max
    absmax = padded.abs().amax(dim=1)
    zero = absmax == 0
    inv = torch.where(zero, torch.zeros_like(absmax), 1.0 / absmax)  # all-zero blocks store index 0
    v = (padded * inv[:, None]).clamp(-1.0, 1.0)
    grid_index = (((v + 1.0) * 0.5) * (_GRID_POINTS - 1) + 0.5).to(torch.int64)  # truncation, v + 1 >= 0
    q = _grid_to_code(code)[grid_index]
    q[zero] = 0
    return q.view(-1)[:n], absmax


def _grid_to_code(code: torch.Tensor) -> torch.Tensor:
    """For each of the 65536 grid points -1 + 2i/65535 on [-1, 1], the index of the nearest code."""
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_GRID_POINTS, dtype=torch.float32, device=code.device)
    grid = -1.0 + (2.0 * i) / (_GRID_POINTS - 1)
    return torch.bucketize(grid, midpoints).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """Quantize `w` (fp32 / fp16 / bf16, any shape) to NF4. Returns (packed uint8 (ceil(n/2), 1), NF4State)."""
    if w.dtype not in _DTYPE_NAMES:
        raise ValueError(f"quantize_nf4 needs a float32, float16 or bfloat16 tensor, got {w.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not one of {BLOCKSIZES}")
    n = w.numel()
    if n == 0:
        raise ValueError("quantize_nf4: cannot quantize an empty tensor")
    flat = w.reshape(-1)
    blocks = -(-n // blocksize)
    absmax = torch.empty(blocks, dtype=torch.float32, device=w.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    midpoints = _nf4_midpoints(w.device)
    step = _chunk_blocks(w.device) * blocksize  # even, so every chunk starts on a byte boundary
    for start in range(0, n, step):
        x = flat[start:start + step].float()
        b0 = start // blocksize
        full = x.numel() // blocksize * blocksize
        scaled = torch.empty(x.numel() + x.numel() % 2, dtype=torch.float32, device=w.device)
        if full:
            am = x[:full].view(-1, blocksize).abs().amax(dim=1)
            absmax[b0:b0 + full // blocksize] = am
            scaled[:full] = (x[:full].view(-1, blocksize) * (1.0 / am.clamp(min=1e-38))[:, None]).view(-1)
        if full < x.numel():  # trailing partial block (last chunk only)
            am = x[full:].abs().amax().clamp(min=1e-38)
            absmax[-1] = am
            scaled[full:x.numel()] = x[full:] / am
        scaled[x.numel():] = 0.0  # odd count: the missing partner is 0.0, i.e. index 7
        scaled.clamp_(-1.0, 1.0)
        packed[start // 2:start // 2 + scaled.numel() // 2] = _pack_nibbles(_nf4_indices(scaled, midpoints))
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


def _byte_to_codes(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) table: byte b -> (code[b >> 4], code[b & 15]), one gather decodes two values."""
    b = torch.arange(256, device=code.device)
    return torch.stack([code[b >> 4], code[b & 15]], dim=1)


_WORK = threading.local()
_WORK_MAX_BYTES = 16 << 20     # larger work buffers (blocksizes above 256 on CPU) are not kept


def _work_buffers(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """dequantize_nf4's (int32 byte index, int64 gathered pairs) work buffers of n entries, reused by every chunk.
    On CPU they are also kept from call to call (one pair per thread, 6 MB at blocksize 64): a fresh pair is an
    allocation the kernel maps in page by page on every call, which made the first gather of each call ~40x slower
    than the others (12 ms against 0.3 ms per 1M values, measured); CUDA's caching allocator already reuses."""
    if device.type != "cpu" or n * 12 > _WORK_MAX_BYTES:
        return torch.empty(n, dtype=torch.int32, device=device), torch.empty(n, dtype=torch.int64, device=device)
    bufs = getattr(_WORK, "bufs", None)
    if bufs is None or bufs[0].numel() < n:
        bufs = _WORK.bufs = (torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int64))
    return bufs[0][:n], bufs[1][:n]


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_nf4: tensor of state.shape in `dtype` (default: the original dtype).

    Values are computed in fp32 and cast once; chunked, so only the result is full size. The state is
    trusted: check_state runs once where a state is made or read (quantize_nf4, Linear4bit, hf.py).
    """
    dtype = dtype or state.dtype
    n, bs = state.numel, state.blocksize
    out = torch.empty(n, dtype=dtype, device=packed.device)
    absmax = dequantize_absmax(state)
    # Each row of the byte table is 8 bytes (two fp32 codes): gathering it as one int64 word per byte
    # is a plain 1-D gather, several times faster on CPU than gathering rows of two floats.
    pairs = _byte_to_codes(state.code.float()).view(torch.int64).view(-1)
    flat = packed.reshape(-1)
    step = min(_chunk_blocks(packed.device) * bs, n + n % 2)
    byte_idx, vals = _work_buffers(step // 2, packed.device)
    for start in range(0, n, step):
        end = min(start + step, n)
        nbytes = (end + 1) // 2 - start // 2
        byte_idx[:nbytes].copy_(flat[start // 2:start // 2 + nbytes])
        torch.index_select(pairs, 0, byte_idx[:nbytes], out=vals[:nbytes])
        chunk = vals.view(torch.float32)[:end - start]
        out[start:end] = _scale_blocks(chunk, absmax[start // bs:-(-end // bs)], bs)
    return out.view(state.shape)


# ------------------------------------------------------------------------------ bitsandbytes interop
# bitsandbytes is imported where it is used: importing it probes for CUDA and takes seconds, and the pure
# PyTorch path (every CPU run) never needs it.

def state_to_bnb(state: NF4State):
    """bitsandbytes.functional.QuantState holding the same tensors (no copies)."""
    from bitsandbytes.functional import QuantState

    state2 = offset = None
    if state.double_quant:
        state2 = QuantState(absmax=state.nested_absmax, code=state.nested_code,
                            blocksize=state.nested_blocksize, dtype=torch.float32)
        # torch.full launches a fill kernel; torch.tensor(float, device=cuda) would be a synchronising copy.
        offset = torch.full((), state.offset, dtype=torch.float32, device=state.absmax.device)
    return QuantState(absmax=state.absmax, shape=torch.Size(state.shape), code=state.code,
                      blocksize=state.blocksize, quant_type="nf4", dtype=state.dtype,
                      offset=offset, state2=state2)


# --------------------------------------------------------------------------------------- the layer

BACKENDS = ("auto", "torch", "bnb")


def _bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # bitsandbytes raises various errors when its native library is unusable
        return False
    return True


def _dequantize_with(backend: str, packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    if backend == "bnb":
        from bitsandbytes.functional import dequantize_4bit

        # Ask bnb for the compute dtype directly: one rounding from fp32, as the torch path does.
        return dequantize_4bit(packed, state_to_bnb(dataclasses.replace(state, dtype=dtype)))
    return dequantize_nf4(packed, state, dtype)


class _NF4Linear(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly; saves only the packed W and its state."""

    @staticmethod
    def forward(ctx, x, packed, bias, state, backend):
        w = _dequantize_with(backend, packed, state, x.dtype)
        # Save the quantized tensors only (uint8 indices, small scales); W is rebuilt in backward.
        ctx.save_for_backward(packed, state.absmax, state.code, state.nested_absmax, state.nested_code)
        ctx.state, ctx.backend = state, backend
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        state = dataclasses.replace(ctx.state, absmax=absmax, code=code, nested_absmax=nested_absmax,
                                    nested_code=nested_code)
        w = _dequantize_with(ctx.backend, packed, state, grad_out.dtype)
        return grad_out @ w, None, None, None, None


class Linear4bit(nn.Module):
    """Frozen NF4 linear layer. state_dict has bitsandbytes' layout: `weight` (packed uint8) and
    `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
    `weight.quant_state.bitsandbytes__nf4` (+ `bias`).

    backend: "torch" (dequantize_nf4), "bnb" (bitsandbytes' dequantize_4bit kernel), or "auto" (bnb when
    the weight is on CUDA and bitsandbytes imports, torch otherwise). Both backends only dequantize; the
    matmul is torch's. (bitsandbytes 0.50's CPU dequantize kernel uses per-row block scales and is wrong
    when in_features is even but not a multiple of the blocksize; "auto" never picks bnb on CPU.)
    The output has the input's dtype, computed in compute_dtype.
    """

    def __init__(self, packed, state: NF4State, bias=None, compute_dtype=torch.bfloat16, backend="auto"):
        super().__init__()
        check_state(packed, state)
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self.compute_dtype = compute_dtype
        self.backend = backend
        self._check_backend()
        self._set_state(packed, state)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_weight(cls, w, bias=None, compute_dtype=torch.bfloat16, backend="auto", blocksize=64,
                    double_quant=True):
        packed, state = quantize_nf4(w.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(packed, state, bias=bias, compute_dtype=compute_dtype, backend=backend)

    def _check_backend(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"quant backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "bnb" and not _bnb_available():
            raise ValueError("quant backend 'bnb' needs bitsandbytes, which cannot be imported")

    def _set_state(self, packed, state: NF4State):
        self.register_buffer("weight", packed.reshape(-1, 1))
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.code)
        self.register_buffer("nested_absmax", state.nested_absmax)
        self.register_buffer("nested_quant_map", state.nested_code)
        self.weight_dtype, self.blocksize = state.dtype, state.blocksize
        self.offset, self.nested_blocksize = state.offset, state.nested_blocksize

    @property
    def state(self) -> NF4State:
        return NF4State(shape=(self.out_features, self.in_features), dtype=self.weight_dtype,
                        blocksize=self.blocksize, absmax=self.absmax, code=self.quant_map, offset=self.offset,
                        nested_absmax=self.nested_absmax, nested_blocksize=self.nested_blocksize,
                        nested_code=self.nested_quant_map)

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
                f"nf4 blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}, "
                f"compute_dtype={self.compute_dtype}, backend={backend}")

    # .to(dtype) / .half() must leave the fp32 scales and code books alone (they are part of the format
    # and the bytes would no longer dequantize to the same values); only device moves apply to them.
    _STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")

    def _apply(self, fn, recurse=True):
        kept = {k: self._buffers[k] for k in self._STATE_BUFFERS if self._buffers[k] is not None}
        super()._apply(fn, recurse)
        device = self.weight.device  # uint8: moved, never cast
        for k, t in kept.items():
            self._buffers[k] = t.to(device)
        return self

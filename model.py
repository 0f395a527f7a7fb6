"""The LLaMA decoder, top to bottom, and its next-token loss.

LongQLoRA changes nothing in the architecture; it changes how positions are encoded (Position Interpolation,
rope.py), how attention is computed during training (S²-Attn, attention.py) and how the frozen weights are
stored (NF4, quant.py). So this file is a plain LLaMA-2 / LLaMA-3 / GQA decoder:

    h_0 = E[tokens]
    a_l = h_{l-1} + W_o · Attn(RoPE(W_q · n), RoPE(W_k · n), W_v · n)      n = RMSNorm(h_{l-1})
    h_l = a_l + W_down · (silu(W_gate · m) * (W_up · m))                   m = RMSNorm(a_l)
    logits = W_head · RMSNorm(h_L),    loss = sum over t of -log softmax(logits_t)[labels_{t+1}]  (-100 ignored)

with RMSNorm(x) = w * x / sqrt(mean(x^2) + eps), in fp32 as HF does. The modules below are these equations;
ModelArgs.fused (the default) swaps in the autograd functions at the end of the file: less kept for backward,
and no (T x vocab) logits in the loss.

Set once per run on the model, not passed to every call: set_attention("s2", group_size_ratio, shift) (S²-Attn for
training; "full" at inference), gradient_checkpointing, set_memory_savings(mlp_chunk, offload_checkpoints), loss_chunk.
Module names mirror the HF checkpoint minus its leading "model.", so checkpoint and PEFT keys map to ours
by one rule (infra/hf.py, which also does all loading and saving).
"""
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import S2_SHIFTS, causal_attention, s2_attention
from rope import apply_rope, pi_inv_freq, rope_cos_sin

# The seven decoder linears: the ones QLoRA quantises and LoRA adapts.
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None       # < n_heads: grouped-query attention (LLaMA-2-70B, LLaMA-3, Mistral)
    head_dim: int | None = None         # defaults to dim // n_heads
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096  # the context the checkpoint was trained for
    tie_word_embeddings: bool = False
    rope_scaling: dict | None = None    # None: plain RoPE; {"rope_type": "linear", "factor": s}: PI (rope.py)
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    extra: dict = field(default_factory=dict, repr=False)  # config.json keys we do not use, written back on export
    fused: bool = True                  # the autograd functions at the end of this file; False: the plain equations
    # For a rope_scaling rule other than PI: its tables' function (infra.rope_scaling.rope_inv_freq, set by the loader)
    rope_rule: Callable | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads={self.n_heads} is not a multiple of "
                             f"num_key_value_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs of dimensions)")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool = True):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """w * x / sqrt(mean(x^2) + eps), statistics in fp32 (x^2 overflows fp16), cast back before w, as HF does."""
        if self.fused:
            return _RMSNorm.apply(x, self.weight, self.eps)
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, attend, cache=None):
        q, k, v = (proj(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = attend(q, k, v)                                   # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)
        self.fused, self.chunk = args.fused, 0    # chunk > 0: in training, tokens per recomputed tile (forward)

    def swiglu(self, x):
        """W_down · (silu(W_gate · x) * (W_up · x))."""
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(_SwiGLU.apply(g, u) if self.fused else F.silu(g) * u)

    def forward(self, x):
        if self.chunk and x.shape[1] > self.chunk and torch.is_grad_enabled() and self.training:
            # The (T x intermediate) activations are the largest of a layer: computed tile by tile, each tile
            # checkpointed, backward holds one tile's worth of them, at the cost of one more MLP forward.
            return torch.cat([checkpoint(self.swiglu, t, use_reentrant=False) for t in x.split(self.chunk, 1)], 1)
        return self.swiglu(x)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps, args.fused)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps, args.fused)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, attend, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attend, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.fused)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.attention, self.group_size_ratio, self.s2_shift = "full", 0.25, "segment"
        self.gradient_checkpointing, self.offload_checkpoints, self.loss_chunk = False, False, 1024
        if self.embed_tokens.weight.device.type != "meta":   # hf.load_model builds on meta: nothing to init
            self.init_weights()

    def init_weights(self, std: float = 0.02):
        """HF LLaMA's initialisation (normal(0, 0.02) weights, unit norms), for models trained from scratch."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_attention(self, mode: str, group_size_ratio: float = 0.25, shift: str = "segment") -> None:
        """"full": causal attention over everything. "s2": S²-Attn in groups of int(T * group_size_ratio)
        tokens, half of the heads shifted by half a group (attention.py); a training-time approximation."""
        if mode not in ("full", "s2") or not 0 < group_size_ratio <= 1 or shift not in S2_SHIFTS:
            raise ValueError(f"attention must be 'full' or 's2' with 0 < group_size_ratio <= 1 and a shift in "
                             f"{S2_SHIFTS}, got {mode!r}, {group_size_ratio!r}, {shift!r}")
        self.attention, self.group_size_ratio, self.s2_shift = mode, group_size_ratio, shift

    def rope_tables(self, positions, dtype):
        """cos/sin for `positions`: PI (rope.py), or args.rope_rule for another rope_scaling rule; per call, as
        dynamic NTK depends on the longest position seen."""
        a, scaling = self.args, self.args.rope_scaling
        if scaling is None or scaling["rope_type"] == "linear":
            factor = 1.0 if scaling is None else scaling["factor"]
            inv_freq, attention_factor = pi_inv_freq(a.head_dim, float(a.rope_theta), factor), 1.0
        else:
            inv_freq, attention_factor = a.rope_rule(a.head_dim, a.rope_theta, scaling, a.max_position_embeddings,
                                                     int(positions[-1]) + 1)
        return rope_cos_sin(inv_freq.to(positions.device), positions, attention_factor, dtype)

    def hidden_states(self, tokens, cache=None, padding_mask=None):
        """tokens (B, T) -> final-norm hidden states (B, T, dim). padding_mask (B, T): True on real tokens. cache:
        the keys and values of earlier positions when decoding (generate.KVCache), extended by these T tokens."""
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + T, device=tokens.device)
        h = self.embed_tokens(tokens)
        cos, sin = self.rope_tables(positions, h.dtype)
        attend = self._attend(T, padding_mask, cache)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each layer's input; recompute its inside in backward (checkpoint() restores the RNG:
                # the same LoRA dropout). Offloaded, that input is a pinned host copy, brought back when needed.
                kept = to_host(h) if self.offload_checkpoints else h
                h = checkpoint(run_on, layer, kept, h.device, cos, sin, attend, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attend, cache)
        if cache is not None:
            cache.length += T
        return self.norm(h)

    def forward(self, tokens, cache=None, padding_mask=None):
        """tokens (B, T) -> logits (B, T, vocab)."""
        return self.lm_head(self.hidden_states(tokens, cache, padding_mask))

    def loss(self, tokens, labels, padding_mask=None, reduction: str = "sum"):
        """Next-token cross-entropy: position t predicts labels[:, t + 1] (-100 ignored); see cross_entropy."""
        hidden = self.hidden_states(tokens, padding_mask=padding_mask)
        if self.args.fused:
            return chunked_cross_entropy(hidden, self.lm_head.weight, labels, self.loss_chunk, reduction)
        return cross_entropy(hidden, self.lm_head.weight, labels, reduction)

    def set_memory_savings(self, mlp_chunk: int = 0, offload_checkpoints: bool = False) -> None:
        """mlp_chunk > 0: the MLP of a recomputed layer in tiles of that many tokens; offload_checkpoints: the
        checkpointed layer inputs in pinned host memory (for a GPU; on a CPU it only adds a copy)."""
        for layer in self.layers:
            layer.mlp.chunk = mlp_chunk
        self.offload_checkpoints = offload_checkpoints

    def _attend(self, T: int, padding_mask, cache):
        if cache is not None and (self.attention == "s2" or padding_mask is not None):
            raise ValueError("with a KV cache, decode with attention 'full' (S²-Attn is a training-time "
                             "approximation) and no padding mask")
        if self.attention == "s2":
            group_size = max(1, int(T * self.group_size_ratio))
            return lambda q, k, v: s2_attention(q, k, v, group_size=group_size, shift=self.s2_shift,
                                                key_padding_mask=padding_mask)
        return lambda q, k, v: causal_attention(q, k, v, key_padding_mask=padding_mask)


def cross_entropy(hidden, head_weight, labels, reduction: str = "mean"):
    """Next-token cross-entropy of hidden (B, T, dim) @ head_weight.T, as HF computes it (16-bit logits, then fp32):
    position t predicts labels[:, t + 1], -100 is ignored. reduction: "mean" over counted tokens, "sum", "none"."""
    logits = (hidden[:, :-1] @ head_weight.t()).float()
    return _reduce(F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="none"), labels, reduction)


def _reduce(nll, labels, reduction: str):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if reduction == "none":
        return nll.view(labels[:, 1:].shape)
    return nll.sum() if reduction == "sum" else nll.sum() / (labels[:, 1:] != -100).sum().clamp(min=1)


# ------------------------------------- The fused and memory-saving paths (ModelArgs.fused, set_memory_savings): the
# computations above with less kept for backward; the same forward bits, gradients equal to rounding (test_model).

class _RMSNorm(torch.autograd.Function):
    """RMSNorm saving only x, which a checkpointed layer keeps anyway, instead of autograd's fp32 copy of it;
    backward recomputes inv = 1 / sqrt(mean(x^2) + eps):
        dx = inv * (g - y * mean(g * y)),   y = x * inv,   g = w * dy,   dw = sum over tokens of dy * y."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        y = _normalized(x, eps)[0].to(x.dtype)                 # a fresh tensor: scaled in place when it can be
        return y.mul_(weight) if weight.dtype == y.dtype else weight * y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        y, inv = _normalized(x, ctx.eps)
        g = (dy * weight).float()
        dx = inv * (g - y * (g * y).mean(-1, keepdim=True)) if ctx.needs_input_grad[0] else None
        dw = (dy * y.to(x.dtype)).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return None if dx is None else dx.to(x.dtype), dw, None


def _normalized(x, eps):
    x32 = x.float()
    inv = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * inv if x32 is x else x32.mul_(inv)), inv     # in place over x.float()'s own copy


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u with the bits of F.silu(g) * u, forward and backward, saving g and u only (autograd would also
    keep silu(g), a third (tokens x intermediate) tensor): backward recomputes it."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g).mul_(u)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        grad_g = torch.ops.aten.silu_backward(dy * u, g) if ctx.needs_input_grad[0] else None
        grad_u = F.silu(g).mul_(dy) if ctx.needs_input_grad[1] else None
        return grad_g, grad_u


def to_host(h):
    """A differentiable copy of h in host memory, pinned on a GPU so that the copy runs asynchronously."""
    return torch.empty(h.shape, dtype=h.dtype, pin_memory=h.is_cuda).copy_(h, non_blocking=h.is_cuda)


def run_on(layer, h, device, *args):
    return layer(h.to(device, non_blocking=True), *args)


def chunked_cross_entropy(hidden, head_weight, labels, chunk_size: int = 1024, reduction: str = "mean"):
    """cross_entropy, chunk_size tokens at a time: at no point do (B*T, V) fp32 logits exist."""
    h, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
    if not head_weight.requires_grad:
        return _reduce(_ChunkedCE.apply(h, head_weight, targets, chunk_size), labels, reduction)
    # A trained head (full fine-tuning) needs dW too: each chunk's plain loss, its logits recomputed in backward.
    nll = [checkpoint(_chunk_nll, h[s:s + chunk_size], head_weight, targets[s:s + chunk_size], use_reentrant=False)
           for s in range(0, len(targets), chunk_size)]
    return _reduce(torch.cat(nll), labels, reduction)


def _chunk_nll(h, weight, targets):
    return F.cross_entropy((h @ weight.t()).float(), targets, reduction="none")


class _ChunkedCE(torch.autograd.Function):
    """Cross-entropy of h @ W^T for a frozen W (LoRA), chunk by chunk of tokens, never keeping (N, V) logits.

    d(nll)/d(logits) = softmax(logits) - onehot(target), so d(nll)/dh = (softmax - onehot) @ W: that (N, dim)
    gradient is computed in the forward pass, while each chunk's logits exist anyway, and saved; backward only
    scales it, and no logits are recomputed. With no gradient wanted (evaluation) only the nll is computed.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size):
        n, valid = h.shape[0], targets != -100
        nll = torch.empty(n, dtype=torch.float32, device=h.device)
        dnll_dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[0] else None
        # Work buffers shared by all chunks; logits in h's dtype (as HF), cast into the fp32 one, all else in place.
        buf32 = torch.empty(min(chunk_size, n), weight.shape[0], dtype=torch.float32, device=h.device)
        buf16 = None if h.dtype == torch.float32 else torch.empty_like(buf32, dtype=h.dtype)
        for s in range(0, n, chunk_size):
            e, t = min(s + chunk_size, n), targets[s:s + chunk_size].clamp(min=0)
            if buf16 is None:
                logits = torch.mm(h[s:e], weight.t(), out=buf32[:e - s])
            else:
                logits = buf32[:e - s].copy_(torch.mm(h[s:e], weight.t(), out=buf16[:e - s]))
            # nll = lse - logit of the target, lse = max + log(sum(exp(logits - max))); logits become exp(. - max).
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            peak = logits.amax(1, keepdim=True)
            total = logits.sub_(peak).exp_().sum(1)
            nll[s:e] = (total.log().add_(peak.squeeze(1)) - target_logit) * valid[s:e]
            if dnll_dh is not None:
                # softmax - onehot (0 for ignored tokens), times _DLOGITS_SCALE, then @ W in the 16-bit dtype.
                weight_row = valid[s:e] * _DLOGITS_SCALE
                logits.mul_((weight_row / total)[:, None]).scatter_add_(1, t[:, None], -weight_row[:, None])
                probs = logits if buf16 is None else buf16[:e - s].copy_(logits)
                dnll_dh[s:e] = probs @ weight
                dnll_dh[s:e].div_(_DLOGITS_SCALE)
        ctx.h_dtype = h.dtype
        ctx.save_for_backward(dnll_dh)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (dnll_dh,) = ctx.saved_tensors
        return (dnll_dh * grad_nll[:, None]).to(ctx.h_dtype), None, None, None


# A power of two applied before the 16-bit matmul and removed after it: softmax values near 1/V (~3e-5) would
# otherwise land in fp16's subnormal range and lose precision. Exact for every dtype.
_DLOGITS_SCALE = 1024.0

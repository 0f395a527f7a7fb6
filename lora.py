"""LoRA adapters: the trainable part of LongQLoRA.

A frozen linear layer W (dense 16-bit, or NF4 via quant.Linear4bit) gets a low-rank update:

    y = W x + (alpha / r) * B A dropout(x)        A: (r, in) Kaiming-uniform, B: (out, r) zeros

so training starts exactly at the base model. A and B are fp32 whatever the base dtype (QLoRA keeps the
adapter in full precision; only the frozen base is 16-bit or 4-bit). LongQLoRA puts r=64, alpha=16,
dropout=0.05 on all seven decoder linears (q, k, v, o, gate, up, down); LongLoRA's "LoRA+" also trains the
embeddings and the norms (`train_embed_norm=True`).

Merging folds the update into the weight, W' = W + (alpha / r) * B @ A, in fp32, cast back to W's dtype
(`merged_weight`; `merge_lora_weights` over a state dict; infra/merge.py for a checkpoint on disk).

LoRALinear.forward is the equation as autograd computes it; the fused path at the end of this file
(`fused=True`, the default) computes the same bits as one autograd node that stores less.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import DECODER_LINEARS
from quant import Linear4bit


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))), the LoRA path in fp32 whatever the base computes in."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, shared_input=None,
                 fused: bool = True):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=device))
        # PEFT's initialisation (nn.Linear's default): uniform(-1/sqrt(in), 1/sqrt(in)).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fused, self.input = fused, shared_input or SharedInput(readers=1)   # input: the fused path's mask
        self.train(base.training)   # a wrapped eval-mode model stays in eval mode (no dropout)

    def forward(self, x):
        if self.fused and _frozen_linear(self.base_layer):
            keep, keep_scale = self.input.mask(x, self.dropout)
            return _LoRALinearFn.apply(x, keep, keep_scale, self.lora_A, self.lora_B, self.scaling, self.base_layer)
        y = self.base_layer(x)
        h = F.linear(self.dropout(x.float()), self.lora_A) * self.scaling
        return y + F.linear(h, self.lora_B).to(y.dtype)

    def extra_repr(self):
        path = f"fused, input shared by {self.input.readers}" if self.fused else "plain"
        return f"r={self.r}, alpha={self.alpha}, {path}"


# Decoder linears that read the same tensor: RMSNorm(h) feeds q, k, v; RMSNorm(a) feeds gate and up.
SAME_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def is_embed_or_norm(param_name: str) -> bool:
    """Is this parameter one LoRA+ trains (`embed_tokens.weight`, `norm.weight`, `layers.0.input_layernorm...`)?"""
    module = param_name.rsplit(".", 2)[-2] if "." in param_name else ""
    return module == "embed_tokens" or module.endswith("norm")


def add_lora(model: nn.Module, r: int = 64, alpha: float = 16, dropout: float = 0.05,
             targets=DECODER_LINEARS, train_embed_norm: bool = False, fused: bool = True,
             shared_dropout: bool = True) -> list[nn.Parameter]:
    """Wrap every linear whose attribute name is in `targets` with LoRALinear and freeze everything else.

    Returns the trainable parameters: all lora_A/lora_B, plus the embeddings and every norm weight when
    `train_embed_norm` (LongLoRA's LoRA+). fused: each layer is the fused autograd node, and siblings that
    read the same tensor (SAME_INPUT) share one dropout mask unless shared_dropout=False (one mask per layer
    as PEFT draws them, as the plain path always does); False: the plain path. The configuration is kept as
    `model.lora_config`.
    """
    targets = tuple(dict.fromkeys(targets))
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has LoRA adapters")
    if "lm_head" in targets:
        raise ValueError("lm_head is never a LoRA target (LongQLoRA adapts the decoder linears only)")
    wrap = [(parent, name) for _, parent in model.named_modules() for name, child in parent.named_children()
            if name in targets and isinstance(child, (nn.Linear, Linear4bit))]
    missing = [t for t in targets if not any(name == t for _, name in wrap)]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no linear layer of the model")
    model.requires_grad_(False)
    shared = {}                   # (parent, name) -> the SharedInput of the siblings that read its input
    for parent in dict.fromkeys(parent for parent, _ in wrap):
        for group in SAME_INPUT if fused and shared_dropout else ():
            readers = [n for n in group if (parent, n) in wrap]
            shared.update(dict.fromkeys([(parent, n) for n in readers], SharedInput(readers=len(readers))))
    # Target by target (every q_proj, then every k_proj, ...): the order the A matrices draw their random init.
    for parent, name in sorted(wrap, key=lambda item: targets.index(item[1])):
        setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha, dropout, shared.get((parent, name)), fused))
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=targets, train_embed_norm=train_embed_norm,
                             training=None)
    trainable = list(adapter_parameters(model).values())
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What training changes, by our key: every lora_A / lora_B (`layers.0.self_attn.q_proj.lora_A`) and, with
    LoRA+, the embedding and norm weights (`embed_tokens.weight`, `norm.weight`, ...)."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters (call add_lora or infra.adapter.load_adapter first)")
    return {n: p for n, p in model.named_parameters()
            if n.endswith((".lora_A", ".lora_B")) or (config["train_embed_norm"] and is_embed_or_norm(n))}


def merged_weight(w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, computed in fp32 and returned in W's dtype."""
    if (lora_b.shape[0], lora_a.shape[1]) != tuple(w.shape) or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"LoRA A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do not fit a weight of shape "
                         f"{tuple(w.shape)}")
    return (w.float() + scaling * (lora_b.float() @ lora_a.float())).to(w.dtype)


def lora_pairs(lora: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our key: tensor} of lora_A / lora_B -> {HF key of the weight the pair updates: (A, B)}. Our module
    `layers.0.self_attn.q_proj` is HF's `model.layers.0.self_attn.q_proj` (lm_head is never a target)."""
    modules = dict.fromkeys(key.rsplit(".", 1)[0] for key in lora)
    unpaired = sorted(set(lora) ^ {f"{m}.{which}" for m in modules for which in ("lora_A", "lora_B")})
    if unpaired:
        raise ValueError(f"adapter tensor {unpaired[0]} is not one of a lora_A / lora_B pair")
    return {f"model.{m}.weight": (lora[m + ".lora_A"], lora[m + ".lora_B"]) for m in modules}


def merge_lora_weights(base_state_dict: dict, lora: dict, scaling: float) -> dict:
    """Pure merge: base_state_dict with HF keys (`model.layers.0.self_attn.q_proj.weight`), lora with our keys
    (`layers.0.self_attn.q_proj.lora_A`). A new dict with the targeted weights merged, the rest as it was."""
    merged = dict(base_state_dict)
    for key, (a, b) in lora_pairs(lora).items():
        if key not in merged:
            raise ValueError(f"adapter targets {key}, which the base state dict lacks")
        merged[key] = merged_weight(merged[key], a, b, scaling)
    return merged


# --------------------------------------------------------------------------- the fused path (fused=True)
# The plain path's bits in less memory: base + LoRA as one autograd node without any (tokens x features) fp32
# tensor. dropout(x) is rebuilt chunk by chunk from x and a 1-byte mask drawn once for the siblings that read x,
# y's gradient is cast to fp32 a chunk at a time, and the base's and LoRA's input gradients are summed in place.

class SharedInput:
    """The dropout mask of x, drawn once for the LoRA layers that read the same x (q, k, v; gate, up).

    The readers are called in a row on the same tensor; the mask is let go after the last one. With dropout
    the readers share one mask where PEFT draws one each; without, the bits are the same."""

    def __init__(self, readers: int):
        self.readers, self.x, self.value, self.reads = readers, None, None, 0

    def mask(self, x, dropout: nn.Module):
        """(keep, scale): the bool mask of x's kept elements and F.dropout's fp32 1 / (1 - p), or (None, None)
        without dropout (dropout 0 or eval mode). The same RNG draws as dropout(x.float())."""
        if self.x is not x:
            self.x, self.value, self.reads = x, (None, None), 0
            if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
                # bernoulli_ into bool draws what F.dropout draws into its fp32 noise, 1 / (1 - p) as it does
                keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - dropout.p)
                self.value = keep, torch.ones((), dtype=torch.float32, device=x.device).div_(1 - dropout.p)
        value, self.reads = self.value, self.reads + 1
        if self.reads == self.readers:
            self.x = self.value = None
        return value


def _dropped(x, keep, scale):
    """dropout(x) in fp32 from its mask, with F.dropout's bits (x * noise, noise = scale where kept)."""
    out = x.float() if x.dtype != torch.float32 else x.clone()
    return out if keep is None else out.mul_(scale).mul_(keep)


# fp32 elements of a chunk's temporaries (4 MiB): they stay in cache and the allocator reuses them, where a
# (tokens x features) fp32 tensor is a fresh allocation mapped in page by page, which costs more than the math.
LORA_CHUNK_ELEMENTS = 1 << 20


def _chunks(x, keep, A, B):
    """(rows, x[rows], keep[rows] or None) over x as (tokens x in), chunks of about LORA_CHUNK_ELEMENTS."""
    x2, keep2 = x.reshape(-1, A.shape[1]), None if keep is None else keep.view(-1, A.shape[1])
    step = max(1, LORA_CHUNK_ELEMENTS // max(A.shape[1], B.shape[0]))
    for start in range(0, x2.shape[0], step):
        rows = slice(start, start + step)
        yield rows, x2[rows], None if keep2 is None else keep2[rows]


def _frozen_linear(base) -> bool:
    """Is `base` a linear layer whose forward and input gradient _LoRALinearFn computes itself?"""
    frozen_dense = type(base) is nn.Linear and not any(p.requires_grad for p in base.parameters())
    return frozen_dense or isinstance(base, Linear4bit)


def _base_weight(base):
    """(W, bias, the dtype base computes in). A Linear4bit dequantizes W in forward and again in backward, as
    its own autograd node does: no 16-bit copy of W is kept."""
    if isinstance(base, Linear4bit):
        bias = None if base.bias is None else base.bias.to(base.compute_dtype)
        return base.dequantize(), bias, base.compute_dtype
    return base.weight, base.bias, base.weight.dtype


class _LoRALinearFn(torch.autograd.Function):
    """base(x) + (s * dropout(x) A^T) B^T for a frozen base, as one autograd node, chunk by chunk of tokens.
    Saves x (for 16-bit x half the fp32 copy autograd keeps), the mask and h = s * dropout(x) A^T (tokens x r)."""

    @staticmethod
    def forward(ctx, x, keep, keep_scale, A, B, scaling, base):
        w, bias, dtype = _base_weight(base)
        y = F.linear(x.to(dtype), w, bias).to(x.dtype)
        del w
        y2 = y.view(-1, B.shape[0])
        h = torch.empty(y2.shape[0], A.shape[0], dtype=torch.float32, device=x.device)
        for rows, x_c, keep_c in _chunks(x, keep, A, B):
            torch.mm(_dropped(x_c, keep_c, keep_scale), A.t(), out=h[rows]).mul_(scaling)
            y2[rows].add_(torch.mm(h[rows], B.t()).to(y.dtype))     # y + F.linear(h, B).to(y.dtype), in place
        ctx.save_for_backward(x, keep, keep_scale, A, B, h)
        ctx.scaling, ctx.base = scaling, base
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, keep, keep_scale, A, B, h = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:                                   # the base's: grad_y @ W
            w, _, dtype = _base_weight(ctx.base)
            grad_x = (grad_y.to(dtype) @ w).to(x.dtype).contiguous()
            del w
        grad_a, grad_b, g2 = torch.zeros_like(A), torch.zeros_like(B), grad_y.reshape(-1, B.shape[0])
        for rows, x_c, keep_c in _chunks(x, keep, A, B):
            g = g2[rows].float()
            grad_b.addmm_(g.t(), h[rows])
            gh = (g @ B).mul_(ctx.scaling)                            # d loss / d (dropout(x) A^T)
            del g
            grad_a.addmm_(gh.t(), _dropped(x_c, keep_c, keep_scale))
            if grad_x is not None:
                gx = gh @ A
                if keep_c is not None:
                    gx.mul_(keep_scale).mul_(keep_c)
                grad_x.view(-1, A.shape[1])[rows].add_(gx.to(x.dtype))  # the bits of autograd's base + lora grad
        return grad_x, None, None, grad_a, grad_b, None, None

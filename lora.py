"""LoRA adapters: the trainable part of LongQLoRA.

A frozen linear layer W (dense 16-bit, or NF4 via quant.Linear4bit) gets a low-rank update:

    y = W x + (alpha / r) * B A dropout(x)        A: (r, in) Kaiming-uniform, B: (out, r) zeros

so training starts exactly at the base model. A and B are fp32 whatever the base dtype (QLoRA keeps the
adapter in full precision; only the frozen base is 16-bit or 4-bit). LongQLoRA puts r=64, alpha=16,
dropout=0.05 on all seven decoder linears (q, k, v, o, gate, up, down); LongLoRA's "LoRA+" also trains the
embeddings and the norms (`train_embed_norm=True`).

Merging folds the update into the weight, W' = W + (alpha / r) * B @ A, computed in fp32 and cast back to
W's dtype (`merged_weight`, a pure function; `merge_lora_weights` applies it to a whole state dict). An
NF4-trained adapter is merged into the original 16-bit weights of the base checkpoint, never into the 4-bit
copy, and the export carries the RoPE scaling the adapter was trained with:

    python lora.py merge --base DIR --adapter ADAPTER --out MERGED [--rope-factor F]

Adapters are saved in PEFT's format (hf.py has the file layout), plus `longqlora.json` with the RoPE
scaling and context of training, which eval.py, generate.py and the merge read back.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from infra import cli
from infra import hf
from quant import Linear4bit
from infra.rope_scaling import describe_scaling, inference_scaling

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """base(x) + B((alpha / r) A(dropout(x))), the LoRA path in fp32 whatever the base computes in."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, shared_input=None):
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
        self.input = shared_input or SharedInput(dropout, readers=1)
        self.dropout = self.input.dropout        # a submodule, so model.train() / .eval() reach it
        self.train(base.training)   # a wrapped eval-mode model stays in eval mode (no dropout)

    def forward(self, x):
        keep, keep_scale = self.input.mask(x)
        if _frozen_linear(self.base_layer):
            return _LoRALinearFn.apply(x, keep, keep_scale, self.lora_A, self.lora_B, self.scaling, self.base_layer)
        y = self.base_layer(x)                                  # a trained or unknown base: autograd does it
        return _LoRAUpdate.apply(y.contiguous(), x, keep, keep_scale, self.lora_A, self.lora_B, self.scaling)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, input shared by {self.input.readers}"


class SharedInput:
    """The dropout mask of x, drawn once for the LoRA layers that read the same x (q, k, v; gate, up).

    The readers must be called in a row on the same tensor; the mask is let go after the last one. With
    dropout 0 there is no mask and the result is bit-identical to unshared inputs; with dropout the readers
    share one mask instead of drawing one each (PEFT draws one per layer). The dropped-out input itself is
    never stored: _LoRALinearFn rebuilds it chunk by chunk from x and the 1-byte mask.
    """

    def __init__(self, dropout: float, readers: int):
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.readers, self.x, self.value, self.reads = readers, None, None, 0

    def mask(self, x):
        """(keep, scale): the bool mask of x's kept elements and F.dropout's fp32 1 / (1 - p), or (None, None)
        without dropout (dropout 0 or eval mode). The same RNG draws as F.dropout(x.float(), p)."""
        if self.x is not x:
            self.x, self.value, self.reads = x, _draw_mask(x, self._p()), 0
        value, self.reads = self.value, self.reads + 1
        if self.reads == self.readers:
            self.x = self.value = None
        return value

    def _p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.dropout.training else 0.0


def _draw_mask(x, p: float):
    if p <= 0:
        return None, None
    # bernoulli_ draws the same values into a bool tensor as into F.dropout's fp32 noise (same RNG use), and
    # F.dropout's noise holds 1 / (1 - p) computed this way in fp32: the same mask and the same bits.
    keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)
    return keep, torch.ones((), dtype=torch.float32, device=x.device).div_(1 - p)


def _dropped(x, keep, scale):
    """dropout(x) in fp32 from its mask, with F.dropout's bits (x * noise, noise = scale where kept)."""
    out = x.float() if x.dtype != torch.float32 else x.clone()
    return out if keep is None else out.mul_(scale).mul_(keep)


# fp32 elements of the per-chunk temporaries of the LoRA path (4 MiB): small enough to stay in cache and to be
# reused by the allocator, where a (tokens x features) fp32 tensor is a fresh allocation the kernel maps in page
# by page on CPU, which cost more than the LoRA arithmetic itself.
LORA_CHUNK_ELEMENTS = 1 << 20


def _lora_rows(A, B) -> int:
    return max(1, LORA_CHUNK_ELEMENTS // max(A.shape[1], B.shape[0]))


def _lora_forward(y2, x2, keep2, keep_scale, A, B, scaling):
    """y2 += (s * dropout(x2) A^T) B^T cast to y2's dtype, chunk by chunk of rows (tokens); returns the fp32
    h = s * dropout(x2) A^T (tokens x r). The same arithmetic as y + F.linear(F.linear(dropout(x.float()), A) * s,
    B).to(y.dtype), without any (tokens x features) fp32 tensor."""
    rows = _lora_rows(A, B)
    h = torch.empty(x2.shape[0], A.shape[0], dtype=torch.float32, device=x2.device)
    for s in range(0, x2.shape[0], rows):
        e = min(s + rows, x2.shape[0])
        d = _dropped(x2[s:e], None if keep2 is None else keep2[s:e], keep_scale)
        torch.mm(d, A.t(), out=h[s:e]).mul_(scaling)
        del d
        y2[s:e].add_(torch.mm(h[s:e], B.t()).to(y2.dtype))
    return h


def _lora_backward(g2, x2, keep2, keep_scale, A, B, h, scaling, grad_x2, want_a, want_b):
    """Gradients of _lora_forward from y's gradient g2, chunk by chunk: (grad_A, grad_B) in fp32, and the input
    gradient added in place into grad_x2 (x's dtype; the base layer's gradient, or zeros) when it is given."""
    grad_a = torch.zeros(A.shape, dtype=torch.float32, device=A.device) if want_a else None
    grad_b = torch.zeros(B.shape, dtype=torch.float32, device=B.device) if want_b else None
    rows = _lora_rows(A, B)
    for s in range(0, x2.shape[0], rows):
        e = min(s + rows, x2.shape[0])
        g = g2[s:e].float()
        if want_b:
            grad_b.addmm_(g.t(), h[s:e])
        gh = (g @ B).mul_(scaling)                                    # d loss / d (dropout(x) A^T)
        del g
        chunk_keep = None if keep2 is None else keep2[s:e]
        if want_a:
            grad_a.addmm_(gh.t(), _dropped(x2[s:e], chunk_keep, keep_scale))
        if grad_x2 is not None:
            gx = gh @ A
            if chunk_keep is not None:
                gx.mul_(keep_scale).mul_(chunk_keep)
            grad_x2[s:e].add_(gx.to(grad_x2.dtype))        # the bits of autograd's base grad + lora grad
    return grad_a, grad_b


def _frozen_linear(base) -> bool:
    """Is `base` a linear layer whose forward and input gradient _LoRALinearFn computes itself?"""
    if isinstance(base, Linear4bit):
        return True
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    return type(base) is nn.Linear and frozen


def _base_forward(base, x):
    """base(x), for a frozen nn.Linear or a Linear4bit (which computes in its compute dtype, returns x's)."""
    if isinstance(base, Linear4bit):
        bias = None if base.bias is None else base.bias.to(base.compute_dtype)
        return F.linear(x.to(base.compute_dtype), base.dequantize(), bias).to(x.dtype)
    return F.linear(x, base.weight, base.bias)


def _base_input_grad(base, grad_y, x_dtype):
    """d loss / d x of _base_forward: grad_y @ W (a Linear4bit dequantizes W again, as its own backward does)."""
    if isinstance(base, Linear4bit):
        return (grad_y.to(base.compute_dtype) @ base.dequantize()).to(x_dtype)
    return grad_y @ base.weight


class _LoRALinearFn(torch.autograd.Function):
    """base(x) + (s * dropout(x) A^T) B^T for a frozen base, as one autograd node.

    Forward: the base's output, the LoRA update added into it in place chunk by chunk of tokens (_lora_forward).
    Backward: the base's input gradient, the LoRA input gradient added into it in place, and the LoRA weight
    gradients, chunk by chunk. Compared with autograd over base(x) + lora(x), no (tokens x features) fp32 tensor
    ever exists (the dropped-out input is rebuilt from x and the 1-byte mask, forward and backward; the product
    and the fp32 copy of y's gradient are chunks), and the two input gradients are never separate tensors to be
    summed. Saves x (for 16-bit x half the fp32 copy autograd would keep), the mask and h (tokens x r); the base
    saves nothing (a Linear4bit dequantizes again in backward, as its own backward does).
    """

    @staticmethod
    def forward(ctx, x, keep, keep_scale, A, B, scaling, base):
        y = _base_forward(base, x)
        x2 = x.reshape(-1, A.shape[1])
        keep2 = None if keep is None else keep.view(-1, A.shape[1])
        h = _lora_forward(y.view(-1, B.shape[0]), x2, keep2, keep_scale, A, B, scaling)
        ctx.save_for_backward(x, keep, keep_scale, A, B, h)
        ctx.scaling, ctx.base = scaling, base
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, keep, keep_scale, A, B, h = ctx.saved_tensors
        want_x = ctx.needs_input_grad[0]
        grad_x = _base_input_grad(ctx.base, grad_y, x.dtype).contiguous() if want_x else None
        grad_a, grad_b = _lora_backward(
            grad_y.reshape(-1, B.shape[0]), x.reshape(-1, A.shape[1]),
            None if keep is None else keep.view(-1, A.shape[1]), keep_scale, A, B, h, ctx.scaling,
            None if grad_x is None else grad_x.view(-1, A.shape[1]), ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        return grad_x, None, None, grad_a, grad_b, None, None


class _LoRAUpdate(torch.autograd.Function):
    """y += (s * dropout(x) A^T) B^T in place, for a base layer autograd differentiates itself (trained or of
    another type): the LoRA half of _LoRALinearFn, with the input gradient a tensor of its own."""

    @staticmethod
    def forward(ctx, y, x, keep, keep_scale, A, B, scaling):
        keep2 = None if keep is None else keep.view(-1, A.shape[1])
        h = _lora_forward(y.view(-1, B.shape[0]), x.reshape(-1, A.shape[1]), keep2, keep_scale, A, B, scaling)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, keep, keep_scale, A, B, h)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, keep, keep_scale, A, B, h = ctx.saved_tensors
        grad_x = torch.zeros(x.shape, dtype=x.dtype, device=x.device) if ctx.needs_input_grad[1] else None
        grad_a, grad_b = _lora_backward(
            grad_y.reshape(-1, B.shape[0]), x.reshape(-1, A.shape[1]),
            None if keep is None else keep.view(-1, A.shape[1]), keep_scale, A, B, h, ctx.scaling,
            None if grad_x is None else grad_x.view(-1, A.shape[1]), ctx.needs_input_grad[4], ctx.needs_input_grad[5])
        return grad_y, grad_x, None, None, grad_a, grad_b, None


# Decoder linears that read the same tensor: RMSNorm(h) feeds q, k, v; RMSNorm(a) feeds gate and up.
SAME_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit))


def _is_embed_or_norm(param_name: str) -> bool:
    module = param_name.rsplit(".", 2)[-2] if "." in param_name else ""
    return module == "embed_tokens" or module.endswith("norm")


def add_lora(model: nn.Module, r: int = 64, alpha: float = 16, dropout: float = 0.05,
             targets=DEFAULT_TARGETS, train_embed_norm: bool = False, share_inputs: bool = True) -> list[nn.Parameter]:
    """Wrap every linear whose attribute name is in `targets` with LoRALinear and freeze everything else.

    Returns the trainable parameters: all lora_A/lora_B, plus the embeddings and every norm weight when
    `train_embed_norm` (LongLoRA's LoRA+). share_inputs: siblings that read the same tensor (SAME_INPUT) share
    one dropped-out fp32 input (False: one each, as PEFT). The configuration is kept as `model.lora_config`.
    """
    targets = tuple(dict.fromkeys(targets))
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has LoRA adapters")
    if "lm_head" in targets:
        raise ValueError("lm_head is never a LoRA target (LongQLoRA adapts the decoder linears only)")
    parents = {}
    for _, parent in model.named_modules():
        names = [n for n, child in parent.named_children() if n in targets and _is_adaptable(child)]
        if names:
            parents[parent] = names
    missing = [t for t in targets if not any(t in names for names in parents.values())]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no linear layer of the model")
    model.requires_grad_(False)
    inputs = {}                   # (parent, name) -> the SharedInput of its group
    for parent, names in parents.items():
        groups = [[n for n in group if n in names] for group in SAME_INPUT] if share_inputs else []
        groups += [[n] for n in names if not any(n in g for g in groups)]
        for group in (g for g in groups if g):
            shared = SharedInput(dropout, readers=len(group))
            inputs.update({(parent, name): shared for name in group})
    # Target by target (every q_proj, then every k_proj, ...): the order the A matrices draw their random init.
    for (parent, name), shared in sorted(inputs.items(), key=lambda item: targets.index(item[0][1])):
        setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha, dropout, shared))
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
        raise ValueError("the model has no LoRA adapters (call add_lora or load_adapter first)")
    return {n: p for n, p in model.named_parameters()
            if n.endswith((".lora_A", ".lora_B")) or (config["train_embed_norm"] and _is_embed_or_norm(n))}


# --------------------------------------------------------------------------- saving and loading

def save_adapter(model: nn.Module, out_dir, base_model_name_or_path=None, training: dict | None = None) -> Path:
    """Write the adapter as a PEFT folder (PeftModel.from_pretrained loads it), atomically. training: how it
    was trained ({"rope_scaling", "ctx", ...}, saved as longqlora.json); default: what it was loaded with."""
    c = model.lora_config
    tensors = {k: p.detach() for k, p in adapter_parameters(model).items()}
    return hf.write_adapter(out_dir, c["r"], c["alpha"], c["dropout"], c["targets"], tensors,
                            base_model_name_or_path=base_model_name_or_path,
                            training=training if training is not None else c["training"])


def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Load a PEFT LoRA adapter (ours, PEFT's or LongLoRA's) into `model`, adding LoRA with the file's r, alpha
    and dropout when the model has none yet. Everything is checked before the model is touched. The adapter's
    training record (longqlora.json, or None) ends up in model.lora_config["training"]."""
    adapter_dir = Path(adapter_dir)
    config, lora, extra, training = hf.read_adapter(adapter_dir)
    config_file, weights_file = adapter_dir / hf.ADAPTER_CONFIG, adapter_dir / hf.ADAPTER_WEIGHTS
    r, alpha, targets = config["r"], config["lora_alpha"], tuple(sorted(set(config["target_modules"])))
    current = getattr(model, "lora_config", None)
    if current is not None:
        if current["r"] != r:
            raise ValueError(f"{config_file}: adapter has r={r} but the model's LoRA has r={current['r']}")
        if set(current["targets"]) != set(targets):
            raise ValueError(f"{config_file}: adapter targets {list(targets)} but the model's LoRA targets "
                             f"{sorted(current['targets'])}")
        modules = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    else:
        modules = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets and _is_adaptable(m)}
        lacking = sorted(set(targets) - {n.rsplit(".", 1)[-1] for n in modules})
        if lacking:
            raise ValueError(f"{config_file}: target modules {lacking} are not linear layers of this model")
    expected = {}
    for name, m in modules.items():
        expected[name + ".lora_A"], expected[name + ".lora_B"] = (r, m.in_features), (m.out_features, r)
    missing, unexpected = sorted(set(expected) - set(lora)), sorted(set(lora) - set(expected))
    if unexpected:
        raise ValueError(f"{weights_file}: {len(unexpected)} tensor(s) for modules this model lacks or the config "
                         f"does not target, e.g. {hf.peft_key(unexpected[0])}")
    if missing:
        raise ValueError(f"{weights_file}: {len(missing)} LoRA tensor(s) missing, e.g. {hf.peft_key(missing[0])}")
    for key, shape in expected.items():
        if tuple(lora[key].shape) != shape:
            raise ValueError(f"{weights_file}: {hf.peft_key(key)} has shape {tuple(lora[key].shape)}, the model "
                             f"needs {shape} (an adapter for a different model?)")
    params = dict(model.named_parameters())
    for key, t in extra.items():
        if not _is_embed_or_norm(key) or key not in params or t.shape != params[key].shape:
            raise ValueError(f"{adapter_dir}: trainable parameter {hf.hf_key(key)} {tuple(t.shape)} is not an "
                             "embedding or norm of this model")
    if current is None:
        add_lora(model, r=r, alpha=alpha, dropout=config.get("lora_dropout") or 0.0, targets=targets,
                 train_embed_norm=bool(extra))
        params = dict(model.named_parameters())
    model.lora_config.update(alpha=alpha, training=training)
    with torch.no_grad():
        for key, t in {**lora, **extra}.items():
            params[key].copy_(t)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.alpha, m.scaling = alpha, alpha / r
    return model


# --------------------------------------------------------------------------- merging

def merged_weight(w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, computed in fp32 and returned in W's dtype."""
    if (lora_b.shape[0], lora_a.shape[1]) != tuple(w.shape) or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"LoRA A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do not fit a weight of shape "
                         f"{tuple(w.shape)}")
    return (w.float() + scaling * (lora_b.float() @ lora_a.float())).to(w.dtype)


def lora_pairs(lora: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our key: tensor} of lora_A / lora_B -> {HF weight key the pair updates: (A, B)}."""
    pairs = {}
    for key in lora:
        module, which = key.rsplit(".", 1)
        other = module + (".lora_B" if which == "lora_A" else ".lora_A")
        if which not in ("lora_A", "lora_B") or other not in lora:
            raise ValueError(f"adapter tensor {key} has no matching {other.rsplit('.', 1)[-1]}")
        pairs[hf.hf_key(module + ".weight")] = (lora[module + ".lora_A"], lora[module + ".lora_B"])
    return pairs


def merge_lora_weights(base_state_dict: dict, lora: dict, scaling: float) -> dict:
    """Pure merge: base_state_dict with HF keys (`model.layers.0.self_attn.q_proj.weight`), lora with our keys
    (`layers.0.self_attn.q_proj.lora_A`). A new dict with the targeted weights merged, the rest as it was."""
    merged = dict(base_state_dict)
    for key, (a, b) in lora_pairs(lora).items():
        if key not in merged:
            raise ValueError(f"adapter targets {key}, which the base state dict lacks")
        merged[key] = merged_weight(merged[key], a, b, scaling)
    return merged


def merge_and_export(base_dir, adapter_dir, out_dir, rope_factor: float | None = None,
                     max_shard_bytes: int = 2 * 1024**3) -> tuple[Path, dict | None, str]:
    """Merge an adapter into the 16-bit weights of `base_dir` and write a full HF checkpoint to `out_dir`.
    Returns (out_dir, the RoPE scaling written into its config.json, where that scaling came from).

    Tensors are read, merged and written one at a time (peak memory: one shard plus one tensor). LoRA+
    embeddings/norms replace the base tensors. The RoPE scaling is the one eval.py would use (rope.py's
    inference_scaling): --rope-factor, else the adapter's recorded training scaling, else the base's; an
    adapter whose scaling is unknown needs rope_factor."""
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    config, lora, extra, training = hf.read_adapter(adapter_dir)
    base_config = hf.load_config(base_dir)
    if base_config.get("quantization_config"):
        raise ValueError(f"{base_dir / 'config.json'}: the base is quantised; merging needs the original 16-bit "
                         "weights")
    base_args = hf.read_config(base_dir)
    scaling, source = inference_scaling(rope_factor, base_args.rope_scaling, adapter_dir, training)
    base_args.rope_scaling = scaling
    out_config = {**base_config, **hf.config_json(base_args)}
    out_config.pop("rope_parameters", None)   # transformers 5 form; we write the portable top-level one
    files = hf.checkpoint_files(base_dir)
    pairs = lora_pairs(lora)
    replaced = {hf.hf_key(k): v for k, v in extra.items()}
    for key in [*pairs, *replaced]:
        if key not in files:
            raise ValueError(f"{adapter_dir}: adapter has weights for {key}, which {base_dir} lacks")
    scale = config["lora_alpha"] / config["r"]

    def tensors():
        for name, t, file in hf.read_tensors(files):
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name in replaced:
                if replaced[name].shape != t.shape:
                    raise ValueError(f"{adapter_dir}: {name} has shape {tuple(replaced[name].shape)}, "
                                     f"{file} has {tuple(t.shape)}")
                t = replaced[name].to(t.dtype)
            if name in pairs:
                try:
                    t = merged_weight(t, *pairs[name], scale)
                except ValueError as e:
                    raise ValueError(f"{adapter_dir / hf.ADAPTER_WEIGHTS}: {name}: {e} (an adapter for a "
                                     "different model?)") from None
            yield name, t

    out = hf.save_checkpoint(tensors(), out_config, out_dir, max_shard_bytes, copy_from=base_dir)
    return out, scaling, source


def main(argv=None) -> None:
    p = cli.one_line_errors(argparse.ArgumentParser(prog="lora.py", description="LoRA adapter tools"))
    sub = p.add_subparsers(dest="command", required=True)
    m = cli.one_line_errors(sub.add_parser(
        "merge", help="merge an adapter into its 16-bit base and write a dense HF checkpoint",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    m.add_argument("--base", required=True, help="HF LLaMA folder the adapter was trained on (16-bit weights)")
    m.add_argument("--adapter", required=True, help="PEFT LoRA adapter folder")
    m.add_argument("--out", required=True, help="output folder (replaced atomically)")
    m.add_argument("--rope-factor", type=float, default=None,
                   help="linear PI factor written into config.json; default: the adapter's longqlora.json, "
                        "else the base config's")
    args = p.parse_args(argv)
    if args.rope_factor is not None:
        cli.check_range("--rope-factor", args.rope_factor, 1)
    out, scaling, source = merge_and_export(args.base, args.adapter, args.out, args.rope_factor)
    print(f"wrote {out}: {args.adapter} merged into {args.base}; rope_scaling {hf.hf_rope_scaling(scaling)} "
          f"(RoPE factor {describe_scaling(scaling)}, from {source})")


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

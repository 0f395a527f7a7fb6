"""How much device memory one LongQLoRA training step needs, predicted from the shapes alone (`--dry-run`).

    peak = weights (NF4 decoder linears, 16-bit embedding, head and norms)
         + trainable state (LoRA: fp32 weight + grad + 2 AdamW moments = 16 bytes per parameter)
         + checkpointed hidden states: layers x tokens x dim x 2 bytes, each layer's input (host with offload)
         + max(one layer's recompute and backward, the loss phase)              (never alive together)

A step as train.py runs it: every decoder layer checkpointed, SDPA with a fused kernel (no T x T scores),
lm_head + cross-entropy in chunks of tokens, base + LoRA of each linear as one node (lora._LoRALinearFn: saves
the 16-bit input, a 1-byte dropout mask and the r-wide h; fp32 only chunk by chunk). What the two phases hold was counted tensor by
tensor at LLaMA-2-7B width (bench/width_memory.py --track: every tensor made and freed, by the module that
made it) and is modelled per token (b = bytes of the compute dtype, d = dim, q = heads x head_dim, I =
intermediate, r = rank, H = heads, m = 1 byte of dropout mask when dropout > 0, f = 1 + ratio / 4 for S²-Attn's
segment shift, whose shifted half pads its last group, else 1; k = 1.5 copies of q, k and v kept by S²-Attn,
1 by full attention, see recompute_per_token):

  kept through the layer's whole backward (per token of the micro-batch)
    grad_in       b d              the gradient arriving at the layer's output (held for the residual)
    input_copy    b d              offload only: the device copy of the layer's input the recompute makes
    rope          2 b head_dim     the cos / sin tables, made once per step
    attention     3 k b q + f (b q + 4 H)   SDPA's saved q, k, v (kv heads repeated): RoPE's outputs, whole,
                                   kept by the unshifted half's views, + the shifted half's padded copies; its
                                   outputs and fp32 log-sum-exp
    attn_inputs   (b + m)(d + q) + 4 x 4r
                                   the 16-bit input q/k/v share and o's input, their masks, the r-wide h of q,
                                   k, v, o (full fine-tuning: the inputs only, for the weight gradients)
    norm2_input   b d              the second RMSNorm's input (the first one's is the checkpoint)
    mlp_input     b d + m d + 2 x 4r   gate/up's shared input, its mask, their h (tiles: the input for all
                                   tokens, kept by the tiles' checkpoints; mask and h per tile)
  the MLP of the layer (per token, or per tile token with --mlp-chunk C), at its widest moment:
    mlp           5 b I            model._SwiGLU's backward: g and u (all it saves), the gradient of silu(g) * u,
                                   dy * u and grad_g (then grad_u)
    down_lora_backward  4 b I + m I + 4r + 2 fp32 chunks of LoRA's temporaries (8 MiB)
                                   the same once W is freed, while LoRA's part is added chunk by chunk
    mlp_dequant   4 b I + m I + one dequantised weight (I x d x b)   down's backward (lora._LoRALinearFn):
                                   g, u, down's input and mask, and its input gradient grad_out @ W (LoRA's
                                   part is added into it in place)
  other moments (per token)
    norm_backward 16 d + b d       the second RMSNorm's backward: four fp32 (tokens x d) temporaries and the
                                   gradient of its output, with everything of the attention half still kept
    tile_grads    (n - C) b d      tiles: the gradients of the tiles' inputs, joined only after the last tile
                                   (then 2 b d while they are joined)
    attn_backward 4 f b q + b q    SDPA's backward: dq, dk, dv and the gradient of its output in groups, the
                                   output's gradient before, with the attention half kept
  the loss phase (chunk c = --loss-chunk tokens, vocab V)
    per token     2 b d + 4 d + 12 + rope   the last layer's output (the final norm keeps it), the normed
                                   hidden states, the fp32 gradient the chunked loss keeps for backward, nll /
                                   targets; backward: + 4 d + b d (its scaled copy and 16-bit cast)
    per chunk     c V (4 + b) + c d b   the chunk's fp32 logits buffer and its 16-bit twin, (c x d) products
  The final RMSNorm's backward (16 d fp32 temporaries + 2 b d) is counted with the loss phase.

The checkpoints of layers already back-propagated are freed, so the layer peak is at the last layer. The
fixed parts for LLaMA-2-7B equal REFERENCE §7's first-principles table; bench/width_memory.py measures the
per-token parts at 7B width on CPU (within 10%), bench/gpu_check.py the whole on a GPU.

One rank of N (--world-size N): data parallel keeps everything above on every rank. --fsdp (infra/fsdp.py) keeps
1/N of the weights and of the LoRA weight + grad + moments, and adds what FSDP2 all-gathers: the decoder layer
being computed and the one prefetched (its NF4 bytes, norms and fp32 LoRA, + their unsharded fp32 LoRA gradients
and the reduce-scatter's copy of them in backward), and the root unit (embeddings, final norm, head), which
stays whole from its forward to the end of the backward. The activations are each rank's own, unsharded.
"""
from __future__ import annotations

import re

from infra import demo
from infra import hf
from model import ModelArgs

from lora import LORA_CHUNK_ELEMENTS    # fp32 elements of each per-chunk temporary of LoRA's backward

# Architectures a dry run uses when there is no --model (LLaMA-2 7B / 13B config.json values).
PRESET_ARCHS = {"llama2-7b-8k": "llama2-7b", "llama2-7b-12k": "llama2-7b", "vicuna-13b-sft-8k": "llama2-13b",
                "llama2-70b-8k": "llama2-70b", "llama2-70b-32k": "llama2-70b"}
ARCHS = {
    "llama2-7b": dict(vocab_size=32000, dim=4096, intermediate_size=11008, n_layers=32, n_heads=32,
                      norm_eps=1e-5, max_position_embeddings=4096),
    "llama2-13b": dict(vocab_size=32000, dim=5120, intermediate_size=13824, n_layers=40, n_heads=40,
                       norm_eps=1e-5, max_position_embeddings=4096),
    "llama2-70b": dict(vocab_size=32000, dim=8192, intermediate_size=28672, n_layers=80, n_heads=64, n_kv_heads=8,
                       norm_eps=1e-5, max_position_embeddings=4096),
}


def linear_shapes(a: ModelArgs) -> dict:
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return {"q_proj": (a.dim, q), "k_proj": (a.dim, kv), "v_proj": (a.dim, kv), "o_proj": (q, a.dim),
            "gate_proj": (a.dim, a.intermediate_size), "up_proj": (a.dim, a.intermediate_size),
            "down_proj": (a.intermediate_size, a.dim)}


def recompute_per_token(a: ModelArgs, b: int, lora_r: int, dropout: bool, full_finetune: bool = False,
                        share_inputs: bool = True, attn: str = "s2", group_size_ratio: float = 0.25,
                        s2_shift: str = "segment", offload: bool = False) -> dict:
    """Bytes per token of what one layer's recompute and backward hold (the module docstring's table)."""
    d, q, inter, hd = a.dim, a.n_heads * a.head_dim, a.intermediate_size, a.head_dim
    m = 0 if full_finetune or not dropout else 1
    r4 = 0 if full_finetune else 4 * lora_r
    masks_qkv = m * d * (3 if not share_inputs else 1)           # unshared: each of q, k, v draws its own mask
    masks_gu = m * d * (2 if not share_inputs else 1)
    # f: tokens SDPA's outputs cover per token: the segment shift runs the shifted half on [0, g/2) and then groups
    # of g from g/2 on, the last one padded (T + g/2 tokens for half of the heads). kept_qkv: copies of q (k, v)
    # SDPA's saved inputs keep: RoPE's whole outputs (views of them, for the unshifted half) + the shifted
    # half's padded (segment) or rolled (roll) copy of its half of the heads; one group over everything: none.
    grouped = attn == "s2" and not (s2_shift == "segment" and group_size_ratio >= 1)
    f = 1 + group_size_ratio / 4 if grouped and s2_shift == "segment" else 1.0
    kept_qkv = 1.5 if grouped and s2_shift != "none" else 1.0
    return {
        "grad_in": b * d, "input_copy": b * d if offload else 0, "rope": 2 * b * hd,
        "attention": round(3 * kept_qkv * b * q + f * (b * q + 4 * a.n_heads)),
        "attn_inputs": b * (d + q) + masks_qkv + m * q + 4 * r4,
        "norm2_input": b * d,
        "mlp_input": b * d, "mlp_input_per_tile": masks_gu + 2 * r4,
        "mlp": 5 * b * inter, "down_lora_backward": 4 * b * inter + m * inter + r4,
        "mlp_dequant": 4 * b * inter + m * inter,
        "norm_backward": 16 * d + b * d,
        "tile_grads": b * d,
        "attn_backward": round(4 * f * b * q) + b * q,
    }


def layer_bytes(per_token: dict, n: int, mlp_chunk: int, dequant: int, lora_chunk: int = 0) -> dict:
    """One layer's recompute + backward at each of its widest moments (bytes), from recompute_per_token;
    dequant: one dequantised NF4 weight, lora_chunk: LoRA's per-chunk fp32 temporaries (constants)."""
    t = per_token
    kept = t["grad_in"] + t["input_copy"] + t["rope"] + t["attention"] + t["attn_inputs"]
    tiled = 0 < mlp_chunk < n
    c = mlp_chunk if tiled else n                                  # tokens of the MLP at a time
    mlp_kept = n * (kept + t["norm2_input"] + t["mlp_input"]) + c * t["mlp_input_per_tile"]
    waiting = (n - c) * t["tile_grads"]                            # tiles' input gradients not yet joined
    moments = {
        "mlp_backward": mlp_kept + waiting + c * t["mlp"],
        "down_lora_backward": mlp_kept + waiting + c * t["down_lora_backward"] + lora_chunk,
        "mlp_dequant": mlp_kept + waiting + c * t["mlp_dequant"] + dequant,
        "norm_backward": n * (kept + t["norm2_input"] + t["norm_backward"]),
        "attn_backward": n * (kept + t["attn_backward"]),
    }
    if tiled:
        moments["tile_grads_joined"] = mlp_kept - c * t["mlp_input_per_tile"] + 2 * n * t["tile_grads"]
    return moments


def loss_bytes(a: ModelArgs, n: int, b: int, loss_chunk: int, full_finetune: bool) -> dict:
    """The loss phase at its widest moments (bytes): chunked lm_head + cross-entropy, then the final norm."""
    d, v, c = a.dim, a.vocab_size, min(loss_chunk, n)
    rope = 2 * b * a.head_dim
    chunk = c * v * (4 + b) + c * d * b                            # fp32 logits buffer, 16-bit twin, (c x d) product
    if full_finetune:   # trained head: forward keeps h and the lse; backward makes dW in fp32 and recomputes logits
        forward = n * (2 * b * d + 4 + 8 + rope) + chunk
        backward = n * (2 * b * d + b * d + rope) + d * v * 4 + c * v * (4 + b) + c * d * 4
    else:               # frozen head: forward keeps d(nll)/dh in fp32; backward scales it and casts it
        forward = n * (2 * b * d + 4 * d + 12 + rope) + chunk
        backward = n * (b * d + 4 * d + 4 * d + b * d + rope)
    final_norm = n * (b * d + b * d + 16 * d + rope)                # its input, its output's gradient, fp32 temps
    return {"loss_forward": forward, "loss_backward": backward, "final_norm_backward": final_norm}


def predict_peak_memory(args_model: ModelArgs, ctx: int, batch_size: int = 1, lora_r: int = 64, *,
                        quant: str = "nf4", dtype_bytes: int = 2, lora_dropout: float = 0.05,
                        loss_chunk: int = 1024, train_embed_norm: bool = False, full_finetune: bool = False,
                        mlp_chunk: int = 0, offload: bool = False, share_inputs: bool = True, attn: str = "s2",
                        group_size_ratio: float = 0.25, s2_shift: str = "segment", world_size: int = 1,
                        fsdp: bool = False) -> dict:
    """Predicted peak device memory (bytes) of one training step on one rank, by part (the module docstring)."""
    a, b = args_model, dtype_bytes
    n = batch_size * ctx                                     # tokens in one micro-batch
    shapes = linear_shapes(a)
    linear_params = a.n_layers * sum(i * o for i, o in shapes.values())
    if quant == "nf4":
        # packed 4-bit codes + one uint8 absmax per 64 values + one fp32 absmax per 256 of those (double
        # quantisation) + per-layer code books (16 + 256 fp32) and offset.
        base = linear_params // 2 + linear_params // 64 + 4 * (linear_params // (64 * 256)) \
            + 7 * a.n_layers * (16 + 256 + 1) * 4
    else:
        base = linear_params * b
    embed = a.vocab_size * a.dim * b * (1 if a.tie_word_embeddings else 2)
    norms = (2 * a.n_layers + 1) * a.dim * b
    lora_params = 0 if full_finetune else a.n_layers * sum(lora_r * (i + o) for i, o in shapes.values())
    trainable = lora_params * 16
    if train_embed_norm and not full_finetune:               # LoRA+: 16-bit embedding/norms, grads, fp32 moments
        trainable += (a.vocab_size * a.dim + (2 * a.n_layers + 1) * a.dim) * (b + 8)
    if full_finetune:                                        # every weight: 16-bit grad + two fp32 moments
        trainable = (linear_params + embed // b + norms // b) * (b + 8)
    checkpoints = a.n_layers * n * a.dim * b                 # each layer's input (the last layer's output and the
    #                                                          loss's tensors are counted in the loss phase)
    per_token = recompute_per_token(a, b, lora_r, lora_dropout > 0, full_finetune, share_inputs, attn,
                                    group_size_ratio, s2_shift, offload)
    dequant = max(i * o for i, o in shapes.values()) * b if quant == "nf4" else 0   # one weight rebuilt at a time
    lora_chunk = 0 if full_finetune else 2 * 4 * LORA_CHUNK_ELEMENTS     # two fp32 chunks in LoRA's backward
    layer_moments = layer_bytes(per_token, n, mlp_chunk, dequant, lora_chunk)
    loss_moments = loss_bytes(a, n, b, loss_chunk, full_finetune)
    layer, loss = max(layer_moments.values()), max(loss_moments.values())
    parts = {"nf4_weights" if quant == "nf4" else "dense_weights": base, "embed_and_head": embed, "norms": norms,
             "trainable_grads_and_adam" if full_finetune else "lora_weights_grads_adam": trainable}
    if fsdp and world_size > 1:          # (one process: train.py runs it unsharded)
        parts = {k: -(-v // world_size) for k, v in parts.items()}              # each rank's shard
        lora_bytes = 4 * lora_params // a.n_layers
        unit = (base + norms - a.dim * b) // a.n_layers + lora_bytes             # one decoder layer, whole
        root = embed + a.dim * b
        parts["fsdp_gathered_units"] = 2 * (unit + 2 * lora_bytes) + root - parts["embed_and_head"]
    parts.update(checkpointed_hidden_states=0 if offload else checkpoints, layer_recompute=layer, loss_chunk=loss)
    parts["peak_bytes"] = sum(parts.values()) - layer - loss + max(layer, loss)
    parts.update(host_checkpoints=checkpoints if offload else 0, layer_recompute_per_token=per_token,
                 layer_moments=layer_moments, loss_moments=loss_moments,
                 layer_peak_moment=max(layer_moments, key=layer_moments.get),
                 loss_peak_moment=max(loss_moments, key=loss_moments.get),
                 lora_params=lora_params, linear_params=linear_params, world_size=world_size, fsdp=fsdp)
    return parts


def largest_ctx(model_args: ModelArgs, budget: int, step: int = 256, **options) -> int:
    """The longest ctx (a multiple of `step`) whose predicted peak fits `budget` bytes; 0 if none does."""
    fits = lambda ctx: predict_peak_memory(model_args, ctx, **options)["peak_bytes"] <= budget   # noqa: E731
    low, high = 0, step
    while fits(high) and high < 1 << 24:          # the peak grows with ctx: double, then bisect
        low, high = high, 2 * high
    while high - low > step:
        mid = (low + high) // 2 // step * step
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def parse_bytes(text: str) -> int:
    """'32GB' -> 32e9, '24GiB' -> 24 * 2**30, '900MB', or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m or not m.group(1).replace(".", "", 1).isdigit():
        raise ValueError(f"--budget {text!r}: expected a size such as 32GB, 24GiB or 900MB")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def options(args, dtype_bytes: int) -> dict:
    """predict_peak_memory's settings (all but the model and ctx) from train.py's flags."""
    return dict(batch_size=args.batch_size, lora_r=args.lora_r, quant=args.quant, dtype_bytes=dtype_bytes,
                lora_dropout=args.lora_dropout, loss_chunk=args.loss_chunk, train_embed_norm=args.train_embed_norm,
                full_finetune=args.full_finetune, mlp_chunk=args.mlp_chunk, offload=args.offload_activations,
                attn=args.attn, group_size_ratio=args.group_size_ratio, s2_shift=args.s2_shift,
                share_inputs=args.lora_dropout_masks == "shared", world_size=args.world_size or 1, fsdp=args.fsdp)


def dry_run(args) -> dict:
    """Print the prediction for train.py's flags, part by part, ending with `peak_bytes=<int>`."""
    if args.model is not None:
        model_args, name = hf.read_config(args.model), args.model
    elif args.preset is not None:
        name = PRESET_ARCHS[args.preset]
        model_args = ModelArgs(**ARCHS[name])
    else:
        model_args, name = demo.model_args(args.ctx), "demo"
    b = 4 if args.dtype == "fp32" else 2       # auto: the GPU's bf16 or fp16 (on a CPU a run computes in fp32)
    compute = f"{args.dtype} compute" if args.dtype != "auto" else \
        "bf16/fp16 compute (--dtype auto on a GPU; a CPU run computes in fp32, predicted with --dtype fp32)"
    p = predict_peak_memory(model_args, args.ctx, **options(args, b))
    gb = lambda x: f"{x / 1e9:8.2f} GB"                            # noqa: E731  (decimal GB, as REFERENCE §7)
    base = "NF4" if args.quant == "nf4" else "dense"
    print(f"predicted peak device memory of one training step: {name}, ctx {args.ctx}, micro-batch "
          f"{args.batch_size}, {base} base, {'full fine-tuning' if args.full_finetune else f'LoRA r={args.lora_r}'}, "
          f"{compute}, {args.attn} attention (fused SDPA), loss chunk {args.loss_chunk}, MLP tiles "
          f"{args.mlp_chunk or 'off'}, checkpoints {'offloaded to the host' if args.offload_activations else 'on device'}"
          + (f"; one rank of {p['world_size']}, " + ("the weights and the LoRA states sharded (--fsdp)" if args.fsdp
             else "each holding everything (data parallel)") if p["world_size"] > 1 else ""))
    rows = [(f"{base} decoder weights ({p['linear_params'] / 1e9:.2f}B params)", p[f"{base.lower()}_weights"]),
            (f"{8 * b}-bit embedding + lm_head", p["embed_and_head"]), ("norms", p["norms"]),
            ("every weight: 16-bit grad + 2 fp32 AdamW moments", p["trainable_grads_and_adam"]) if args.full_finetune
            else (f"LoRA {p['lora_params'] / 1e6:.0f}M params: fp32 weight + grad + 2 AdamW moments"
                  + (" (+ embeddings, norms)" if args.train_embed_norm else ""), p["lora_weights_grads_adam"]),
            *([("FSDP all-gathers: the layer computed, the one prefetched, the root", p["fsdp_gathered_units"])]
              if "fsdp_gathered_units" in p else []),
            (f"checkpointed hidden states (the input of each of {model_args.n_layers} layers)",
             p["checkpointed_hidden_states"]),
            (f"one layer's recompute + backward (widest: {p['layer_peak_moment'].replace('_', ' ')})",
             p["layer_recompute"]),
            (f"loss phase, not alive with the recompute (widest: {p['loss_peak_moment'].replace('_', ' ')})",
             p["loss_chunk"])]
    rows.append(f"  (recompute, bytes per token: "
                f"{', '.join(f'{k} {v}' for k, v in p['layer_recompute_per_token'].items())})")
    if args.offload_activations:
        rows.append(("host (pinned) memory for the offloaded checkpoints", p["host_checkpoints"]))
    for row in rows + [("peak", p["peak_bytes"])]:
        print(row if isinstance(row, str) else f"  {row[0]:<72}{gb(row[1])}")
    if args.budget is not None:
        budget = parse_bytes(args.budget)
        p["largest_ctx"] = largest_ctx(model_args, budget, **options(args, b))
        print(f"largest ctx that fits {budget / 1e9:.1f} GB with these settings: {p['largest_ctx']} tokens")
    print(f"peak_bytes={p['peak_bytes']}")
    return p

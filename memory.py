"""How much device memory one LongQLoRA training step needs, predicted from the shapes alone (`--dry-run`).

    peak = weights (NF4 decoder linears, 16-bit embedding, head and norms)
         + trainable state (LoRA: fp32 weight + grad + 2 AdamW moments = 16 bytes per parameter)
         + checkpointed hidden states: (layers + 2) x tokens x dim x 2 bytes      (on the host with offload)
         + max(one layer's recompute and backward, one loss chunk)               (never alive together)

A step as train.py runs it on CUDA: every decoder layer checkpointed, SDPA with a fused kernel (no T x T
scores), lm_head + cross-entropy in chunks of tokens. The recompute of a layer is counted per token from what
autograd keeps (b = bytes of the compute dtype, d = dim, q = heads x head_dim, I = intermediate, r = rank):

    norms       b d                  the second RMSNorm's input (model._RMSNorm keeps its input, and the first
                                     one's is the checkpointed layer input)
    lora        (4 + m) x (d + q + d + I) + 7 x 4r
                                     one fp32 dropped-out input (+ a 1-byte mask m when dropout > 0) for q/k/v
                                     together, o, gate/up together and down (5d + q + 2d + I unshared), and the
                                     r-wide fp32 input of every B
    attention   4 x b q + 4 H        q, k, v as SDPA reads them (kv heads repeated for GQA) and its output, and
                                     the fp32 log-sum-exp per head
    mlp         3 x b I              gate output, silu(gate) and up output
    backward    2 b d + 3 b I + 4 I  gradients at the MLP, the layer's widest point, incl. down's fp32 LoRA input
--mlp-chunk C: the I-wide terms (mlp, down's LoRA input, backward) exist for C tokens at a time, and the tiles
keep the MLP's b d input. The fixed parts for LLaMA-2-7B equal REFERENCE §7's first-principles table;
bench/width_memory.py checks the recompute terms at 7B width on CPU, bench/gpu_check.py the whole on a GPU.
"""
from __future__ import annotations

import re

import demo
import hf
from model import ModelArgs

# Architectures a dry run uses when there is no --model (LLaMA-2 7B / 13B config.json values).
PRESET_ARCHS = {"llama2-7b-8k": "llama2-7b", "llama2-7b-12k": "llama2-7b", "vicuna-13b-sft-8k": "llama2-13b"}
ARCHS = {
    "llama2-7b": dict(vocab_size=32000, dim=4096, intermediate_size=11008, n_layers=32, n_heads=32,
                      norm_eps=1e-5, max_position_embeddings=4096),
    "llama2-13b": dict(vocab_size=32000, dim=5120, intermediate_size=13824, n_layers=40, n_heads=40,
                       norm_eps=1e-5, max_position_embeddings=4096),
}


def linear_shapes(a: ModelArgs) -> dict:
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return {"q_proj": (a.dim, q), "k_proj": (a.dim, kv), "v_proj": (a.dim, kv), "o_proj": (q, a.dim),
            "gate_proj": (a.dim, a.intermediate_size), "up_proj": (a.dim, a.intermediate_size),
            "down_proj": (a.intermediate_size, a.dim)}


def recompute_per_token(a: ModelArgs, b: int, lora_r: int, dropout: bool, full_finetune: bool = False,
                        share_inputs: bool = True) -> dict:
    """Bytes per token of one layer's recompute (the table in the module docstring), I-wide and the rest."""
    d, q, inter, m = a.dim, a.n_heads * a.head_dim, a.intermediate_size, int(dropout)
    if full_finetune:   # no LoRA: each linear keeps its 16-bit input for the weight gradient (shared reads once)
        lora_narrow, lora_wide = (2 * d + q) * b, inter * b
    else:
        lora_narrow = (4 + m) * ((2 * d if share_inputs else 5 * d) + q) + 7 * 4 * lora_r
        lora_wide = (4 + m) * inter
    return {"norms": b * d, "lora": lora_narrow, "attention": 4 * b * q + 4 * a.n_heads,
            "backward_narrow": 2 * b * d, "mlp_wide": 3 * b * inter + lora_wide,
            "backward_wide": 3 * b * inter + (0 if full_finetune else 4 * inter)}


def predict_peak_memory(args_model: ModelArgs, ctx: int, batch_size: int = 1, lora_r: int = 64, *,
                        quant: str = "nf4", dtype_bytes: int = 2, lora_dropout: float = 0.05,
                        loss_chunk: int = 1024, train_embed_norm: bool = False, full_finetune: bool = False,
                        mlp_chunk: int = 0, offload: bool = False, share_inputs: bool = True) -> dict:
    """Predicted peak device memory (bytes) of one training step, by part (see the module docstring)."""
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
    # each layer's input, the last layer's output (kept for the final norm) and the normed hidden states the
    # chunked loss saves
    checkpoints = (a.n_layers + 2) * n * a.dim * b
    per_token = recompute_per_token(a, b, lora_r, lora_dropout > 0, full_finetune, share_inputs)
    wide = per_token["mlp_wide"] + per_token["backward_wide"]
    narrow = sum(v for k, v in per_token.items() if not k.endswith("wide"))
    tiled = 0 < mlp_chunk < n
    dequant = max(i * o for i, o in shapes.values()) * b if quant == "nf4" else 0   # one weight rebuilt at a time
    layer = n * narrow + (mlp_chunk * wide + n * a.dim * b if tiled else n * wide) + dequant
    # loss chunk: 16-bit logits, their fp32 copy and softmax, fp32 dlogits and their 16-bit cast; the fp32
    # nll and lse per token; the 16-bit grad of the hidden states
    c = min(loss_chunk, n)
    loss = c * a.vocab_size * (b + 4 + 4 + 4 + b) + n * (8 + a.dim * b)
    parts = {"nf4_weights" if quant == "nf4" else "dense_weights": base, "embed_and_head": embed, "norms": norms,
             "trainable_grads_and_adam" if full_finetune else "lora_weights_grads_adam": trainable,
             "checkpointed_hidden_states": 0 if offload else checkpoints, "layer_recompute": layer,
             "loss_chunk": loss}
    parts["peak_bytes"] = sum(parts.values()) - layer - loss + max(layer, loss)
    parts.update(host_checkpoints=checkpoints if offload else 0, layer_recompute_per_token=per_token,
                 lora_params=lora_params, linear_params=linear_params)
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


def dry_run(args) -> dict:
    """Print the prediction for train.py's flags, part by part, ending with `peak_bytes=<int>`."""
    if args.model is not None:
        model_args, name = hf.read_config(args.model), args.model
    elif args.preset is not None:
        name = PRESET_ARCHS[args.preset]
        model_args = ModelArgs(**ARCHS[name])
    else:
        model_args, name = demo.model_args(args.ctx), "demo"
    b = 4 if args.dtype == "fp32" else 2
    options = dict(batch_size=args.batch_size, lora_r=args.lora_r, quant=args.quant, dtype_bytes=b,
                   lora_dropout=args.lora_dropout, loss_chunk=args.loss_chunk, train_embed_norm=args.train_embed_norm,
                   full_finetune=args.full_finetune, mlp_chunk=args.mlp_chunk, offload=args.offload_activations)
    p = predict_peak_memory(model_args, args.ctx, **options)
    gb = lambda x: f"{x / 1e9:8.2f} GB"                            # noqa: E731  (decimal GB, as REFERENCE §7)
    method = "full fine-tuning" if args.full_finetune else f"LoRA r={args.lora_r}"
    print(f"predicted peak device memory of one training step: {name}, ctx {args.ctx}, micro-batch "
          f"{args.batch_size}, {'NF4' if args.quant == 'nf4' else 'dense'} base, {method}, {8 * b}-bit compute, "
          f"{args.attn} attention (fused SDPA), loss chunk {args.loss_chunk}, MLP tiles "
          f"{args.mlp_chunk or 'off'}, checkpoints {'offloaded to the host' if args.offload_activations else 'on device'}")
    weights = next(k for k in p if k.endswith("_weights"))
    trainable = next(k for k in p if k.startswith(("lora_", "trainable_")))
    rows = [(f"{'NF4' if args.quant == 'nf4' else 'dense'} decoder weights ({p['linear_params'] / 1e9:.2f}B params)",
             p[weights]), ("16-bit embedding + lm_head", p["embed_and_head"]), ("norms", p["norms"]),
            ("every weight: 16-bit grad + 2 fp32 AdamW moments" if args.full_finetune else
             f"LoRA {p['lora_params'] / 1e6:.0f}M params: fp32 weight + grad + 2 AdamW moments"
             + (" (+ embeddings, norms)" if args.train_embed_norm else ""), p[trainable]),
            (f"checkpointed hidden states ({model_args.n_layers} layers + 2)", p["checkpointed_hidden_states"]),
            ("one layer's recompute + backward working set", p["layer_recompute"]),
            ("loss chunk (not alive at the same time as the recompute)", p["loss_chunk"])]
    for label, value in rows:
        print(f"  {label:<72}{gb(value)}")
    print(f"  (recompute, bytes per token: {', '.join(f'{k} {v}' for k, v in p['layer_recompute_per_token'].items())})")
    if args.offload_activations:
        print(f"  {'host (pinned) memory for the offloaded checkpoints':<72}{gb(p['host_checkpoints'])}")
    print(f"  {'peak':<72}{gb(p['peak_bytes'])}")
    if args.budget is not None:
        budget = parse_bytes(args.budget)
        p["largest_ctx"] = largest_ctx(model_args, budget, **options)
        print(f"largest ctx that fits {budget / 1e9:.1f} GB with these settings: {p['largest_ctx']} tokens")
    print(f"peak_bytes={p['peak_bytes']}")
    return p

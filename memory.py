"""How much device memory one LongQLoRA training step needs, predicted from the shapes alone (`--dry-run`).

    peak = NF4 weights + 16-bit embedding and head + LoRA weights, grads and AdamW moments (fp32)
         + checkpointed hidden states (one per layer) + max(one layer's recompute, one loss chunk)

Each term is counted from what lives on the device at the peak of a step as train.py runs it on CUDA:
every decoder layer checkpointed, SDPA with a fused kernel (no T x T scores), the lm_head + cross-entropy
in chunks of tokens. For LLaMA-2-7B the fixed parts equal REFERENCE §7's first-principles table; the
prediction is checked against measured steps by bench/ctx_memory.py (CPU) and bench/gpu_check.py (CUDA).
"""
from __future__ import annotations

import demo
import hf
from model import ModelArgs

# Architectures a dry run uses when there is no --model (LLaMA-2 7B / 13B config.json values).
PRESET_ARCHS = {
    "llama2-7b-8k": "llama2-7b", "llama2-7b-12k": "llama2-7b", "vicuna-13b-sft-8k": "llama2-13b",
}
ARCHS = {
    "llama2-7b": dict(vocab_size=32000, dim=4096, intermediate_size=11008, n_layers=32, n_heads=32,
                      norm_eps=1e-5, max_position_embeddings=4096),
    "llama2-13b": dict(vocab_size=32000, dim=5120, intermediate_size=13824, n_layers=40, n_heads=40,
                       norm_eps=1e-5, max_position_embeddings=4096),
}


def predict_peak_memory(args_model: ModelArgs, ctx: int, batch_size: int = 1, lora_r: int = 64, *,
                        quant: str = "nf4", dtype_bytes: int = 2, lora_dropout: float = 0.05,
                        loss_chunk: int = 1024, train_embed_norm: bool = False,
                        full_finetune: bool = False) -> dict:
    """Predicted peak device memory (bytes) of one LongQLoRA training step, by part.

    Assumes what train.py does on CUDA: NF4 base (or dense with quant="none"), LoRA on the seven decoder
    linears with fp32 weights/grads/AdamW moments, every decoder layer checkpointed, SDPA with a fused
    (flash / memory-efficient) kernel so no (T x T) scores exist, chunked lm_head + cross-entropy.
    full_finetune: no LoRA; every (dense) weight gets a 16-bit grad and two fp32 moments (PagedAdamW32bit).
    Peak = what lives the whole step + the checkpointed layer inputs + the larger of (a) one layer's
    recompute and backward working set and (b) the loss chunk's working set (they never overlap).
    Not counted: the CUDA context (~0.3-0.5 GB, outside torch's allocator) and allocator fragmentation.
    """
    a, b = args_model, dtype_bytes
    n = batch_size * ctx                                     # tokens in one micro-batch
    q_out, kv_out = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    shapes = {"q_proj": (a.dim, q_out), "k_proj": (a.dim, kv_out), "v_proj": (a.dim, kv_out),
              "o_proj": (q_out, a.dim), "gate_proj": (a.dim, a.intermediate_size),
              "up_proj": (a.dim, a.intermediate_size), "down_proj": (a.intermediate_size, a.dim)}
    linear_params = a.n_layers * sum(i * o for i, o in shapes.values())
    if quant == "nf4":
        # packed 4-bit codes + one uint8 absmax per 64 values + one fp32 absmax per 256 of those
        # (double quantisation) + per-layer code books (16 + 256 fp32) and offset.
        base = linear_params // 2 + linear_params // 64 + 4 * (linear_params // (64 * 256)) \
            + 7 * a.n_layers * (16 + 256 + 1) * 4
    else:
        base = linear_params * b
    embed = a.vocab_size * a.dim * b * (1 if a.tie_word_embeddings else 2)
    norms = (2 * a.n_layers + 1) * a.dim * b
    lora_params = 0 if full_finetune else a.n_layers * sum(lora_r * (i + o) for i, o in shapes.values())
    # fp32 weight + fp32 grad + two fp32 AdamW moments
    lora = lora_params * 16
    if train_embed_norm and not full_finetune:               # LoRA+: 16-bit embedding/norms, grads, fp32 moments
        lora += (a.vocab_size * a.dim + (2 * a.n_layers + 1) * a.dim) * (b + 8)
    if full_finetune:                                        # every weight: 16-bit grad + two fp32 moments
        lora = (linear_params + embed // b + norms // b) * (b + 8)
    # Checkpointed activations: each layer's input (L of them), the last layer's output (kept for the
    # final norm's backward) and the normed hidden states the chunked loss saves.
    checkpoints_ = (a.n_layers + 2) * n * a.dim * b
    # One layer recomputed for its backward, bytes per token of what autograd keeps:
    drop = 1 if lora_dropout > 0 else 0                      # bool dropout mask per LoRA input value
    per_token = {
        # RMSNorm (x2): the fp32 copy of its input and its 16-bit normalised output
        "norms": 2 * a.dim * (4 + b),
        # LoRA (x7): each keeps its own fp32 dropped-out input (+ mask) and the r-dim A output in fp32;
        # full fine-tuning instead keeps the 16-bit input of each linear for its weight gradient (q/k/v and
        # gate/up share theirs)
        "lora": sum(i * (4 + drop) + 4 * lora_r for i, _ in shapes.values()) if not full_finetune
        else (2 * a.dim + q_out + a.intermediate_size) * b,
        # q, k, v regrouped for S²-Attn (kv repeated to n_heads for GQA) + SDPA output + fp32 logsumexp
        "attention": 4 * q_out * b + 4 * a.n_heads,
        # MLP: gate output, silu(gate), up output
        "mlp": 3 * a.intermediate_size * b,
        # backward buffers at the MLP (the layer's widest point): grad in/out of the hidden state,
        # grads of gate/up/act in 16-bit and the fp32 grad through down_proj's LoRA input
        "backward": 2 * a.dim * b + 3 * a.intermediate_size * b
        + (0 if full_finetune else 4 * a.intermediate_size),
    }
    dequant = max(i * o for i, o in shapes.values()) * b if quant == "nf4" else 0   # one weight rebuilt at a time
    layer = n * sum(per_token.values()) + dequant
    # Loss chunk: bf16 logits of a chunk, its fp32 copy and fp32 softmax, the fp32 dlogits and their
    # 16-bit cast (backward); plus the fp32 nll / lse per token and the 16-bit grad of the hidden states.
    c = min(loss_chunk, n)
    loss = c * a.vocab_size * (b + 4 + 4 + 4 + b) + n * (8 + a.dim * b)
    parts = {
        "nf4_weights" if quant == "nf4" else "dense_weights": base,
        "embed_and_head": embed,
        "norms": norms,
        "trainable_grads_and_adam" if full_finetune else "lora_weights_grads_adam": lora,
        "checkpointed_hidden_states": checkpoints_,
        "layer_recompute": layer,
        "loss_chunk": loss,
    }
    parts["peak_bytes"] = base + embed + norms + lora + checkpoints_ + max(layer, loss)
    parts["layer_recompute_per_token"] = per_token
    parts["lora_params"] = lora_params
    parts["linear_params"] = linear_params
    return parts


def dry_run(args) -> dict:
    """Print the prediction for train.py's flags, part by part, ending with `peak_bytes=<int>`."""
    if args.model is not None:
        model_args, name = hf.read_config(args.model), args.model
    elif args.preset is not None:
        name = PRESET_ARCHS[args.preset]
        model_args = ModelArgs(**ARCHS[name])
    else:
        model_args, name = demo.model_args(args.ctx), "demo"
    dtype_bytes = 4 if args.dtype == "fp32" else 2
    p = predict_peak_memory(model_args, args.ctx, args.batch_size, args.lora_r, quant=args.quant,
                            dtype_bytes=dtype_bytes, lora_dropout=args.lora_dropout, loss_chunk=args.loss_chunk,
                            train_embed_norm=args.train_embed_norm, full_finetune=args.full_finetune)
    gb = lambda x: f"{x / 1e9:8.2f} GB"                            # noqa: E731  (decimal GB, as REFERENCE §7)
    method = "full fine-tuning" if args.full_finetune else f"LoRA r={args.lora_r}"
    print(f"predicted peak device memory of one training step: {name}, ctx {args.ctx}, micro-batch "
          f"{args.batch_size}, {'NF4' if args.quant == 'nf4' else 'dense'} base, {method}, "
          f"{8 * dtype_bytes}-bit compute, {args.attn} attention (fused SDPA), loss chunk {args.loss_chunk}")
    if args.quant == "nf4":
        weights = (f"NF4 weights ({p['linear_params'] / 1e9:.2f}B params, incl. double-quant stats)", p["nf4_weights"])
    else:
        weights = (f"dense decoder weights ({p['linear_params'] / 1e9:.2f}B params)", p["dense_weights"])
    if args.full_finetune:
        trainable = ("every weight: 16-bit grad + 2 fp32 AdamW moments", p["trainable_grads_and_adam"])
    else:
        trainable = (f"LoRA {p['lora_params'] / 1e6:.0f}M params: fp32 weight + grad + 2 AdamW moments"
                     + (" (+ embeddings, norms)" if args.train_embed_norm else ""), p["lora_weights_grads_adam"])
    rows = [
        weights,
        ("16-bit embedding + lm_head", p["embed_and_head"]),
        ("norms", p["norms"]),
        trainable,
        (f"checkpointed hidden states ({model_args.n_layers} layers + 2)", p["checkpointed_hidden_states"]),
        ("one layer's recompute + backward working set", p["layer_recompute"]),
        ("loss chunk (not alive at the same time as the recompute)", p["loss_chunk"]),
    ]
    for label, value in rows:
        print(f"  {label:<72}{gb(value)}")
    per_token = ", ".join(f"{k} {v}" for k, v in p["layer_recompute_per_token"].items())
    print(f"  (recompute, bytes per token: {per_token})")
    print(f"  {'peak':<72}{gb(p['peak_bytes'])}")
    print(f"peak_bytes={p['peak_bytes']}")
    return p

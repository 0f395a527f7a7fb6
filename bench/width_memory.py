"""The dry run's per-token terms checked at true width: a LLaMA-2-7B-shaped model with 2 layers on the CPU.

`train.py --dry-run` predicts a step's device memory from the shapes alone (memory.py). Its fixed parts are
plain arithmetic; its per-token parts (the checkpointed hidden states, one layer's recompute + backward, the
loss chunk) are a model of what autograd keeps, and they only show at real width: at dim 256 (ctx_memory.py)
allocator overheads and the loss chunk are as large as a layer. So here the layer is LLaMA-2-7B's (dim 4096,
intermediate 11008, 32 heads, vocab 32000, trained context 4096) and there are only 2 of them, so that a step
at 32k tokens fits in the RAM of a small machine.

Each configuration runs in a fresh process (a clean RSS high-water mark), as train.py would run it: the
random bf16 checkpoint (benchlib.random_checkpoint, cached in --cache-dir) loaded by train.build_model
(NF4 double-quantized decoder linears quantised as read, PI factor ceil(ctx / 4096), LoRA r=64 alpha 16
dropout 0.05 on all seven linears, S²-Attn 1/4 with the shifted half, every layer checkpointed, loss in
chunks of 1024 tokens, --mlp-chunk as given), torch AdamW, bf16 compute, and one train.train_step.
Measured: the peak RSS during the step above the RSS of the loaded model (VmHWM reset by /proc/self/clear_refs
once the model and optimizer exist). The children run with glibc's mmap threshold pinned to 64 KiB
(benchlib.PINNED_MMAP, as ctx_memory.py) so that a freed tensor leaves RSS at once. No data: random tokens.

Baseline, the prediction: what memory.predict_peak_memory says this step adds above the loaded weights. In a first step
the AdamW moments do not exist yet during backward (torch creates them in optimizer.step, after every
activation is freed), and a layer's backward holds the inputs of the layers below it and the LoRA grads of
the layers above it, so the step's peak is

    max(max over layers l of (inputs of layers 0..l + LoRA grads of the layers above) + down's LoRA grads
            + one layer's recompute and backward,
        checkpointed hidden states + loss phase,
        LoRA grads + 2 AdamW moments)                             (4 + 8 bytes per LoRA parameter)

(with 2 layers the last layer's backward holds one more layer input, the first one's the last layer's 20 MB of
LoRA grads: the larger wins; on a GPU, from the second step on, the moments are there all the time: the dry
run's peak counts them). --repredict FILE recomputes the predictions of a results JSON with the memory.py
there is now, the measurements as they were.
--offload-activations is a no-op on the CPU (train.build_model turns it on for CUDA only: the "host" copy
would be a second copy in the same memory), so the host memory of an offloaded run is the one measured
here; bench/gpu_check.py measures the device side.

--track additionally counts the live tensor bytes the step allocates (a TorchDispatchMode that sees every
tensor made, and a weakref on its storage that sees it freed), by phase and at the peak, and the bytes
autograd saves per layer (saved_tensors_hooks): the evidence for each term of memory.py's table. At this
width the model's moments match the live tensor bytes to ~1%; the RSS high-water mark is ~10-15 MiB above
them whatever the context (allocator slack: small allocations in glibc's heap, page rounding, buffers that
are not tensors), a few % of the measured step at 1k-4k tokens and less beyond. A forward + backward on
--warmup-tokens tokens before the reset keeps the first use of libtorch's backward code (~15 MiB of code
pages) out of the figure.

    python bench/width_memory.py --threads 1 --out bench/results/width_memory.json  # committed: 4k, 12k +/- tiles, 32k
    python bench/width_memory.py --runs 4096:0 --track                      # one configuration, with counts
    python bench/width_memory.py --smoke --out /tmp/w.json                  # tiny width, seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import benchlib

WIDE = dict(vocab_size=32000, dim=4096, intermediate_size=11008, n_layers=2, n_heads=32, norm_eps=1e-5,
            max_position_embeddings=4096)
SMOKE = dict(vocab_size=2048, dim=256, intermediate_size=688, n_layers=2, n_heads=4, norm_eps=1e-5,
             max_position_embeddings=1024)
# (ctx, mlp_chunk): with and without tiles at 4k and 12k; 32k with tiles (offload changes nothing on a CPU).
DEFAULT_RUNS = ("4096:0", "4096:1024", "12288:0", "12288:1024", "32768:1024")
SMOKE_RUNS = ("4096:0", "4096:512")
LORA = dict(r=64, alpha=16, dropout=0.05)
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def geometry(a) -> dict:
    return SMOKE if a.smoke else WIDE


def model_args(a):
    from model import ModelArgs

    return ModelArgs(**geometry(a))


def make_checkpoint(a) -> Path:
    """A random LLaMA of this geometry in HF format (benchlib.random_checkpoint), written once to --cache-dir."""
    name = "width_memory-" + "-".join(f"{k}{v}" for k, v in geometry(a).items() if k != "norm_eps") + f"-s{a.seed}"
    return benchlib.random_checkpoint(Path(a.cache_dir) / name, model_args(a), a.seed)


# --------------------------------------------------------------------------- the prediction

def predict_step(margs, ctx: int, mlp_chunk: int, offload: bool = False) -> dict:
    """memory.predict_peak_memory's parts and what they say one first step adds above the loaded model."""
    from infra import memory

    p = memory.predict_peak_memory(margs, ctx, 1, LORA["r"], quant="nf4", dtype_bytes=2, lora_dropout=LORA["dropout"],
                                   loss_chunk=1024, mlp_chunk=mlp_chunk, offload=offload)
    grads, moments = 4 * p["lora_params"], 8 * p["lora_params"]
    layer_grads = grads // margs.n_layers
    down_grads = 4 * LORA["r"] * (margs.intermediate_size + margs.dim)     # made by down's backward, the MLP's first
    unit = p["checkpointed_hidden_states"] // margs.n_layers if not offload else 0
    layer = p["layer_recompute"]
    dequant = 2 * max(i * o for i, o in memory.linear_shapes(margs).values())
    cpu_copy = 0
    if 0 < mlp_chunk < ctx:
        # CPU only: F.linear of a (1, C, d) tile that is a view of the (1, T, d) MLP input takes torch's batched
        # matmul path, which copies the dequantised weight inside the kernel (measured: +86 MiB for 11008 x 4096,
        # none for the same rows as a 2-D tensor or a fresh 3-D one; invisible to --track, which sees tensors
        # made by ops, not inside them). So a tile's matmul holds the weight twice.
        cpu_copy = dequant
        layer = max(layer, p["layer_moments"]["mlp_dequant"] + cpu_copy)
    # Back-propagating layer l: the inputs of layers 0..l are still held, the LoRA grads of the layers above exist.
    held = max((l + 1) * unit + (margs.n_layers - 1 - l) * layer_grads for l in range(margs.n_layers))
    host = p["host_checkpoints"]                                          # on a CPU the host is the device
    loss = p["checkpointed_hidden_states"] + p["loss_chunk"]
    backward = host + max(held + down_grads + layer, loss)
    tensors = host + max(held + down_grads + p["layer_recompute"], loss)     # what --track can see
    terms = {k: p[k] for k in ("checkpointed_hidden_states", "host_checkpoints", "layer_recompute", "loss_chunk",
                               "layer_peak_moment", "loss_peak_moment", "layer_moments", "loss_moments",
                               "layer_recompute_per_token", "lora_params")}
    terms.update(cpu_tile_weight_copy=cpu_copy, layer_with_cpu_terms=layer, held_outside_the_layer=held, down_lora_grads=down_grads, lora_grads_and_adamw_moments=grads + moments,
                 device_peak_bytes=p["peak_bytes"])
    return {"predicted_step_bytes": max(backward, grads + moments),
            "predicted_tensor_bytes": max(tensors, grads + moments), "terms": terms}


def repredict(path: Path) -> dict:
    """The rows of an earlier run with the predictions of the memory.py there is now (measurements kept)."""
    res = json.loads(Path(path).read_text())
    from model import ModelArgs

    margs = ModelArgs(**res["geometry"])
    for row in res["rows"]:
        pred = predict_step(margs, row["ctx"], row["options"]["mlp_chunk"], row["options"]["offload_activations"])
        row.update(predicted_bytes=pred["predicted_step_bytes"], predicted_terms=pred["terms"],
                   predicted_tensor_bytes=pred["predicted_tensor_bytes"],
                   ratio=None if row["measured_bytes"] is None else row["measured_bytes"] / pred["predicted_step_bytes"])
        if "live_tensor_peak_bytes" in row:
            row["live_ratio"] = row["live_tensor_peak_bytes"] / pred["predicted_tensor_bytes"]
    return res


# --------------------------------------------------------------------------- counting live tensors

class LiveTensors:
    """Bytes of the tensors alive now, made since it was created: every op's outputs through a
    TorchDispatchMode, each storage counted once and uncounted when a weakref sees it freed (tensors that
    existed before, given as `existing`, and views of them are not counted). Records the peak of each phase
    (set by .phase = "...", e.g. by module hooks) and what was alive then, by the op that made it."""

    def __init__(self, existing=()):
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self
        self.live, self.now, self.phase, self.peaks = {}, 0, "start", {}
        seen = WeakIdKeyDictionary()
        for t in existing:             # weights, LoRA, inputs: views of them are not new tensors
            seen[t.untyped_storage()] = None

        def freed(key):
            self.now -= self.live.pop(key)[0]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        st = t.untyped_storage()
                        if st in seen or st.nbytes() == 0:
                            continue
                        key = id(st)
                        seen[st] = weakref.finalize(st, freed, key)
                        tracker.live[key] = (st.nbytes(), f"{func.__name__} {str(t.dtype)[6:]} {tuple(t.shape)} "
                                                          f"[{tracker.phase}]")
                        tracker.now += st.nbytes()
                        if tracker.now > tracker.peaks.get(tracker.phase, (0,))[0]:
                            tracker.peaks[tracker.phase] = (tracker.now, dict(tracker.live))
                return out

        self.mode = Mode()

    @property
    def peak(self) -> int:
        return max((v[0] for v in self.peaks.values()), default=0)

    def summary(self, top: int = 40) -> dict:
        def alive(snapshot):
            groups = {}
            for nbytes, label in snapshot.values():
                n, total = groups.get(label, (0, 0))
                groups[label] = (n + 1, total + nbytes)
            return [f"{b / 2**20:9.2f} MiB x{n} {k}" for k, (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])]

        phase = max(self.peaks, key=lambda k: self.peaks[k][0]) if self.peaks else None
        return {"peak_bytes": self.peak, "peak_phase": phase,
                "phase_peaks": {k: v[0] for k, v in self.peaks.items()},
                "alive_at_phase_peaks": {k: alive(v[1])[:top] for k, v in self.peaks.items()}}


def phase_hooks(model, tracker) -> None:
    """Name the phase tensors are made in: `L1.mlp.down_proj fwd` (first forward), `... rec` (its recompute in
    backward), `... bwd` (the backward of its output's autograd node), `loss fwd` / `loss bwd`. Forward hooks
    that return nothing and node pre-hooks only: module backward hooks would wrap the inputs in new tensors,
    which (besides costing memory) defeats lora.SharedInput's sharing of one input by q/k/v and gate/up."""
    state = {"backward": False}

    def pre_forward(name):
        def hook(module, args):
            tracker.phase = f"{name} {'rec' if state['backward'] else 'fwd'}"
        return hook

    def set_backward(name):
        def hook(grad_outputs):
            state["backward"] = True
            tracker.phase = f"{name} bwd"
        return hook

    def post_forward(name):
        def hook(module, args, out):
            if not state["backward"] and isinstance(out, torch.Tensor) and out.grad_fn is not None:
                out.grad_fn.register_prehook(set_backward(name))
        return hook

    import torch

    for i, layer in enumerate(model.layers):
        for name, module in layer.named_modules():
            if name.split(".")[-1] not in ("", "input_layernorm", "post_attention_layernorm", "self_attn", "mlp",
                                           *DECODER_LINEARS):
                continue
            full = f"L{i}.{name}" if name else f"L{i}"
            module.register_forward_pre_hook(pre_forward(full))
            module.register_forward_hook(post_forward(full))
    model.norm.register_forward_pre_hook(lambda m, a: setattr(tracker, "phase", "loss fwd"))
    model.norm.register_forward_hook(post_forward("loss"))


def saved_per_layer(model, tokens) -> dict:
    """Bytes autograd saves inside one recomputed layer, by dtype and width, counted with saved_tensors_hooks
    during a forward of layer 0 on an input that requires grad, as every layer's but the first does (each
    storage once; weights, the cos/sin tables' source and the layer input, which the checkpoint keeps, left out)."""
    import torch

    h = model.embed_tokens(tokens).detach().requires_grad_()
    positions = torch.arange(tokens.shape[1])
    cos, sin = model.rope_tables(positions, h.dtype)
    attend = model._attend(tokens.shape[1], None, None)
    skip = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    skip.add(h.untyped_storage().data_ptr())          # the layer input: the checkpoint keeps it, counted there
    seen, by_kind = set(), {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            key = f"{t.dtype} {'x'.join(map(str, t.shape[-1:]))}-wide"
            by_kind[key] = by_kind.get(key, 0) + t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.layers[0](h, cos, sin, attend)
    del out
    n = tokens.numel()
    return {"bytes": sum(by_kind.values()), "bytes_per_token": sum(by_kind.values()) / n,
            "by_kind_per_token": {k: v / n for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}


# --------------------------------------------------------------------------- one configuration (child)

MODEL_FILES = ("model.py", "lora.py", "attention.py", "quant.py", "train.py", "rope.py")


def code_version() -> str:
    """sha1 of the files a step runs through: which version of the code a measurement is of."""
    import hashlib

    h = hashlib.sha1()
    for name in MODEL_FILES:
        h.update((benchlib.ROOT / name).read_bytes())
    return h.hexdigest()[:12]


def child(ckpt: Path, ctx: int, mlp_chunk: int, a) -> dict:
    version = code_version()                      # before the imports, which read the same files
    import torch

    import train

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    flags = ["--model", str(ckpt), "--ctx", str(ctx), "--attn", "s2", "--quant", "nf4",
             "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]), "--lora-dropout", str(LORA["dropout"]),
             "--loss-chunk", "1024"]
    if mlp_chunk:
        flags += ["--mlp-chunk", str(mlp_chunk)]
    t0 = time.perf_counter()
    model, trainable, factor = train.build_model(train.parse_args(flags), torch.bfloat16)
    optimizer = train.make_optimizer(trainable, 2e-4, 0.0, torch.device("cpu"))
    tokens = torch.randint(3, model.args.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(a.seed))
    if a.warmup_tokens:
        # A forward + backward on a few tokens first (no optimizer step, gradients dropped): the step's kernels'
        # code pages and one-off buffers (oneDNN, the autograd engine) are then resident before the high-water
        # mark is reset, so that it measures tensors, not the first use of libtorch's backward code.
        warm = tokens[:, :a.warmup_tokens]
        model.loss(warm, warm, reduction="sum").backward()
        for p in trainable:
            p.grad = None
    load_seconds = time.perf_counter() - t0
    extra = {}
    if a.track:
        extra["saved_per_layer"] = saved_per_layer(model, tokens)
    rss_loaded = benchlib.rss_bytes()
    peak_load = benchlib.peak_rss_bytes()
    resettable = benchlib.reset_peak_rss()
    tracker = LiveTensors([*model.parameters(), *model.buffers(), tokens]) if a.track else None
    if tracker is not None:
        phase_hooks(model, tracker)
        tracker.mode.__enter__()
    t0, cpu0 = time.perf_counter(), benchlib.cpu_seconds()
    try:
        r = train.train_step(model, [{"input_ids": tokens, "labels": tokens, "padding_mask": None}], optimizer,
                             torch.amp.GradScaler("cpu", enabled=False), max_grad_norm=0.3)
    finally:
        if tracker is not None:
            tracker.mode.__exit__(None, None, None)
    seconds, cpu = time.perf_counter() - t0, benchlib.cpu_seconds() - cpu0
    step_peak = benchlib.peak_rss_bytes()
    if tracker is not None:
        extra["live_tensors"] = tracker.summary()
    return {"ctx": ctx, "mlp_chunk": mlp_chunk, "code_version": version, "pi_factor": factor, "loss": r["loss"],
            "step_seconds": seconds,
            "step_cpu_seconds": cpu, "load_seconds": load_seconds, "rss_after_load": rss_loaded,
            "peak_rss": max(peak_load, step_peak),
            "measured_step_bytes": step_peak - rss_loaded if resettable else None, **extra}


# --------------------------------------------------------------------------- the parent

def run_child(ckpt, ctx, mlp_chunk, argv, timeout):
    return benchlib.run_child([sys.executable, __file__, *argv, "--child", str(ckpt), str(ctx), str(mlp_chunk)],
                              timeout, benchlib.PINNED_MMAP)[0]


def parse_run(text: str) -> tuple[int, int]:
    try:
        ctx, chunk = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CTX:MLP_CHUNK, e.g. 12288:1024") from None
    if ctx < 8 or chunk < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: ctx must be >= 8 and the MLP chunk >= 0")
    return ctx, chunk


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=parse_run, nargs="+", default=None,
                   help=f"CTX:MLP_CHUNK per fresh process (0: no tiles) [{' '.join(DEFAULT_RUNS)}; --smoke: "
                        f"{' '.join(SMOKE_RUNS)}]")
    p.add_argument("--smoke", action="store_true", help=f"tiny geometry {SMOKE} (seconds): the test's path")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process (memory does not depend on it)")
    p.add_argument("--warmup-tokens", type=int, default=64,
                   help="forward + backward on this many tokens before the measured step, no optimizer step (0: none)")
    p.add_argument("--track", action="store_true", help="also count live tensor bytes and saved bytes per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--cache-dir", default=str(benchlib.CACHE), help="where the random checkpoint is written and reused")
    p.add_argument("--repredict", metavar="JSON", help="recompute the predictions of this results file (no runs)")
    p.add_argument("--child", nargs=3, metavar=("CKPT", "CTX", "MLP_CHUNK"), help=argparse.SUPPRESS)
    return p


def mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.child:
        print(json.dumps(child(Path(a.child[0]), int(a.child[1]), int(a.child[2]), a)))
        return 0
    if a.repredict:
        res = repredict(Path(a.repredict))
        for row in res["rows"]:
            print(f"  ctx {row['ctx']:6d} mlp-chunk {row['options']['mlp_chunk'] or '-':>5}: measured "
                  f"{mib(row['measured_bytes'])} MiB, predicted {mib(row['predicted_bytes'])} MiB, ratio "
                  f"{row['ratio']:.3f} (widest: {row['predicted_terms']['layer_peak_moment']})")
        out = Path(a.out or a.repredict)
        benchlib.write_json(out, res)
        print(f"wrote {out}")
        return 0
    runs = a.runs or [parse_run(r) for r in (SMOKE_RUNS if a.smoke else DEFAULT_RUNS)]
    t0 = time.perf_counter()
    ckpt = make_checkpoint(a)
    margs = model_args(a)
    passthrough = ["--threads", str(a.threads), "--seed", str(a.seed), "--warmup-tokens", str(a.warmup_tokens)] + (["--smoke"] if a.smoke else []) \
        + (["--track"] if a.track else [])
    print(f"geometry {geometry(a)}; NF4 + LoRA r=64 on 7 linears, S²-Attn, checkpointing, loss chunk 1024, "
          f"AdamW, bf16, {a.threads} thread(s); one fresh process per configuration", flush=True)
    rows = []
    for ctx, chunk in runs:
        r = run_child(ckpt, ctx, chunk, passthrough, a.timeout)
        pred = predict_step(margs, ctx, chunk)
        m = r["measured_step_bytes"]
        row = {"ctx": ctx, "options": {"mlp_chunk": chunk, "offload_activations": False},
               "measured_bytes": m, "predicted_bytes": pred["predicted_step_bytes"],
               "predicted_tensor_bytes": pred["predicted_tensor_bytes"],
               "ratio": None if m is None else m / pred["predicted_step_bytes"], "predicted_terms": pred["terms"],
               **{k: v for k, v in r.items() if k not in ("ctx", "mlp_chunk", "measured_step_bytes")}}
        if a.track:
            live = r["live_tensors"]["peak_bytes"]
            row.update(live_tensor_peak_bytes=live, live_ratio=live / pred["predicted_tensor_bytes"],
                       live_peak_phase=r["live_tensors"]["peak_phase"])
        rows.append(row)
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"  ctx {ctx:6d} mlp-chunk {chunk or '-':>5}: step peak above the loaded model {mib(m)} MiB, "
              f"predicted {mib(row['predicted_bytes'])} MiB, measured/predicted {ratio}; "
              f"step {r['step_seconds']:.0f} s (load {r['load_seconds']:.0f} s)", flush=True)
        if a.track:
            lt = r["live_tensors"]
            print(f"    live tensors: peak {mib(lt['peak_bytes'])} MiB (measured/live {m / lt['peak_bytes']:.3f}, "
                  f"live/predicted {row['live_ratio']:.3f}) in phase {lt['peak_phase']}; predicted widest moment "
                  f"{pred['terms']['layer_peak_moment']}; saved per layer "
                  f"{r['saved_per_layer']['bytes_per_token']:.0f} B/token; alive at the peak:", flush=True)
            for line in lt["alive_at_phase_peaks"][lt["peak_phase"]][:15]:
                print("      " + line)
    seconds = time.perf_counter() - t0
    print(f"{seconds:.0f} s in all")
    if a.out:
        notes = ["--offload-activations is a no-op on the CPU (train.build_model enables it on CUDA only): the host "
                 "memory an offloaded run needs is what the rows measure; the device side is bench/gpu_check.py's",
                 "measured = peak RSS during the step above the RSS of the loaded model; predicted = what "
                 "memory.predict_peak_memory's terms add in a first step (no AdamW moments during backward); "
                 "predicted_tensor_bytes leaves out the CPU-only weight copy of tiled matmuls (cpu_tile_weight_copy)"]
        benchlib.write_json(a.out, {"rows": rows, "notes": notes, "geometry": geometry(a), "lora": LORA, "attn": "s2",
                                    "loss_chunk": 1024, "threads": a.threads, "warmup_tokens": a.warmup_tokens,
                                    "seconds": seconds, "machine": benchlib.machine()})
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    benchlib.cli_main(main)

"""The harness every benchmark here shares: what it measures the same way (memory of this process, CPU time,
the machine, the matmul peak and FLOPs per token), how it runs (fresh child processes, a deadline, random
checkpoints cached by their shape) and how it reports (atomic JSON and figures, one-line errors).

Speed is only ever reported as a ratio against a baseline measured in the same run (machines here are shared
and noisy); each result JSON carries `machine()` so that a figure says which CPU and dtype it came from.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / "cache"          # default --cache-dir of every benchmark (git-ignored)
sys.path.insert(0, str(ROOT))             # the project's modules, for every script that imports this one


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: peak resident set size since start or the last reset_peak_rss(). Not ru_maxrss, which Linux
    carries over from the parent across fork + exec (a child would read at least its parent's RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM line (Linux only)")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark VmHWM (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """User + system CPU time of this process: less sensitive than wall time to other processes' load."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX)? Without it torch's bf16 matmul takes a slow
    path (~30x slower than fp32 was measured on such an AMD EPYC), so bf16 figures there say little."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def machine() -> dict:
    """The CPU model, its core count and native bf16 support, and the torch build."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    import torch
    return {"cpu": model, "cpus": os.cpu_count(), "native_bf16": native_bf16(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------- dtypes, peak matmul, FLOPs

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def pick_dtype(requested: str, device: str = "cpu") -> tuple[str, str]:
    """("bf16" | "fp16" | "fp32", why). "auto": bf16 on CUDA and on CPUs with native bf16, else fp32 (bf16 is
    emulated there and ~30x slower, which would make every bf16 figure say more about the emulation)."""
    if requested != "auto":
        return requested, "asked for"
    if str(device).startswith("cuda"):
        return "bf16", "auto: CUDA"
    if native_bf16():
        return "bf16", "auto: this CPU has native bf16 (avx512_bf16 / amx_bf16)"
    return "fp32", ("auto: this CPU has no native bf16 (no avx512_bf16 / amx_bf16), so fp32; "
                    "pass --dtype bf16 to force it")


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 3, device: str = "cpu") -> dict:
    """The machine's measured matmul peak, the denominator of every utilisation figure here: the best FLOP/s of
    an n x n @ n x n product in that dtype with the current torch thread count, per wall second
    ("flops_per_s") and per CPU second of this process ("flops_per_cpu_s": on a machine shared with other jobs
    this one hardly depends on their load, as long as they leave the caches alone)."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=out)                             # warm-up (MKL / oneDNN pick their kernels here)
    wall = cpu = float("inf")
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b, out=out)
        if device != "cpu":
            torch.cuda.synchronize()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return {"flops_per_s": 2 * n**3 / wall, "flops_per_cpu_s": 2 * n**3 / max(cpu, 1e-9)}


def train_flops_per_token(*, dim: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                          vocab: int, lora_r: int, span: int) -> dict:
    """FLOPs of one LongQLoRA training step per trained token, counting matmuls only (2 per multiply-add).

    N = decoder linear parameters (q, k, v, o, gate, up, down of every layer), R = LoRA parameters
    (r * (in + out) on each of them), H = vocab * dim (lm_head), A = attention forward = layers * 4 * (heads *
    head_dim) * k with k = (span + 1) / 2 keys per query on average (causal inside a span of `span` tokens:
    ctx for full attention, the group size ctx / 4 for S²-Attn):
        forward     2N + 2R + 2H + A
        recompute   2N + 2R + A            every decoder layer is checkpointed (ours and HF alike)
        backward    2N + 4R + 2H + 2A      input gradients of the frozen base and head, LoRA input and weight
                                           gradients, attention's dQ, dK, dV (the kernels' own recompute of the
                                           scores inside flash attention's backward is not counted)
        total       6N + 8R + 4H + 4A      ("executed": what both implementations compute)
        model       4N + 6R + 4H + 3A      (without the recompute: the usual MFU numerator)
    The frozen head costs 4H in both: HF computes the logits, then their gradient times W in backward; ours
    computes both in the forward pass, chunk by chunk, and recomputes nothing."""
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    shapes = [(dim, q_out), (dim, kv_out), (dim, kv_out), (q_out, dim),
              (dim, intermediate), (dim, intermediate), (intermediate, dim)]
    n = layers * sum(i * o for i, o in shapes)
    r = layers * lora_r * sum(i + o for i, o in shapes)
    h = vocab * dim
    a = layers * 4 * q_out * (span + 1) / 2
    return {"executed": 6 * n + 8 * r + 4 * h + 4 * a, "model": 4 * n + 6 * r + 4 * h + 3 * a,
            "decoder_linear_params": n, "lora_params": r, "head_params": h, "attention_forward": a, "span": span}


def eval_flops_per_token(*, dim: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                         vocab: int, ctx: int) -> float:
    """Matmul FLOPs of one scoring forward per token (no LoRA): 2N + 2H + A, as in train_flops_per_token."""
    f = train_flops_per_token(dim=dim, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads,
                              head_dim=head_dim, vocab=vocab, lora_r=0, span=ctx)
    return 2 * f["decoder_linear_params"] + 2 * f["head_params"] + f["attention_forward"]


def state_to_bnb(state):
    """bitsandbytes.functional.QuantState holding the same tensors as quant.NF4State `state` (no copies): how
    nf4_bench.py and the parity tests hand our NF4 state to bitsandbytes' kernels (run time never needs it)."""
    import torch
    from bitsandbytes.functional import QuantState  # importing bitsandbytes probes for CUDA: only when asked

    state2 = offset = None
    if state.double_quant:
        state2 = QuantState(absmax=state.nested_absmax, code=state.nested_code,
                            blocksize=state.nested_blocksize, dtype=torch.float32)
        # torch.full launches a fill kernel; torch.tensor(float, device=cuda) would be a synchronising copy.
        offset = torch.full((), state.offset, dtype=torch.float32, device=state.absmax.device)
    return QuantState(absmax=state.absmax, shape=torch.Size(state.shape), code=state.code,
                      blocksize=state.blocksize, quant_type="nf4", dtype=state.dtype,
                      offset=offset, state2=state2)


# --------------------------------------------------------------------------- running

def log(message: str) -> None:
    print(message, flush=True)


def set_threads(n: int | None) -> None:
    """torch's thread count (None: torch's choice). One is fastest on a machine other jobs share."""
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be at least 1, got {n}")
        import torch
        torch.set_num_threads(n)


class Deadline:
    """A wall-clock budget for a whole benchmark: what is left, and a reason to stop when it runs out."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = None if not seconds else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()


# glibc serves allocations below its mmap threshold from the heap and keeps freed heap memory resident; the
# threshold also grows (up to 32 MiB) as large blocks are freed, so RSS depends on the history of frees, not
# on what is alive. A fixed 64 KiB threshold maps every tensor of real size on its own and unmaps it on free,
# so a child's peak RSS follows its peak of live tensor bytes.
PINNED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(cmd: list[str], timeout: float | None = None, env: dict | None = None):
    """Run a child process that prints its result as JSON on its last line: (that dict, the finished process).
    A failed child raises RuntimeError with its stderr's tail; a timeout kills it (subprocess.TimeoutExpired)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def cached_dir(path: Path, write) -> Path:
    """path, unless it already holds a config.json: write(tmp) fills a fresh folder beside it, renamed into
    place when complete (a crashed writer leaves no half checkpoint in the cache)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    write(tmp / "ckpt")
    os.replace(tmp / "ckpt", path)
    os.rmdir(tmp)
    return path


def random_checkpoint(path: Path, margs, seed: int) -> Path:
    """A random LLaMA of ModelArgs margs in HF format (hf.save_model, bf16), cached at path. Built in bf16
    directly: no fp32 copy of the model (the same weights as building in fp32 and casting)."""
    def write(tmp):
        import torch

        from infra import hf
        from model import Transformer

        torch.manual_seed(seed)
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Transformer(margs)
        finally:
            torch.set_default_dtype(torch.float32)
        hf.save_model(model, tmp)
    return cached_dir(path, write)


def random_hf_checkpoint(path: Path, config: dict, seed: int) -> Path:
    """A random transformers LlamaForCausalLM(LlamaConfig(**config)) saved in bf16 by save_pretrained, cached
    at path: the baselines' own writer, so HF reads a checkpoint exactly as its users' are written."""
    def write(tmp):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).save_pretrained(tmp)
    return cached_dir(path, write)


def config_key(obj) -> str:
    """12 hex digits naming a cache entry by everything that defines it."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- reporting

def write_json(path, obj, indent: int = 2) -> None:
    """Write obj as indented JSON atomically (a reader never sees half a file); numpy scalars as floats."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent, default=float) + "\n")
    os.replace(tmp, path)


def markdown_table(head: list, rows: list[list]) -> list[str]:
    """The lines of a markdown table: the first column (names) left-aligned, the figures right-aligned."""
    return ["| " + " | ".join(map(str, head)) + " |", "|---|" + "---:|" * (len(head) - 1),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def save_figure(fig, path: Path, dpi: int) -> None:
    """fig as a PNG at path, atomically (a reader never sees half an image), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is not installed (the figures
    are optional: every number is in the JSON)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def parse_and_run(build_parser, run, argv=None):
    """run(args) for the flags in argv (default sys.argv[1:]); args.argv keeps them for the results' "command"."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run(args)


def cli_main(main) -> None:
    """sys.exit(main()), with the errors a user can fix (bad flags, missing files) as one line and exit 2."""
    try:
        result = main()
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)

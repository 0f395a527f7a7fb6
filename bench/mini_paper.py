"""The LongQLoRA paper's experiment in miniature: extend a small LLaMA's context 4x on 2 CPU cores.

The paper (REFERENCE §7) takes LLaMA-2-7B, trained at 4096 tokens, to 8192 with Position Interpolation +
NF4 + LoRA + S²-Attn and shows that perplexity keeps falling as the evaluation context grows, while the
original model collapses beyond its trained length. Here the same code paths (model.py, train.py, eval.py)
run the same experiment at a scale that fits in ~40 minutes on 2 CPU cores:

  1. tokenizer  a LLaMA-style sentencepiece BPE (byte fallback, unk 0 / bos 1 / eos 2, ~4k pieces) trained
                on the pg19-mini train split;
  2. pretrain   a ~5M-parameter LLaMA from scratch at 256 tokens, full attention, AdamW on the
                chunked loss, saved as an HF directory (transformers loads it). Both are cached under
                --cache-dir keyed by their configuration, so a rerun skips them;
  3. extend     256 -> 1024 (PI factor 4) with each variant below, every trained variant seeing the same
                number of tokens, with the same seed and therefore the same data order (train.py, in-process);
  4. evaluate   pg19-mini validation with eval.py's `sliding` protocol at 256 / 512 / 1024 tokens of context.
                That protocol scores every token x_1 .. x_{N-1} of the stream exactly once whatever the context
                length, so the three columns are perplexities of the SAME target tokens and differ only in how
                much context each token gets. Each variant keeps its own RoPE factor at every length
                (4 for the PI variants, 1 for the others).

Variants (rows of the table):
  base            the pretrained model, unchanged (RoPE factor 1)
  pi              the base with PI factor 4, no training
  control         the base trained further at 256 tokens with the LongQLoRA adapter recipe (NF4 + LoRA r=64),
                  full attention, no PI, same number of tokens: separates "more training" from "longer context"
  longqlora       PI + NF4 + LoRA r=64 + S²-Attn at 1024 (the paper's method)
  lora_full_attn  PI + LoRA r=64 on the dense base, full attention (LoRA without the memory savings)
  nopi_lora       longqlora without PI (RoPE factor 1 at 1024): is interpolation needed?
  full_ft         PI + full fine-tuning of the dense model, S²-Attn (LongLoRA-Full)
  longqlora_r8, longqlora_r32   the paper's rank ablation (r=64 is longqlora)
  longqlora_s2_eval             longqlora evaluated with S²-Attn instead of full attention (S²-Attn at inference)

    python bench/mini_paper.py                 # the full run, ~40 min on 2 cores
    python bench/mini_paper.py --threads 1     # the same on a machine other jobs are using too
    python bench/mini_paper.py --smoke         # a tiny configuration in well under a minute (tests)
    python bench/mini_paper.py --finetune-steps 120 --variants longqlora lora_full_attn --results-dir DIR

Writes RESULTS_DIR/mini_paper.json ({"results": [{"variant", "eval_ctx", "ppl", ...}], "config", "seconds",
"timings"}) and mini_paper.png (perplexity against context length, when matplotlib is installed), and
prints a markdown table (rows: variants, columns: evaluation context). The committed results and what
they show are in bench/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from infra import atomic  # noqa: E402
from infra import cli  # noqa: E402
import data as data_lib  # noqa: E402
from infra import sources  # noqa: E402
import eval as eval_lib  # noqa: E402
import generate as generate_lib  # noqa: E402
from infra import hf  # noqa: E402
import train as train_lib  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

from infra import PG19_MINI  # noqa: E402
DEFAULT_DATA = PG19_MINI    # the sample shipped in infra/pg19-mini: a fresh clone has everything it needs
DEFAULT_CACHE = ROOT / "bench" / "cache"
DEFAULT_RESULTS = ROOT / "bench" / "results"
SEED = 42

# The paper's fine-tuning LRs (LoRA 2e-4; LongLoRA/PI full fine-tuning 2e-5) are for LLaMA-2-7B, pretrained with
# a peak LR of 3e-4. The small model here was pretrained with 1e-3, so both are scaled by 1e-3 / 3e-4, fixed
# before any result was seen.
LR_SCALE = 1e-3 / 3e-4

# Everything that defines a run. "full" is the committed experiment; "smoke" exercises every stage on a
# model small enough for a test. Pretraining and fine-tuning sizes were set by the 40-minute budget.
CONFIGS = {
    "full": dict(
        tokenizer=dict(vocab_size=4096),
        model=dict(dim=256, intermediate_size=688, n_layers=4, n_heads=4, norm_eps=1e-5, rope_theta=10000.0),
        short_ctx=256, long_ctx=1024,
        pretrain=dict(steps=600, batch_size=8, lr=1e-3, warmup=20, min_lr_ratio=0.1, weight_decay=0.1,
                      max_grad_norm=1.0),
        # Every trained variant: `steps` optimizer steps of `sequences` x long_ctx tokens (control: 4x as many
        # sequences of short_ctx tokens), the paper's LoRA recipe (alpha 16, dropout 0.05, clip 0.3, constant
        # LR after warmup) otherwise.
        finetune=dict(steps=30, sequences=4, lr=2e-4 * LR_SCALE, full_ft_lr=2e-5 * LR_SCALE, warmup=3),
        # The first 48,000 tokens of the validation stream (Julius Caesar and the start of Macbeth), so that
        # ten variants x three lengths (each token read ~2x by the sliding windows) fit in the budget.
        eval=dict(ctx=(256, 512, 1024), max_tokens=48000, batch_size=4),
    ),
    "smoke": dict(
        tokenizer=dict(vocab_size=512, max_files=3),
        model=dict(dim=32, intermediate_size=64, n_layers=2, n_heads=2, norm_eps=1e-5, rope_theta=10000.0),
        short_ctx=32, long_ctx=128,
        pretrain=dict(steps=8, batch_size=4, lr=3e-3, warmup=2, min_lr_ratio=0.1, weight_decay=0.1,
                      max_grad_norm=1.0),
        finetune=dict(steps=2, sequences=2, lr=1e-3, full_ft_lr=1e-3, warmup=1),
        eval=dict(ctx=(32, 64, 128), max_tokens=600, batch_size=4),
    ),
}


def log(message: str) -> None:
    print(message, flush=True)


def config_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- 1. tokenizer

def train_tokenizer(data_dir: Path, vocab_size: int, out_dir: Path, max_files: int | None = None) -> Path:
    """A LLaMA-style sentencepiece model (BPE, byte fallback, split digits, unk 0 / bos 1 / eos 2, no pad)
    trained on the lines of the train split; written atomically as out_dir/tokenizer.model."""
    import io

    import sentencepiece as spm

    docs = list(sources.iter_documents(data_dir, split="train"))[:max_files]
    lines = [line for _, text in docs for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{data_dir}: the train split holds no text to train a tokenizer on")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=0.99995, num_threads=1, minloglevel=2)   # one thread: deterministic merges
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"tokenizer.model.tmp-{os.getpid()}"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_dir / "tokenizer.model")
    return out_dir


# --------------------------------------------------------------------------- 2. pretraining

def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier of step `step` (0-based): linear warmup, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(cfg: dict, data_dir: Path, tokenizer_dir: Path, out_dir: Path, cache_dir: Path) -> dict:
    """Pretrain a small LLaMA from scratch at short_ctx on packed train documents; save it as an HF directory.

    Standard small-model recipe: AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then
    cosine decay, gradient clipping, fp32. The loss is model.chunked_cross_entropy, as in train.py."""
    p = cfg["pretrain"]
    tokenizer = sources.Tokenizer(tokenizer_dir / "tokenizer.model")
    corpus = sources.tokenize_source(data_dir, tokenizer, split="train", cache_dir=cache_dir / "tokens",
                                      progress=False)
    dataset = data_lib.PackedDataset(corpus, cfg["short_ctx"], tokenizer.eos_id)
    sampler = data_lib.ShuffledSampler(len(dataset), SEED)
    torch.manual_seed(SEED)
    args = ModelArgs(vocab_size=tokenizer.vocab_size, max_position_embeddings=cfg["short_ctx"],
                     bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **cfg["model"])
    model = Transformer(args).train()
    n_params = sum(t.numel() for t in model.parameters())
    matrices = [t for t in model.parameters() if t.dim() >= 2]
    vectors = [t for t in model.parameters() if t.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": p["weight_decay"]},
                                   {"params": vectors, "weight_decay": 0.0}], lr=p["lr"], betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, p["warmup"], p["steps"], p["min_lr_ratio"]))
    tokens_per_step = p["batch_size"] * cfg["short_ctx"]
    log(f"pretrain: {n_params / 1e6:.2f}M parameters, {len(dataset):,} packed sequences of {cfg['short_ctx']} "
        f"tokens ({corpus.n_tokens:,} train tokens); {p['steps']} steps x {tokens_per_step} tokens = "
        f"{p['steps'] * tokens_per_step / corpus.n_tokens:.2f} epochs")
    losses, t0 = [], time.perf_counter()
    for step in range(p["steps"]):
        batch = data_lib.collate([dataset[next(sampler)] for _ in range(p["batch_size"])], tokenizer.pad_id)
        loss = model.loss(batch["input_ids"], batch["labels"], reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p["max_grad_norm"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, p["steps"] // 10) == 0 or step == 0:
            window = losses[-max(1, p["steps"] // 10):]
            log(f"  step {step + 1}/{p['steps']} loss {sum(window) / len(window):.3f} "
                f"({(step + 1) * tokens_per_step / (time.perf_counter() - t0):.0f} tok/s)")
    hf.save_model(model.eval(), out_dir, copy_from=tokenizer_dir)
    summary = {"params": n_params, "train_tokens": corpus.n_tokens, "steps": p["steps"],
               "tokens": p["steps"] * tokens_per_step, "first_loss": losses[0],
               "last_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": time.perf_counter() - t0}
    atomic.write_json(out_dir / "pretrain.json", summary)     # written last: marks the cache entry complete
    return summary


# --------------------------------------------------------------------------- 3. variants

def variant_specs(cfg: dict) -> dict[str, dict]:
    """name -> {train: train.py flags or None, eval: eval settings}. The flags not given here are train.py's
    defaults, i.e. the paper's recipe (LoRA alpha 16, dropout 0.05, clip 0.3, NF4 double quant, S²-Attn
    with group ratio 1/4, packed documents, seed 42)."""
    f = cfg["finetune"]
    factor = cfg["long_ctx"] // cfg["short_ctx"]
    common = ["--max-steps", str(f["steps"]), "--warmup", str(f["warmup"]), "--batch-size", "1",
              "--seed", str(SEED), "--dtype", "fp32", "--save-every", "0", "--log-every", str(max(1, f["steps"] // 4))]
    long = common + ["--ctx", str(cfg["long_ctx"]), "--grad-accum", str(f["sequences"]), "--lr", str(f["lr"])]
    pi, no_pi = str(float(factor)), "1"
    qlora = ["--quant", "nf4", "--lora-r", "64"]
    return {
        "base": dict(train=None, eval=dict(rope_factor=1, quant="none")),
        "pi": dict(train=None, eval=dict(rope_factor=factor, quant="none")),
        "control": dict(train=common + ["--ctx", str(cfg["short_ctx"]), "--grad-accum", str(f["sequences"] * factor),
                                        "--lr", str(f["lr"]), "--rope-factor", no_pi, "--attn", "full"] + qlora,
                        eval=dict(rope_factor=1, quant="nf4")),
        "longqlora": dict(train=long + ["--rope-factor", pi, "--attn", "s2"] + qlora,
                          eval=dict(rope_factor=factor, quant="nf4")),
        "longqlora_s2_eval": dict(train="longqlora", eval=dict(rope_factor=factor, quant="nf4", attn="s2")),
        "lora_full_attn": dict(train=long + ["--rope-factor", pi, "--attn", "full", "--quant", "none",
                                             "--lora-r", "64"], eval=dict(rope_factor=factor, quant="none")),
        "nopi_lora": dict(train=long + ["--rope-factor", no_pi, "--attn", "s2"] + qlora,
                          eval=dict(rope_factor=1, quant="nf4")),
        "full_ft": dict(train=common + ["--ctx", str(cfg["long_ctx"]), "--grad-accum", str(f["sequences"]),
                                        "--lr", str(f["full_ft_lr"]), "--rope-factor", pi, "--attn", "s2",
                                        "--full-finetune", "--quant", "none"],
                        eval=dict(rope_factor=factor, quant="none")),
        "longqlora_r8": dict(train=long + ["--rope-factor", pi, "--attn", "s2", "--quant", "nf4", "--lora-r", "8"],
                             eval=dict(rope_factor=factor, quant="nf4")),
        "longqlora_r32": dict(train=long + ["--rope-factor", pi, "--attn", "s2", "--quant", "nf4", "--lora-r", "32"],
                              eval=dict(rope_factor=factor, quant="nf4")),
    }


def train_variant(name: str, flags: list[str], base_dir: Path, data_dir: Path, runs_dir: Path) -> dict:
    """One train.py run in this process; returns train.py's summary (output dir, losses, tokens/s, seconds)."""
    argv = ["--model", str(base_dir), "--data", str(data_dir), "--split", "train",
            "--out", str(runs_dir / name), "--overwrite"] + flags
    log(f"train {name}: python train.py {' '.join(argv)}")
    return train_lib.main(argv)


# --------------------------------------------------------------------------- 4. evaluation

def evaluate_variant(base_dir: Path, adapter, tokens, cfg: dict, rope_factor: float, quant: str,
                     attn: str = "full", model_dir: Path | None = None) -> list[dict]:
    """eval.py's sliding-window perplexity at every evaluation context, RoPE factor fixed for all of them."""
    e = cfg["eval"]
    model, _ = generate_lib.load_model(model_dir or base_dir, adapter, quant, torch.float32, rope_factor=rope_factor)
    model.set_attention(attn)
    out = []
    for L in e["ctx"]:
        r = eval_lib.evaluate_perplexity(model, tokens, L, "sliding", batch_size=e["batch_size"], progress=False)
        out.append({"eval_ctx": L, "ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"],
                    "windows": r["windows"], "stride": r["stride"], "seconds": r["seconds"]})
    return out


# --------------------------------------------------------------------------- report

def markdown_table(results: list[dict], ctxs) -> str:
    names = list(dict.fromkeys(r["variant"] for r in results))
    ppl = {(r["variant"], r["eval_ctx"]): r["ppl"] for r in results}
    lines = ["| variant | " + " | ".join(str(c) for c in ctxs) + " |", "|---|" + "---:|" * len(ctxs)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{ppl[(n, c)]:.2f}" for c in ctxs) + " |")
    return "\n".join(lines)


def plot(results: list[dict], ctxs, short_ctx: int, path: Path, all_variants) -> bool:
    """Perplexity against evaluation context, one line per variant (its colour fixed by its place in
    `all_variants`, so partial runs match the full plot); False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for name in dict.fromkeys(r["variant"] for r in results):
        ys = [next(r["ppl"] for r in results if r["variant"] == name and r["eval_ctx"] == c) for c in ctxs]
        ax.plot(ctxs, ys, marker="o", label=name, color=f"C{list(all_variants).index(name) % 10}",
                linestyle="--" if name in ("base", "pi", "control") else "-")
    ax.axvline(short_ctx, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")          # PI without training sits far above the rest
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.0f"))
    ax.set_xticks(list(ctxs), [str(c) for c in ctxs])
    ax.set_xlabel("evaluation context (tokens); pretrained at %d" % short_ctx)
    ax.set_ylabel("perplexity, pg19-mini validation (same tokens)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
    return True


def save_figure(fig, path: Path, dpi: int) -> None:
    """fig as a PNG at path, atomically (a reader never sees half an image), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- driver

def run(args) -> dict:
    cfg = CONFIGS["smoke" if args.smoke else "full"]
    if args.finetune_steps is not None:
        if args.finetune_steps < 1:
            raise ValueError(f"--finetune-steps must be at least 1, got {args.finetune_steps}")
        cfg = {**cfg, "finetune": {**cfg["finetune"], "steps": args.finetune_steps}}
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    data_dir, cache_dir, results_dir = Path(args.data_dir), Path(args.cache_dir), Path(args.results_dir)
    if not (data_dir / "train").is_dir() or not (data_dir / "validation").is_dir():
        raise FileNotFoundError(f"{data_dir}: expected a PG19-layout folder with train/ and validation/")
    specs = variant_specs(cfg)
    wanted = args.variants or list(specs)
    unknown = [v for v in wanted if v not in specs]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(specs)}")
    torch.manual_seed(SEED)
    timings, t_start = {}, time.perf_counter()
    data_key = sources.source_fingerprint(sources.source_files(data_dir, "train"), data_dir / "train")

    t = time.perf_counter()
    tok_dir = cache_dir / f"tokenizer-{config_key([cfg['tokenizer'], data_key])}"
    if (tok_dir / "tokenizer.model").is_file():
        log(f"tokenizer: cached {tok_dir}")
    else:
        train_tokenizer(data_dir, cfg["tokenizer"]["vocab_size"], tok_dir, cfg["tokenizer"].get("max_files"))
    timings["tokenizer"] = time.perf_counter() - t
    log(f"tokenizer: {timings['tokenizer']:.1f} s")

    t = time.perf_counter()
    base_dir = cache_dir / f"base-{config_key([cfg['model'], cfg['short_ctx'], cfg['pretrain'], tok_dir.name])}"
    if (base_dir / "pretrain.json").is_file():
        log(f"pretrain: cached {base_dir}")
        pretrain_summary = json.loads((base_dir / "pretrain.json").read_text())
    else:
        pretrain_summary = pretrain(cfg, data_dir, tok_dir, base_dir, cache_dir)
    timings["pretrain"] = time.perf_counter() - t
    log(f"pretrain: {timings['pretrain']:.1f} s (loss {pretrain_summary['first_loss']:.3f} -> "
        f"{pretrain_summary['last_loss']:.3f})")

    runs_dir = cache_dir / f"runs-{base_dir.name}"
    # a variant whose "train" is a name evaluates that variant's training run differently
    runs = dict.fromkeys(specs[v]["train"] if isinstance(specs[v]["train"], str) else v
                         for v in wanted if specs[v]["train"] is not None)
    trained, train_summaries = {}, {}
    for name in runs:
        t = time.perf_counter()
        summary = train_variant(name, specs[name]["train"], base_dir, data_dir, runs_dir)
        timings[f"train {name}"] = time.perf_counter() - t
        trained[name] = Path(summary["output"])
        train_summaries[name] = {k: summary[k] for k in ("first_loss", "last_loss", "tokens_per_s", "seconds",
                                                          "steps")}
        train_summaries[name]["flags"] = specs[name]["train"]
        log(f"train {name}: {timings[f'train {name}']:.1f} s")

    t = time.perf_counter()
    tokenizer = sources.load_tokenizer(base_dir)
    tokens = sources.tokenize_source(data_dir, tokenizer, "validation", cache_dir / "tokens", tokenizer.vocab_size,
                                     progress=False).tokens[:cfg["eval"]["max_tokens"]]
    results = []
    for name in [v for v in specs if v in wanted]:
        t_v = time.perf_counter()
        spec = specs[name]
        source = spec["train"] if isinstance(spec["train"], str) else name
        output = trained.get(source)
        full_model = output is not None and (output / "config.json").is_file()    # full_ft saves a whole model
        adapter = None if output is None or full_model else output
        rows = evaluate_variant(base_dir, adapter, tokens, cfg, spec["eval"]["rope_factor"], spec["eval"]["quant"],
                                spec["eval"].get("attn", "full"), model_dir=output if full_model else None)
        for r in rows:
            results.append({"variant": name, **r, "rope_factor": spec["eval"]["rope_factor"],
                            "quant": spec["eval"]["quant"], "attn": spec["eval"].get("attn", "full")})
        timings[f"eval {name}"] = time.perf_counter() - t_v
        log(f"eval {name}: " + ", ".join(f"{r['eval_ctx']}: {r['ppl']:.2f}" for r in rows)
            + f" ({timings[f'eval {name}']:.1f} s)")
    timings["eval"] = time.perf_counter() - t

    seconds = time.perf_counter() - t_start
    table = markdown_table(results, cfg["eval"]["ctx"])
    report = {
        "results": results,
        "config": {**cfg, "mode": "smoke" if args.smoke else "full", "seed": SEED, "data_dir": str(data_dir),
                   "eval_tokens": int(len(tokens)), "eval_protocol": "sliding (eval.py), stride = ctx // 2",
                   "pretrain": {**cfg["pretrain"], **pretrain_summary}, "base_dir": base_dir.name,
                   "variants": {n: {"eval": specs[n]["eval"], "train": train_summaries.get(n)} for n in specs
                                if n in wanted},
                   "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": seconds,
        "timings": timings,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(results_dir / "mini_paper.json", report)
    plotted = plot(results, cfg["eval"]["ctx"], cfg["short_ctx"], results_dir / "mini_paper.png", specs)
    log("\ntimings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {seconds:.0f} s")
    log(f"\nperplexity on the same {len(tokens) - 1:,} pg19-mini validation tokens, by evaluation context "
        f"(pretrained at {cfg['short_ctx']}, extended to {cfg['long_ctx']}):\n\n{table}\n")
    log(f"wrote {results_dir / 'mini_paper.json'}" + (f" and {results_dir / 'mini_paper.png'}" if plotted else ""))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="PG19-layout folder (train/, validation/)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="tokenizer, pretrained base and training runs")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS), help="where mini_paper.json / .png go")
    p.add_argument("--smoke", action="store_true", help="tiny configuration that runs every stage in seconds")
    p.add_argument("--variants", nargs="+", default=None, help="only these variants (default: all)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="optimizer steps of every trained variant (default: the configuration's)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice, all cores); 1 is faster on a busy machine")
    return p


def main(argv=None) -> dict:
    return run(cli.one_line_errors(build_parser()).parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli.run(main))

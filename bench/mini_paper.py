"""The LongQLoRA paper's experiment in miniature: extend a small LLaMA's context 4x on 2 CPU cores.

Measured: perplexity of the same pg19-mini validation tokens at 256, 512 and 1024 tokens of context, for a
5.3M LLaMA pretrained at 256 and extended to 1024 in several ways. Baselines: the unextended base (how a
model degrades past its trained length), PI without training, and `control` (the same training tokens at
256: what more training alone does). The paper (REFERENCE §7) shows this for LLaMA-2-7B, 4096 -> 8192; here
the same code paths (model.py, train.py, eval.py) run it at a scale that fits ~40 minutes on 2 CPU cores.
Data: infra/pg19-mini, the sample shipped with the repository (--data-dir for another PG19-layout folder).

  1-2.  tokenizer and base: bench/miniature.py (4,096-piece BPE; 600 steps x 8 x 256 tokens), cached;
  3. extend     256 -> 1024 (PI factor 4) with each variant below, every trained variant seeing the same
                number of tokens, with the same seed and therefore the same data order (train.py, in-process);
  4. evaluate   the first 48k tokens of validation with eval.py's `sliding` protocol. It scores every token
                x_1 .. x_{N-1} of the stream exactly once whatever the context length, so the three columns
                are perplexities of the SAME target tokens and differ only in how much context each token
                gets. Each variant keeps its own RoPE factor at every length (4 with PI, 1 without).

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

    python bench/mini_paper.py --threads 1     # the committed bench/results/mini_paper.json and .png
    python bench/mini_paper.py --finetune-steps 120 --variants control longqlora longqlora_s2_eval \
        lora_full_attn --results-dir bench/results/finetune_120_steps     # the committed 120-step follow-up
    python bench/mini_paper.py --smoke         # a tiny configuration in well under a minute (tests)

Writes RESULTS_DIR/mini_paper.json ({"results": [{"variant", "eval_ctx", "ppl", ...}], "config", "seconds",
"timings"}) and mini_paper.png (perplexity against context length, when matplotlib is installed), and
prints a markdown table (rows: variants, columns: evaluation context). The committed results and what
they show are in bench/README.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import benchlib
from benchlib import log
import miniature
from miniature import SEED

import eval as evaluation
from infra import sources

# The experiment's own sizes on top of miniature.CONFIGS: the first 48,000 tokens of the validation stream
# (Julius Caesar and the start of Macbeth), so that ten variants x three lengths (each token read ~2x by the
# sliding windows) fit in the budget.
EVAL = {"full": dict(ctx=(256, 512, 1024), max_tokens=48000, batch_size=4),
        "smoke": dict(ctx=(32, 64, 128), max_tokens=600, batch_size=4)}
CONFIGS = {mode: {**cfg, "eval": EVAL[mode]} for mode, cfg in miniature.CONFIGS.items()}


def variant_specs(cfg: dict) -> dict[str, dict]:
    """name -> {train: train.py flags, None (untrained) or the name of the variant whose run it evaluates, eval:
    eval settings}. The flags not given here are train.py's defaults, i.e. the paper's recipe (LoRA alpha 16,
    dropout 0.05, clip 0.3, NF4 double quant, S²-Attn with group ratio 1/4, packed documents, seed 42)."""
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


def evaluate_variant(model, tokens, cfg: dict) -> list[dict]:
    """eval.py's sliding-window perplexity at every evaluation context."""
    out = []
    for L in cfg["eval"]["ctx"]:
        r = evaluation.evaluate_perplexity(model, tokens, L, "sliding", batch_size=cfg["eval"]["batch_size"],
                                           progress=False)
        out.append({"eval_ctx": L, **{k: r[k] for k in ("ppl", "nll", "tokens", "windows", "stride", "seconds")}})
    return out


# --------------------------------------------------------------------------- report

def markdown_table(results: list[dict], ctxs) -> str:
    ppl = {(r["variant"], r["eval_ctx"]): r["ppl"] for r in results}
    return "\n".join(benchlib.markdown_table(["variant", *ctxs], [[n] + [f"{ppl[(n, c)]:.2f}" for c in ctxs] for n in
                                                                   dict.fromkeys(r["variant"] for r in results)]))


def plot(results: list[dict], ctxs, short_ctx: int, path: Path, all_variants) -> bool:
    """Perplexity against evaluation context, one line per variant (its colour fixed by its place in
    `all_variants`, so partial runs match the full plot); False when matplotlib is missing."""
    plt = benchlib.pyplot()
    if plt is None:
        return False
    import matplotlib.ticker

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
    benchlib.save_figure(fig, path, dpi=110)
    return True


# --------------------------------------------------------------------------- driver

def run(args) -> dict:
    cfg = CONFIGS["smoke" if args.smoke else "full"]
    if args.finetune_steps is not None:
        if args.finetune_steps < 1:
            raise ValueError(f"--finetune-steps must be at least 1, got {args.finetune_steps}")
        cfg = {**cfg, "finetune": {**cfg["finetune"], "steps": args.finetune_steps}}
    data_dir, cache_dir = miniature.setup(args)
    results_dir = Path(args.results_dir)
    specs = variant_specs(cfg)
    wanted = args.variants or list(specs)
    unknown = [v for v in wanted if v not in specs]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(specs)}")
    torch.manual_seed(SEED)
    timings, t_start = {}, time.perf_counter()
    tok_dir = miniature.cached_tokenizer(cfg, data_dir, cache_dir, timings)
    base_dir, pretrain_summary = miniature.cached_base(cfg, data_dir, tok_dir, cache_dir, timings)

    runs_dir = cache_dir / f"runs-{base_dir.name}"
    source = {v: specs[v]["train"] if isinstance(specs[v]["train"], str) else v for v in specs}
    trained, train_summaries = {}, {}
    for name in dict.fromkeys(source[v] for v in wanted if specs[v]["train"] is not None):
        t = time.perf_counter()
        flags = ["--model", str(base_dir), "--data", str(data_dir), "--split", "train"] + specs[name]["train"]
        summary, _ = miniature.finetune(name, flags, runs_dir / name)
        timings[f"train {name}"] = time.perf_counter() - t
        trained[name] = Path(summary["output"])
        train_summaries[name] = {**{k: summary[k] for k in ("first_loss", "last_loss", "tokens_per_s", "seconds",
                                                            "steps")}, "flags": specs[name]["train"]}
        log(f"train {name}: {timings[f'train {name}']:.1f} s")

    t = time.perf_counter()
    tokenizer = sources.load_tokenizer(base_dir)
    tokens = sources.tokenize_source(data_dir, tokenizer, "validation", cache_dir / "tokens", tokenizer.vocab_size,
                                     progress=False).tokens[:cfg["eval"]["max_tokens"]]
    results = []
    for name in [v for v in specs if v in wanted]:
        t_v, ev = time.perf_counter(), specs[name]["eval"]
        model = miniature.load_variant(base_dir, trained.get(source[name]), ev)
        rows = evaluate_variant(model, tokens, cfg)
        results += [{"variant": name, **r, "rope_factor": ev["rope_factor"], "quant": ev["quant"],
                     "attn": ev.get("attn", "full")} for r in rows]
        timings[f"eval {name}"] = time.perf_counter() - t_v
        log(f"eval {name}: " + ", ".join(f"{r['eval_ctx']}: {r['ppl']:.2f}" for r in rows)
            + f" ({timings[f'eval {name}']:.1f} s)")
    timings["eval"] = time.perf_counter() - t

    seconds = time.perf_counter() - t_start
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
    benchlib.write_json(results_dir / "mini_paper.json", report)
    plotted = plot(results, cfg["eval"]["ctx"], cfg["short_ctx"], results_dir / "mini_paper.png", specs)
    log("\ntimings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {seconds:.0f} s")
    log(f"\nperplexity on the same {len(tokens) - 1:,} pg19-mini validation tokens, by evaluation context "
        f"(pretrained at {cfg['short_ctx']}, extended to {cfg['long_ctx']}):\n\n"
        f"{markdown_table(results, cfg['eval']['ctx'])}\n")
    log(f"wrote {results_dir / 'mini_paper.json'}" + (f" and {results_dir / 'mini_paper.png'}" if plotted else ""))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    miniature.add_common_args(p, "tokenizer, pretrained base and training runs")
    p.add_argument("--results-dir", default=str(benchlib.ROOT / "bench" / "results"),
                   help="where mini_paper.json / .png go")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="optimizer steps of every trained variant (default: the configuration's)")
    return p


def main(argv=None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    benchlib.cli_main(main)

"""--fsdp against data parallel (DDP) on the CPU, 2 gloo ranks under torchrun: tokens/s per rank, and each
rank's peak RSS against the dry run's per-rank prediction.

    python bench/fsdp_bench.py --out bench/results/fsdp.json      # the committed JSON (README: DDP or FSDP)
    python bench/fsdp_bench.py --smoke                            # seconds: tiny widths, one step

For each mode (ddp, fsdp) and each width (a tiny model, then the measured one: dim 1536, 8 layers, vocab 4096,
ctx 256), `torchrun --nproc_per_node 2 train.py` on a random checkpoint (benchlib.random_checkpoint), synthetic
tokens, fp32, one thread per rank. Each rank reports its VmHWM (its own peak RSS; ru_maxrss would carry the
torchrun agent's over) after the run.
  speed:  tokens/s per rank of the steps after the first, FSDP / DDP of the same run (no absolute figure);
  memory: a rank's peak RSS above the tiny width's (the interpreter, torch and gloo) against what the dry run
          (infra/memory.py, --world-size 2 [--fsdp], 4-byte compute) predicts above the tiny width's prediction.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import benchlib

WIDTHS = {"tiny": dict(vocab_size=512, dim=64, intermediate_size=160, n_layers=2, n_heads=4),
          "measured": dict(vocab_size=4096, dim=1536, intermediate_size=4096, n_layers=8, n_heads=12)}
SMOKE = {"tiny": WIDTHS["tiny"], "measured": dict(vocab_size=512, dim=128, intermediate_size=320, n_layers=2,
                                                   n_heads=4)}
FLAGS = ["--data", "synthetic", "--dtype", "fp32", "--lora-dropout", "0.05", "--save-every", "0", "--log-every",
         "100", "--threads", "1", "--warmup", "0"]


def worker(argv: list[str], report: Path) -> None:
    """One rank (under torchrun): train.py with argv, then this process's peak RSS into report-<rank>.json."""
    import train
    train.main(argv)
    benchlib.write_json(f"{report}-{os.environ['RANK']}.json", {"vmhwm": benchlib.peak_rss_bytes()})


def launch(ckpt: Path, out: Path, ctx: int, steps: int, fsdp: bool) -> dict:
    """A 2-rank run; {per-rank peak RSS, tokens/s per rank of the steps after the first}."""
    argv = ["--model", str(ckpt), "--out", str(out), "--ctx", str(ctx), "--max-steps", str(steps), *FLAGS,
            *(["--fsdp"] if fsdp else [])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", str(out / "rank"), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **benchlib.PINNED_MMAP)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {'--fsdp ' if fsdp else ''}failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"peak_rss": [json.loads((out / f"rank-{r}.json").read_text())["vmhwm"] for r in range(2)],
            "tokens_per_s_per_rank": sum(r["tokens"] for r in timed) / 2 / seconds,
            "loss": [r["loss"] for r in rows]}


def predicted(width: dict, ctx: int, fsdp: bool) -> int:
    from infra import memory
    from model import ModelArgs
    return memory.predict_peak_memory(ModelArgs(**width), ctx, dtype_bytes=4, world_size=2, fsdp=fsdp)["peak_bytes"]


def run(args) -> dict:
    import tempfile
    from model import ModelArgs
    widths, ctx, steps = (SMOKE, 64, 1) if args.smoke else (WIDTHS, args.ctx, args.steps)
    results = {"command": "python bench/fsdp_bench.py " + " ".join(args.argv), "machine": benchlib.machine(),
               "ctx": ctx, "steps": steps, "widths": widths, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, width in widths.items():
            ckpt = benchlib.random_checkpoint(Path(args.cache_dir) / f"fsdp-{benchlib.config_key(width)}",
                                              ModelArgs(**width, max_position_embeddings=4096), seed=0)
            for mode in ("ddp", "fsdp"):
                r = launch(ckpt, Path(tmp) / f"{name}-{mode}", ctx, steps, mode == "fsdp")
                r["predicted"] = predicted(width, ctx, mode == "fsdp")
                results["runs"][f"{name}-{mode}"] = r
                benchlib.log(f"{name} {mode}: peak RSS per rank {[round(x / 2**20) for x in r['peak_rss']]} MiB, "
                             f"predicted {r['predicted'] / 2**20:.0f} MiB, {r['tokens_per_s_per_rank']:.1f} tok/s/rank")
    runs = results["runs"]
    for mode in ("ddp", "fsdp"):
        big, small = runs[f"measured-{mode}"], runs[f"tiny-{mode}"]
        measured = max(big["peak_rss"]) - max(small["peak_rss"])
        want = big["predicted"] - small["predicted"]
        results[f"{mode}_rss_above_tiny"] = {"measured": measured, "predicted": want, "ratio": measured / want}
        benchlib.log(f"{mode}: peak RSS per rank above the tiny width {measured / 2**20:.0f} MiB, predicted "
                     f"{want / 2**20:.0f} MiB: measured / predicted {measured / want:.2f}")
    results["fsdp_over_ddp_tokens_per_s"] = runs["measured-fsdp"]["tokens_per_s_per_rank"] / \
        runs["measured-ddp"]["tokens_per_s_per_rank"]
    benchlib.log(f"tokens/s per rank, FSDP / DDP: {results['fsdp_over_ddp_tokens_per_s']:.2f}")
    if args.out:
        benchlib.write_json(args.out, results)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run; the first is not timed")
    p.add_argument("--cache-dir", default=str(benchlib.CACHE))
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny widths, one step: checks the script runs")
    return p


def main(argv=None):
    return benchlib.parse_and_run(build_parser, run, argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[3:], Path(sys.argv[2]))
    else:
        benchlib.cli_main(main)

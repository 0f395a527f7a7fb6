"""The measured effect of each place where our defaults deviate from LongQLoRA's published code (README's
deviation table; issue 18). Anyone can rerun it on a CPU in a few minutes:

    python bench/deviations.py [--out bench/results/deviations.json] [--eval-steps 300]

Training deviations: one optimizer step of train.py's own train_step on a tiny random LLaMA (NF4 base, LoRA
r=64, S²-Attn 1/4, ctx 256), once with our setting and once with the published one, everything else equal;
the effect is the rel-L2 of the two updates, ||u_ours - u_pub|| / ||u_pub||, on PADDED micro-batches (documents
of 256, 150, 40 and 12 tokens, right-padded to ctx, as LongQLoRA's truncation and SFT produce them) and on
unpadded ones. LoRA B starts non-zero (as after a few steps), so that A gets a gradient too.
  roll mask      --s2-shift roll vs roll-published (our padding mask vs the first group's for every group)
  segment        --s2-shift segment (our default) vs roll-published
  loss weighting --loss-weighting tokens vs micro-batch (4 micro-batches of one sequence)
  dropout masks  --lora-dropout-masks shared vs per-projection at dropout 0.05, beside the rel-L2 between two
                 seeds of the per-projection masks (the noise floor: different masks are different draws)
  precision      bf16 / fp16 base compute vs fp32 (CPU; the published runs are fp16 on GPU)
  all            our preset vs --as-published (the warmup aside, which acts on the LR, not the gradient)
Warmup: the LR of the first steps under both schedules (train.constant_with_warmup), and the LR summed over the
20 warmup steps. Evaluation: perplexity with LongQLoRA's stride (8192 whatever the window; here, in a model with
a 128-token context, the analog stride is 8 x 128 = 1024) against our disjoint windows (stride = window), on a
tiny model fully fine-tuned for --eval-steps steps on the PG19-mini sample (the first 64k validation tokens),
windows of 16, 32, 64 and 128 tokens.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import benchlib  # noqa: F401  (puts the project on sys.path)

sys.path.insert(0, str(benchlib.ROOT / "tests"))

import torch  # noqa: E402

import eval as ev  # noqa: E402
import train  # noqa: E402
from conftest import make_hf_checkpoint  # noqa: E402
from infra import PG19_MINI, sources  # noqa: E402

CTX, PAD, DOCS = 256, 2, (256, 150, 40, 12)
EVAL_TOKENS = 65536      # the first 64k tokens of PG19-mini's validation books


def micro_batches(padded: bool, seed: int = 0) -> list[dict]:
    """One sequence per micro-batch; padded: documents of DOCS tokens, right-padded to CTX (pads are ignored)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in DOCS if padded else (CTX,) * len(DOCS):
        ids = torch.randint(3, 512, (1, CTX), generator=g)
        ids[0, 0] = 1
        mask = torch.arange(CTX)[None] < n
        ids[~mask] = PAD
        labels = ids.masked_fill(~mask, -100)
        out.append({"input_ids": ids, "labels": labels, "padding_mask": None if n == CTX else mask})
    return out


def update(model_dir: Path, flags: list, batches: list[dict], dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """The flat LoRA update of one train_step (SGD, LR 1, no clipping: minus the step's gradient)."""
    args = train.parse_args(["--model", str(model_dir), "--ctx", str(CTX), "--lora-dropout", "0", *map(str, flags)])
    torch.manual_seed(seed)
    model, trainable, _ = train.build_model(args, dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    before = torch.cat([p.detach().flatten().clone() for p in trainable])
    opt = torch.optim.SGD(trainable, lr=1.0)
    torch.manual_seed(seed + 1)          # the dropout masks
    train.train_step(model, batches, opt, torch.amp.GradScaler("cpu", enabled=False), 0, args.loss_weighting)
    return before - torch.cat([p.detach().flatten() for p in trainable])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def training_effects(model_dir: Path) -> dict:
    pub = ["--s2-shift", "roll-published", "--loss-weighting", "micro-batch"]
    out = {}
    for padded in (True, False):
        b = micro_batches(padded)
        ref = update(model_dir, pub, b)
        key = "padded" if padded else "unpadded"
        out[key] = {
            "roll mask": rel_l2(update(model_dir, ["--s2-shift", "roll", "--loss-weighting", "micro-batch"], b), ref),
            "segment": rel_l2(update(model_dir, ["--s2-shift", "segment", "--loss-weighting", "micro-batch"], b), ref),
            "loss weighting": rel_l2(update(model_dir, ["--s2-shift", "roll-published", "--loss-weighting", "tokens"],
                                            b), ref),
            "bf16 vs fp32": rel_l2(update(model_dir, pub, b, torch.bfloat16), ref),
            "fp16 vs fp32": rel_l2(update(model_dir, pub, b, torch.float16), ref),
            "all (preset vs --as-published)": rel_l2(update(model_dir, [], b), update(model_dir, ["--as-published",
                                                                                                   "--dtype", "fp32"], b)),
        }
        drop = lambda masks, seed: update(model_dir, [*pub, "--lora-dropout", 0.05, "--lora-dropout-masks", masks],  # noqa: E731
                                          b, seed=seed)
        per = drop("per-projection", 0)
        out[key]["dropout masks shared vs per-projection"] = rel_l2(drop("shared", 0), per)
        out[key]["dropout masks, two seeds (noise floor)"] = rel_l2(drop("per-projection", 1), per)
        benchlib.log(f"{key}: " + ", ".join(f"{k} {v:.3g}" for k, v in out[key].items()))
    return out


def warmup_effects(warmup: int = 20, lr: float = 2e-4) -> dict:
    def lrs(hf):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched, seen = train.constant_with_warmup(opt, warmup, hf=hf), []
        for _ in range(warmup + 1):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return seen
    ours, hf = lrs(False), lrs(True)
    return {"first_lrs_ours": ours[:3], "first_lrs_hf": hf[:3], "warmup_lr_sum_ours": sum(ours[:warmup]),
            "warmup_lr_sum_hf": sum(hf[:warmup]), "first_full_lr_step_ours": ours.index(lr),
            "first_full_lr_step_hf": hf.index(lr)}


def eval_effects(root: Path, steps: int) -> dict:
    """disjoint (stride = window) against LongQLoRA's fixed stride, on a briefly trained tiny model."""
    base = make_hf_checkpoint(root / "tiny", initializer_range=0.125)
    out = root / "ft"
    train.main(["--model", str(base), "--data", str(PG19_MINI), "--split", "train", "--ctx", "128",
                "--full-finetune", "--quant", "none", "--attn", "full", "--dtype", "fp32", "--lr", "3e-3",
                "--warmup", "10", "--max-steps", str(steps), "--save-every", "0", "--log-every", "100",
                "--out", str(out), "--cache-dir", str(root / "cache")])
    from generate import load_model
    model = load_model(str(out / "model"), dtype=torch.float32)[0]
    tok = sources.load_tokenizer(base)
    tokens = sources.tokenize_source(PG19_MINI, tok, split="validation", cache_dir=root / "cache").tokens[:EVAL_TOKENS]
    stride = 8 * 128         # 8192 / 1024: LongQLoRA's stride over its shortest window, scaled to this context
    res = {"eval_tokens": int(len(tokens)), "stride": stride}
    for L in (16, 32, 64, 128):
        ours = ev.evaluate_perplexity(model, tokens, L, "disjoint", batch_size=64, progress=False)
        pub = ev.evaluate_perplexity(model, tokens, L, "longqlora", stride=stride, batch_size=64, progress=False)
        res[str(L)] = {"ppl_disjoint": ours["ppl"], "ppl_longqlora_stride": pub["ppl"],
                       "windows": [ours["windows"], pub["windows"]],
                       "change_pct": 100 * (pub["ppl"] / ours["ppl"] - 1)}
        benchlib.log(f"eval L={L}: disjoint {ours['ppl']:.3f} ({ours['windows']} windows), stride {stride} "
                     f"{pub['ppl']:.3f} ({pub['windows']}): {res[str(L)]['change_pct']:+.2f}%")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(benchlib.ROOT / "bench" / "results" / "deviations.json"))
    p.add_argument("--eval-steps", type=int, default=300, help="fine-tuning steps of the eval model (0: skip)")
    args = p.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_hf_checkpoint(root / "model", initializer_range=0.125, max_position_embeddings=64)
        result = {"machine": benchlib.machine(), "training_rel_l2": training_effects(model_dir),
                  "warmup": warmup_effects()}
        if args.eval_steps:
            result["eval"] = eval_effects(root, args.eval_steps)
    benchlib.write_json(args.out, result)
    print(f"results: {args.out}")
    assert all(math.isfinite(v) for v in result["training_rel_l2"]["padded"].values())


if __name__ == "__main__":
    benchlib.cli_main(main)

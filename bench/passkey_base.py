"""A passkey-capable base for the long-context miniature (issue 21, step 1): model.py's LLaMA trained from scratch
by ONE planned schedule in two phases, so that it retrieves a passkey inside its trained window and, untrained
past it, fails beyond it.

    phase copy     copy.steps steps on copy documents of copy.ctx tokens: BOS, then n distinct tokens (n uniform
                   in copy.distinct) drawn from an alphabet of the 10 digits and the most frequent tokens of the
                   train split, repeated to the end. Every token after the first period is predicted only by an
                   induction circuit (find the earlier occurrence of the current token, copy the token after it),
                   the circuit passkey retrieval needs; in short documents it is the cheapest thing to learn.
    phase passkey  passkey.steps steps on passkey.ctx-token sequences: BOS, with probability passkey_prob an
                   answered passkey episode in eval.py's format and of uniform length (fact_corpus.PasskeyEpisodes),
                   then pg19 text to the end.
    schedule       one AdamW run over both phases (betas 0.9 / 0.95, weight decay on matrices only, gradient
                   clipping): linear warmup, then cosine decay over copy.steps + passkey.steps
                   (miniature.warmup_cosine).
    evaluate       eval.evaluate_passkey at every eval length (eval.py's own prompts and scoring), and
                   eval.evaluate_perplexity on the validation split at passkey.ctx (disjoint windows).

The base is cached under --cache-dir by everything that defines it, like miniature's base; the report goes to
bench/results/passkey_base.json.

    python bench/passkey_base.py --threads 1                 # the committed run
    python bench/passkey_base.py --smoke                     # every stage in seconds
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import benchlib
import fact_corpus
import miniature
from benchlib import log
from miniature import SEED

import eval as evaluation   # the project's modules: benchlib put the repository root on sys.path
import generate
from infra import hf, sources
from model import ModelArgs, Transformer

DEFAULT_OUT = benchlib.ROOT / "bench" / "results" / "passkey_base.json"

# "full": the probe of issue 21 (1.84M parameters; 512 tokens a step in the copy phase, 2,048 in the passkey
# phase), the passkey phase longer than the probe's (which was still improving), to fit ~35 minutes on one busy
# thread. "smoke": every stage, tiny.
CONFIGS = {
    "full": dict(
        tokenizer=miniature.CONFIGS["full"]["tokenizer"],
        model=dict(dim=128, intermediate_size=344, n_layers=4, n_heads=4, norm_eps=1e-5, rope_theta=10000.0),
        copy=dict(steps=3000, batch_size=16, ctx=32, alphabet=64, distinct=(3, 10)),
        passkey=dict(steps=4500, batch_size=8, ctx=256, passkey_prob=0.55),
        optim=dict(lr=2e-3, warmup=100, min_lr_ratio=0.1, weight_decay=0.1, max_grad_norm=1.0),
        eval=dict(seq_len=(256, 512, 1024), trials=50, seed=0),
    ),
    "smoke": dict(
        tokenizer=miniature.CONFIGS["smoke"]["tokenizer"],
        model=dict(dim=32, intermediate_size=64, n_layers=2, n_heads=2, norm_eps=1e-5, rope_theta=10000.0),
        copy=dict(steps=6, batch_size=4, ctx=16, alphabet=24, distinct=(3, 5)),
        passkey=dict(steps=4, batch_size=2, ctx=192, passkey_prob=0.5),
        optim=dict(lr=3e-3, warmup=2, min_lr_ratio=0.1, weight_decay=0.1, max_grad_norm=1.0),
        eval=dict(seq_len=(256, 320), trials=2, seed=0),
    ),
}


# --------------------------------------------------------------------------- the two phases' sequences

def copy_alphabet(tokenizer, train_docs: list[np.ndarray], size: int) -> np.ndarray:
    """The digits' ids, then the most frequent other tokens of the train split: `size` ids in all. A digit's id
    is the piece it encodes to after the space piece: a byte-fallback piece where the tokenizer has none."""
    digits = [tokenizer.encode(str(d), bos=False)[-1] for d in range(10)]
    counts = np.bincount(np.concatenate(train_docs), minlength=tokenizer.vocab_size)
    counts[digits + [0, tokenizer.bos_id, tokenizer.eos_id]] = 0          # no digit twice, no special token
    return np.asarray(digits + np.argsort(-counts, kind="stable")[:size - len(digits)].tolist(), dtype=np.int64)


def copy_document(rng, alphabet: np.ndarray, c: dict, bos: int) -> np.ndarray:
    """BOS, then n distinct alphabet tokens repeated up to c["ctx"] tokens."""
    period = rng.choice(alphabet, size=int(rng.integers(c["distinct"][0], c["distinct"][1] + 1)), replace=False)
    return np.concatenate([[bos], np.resize(period, c["ctx"] - 1)])


def passkey_sequence(rng, text: fact_corpus.TextSource, episodes: fact_corpus.PasskeyEpisodes, c: dict,
                     bos: int) -> tuple[np.ndarray, bool]:
    """(c["ctx"] tokens: BOS, maybe an answered passkey episode, pg19 text to the end; whether it holds one)."""
    tokens = [bos]
    if rng.random() < c["passkey_prob"]:
        tokens += episodes.sample(rng, c["ctx"] - 1) or []
    return np.concatenate([tokens, text.take(rng, c["ctx"] - len(tokens))]), len(tokens) > 1   # an episode < ctx


# --------------------------------------------------------------------------- training

def train_base(cfg: dict, data_dir: Path, tok_dir: Path, out_dir: Path, cache_dir: Path) -> dict:
    """Train the base by the planned schedule, save it as an HF folder in out_dir; returns the phases' summary."""
    o = cfg["optim"]
    tokenizer = sources.load_tokenizer(tok_dir)
    train_docs = fact_corpus.split_documents(data_dir, "train", tokenizer, cache_dir / "tokens")
    alphabet = copy_alphabet(tokenizer, train_docs, cfg["copy"]["alphabet"])
    text, episodes = fact_corpus.TextSource(train_docs), fact_corpus.PasskeyEpisodes(tokenizer)
    rng = np.random.default_rng([SEED, 21])
    torch.manual_seed(SEED)
    model = Transformer(ModelArgs(vocab_size=tokenizer.vocab_size, max_position_embeddings=cfg["passkey"]["ctx"],
                                  bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                  **cfg["model"])).train()
    matrices = [t for t in model.parameters() if t.dim() >= 2]
    vectors = [t for t in model.parameters() if t.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": o["weight_decay"]},
                                   {"params": vectors, "weight_decay": 0.0}], lr=o["lr"], betas=(0.9, 0.95))
    total = cfg["copy"]["steps"] + cfg["passkey"]["steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: miniature.warmup_cosine(s, o["warmup"], total, o["min_lr_ratio"]))
    log(f"base: {sum(t.numel() for t in model.parameters()) / 1e6:.2f}M parameters; copy alphabet "
        f"{tokenizer.decode(alphabet.tolist())!r}")
    phases, step = [], 0
    for name in ("copy", "passkey"):
        c, losses, episodes_held, t0 = cfg[name], [], 0, time.perf_counter()
        for k in range(c["steps"]):
            if name == "copy":
                rows = [copy_document(rng, alphabet, c, tokenizer.bos_id) for _ in range(c["batch_size"])]
            else:
                rows, held = zip(*(passkey_sequence(rng, text, episodes, c, tokenizer.bos_id)
                                   for _ in range(c["batch_size"])))
                episodes_held += sum(held)
            batch = torch.from_numpy(np.stack(rows).astype(np.int64))
            losses.append(miniature.optimizer_step(model, model.loss(batch, batch, reduction="mean"), optimizer,
                                                   schedule, o["max_grad_norm"]))
            step += 1
            if (k + 1) % max(1, c["steps"] // 10) == 0:
                window = losses[-max(1, c["steps"] // 10):]
                tokens_per_s = (k + 1) * c["batch_size"] * c["ctx"] / (time.perf_counter() - t0)
                log(f"  {name} step {k + 1}/{c['steps']} loss {sum(window) / len(window):.3f} lr "
                    f"{schedule.get_last_lr()[0]:.2e} ({tokens_per_s:.0f} tok/s)")
        seconds = time.perf_counter() - t0
        tokens = c["steps"] * c["batch_size"] * c["ctx"]
        phases.append({"phase": name, "steps": c["steps"], "tokens": tokens, "seconds": seconds,
                       "tokens_per_s": tokens / max(seconds, 1e-9), "first_loss": losses[0] if losses else None,
                       "last_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
                       **({"sequences_with_episode": episodes_held} if name == "passkey" else {})})
    hf.save_model(model.eval(), out_dir, copy_from=tok_dir)
    summary = {"params": sum(t.numel() for t in model.parameters()), "steps": step, "phases": phases,
               "copy_alphabet": alphabet.tolist(), "passkey_episode_fixed_tokens": episodes.fixed}
    benchlib.write_json(out_dir / "train.json", summary)        # written last: marks the cache entry complete
    return summary


def cached_base(cfg: dict, data_dir: Path, tok_dir: Path, cache_dir: Path) -> tuple[Path, dict, bool]:
    """(base folder, training summary, cached): this configuration's base, trained if missing."""
    key = benchlib.config_key([{k: cfg[k] for k in ("model", "copy", "passkey", "optim")}, tok_dir.name,
                               miniature.data_fingerprint(data_dir, "train")])
    base_dir = cache_dir / f"passkey-base-{key}"
    if (base_dir / "train.json").is_file():
        log(f"base: cached {base_dir}")
        return base_dir, json.loads((base_dir / "train.json").read_text()), True
    return base_dir, train_base(cfg, data_dir, tok_dir, base_dir, cache_dir), False


# --------------------------------------------------------------------------- driver

def run(args) -> dict:
    cfg = CONFIGS["smoke" if args.smoke else "full"]
    for phase in ("copy", "passkey"):
        if getattr(args, f"{phase}_steps") is not None:
            cfg = {**cfg, phase: {**cfg[phase], "steps": getattr(args, f"{phase}_steps")}}
    data_dir, cache_dir = miniature.setup(args)
    timings, t_start = {}, time.perf_counter()
    tok_dir = miniature.cached_tokenizer(cfg, data_dir, cache_dir, timings)
    t = time.perf_counter()
    base_dir, summary, cached = cached_base(cfg, data_dir, tok_dir, cache_dir)
    timings["train"] = time.perf_counter() - t
    model, _ = generate.load_model(base_dir, dtype=torch.float32)
    tokenizer = sources.load_tokenizer(base_dir)
    passkey = []
    for L in cfg["eval"]["seq_len"]:
        r = evaluation.evaluate_passkey(model, tokenizer, L, cfg["eval"]["trials"], cfg["eval"]["seed"], progress=False)
        passkey.append({"seq_len": L, **{k: r[k] for k in ("accuracy", "correct", "trials", "depth_accuracy",
                                                            "seconds")}})
        log(f"passkey at {L}: {r['correct']}/{r['trials']} exact ({r['seconds']:.0f} s)")
    valid = np.concatenate(fact_corpus.split_documents(data_dir, "validation", tokenizer, cache_dir / "tokens"))
    ppl = evaluation.evaluate_perplexity(model, valid, cfg["passkey"]["ctx"], progress=False, name="passkey base")
    log(f"validation ppl at {cfg['passkey']['ctx']}: {ppl['ppl']:.2f} ({ppl['tokens']:,} tokens)")
    timings["eval"] = sum(r["seconds"] for r in passkey) + ppl["seconds"]
    report = {"passkey": passkey, "text_ppl": {k: ppl[k] for k in ("seq_len", "protocol", "ppl", "tokens", "seconds")},
              "base": {"dir": base_dir.name, "cached": cached, **summary},
              "config": {**cfg, "mode": "smoke" if args.smoke else "full", "seed": SEED, "data_dir": str(data_dir),
                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "command": "python bench/passkey_base.py " + " ".join(args.argv)},
              "machine": benchlib.machine(), "timings": timings, "seconds": time.perf_counter() - t_start}
    out = Path(args.out)
    benchlib.write_json(out, report, indent=1)
    log(f"wrote {out}")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    miniature.add_common_args(p, "tokenizer and base")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON")
    p.add_argument("--copy-steps", type=int, default=None, help="override the copy phase's steps")
    p.add_argument("--passkey-steps", type=int, default=None, help="override the passkey phase's steps")
    return p


def main(argv=None) -> dict:
    return benchlib.parse_and_run(build_parser, run, argv)


if __name__ == "__main__":
    benchlib.cli_main(main)

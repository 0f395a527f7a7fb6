"""Does the extended model USE the longer window? A miniature where more context must help.

Measured: the perplexity of tokens that can be predicted only from evidence 64-256, 256-512 or 512-1024 tokens
back, at 256, 512 and 1024 tokens of context, and passkey accuracy (eval.py's task, 20 trials per length), for
mini_paper's base (bench/miniature.py, pretrained here at 256 on the corpus below) and its extensions to 1024
at "1x" (30 steps x 4 x 1024 tokens, mini_paper's budget) and "4x" (120 steps). Baselines: the base and PI
without training (where the extension starts), chance (ppl 8: a uniform guess among the 8 values) and
`control` (the same training tokens at 256). mini_paper's model reads only a few dozen tokens of context, so
ordinary text cannot show whether an extension uses the window; here the text makes long context necessary.

Data: infra/pg19-mini, the sample shipped with the repository (--data-dir: another PG19-layout folder), with
key-value facts written into it (bench/fact_corpus.py): 256-token pretraining and 1024-token extension
sequences of the train split, and 1024-token probes of the held-out validation split whose evidence lies in one
band. Every probe is read at every length L as BOS + its last L - 1 tokens, so every variant and length scores
the same targets; a band's score is exp(mean nll) of its value tokens, with a 95% bootstrap interval over
probes. bench/README.md describes the design and the results.

Variants (train.py flags in variant_flags):
  base               the pretrained model, RoPE factor 1
  pi                 the base with PI factor 4, no training
  control            NF4 + LoRA r64 at 256 tokens, no PI, full attention: the same tokens, short context
  longqlora          PI x4 + NF4 + LoRA r64 + S²-Attn (groups of 1/4, segment shift) at 1024; full attention at eval
  longqlora_roll     the same with LongLoRA's roll shift (what LongQLoRA trained with)
  longqlora_noshift  the same without the shifted half (LongLoRA's "short attention" ablation)
  lora_full_attn     longqlora with full attention in training (NF4 too: only the attention pattern differs)
  full_ft            PI + full fine-tuning of the dense model with S²-Attn (LongLoRA-Full)
  longqlora_s2_eval  longqlora's adapter evaluated WITH S²-Attn (not full attention)
and the diagnosis of the S²-Attn transfer (--diagnose): longqlora with one setting changed (DIAGNOSIS).

    python bench/long_context.py --threads 1            # the committed bench/results/long_context.json, .png
    python bench/long_context.py --diagnose --threads 1 # the committed bench/results/long_context/diagnosis.*
    python bench/long_context.py --smoke                # every stage on a tiny model, seconds (tests)
    python bench/long_context.py --table                # the markdown tables of an existing --out JSON

Writes --out ({"results": [{variant, steps, budget, eval_ctx, band, ppl, ppl_lo, ppl_hi, nll, n_tokens,
n_probes}], "passkey": [{variant, steps, budget, seq_len, accuracy, ...}], "config" (with "command"),
"timings", "seconds", "complete"}) after every variant, a plot beside it at the end, and markdown tables.
Trained runs are cached by their flags (--retrain ignores them), so a rerun only evaluates.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import benchlib
from benchlib import log
from fact_corpus import C_VALUE, TEXT, VALUE, Facts, band_name, bands, prepare_corpus
import miniature
from miniature import SEED

import eval as evaluation
from infra import sources

DEFAULT_OUT = benchlib.ROOT / "bench" / "results" / "long_context.json"
DIAGNOSIS_OUT = benchlib.ROOT / "bench" / "results" / "long_context" / "diagnosis.json"

# The corpus, evaluation and passkey sizes on top of miniature.CONFIGS. Facts: 8 statements per sequence and
# queries_per_token * ctx queries (16 at 256, 64 at 1024), between chunks of 4-24 natural tokens; one passkey
# episode at the start of a sequence with probability passkey_prob.
EXTRA = {
    "full": dict(corpus=dict(chunk=(4, 24), queries_per_token=1 / 16, passkey_prob=0.2, finetune_sequences=512),
                 budgets={"1x": 1, "4x": 4},
                 eval=dict(ctx=(256, 512, 1024), probes_per_band=48, queries=4, batch_size=8, bootstrap=1000),
                 passkey=dict(seq_len=(256, 512, 1024), trials=20, seed=0)),
    "smoke": dict(corpus=dict(chunk=(2, 6), queries_per_token=1 / 16, passkey_prob=0.3, finetune_sequences=16),
                  budgets={"1x": 1, "4x": 4},
                  eval=dict(ctx=(32, 64, 128), probes_per_band=3, queries=2, batch_size=4, bootstrap=50),
                  passkey=dict(seq_len=(320, 384), trials=2, seed=0)),
}
CONFIGS = {mode: {**cfg, **EXTRA[mode]} for mode, cfg in miniature.CONFIGS.items()}
# What the committed run trains at each budget (the 4x set is what fits the ~45-minute budget).
DEFAULT_RUNS = {"1x": ["control", "longqlora", "lora_full_attn", "longqlora_noshift", "longqlora_roll", "full_ft",
                       "longqlora_s2_eval"],
                "4x": ["longqlora", "lora_full_attn", "longqlora_noshift"]}
UNTRAINED = ["base", "pi"]


# --------------------------------------------------------------------------- variants

def variant_flags(cfg: dict, corpus: Path) -> dict[str, dict]:
    """name -> {train: train.py flags (None: untrained), eval: {rope_factor, quant, attn}}. Flags not given are
    train.py's defaults (LoRA alpha 16, dropout 0.05, clip 0.3, S²-Attn group 1/4, segment shift, seed 42)."""
    f, S, L = cfg["finetune"], cfg["short_ctx"], cfg["long_ctx"]
    factor = L // S
    common = ["--warmup", str(f["warmup"]), "--seed", str(SEED), "--dtype", "fp32", "--save-every", "0"]
    long = common + ["--data", str(corpus / "finetune.bin"), "--ctx", str(L), "--batch-size", "1",
                     "--grad-accum", str(f["sequences"])]
    lora = ["--lr", str(f["lr"]), "--quant", "nf4", "--lora-r", "64"]
    pi = ["--rope-factor", str(float(factor))]
    s2 = long + pi + lora + ["--attn", "s2"]
    pi_eval = dict(rope_factor=factor, quant="nf4")
    specs = {
        "base": dict(train=None, eval=dict(rope_factor=1, quant="none")),
        "pi": dict(train=None, eval=dict(rope_factor=factor, quant="none")),
        # 4 sequences of 256 per micro-batch, 4 micro-batches: the long variants' tokens per step, fewer calls
        "control": dict(train=common + ["--data", str(corpus / "control.bin"), "--ctx", str(S), "--batch-size",
                                        str(factor), "--grad-accum", str(f["sequences"]), "--rope-factor", "1",
                                        "--attn", "full"] + lora, eval=dict(rope_factor=1, quant="nf4")),
        "longqlora": dict(train=s2 + ["--s2-shift", "segment"], eval=pi_eval),
        "longqlora_roll": dict(train=s2 + ["--s2-shift", "roll"], eval=pi_eval),
        "longqlora_noshift": dict(train=s2 + ["--s2-shift", "none"], eval=pi_eval),
        "lora_full_attn": dict(train=long + pi + lora + ["--attn", "full"], eval=pi_eval),
        "full_ft": dict(train=long + pi + ["--lr", str(f["full_ft_lr"]), "--attn", "s2", "--full-finetune",
                                           "--quant", "none"], eval=dict(rope_factor=factor, quant="none")),
        "longqlora_s2_eval": dict(train="longqlora", eval=dict(pi_eval, attn="s2")),
    }
    for name, (extra, ev) in DIAGNOSIS.items():
        specs[name] = dict(train=s2 + ["--s2-shift", "segment"] + extra(cfg), eval=dict(pi_eval, **ev))
    return specs


# The S²-Attn transfer experiments: longqlora (PI x4, NF4, LoRA r64 alpha 16, S²-Attn 1/4 segment) with ONE
# thing changed (later flags override earlier ones), evaluated with full attention unless said otherwise.
DIAGNOSIS = {
    "s2_embed_norm": (lambda cfg: ["--train-embed-norm"], {}),                            # LongLoRA's LoRA+
    "s2_lr_div4": (lambda cfg: ["--lr", str(cfg["finetune"]["lr"] / 4)], {}),
    "s2_r8": (lambda cfg: ["--lora-r", "8"], {}),                                         # scaling 2
    "s2_r64_alpha128": (lambda cfg: ["--lora-alpha", "128"], {}),                         # scaling 2
    "s2_group_1_2": (lambda cfg: ["--group-size-ratio", "0.5"], {}),
    "s2_group_1_8": (lambda cfg: ["--group-size-ratio", "0.125"], {}),
    "s2_nopi": (lambda cfg: ["--rope-factor", "1"], {"rope_factor": 1}),
}
# What --diagnose runs (the 1x budget: what fitted the time left after the committed run).
DIAGNOSE_RUNS = {"1x": ["s2_group_1_2", "s2_group_1_8", "s2_lr_div4"]}


def answerable_fractions(cfg: dict, corpus: Path, facts: Facts, ratios=(1 / 8, 1 / 4, 1 / 2)) -> dict:
    """For the lookup queries of the extension corpus: the fraction whose statement lies in the query's own
    S²-Attn group, for the unshifted heads (groups [0, g), [g, 2g), ...), the segment-shifted heads ([0, g/2),
    [g/2, 3g/2), ...) and either: the training targets S²-Attn lets the model answer at all."""
    L = cfg["long_ctx"]
    x = np.fromfile(corpus / "finetune.bin", dtype=np.uint16).astype(np.int64).reshape(-1, L)
    pair_key = {int(t): k for k in range(Facts.N) for t in facts.pair[k]}
    key = {int(t): k for k, t in enumerate(facts.key)}
    pairs = []                                   # (query position, statement position)
    for seq in x:
        stated = {}
        for i, t in enumerate(seq[:-1].tolist()):
            if t in pair_key:
                stated[pair_key[t]] = i
            elif t in key and key[t] in stated:
                pairs.append((i, stated[key[t]]))
    q, st = np.asarray(pairs).T
    out = {"queries": int(len(q))}
    for r in ratios:
        g = int(L * r)
        h = g // 2
        plain = q // g == st // g
        shifted = ((q < h) & (st < h)) | ((q >= h) & (st >= h) & ((q - h) // g == (st - h) // g))
        out[f"1/{round(1 / r)}"] = {"group": g, "unshifted_heads": float(plain.mean()),
                                    "shifted_heads": float(shifted.mean()), "either": float((plain | shifted).mean())}
    return out


# --------------------------------------------------------------------------- evaluation

def band_masks(cfg: dict, probes: dict) -> dict[str, np.ndarray]:
    """band name -> bool (P, long_ctx) over probe positions: which targets a band scores (see the docstring)."""
    P, L = probes["tokens"].shape
    last = cfg["short_ctx"] - 1
    masks = {}
    for prefix, target in (("", VALUE), ("copy ", C_VALUE)):
        value = probes["kind"] == target
        masks.update({prefix + band_name(b): value & (probes["band"][:, None] == i) for i, b in enumerate(bands(cfg))})
    window = np.broadcast_to(np.arange(L)[None, :] >= L - last, (P, L))
    masks["all"] = window.copy()
    masks["text"] = window & (probes["kind"] == TEXT)
    return masks


def score_probes(model, cfg: dict, probes: dict, masks: dict) -> list[dict]:
    """Per (context length, band): perplexity of the band's targets, with a bootstrap interval over probes."""
    e = cfg["eval"]
    tokens = probes["tokens"]
    P, Lmax = tokens.shape
    rows = []
    for L in e["ctx"]:
        nll = np.zeros((P, Lmax))          # nll[p, t]: target t of probe p, read with BOS + last L - 1 tokens
        with torch.inference_mode():
            for s in range(0, P, e["batch_size"]):
                window = np.concatenate([tokens[s:s + e["batch_size"], :1], tokens[s:s + e["batch_size"], Lmax - L + 1:]],
                                        axis=1)
                out = evaluation.token_nll(model, torch.from_numpy(window)).double().numpy()     # (B, L - 1)
                nll[s:s + len(window), Lmax - L + 1:] = out       # window index i >= 1 <-> probe position Lmax - L + i
        for band, m in masks.items():
            if m[:, :Lmax - L + 1].any():
                raise AssertionError(f"band {band}: a target outside the {L}-token window")
            sums, counts = (nll * m).sum(1), m.sum(1)
            used = counts > 0
            sums, counts = sums[used], counts[used]
            mean = sums.sum() / counts.sum()
            rng = np.random.default_rng([SEED, L])
            idx = rng.integers(0, len(sums), size=(e["bootstrap"], len(sums)))
            boot = sums[idx].sum(1) / counts[idx].sum(1)
            rows.append({"eval_ctx": L, "band": band, "ppl": math.exp(mean), "nll": mean,
                         "ppl_lo": math.exp(np.percentile(boot, 2.5)), "ppl_hi": math.exp(np.percentile(boot, 97.5)),
                         "n_tokens": int(counts.sum()), "n_probes": int(len(sums))})
    return rows


# --------------------------------------------------------------------------- report

def fact_bands(cfg: dict, prefix: str = "") -> list[str]:
    return [prefix + band_name(b) for b in bands(cfg)]


BAND_ORDER = lambda cfg: fact_bands(cfg) + fact_bands(cfg, "copy ") + ["all", "text"]   # noqa: E731


def label(r: dict) -> str:
    return r["variant"] if r["steps"] == 0 else f"{r['variant']} ({r['steps']})"


def markdown_tables(results, passkey_rows, cfg) -> str:
    """README-ready tables: value perplexity per band x context for each fact kind; all/text perplexity;
    passkey accuracy."""
    ctxs = list(cfg["eval"]["ctx"])
    names = list(dict.fromkeys(label(r) for r in results))
    ppl = {(label(r), r["band"], r["eval_ctx"]): f"{r['ppl']:.2f}" for r in results}
    n_tok = {r["band"]: r["n_tokens"] for r in results}

    def table(title: str, columns: list[str], strip: int = 0) -> list[str]:
        head = ["variant (steps)"] + [f"{b[strip:]} @{c}" for b in columns for c in ctxs]
        rows = [[n] + [ppl[(n, b, c)] for b in columns for c in ctxs] for n in names]
        return [title, "", *benchlib.markdown_table(head, rows), ""]

    lines = []
    for prefix, what in (("", "lookup facts (one pair token P(k,v); the value is found by content)"),
                         ("copy ", "copy facts (C(k) W(v) repeated; the value is the token after the earlier key)")):
        if all(b in n_tok for b in fact_bands(cfg, prefix)):
            lines += table(f"Perplexity of the values of {what}, by the distance of their evidence (tokens back; "
                           f"{n_tok[fact_bands(cfg, prefix)[0]]} targets per band) and the evaluation context; "
                           f"chance = {Facts.N}:", fact_bands(cfg, prefix), len(prefix))
    lines += table(f"Perplexity of all targets / the ordinary-text targets in the last {cfg['short_ctx'] - 1} "
                   f"positions of the probes ({n_tok['all']} / {n_tok['text']} targets):", ["all", "text"])
    lens = list(cfg["passkey"]["seq_len"])
    acc = {(label(r), r["seq_len"]): r for r in passkey_rows}
    pk_names = [n for n in names if any((n, L) in acc for L in lens)]
    if pk_names:
        trials = "/".join(map(str, sorted({r["trials"] for r in acc.values()})))
        lines += [f"Passkey retrieval accuracy (eval.py's task, {trials} trials per length):", "",
                  *benchlib.markdown_table(["variant (steps)"] + [f"passkey @{L}" for L in lens], [
                      [n] + [f"{100 * acc[(n, L)]['accuracy']:.0f}%" if (n, L) in acc else "-" for L in lens]
                      for n in pk_names])]
    return "\n".join(lines).rstrip("\n")


def plot(results, passkey_rows, cfg, path: Path) -> bool:
    """Perplexity against context, one panel per band and kind, and passkey accuracy; False without matplotlib."""
    plt = benchlib.pyplot()
    if plt is None:
        return False
    ctxs, lens = list(cfg["eval"]["ctx"]), list(cfg["passkey"]["seq_len"])
    panels = fact_bands(cfg) + fact_bands(cfg, "copy ") + ["all"]
    fig, axes = plt.subplots(2, 4, figsize=(17, 8.4))
    axes = [axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0], axes[1, 1], axes[1, 2], axes[0, 3], axes[1, 3]]
    names = list(dict.fromkeys(label(r) for r in results))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    longest = max(r["steps"] for r in results)
    for n in names:
        r0 = next(r for r in results if label(r) == n)
        # colour: the variant; solid: the longest budget, dotted: shorter ones; dashed: untrained
        style = dict(marker="o", markersize=3, color=f"C{variants.index(r0['variant']) % 10}",
                     linestyle="--" if r0["steps"] == 0 else ("-" if r0["steps"] == longest else ":"))
        ppl = {(r["band"], r["eval_ctx"]): r["ppl"] for r in results if label(r) == n}
        for ax, band in zip(axes, panels):
            ax.plot(ctxs, [ppl[(band, c)] for c in ctxs], label=n, **style)
        acc = {r["seq_len"]: r["accuracy"] for r in passkey_rows if label(r) == n}
        axes[-1].plot(lens, [100 * acc.get(L, float("nan")) for L in lens], label=n, **style)
    for ax, band in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ctxs, [str(c) for c in ctxs])
        ax.set_title(("copy" if band.startswith("copy") else "lookup") + f" values, evidence {band.split()[-1]} back"
                     if band != "all" else "all tokens (last 255)", fontsize=9)
        ax.set_xlabel("evaluation context (tokens)")
        ax.grid(alpha=0.3)
    for ax in axes[:-2]:
        ax.axhline(Facts.N, color="grey", linewidth=0.8, linestyle=":")      # chance: uniform over the values
    axes[0].set_ylabel("perplexity of the same targets (held-out)")
    axes[3].set_ylabel("perplexity of the same targets (held-out)")
    pk = axes[-1]
    pk.set_xscale("log", base=2)
    pk.set_xticks(lens, [str(c) for c in lens])
    pk.set_ylim(-5, 105)
    pk.set(title="passkey retrieval", ylabel="accuracy (%)", xlabel="prompt length (tokens)")
    pk.grid(alpha=0.3)
    pk.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    benchlib.save_figure(fig, path, dpi=100)
    return True


# --------------------------------------------------------------------------- driver

def plan_runs(args, cfg: dict) -> tuple[dict, list[str]]:
    """({budget: [trained variants]}, [untrained variants]) that this command asks for."""
    plan = {b: list(v) for b, v in (DIAGNOSE_RUNS if args.diagnose else DEFAULT_RUNS).items()}
    if args.variants:
        plan = {b: [v for v in args.variants if v not in UNTRAINED] for b in (args.budgets or plan)}
    elif args.budgets:
        plan = {b: plan.get(b, DEFAULT_RUNS["1x"]) for b in args.budgets}
    for b in plan:
        if b not in cfg["budgets"]:
            raise ValueError(f"unknown budget {b}; choose from {', '.join(cfg['budgets'])}")
    untrained = [v for v in UNTRAINED if not args.variants or v in args.variants]
    return plan, [] if args.diagnose and not args.variants else untrained


def run(args) -> dict:
    out = Path(args.out) if args.out else (DIAGNOSIS_OUT if args.diagnose else DEFAULT_OUT)
    if args.table:
        report = json.loads(out.read_text())
        print(markdown_tables(report["results"], report["passkey"], report["config"]))
        return {}
    cfg = CONFIGS["smoke" if args.smoke else "full"]
    if args.pretrain_steps is not None:
        cfg = {**cfg, "pretrain": {**cfg["pretrain"], "steps": args.pretrain_steps}}
    data_dir, cache_dir = miniature.setup(args)
    plan, untrained = plan_runs(args, cfg)
    timings, t_start = {}, time.perf_counter()
    tok_dir = miniature.cached_tokenizer(cfg, data_dir, cache_dir, timings)
    t = time.perf_counter()
    corpus, corpus_stats = prepare_corpus(cfg, data_dir, tok_dir, cache_dir)
    timings["corpus"] = time.perf_counter() - t
    log(f"corpus {corpus.name}: {timings['corpus']:.1f} s; "
        + json.dumps({k: corpus_stats[k] for k in ("pretrain", "finetune")}))
    # pretrained on our 256-token sequences: a .bin token file is one stream that PackedDataset cuts at
    # multiples of short_ctx, i.e. exactly these sequences
    base_dir, pre = miniature.cached_base(cfg, corpus / "pretrain.bin", tok_dir, cache_dir, timings, [corpus.name])

    specs = variant_flags(cfg, corpus)
    for v in [v for b in plan.values() for v in b] + untrained:
        if v not in specs:
            raise ValueError(f"unknown variant {v}; choose from {', '.join(specs)}")
    runs_dir = cache_dir / f"runs-{base_dir.name}"
    tokenizer = sources.load_tokenizer(base_dir)
    probes = dict(np.load(corpus / "probes.npz"))
    masks = band_masks(cfg, probes)
    jobs = [(v, 0, None) for v in untrained] + [(v, cfg["finetune"]["steps"] * cfg["budgets"][b], b)
                                                 for b, names in plan.items() for v in names]
    trained, train_info, results, passkey_rows, extra = {}, {}, [], [], {}
    timings["eval"] = 0.0

    def write_report(final: bool) -> dict:      # after every variant: an interrupted run keeps what it finished
        report = {
            "results": results, "passkey": passkey_rows, "complete": final, **extra,
            "config": {**cfg, "mode": "smoke" if args.smoke else "full", "seed": SEED, "data_dir": str(data_dir),
                       "corpus": {**corpus_stats, "dir": corpus.name}, "base_dir": base_dir.name,
                       "pretrain": {**cfg["pretrain"], **pre}, "plan": plan, "train": train_info,
                       "variants": {n: specs[n]["eval"] for n in dict.fromkeys(j[0] for j in jobs)},
                       "bands": BAND_ORDER(cfg), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "command": "python bench/long_context.py " + " ".join(args.argv)},
            "seconds": time.perf_counter() - t_start, "timings": timings,
        }
        benchlib.write_json(out, report, indent=1)
        return report

    for name, steps, budget in jobs:    # each variant trained (or found in the cache), then evaluated
        ev = specs[name]["eval"]
        source = specs[name]["train"] if isinstance(specs[name]["train"], str) else name
        if steps and (source, steps) not in trained:
            flags = specs[source]["train"] + ["--max-steps", str(steps)]
            run_dir = runs_dir / f"{source}-{benchlib.config_key([flags, base_dir.name])}"
            t = time.perf_counter()
            summary, cached = miniature.finetune(source, ["--model", str(base_dir), "--log-every",
                                                          str(max(1, steps // 4))] + flags, run_dir, not args.retrain)
            timings[f"train {source} {steps}"] = took = time.perf_counter() - t
            trained[(source, steps)] = Path(summary["output"])
            train_info[f"{source} ({steps})"] = {**summary, "flags": flags, "cached": cached}
            log(f"train {source} ({steps} steps): " + ("cached" if cached else f"{took:.0f} s")
                + f", loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
        t = time.perf_counter()
        model = miniature.load_variant(base_dir, trained.get((source, steps)), ev)
        scaling = model.args.rope_scaling
        if (1.0 if scaling is None else float(scaling["factor"])) != ev["rope_factor"]:
            raise AssertionError(f"{name}: RoPE scaling {scaling}, expected factor {ev['rope_factor']}")
        tag = {"variant": name, "steps": steps, "budget": budget, "rope_factor": ev["rope_factor"],
               "quant": ev["quant"], "attn": ev.get("attn", "full")}
        rows = score_probes(model, cfg, probes, masks)
        results += [{**tag, **r} for r in rows]
        if tag["attn"] == "full":     # passkey decodes with the KV cache: full attention only
            for L in cfg["passkey"]["seq_len"]:
                r = evaluation.evaluate_passkey(model, tokenizer, L, cfg["passkey"]["trials"], cfg["passkey"]["seed"],
                                                progress=False)
                passkey_rows.append({**tag, "seq_len": L, **{k: r[k] for k in ("accuracy", "correct", "trials",
                                                                                "depth_accuracy", "seconds")}})
        timings[f"eval {name} {steps}"] = took = time.perf_counter() - t
        timings["eval"] += took
        by = {(r["band"], r["eval_ctx"]): r["ppl"] for r in rows}
        log(f"eval {name} ({steps}): " + "; ".join(
            f"{b} " + "/".join(f"{by[(b, c)]:.1f}" for c in cfg["eval"]["ctx"]) for b in BAND_ORDER(cfg))
            + "; passkey " + "/".join(f"{r['accuracy']:.2f}" for r in passkey_rows if r["variant"] == name
                                      and r["steps"] == steps) + f" ({took:.0f} s)")
        del model
        write_report(False)

    if args.diagnose:
        t = time.perf_counter()
        extra["answerable_under_s2"] = answerable_fractions(cfg, corpus, Facts(tokenizer))
        timings["answerable"] = time.perf_counter() - t
        log("lookup queries of the extension corpus whose evidence is inside their S²-Attn group: "
            + json.dumps(extra["answerable_under_s2"]))
    report = write_report(True)
    plotted = plot(results, passkey_rows, cfg, out.with_suffix(".png"))
    log("\ntimings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {report['seconds']:.0f} s\n")
    log(markdown_tables(results, passkey_rows, cfg))
    log(f"\nwrote {out}" + (f" and {out.with_suffix('.png')}" if plotted else ""))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    miniature.add_common_args(p, "tokenizer, corpus, base and training runs")
    p.add_argument("--out", default=None, help=f"results JSON (default {DEFAULT_OUT.relative_to(benchlib.ROOT)}; "
                   f"with --diagnose {DIAGNOSIS_OUT.relative_to(benchlib.ROOT)}); the plot goes beside it")
    p.add_argument("--diagnose", action="store_true", help="the S²-Attn transfer experiments (DIAGNOSIS)")
    p.add_argument("--budgets", nargs="+", default=None, help="only these step budgets (1x, 4x)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the base's pretraining steps")
    p.add_argument("--retrain", action="store_true", help="retrain variants even when a complete run is cached")
    p.add_argument("--table", action="store_true", help="only print the markdown tables of --out; runs nothing")
    return p


def main(argv=None) -> dict:
    return benchlib.parse_and_run(build_parser, run, argv)


if __name__ == "__main__":
    benchlib.cli_main(main)

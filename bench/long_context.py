"""Does the extended model USE the longer window? A miniature where more context must help.

bench/mini_paper.py shows the base degrading past its trained length and the PI variants staying flat, but its
5M-parameter model reads only a few dozen tokens of context, so it cannot show the paper's central claim. Here
the text itself makes long context necessary, and the evaluation scores exactly the tokens that need it:

  corpus   pg19-mini text into which key-value FACTS are inserted (class Facts), on byte-fallback ids 0x80-0xFF
           that pg19-mini's text never produces: 8 keys, 8 values, two kinds of fact.
             lookup  a statement is ONE "pair" token P(k, v); a query is K(k) followed by V(v): V(v) can be
                     predicted only by finding the key's statement in the context, by content;
             copy    a statement is C(k) W(v); a query repeats it: W(v) is the token after the earlier C(k), an
                     induction (copy) circuit, like passkey retrieval and verbatim copying.
           Each value is drawn per sequence, uniformly. Every sequence: BOS, with probability passkey_prob a
           passkey episode in eval.py's exact format (filler, "The pass key is K. ...", the question, the
           answer), then text with, per kind, the 8 statements at uniform positions and ctx / 16 queries at
           uniform positions (each asking an already stated key), so query-to-evidence distances spread over
           the whole window. (A first design, verbatim copies of text spans at a distance, was dropped: the 5.3M
           base did not learn in-context copying of text in its pretraining budget; it does not learn the copy
           facts either, see bench/README.md, but it learns the lookup facts.) Deterministic: numpy generators
           seeded with (42, purpose).
             pretraining  256-token sequences of the train split (evidence within 256);
             extension    1024-token sequences of the train split (evidence within 1024; every trained variant
                          reads this file; `control` reads the same tokens cut into 256-token chunks, in an
                          order arranged so that its step k sees exactly the tokens of the others' step k);
             probes       held-out pg19-mini VALIDATION text (never trained on): BOS + natural text ending with
                          4 copy queries then 4 lookup queries, on distinct keys, each stated once e tokens
                          before the probe's end, e uniform in the probe's band: 64-256, 256-512 or 512-1024;
                          the other 4 keys of each kind are stated (distractors) in the 72 tokens before the
                          queries.
  eval     every probe is read at 256, 512 and 1024 tokens of context: BOS + its last L - 1 tokens, so each
           target is at the same place at every L, and a statement e tokens from the end is inside the window iff
           e <= L - 1. Band 64-256: visible at every L; 256-512: invisible at 256, visible at 512 and 1024;
           512-1024: visible only at 1024. Scored targets, identical for every variant and every L:
             a band   the value tokens V(v) (lookup) or W(v) ("copy" bands) of the probes of that band (chance:
                      ppl 8, a uniform guess among the 8 values; a model that retrieves: ppl near 1);
             all      every target in the last 255 positions of every probe (text, statements and queries);
             text     the same without the fact tokens: ordinary text.
           Perplexity = exp(mean nll) of the band's targets, with a 95% bootstrap interval over probes. Passkey
           retrieval: eval.evaluate_passkey (greedy, KV cache, full attention) at 256 / 512 / 1024.
  models   a 5.3M LLaMA (mini_paper's architecture and tokenizer) pretrained from scratch at 256 on the
           pretraining corpus, cached under --cache-dir by its configuration; then each variant is trained on the
           extension corpus at "1x" (the paper's budget scaled as mini_paper scales it: 30 steps x 4 x 1024
           tokens) and "4x" (120 steps, as mini_paper's follow-up), with mini_paper's recipe and LRs.

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

    python bench/long_context.py --threads 1            # the committed run (tokenizer, corpus, base cached)
    python bench/long_context.py --diagnose --threads 1 # the S²-Attn transfer experiments (1x budget)
    python bench/long_context.py --smoke                # every stage on a tiny model, seconds (tests)
    python bench/long_context.py --table                # the markdown tables of an existing --out JSON

Writes --out (default bench/results/long_context.json: {"results": [{variant, steps, budget, eval_ctx, band,
ppl, ppl_lo, ppl_hi, nll, n_tokens, n_probes}], "passkey": [{variant, steps, budget, seq_len, accuracy,
correct, trials, depth_accuracy}], "config" (with "command"), "timings", "seconds", "complete"}) after every
variant (an interrupted run keeps what it finished; "complete" is true at the end), a plot beside it at the end,
and prints markdown tables. Trained runs are cached by their flags (--retrain ignores them), so a rerun only
evaluates.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from infra import PG19_MINI  # noqa: E402
DEFAULT_DATA = PG19_MINI    # the sample shipped in infra/pg19-mini: a fresh clone has everything it needs
DEFAULT_CACHE = ROOT / "bench" / "cache"
DEFAULT_OUT = ROOT / "bench" / "results" / "long_context.json"
DIAGNOSIS_OUT = ROOT / "bench" / "results" / "long_context" / "diagnosis.json"
SEED = 42
LR_SCALE = 1e-3 / 3e-4          # mini_paper's: the paper's LRs, scaled to a base pretrained at 1e-3

CONFIGS = {
    "full": dict(
        tokenizer=dict(vocab_size=4096),                  # = mini_paper's, so its cached tokenizer is shared
        model=dict(dim=256, intermediate_size=688, n_layers=4, n_heads=4, norm_eps=1e-5, rope_theta=10000.0),
        short_ctx=256, long_ctx=1024,
        # facts: 8 statements per sequence and queries_per_token * ctx queries (16 at 256, 64 at 1024), between
        # chunks of 4-24 natural tokens; one passkey episode at the start of a sequence with probability
        # passkey_prob.
        corpus=dict(chunk=(4, 24), queries_per_token=1 / 16, passkey_prob=0.2, finetune_sequences=512),
        pretrain=dict(steps=600, batch_size=8, lr=1e-3, warmup=20, min_lr_ratio=0.1, weight_decay=0.1,
                      max_grad_norm=1.0),
        finetune=dict(steps=30, sequences=4, lr=2e-4 * LR_SCALE, full_ft_lr=2e-5 * LR_SCALE, warmup=3),
        budgets={"1x": 1, "4x": 4},
        eval=dict(ctx=(256, 512, 1024), probes_per_band=48, queries=4, batch_size=8, bootstrap=1000),
        passkey=dict(seq_len=(256, 512, 1024), trials=20, seed=0),
    ),
    "smoke": dict(
        tokenizer=dict(vocab_size=512, max_files=3),
        model=dict(dim=32, intermediate_size=64, n_layers=2, n_heads=2, norm_eps=1e-5, rope_theta=10000.0),
        short_ctx=32, long_ctx=128,
        corpus=dict(chunk=(2, 6), queries_per_token=1 / 16, passkey_prob=0.3, finetune_sequences=16),
        pretrain=dict(steps=8, batch_size=4, lr=3e-3, warmup=2, min_lr_ratio=0.1, weight_decay=0.1,
                      max_grad_norm=1.0),
        finetune=dict(steps=2, sequences=2, lr=1e-3, full_ft_lr=1e-3, warmup=1),
        budgets={"1x": 1, "4x": 4},
        eval=dict(ctx=(32, 64, 128), probes_per_band=3, queries=2, batch_size=4, bootstrap=50),
        passkey=dict(seq_len=(320, 384), trials=2, seed=0),
    ),
}
# What the committed run trains at each budget (the 4x set is what fits the ~45-minute budget).
DEFAULT_RUNS = {"1x": ["control", "longqlora", "lora_full_attn", "longqlora_noshift", "longqlora_roll", "full_ft",
                       "longqlora_s2_eval"],
                "4x": ["longqlora", "lora_full_attn", "longqlora_noshift"]}
UNTRAINED = ["base", "pi"]


def log(message: str) -> None:
    print(message, flush=True)


def config_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


# =========================================================================== PROJECT INTERNALS
# Every use of the project's run-time code is in this section: thin wrappers, so that an API change is
# adapted here only. Stable interfaces: train.py's flags (train.main) and eval.py's functions.

import data as _data      # noqa: E402
from infra import sources as _sources  # noqa: E402
import eval as _eval      # noqa: E402
import generate as _generate  # noqa: E402
import mini_paper         # noqa: E402  (tokenizer training and pretraining are reused, not copied)
import train as _train    # noqa: E402


def load_tokenizer(path):
    return _sources.load_tokenizer(path)


def data_fingerprint(data_dir: Path, split: str) -> str:
    return _sources.source_fingerprint(_sources.source_files(data_dir, split), data_dir / split)


def split_documents(data_dir: Path, split: str, tokenizer, cache_dir: Path) -> list[np.ndarray]:
    """The documents of a PG19-layout split as token arrays, without their leading BOS."""
    corpus = _sources.tokenize_source(data_dir, tokenizer, split=split, cache_dir=cache_dir, progress=False)
    skip = 1 if corpus.bos else 0
    return [np.asarray(corpus.document(i)[skip:], dtype=np.int64) for i in range(len(corpus))]


def byte_token_ids(tokenizer, byte_values) -> list[int]:
    """The ids of the tokenizer's byte-fallback pieces <0xNN>."""
    ids = [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in byte_values]
    if len(set(ids)) != len(ids) or min(ids) <= max(tokenizer.bos_id, tokenizer.eos_id, 0):
        raise ValueError("the tokenizer has no byte-fallback pieces for these bytes")
    return ids


def passkey_text(n_filler: int, depth: float, key: str) -> str:
    """eval.py's passkey prompt text (task line, filler, key line at `depth`, filler, question)."""
    return _eval.passkey_text(n_filler, depth, key)


def train_tokenizer(data_dir: Path, cfg: dict, out_dir: Path) -> None:
    mini_paper.train_tokenizer(data_dir, cfg["vocab_size"], out_dir, cfg.get("max_files"))


def pretrain_base(cfg: dict, corpus_bin: Path, tokenizer_dir: Path, out_dir: Path, cache_dir: Path) -> dict:
    """mini_paper's pretraining (AdamW, warmup + cosine, chunked loss) on our 256-token sequences: a .bin token
    file is one stream that PackedDataset cuts at multiples of short_ctx, i.e. exactly our sequences."""
    return mini_paper.pretrain(cfg, corpus_bin, tokenizer_dir, out_dir, cache_dir)


def sampler_order(n: int, seed: int) -> np.ndarray:
    """The order in which train.py reads n sequences in its first epoch (data.ShuffledSampler)."""
    return np.asarray(_data.ShuffledSampler(n, seed).epoch_indices(0))


def finetune(flags: list[str]) -> dict:
    """One train.py run in this process (flags as on its command line); returns {output, seconds, losses...}."""
    summary = _train.main(flags)
    return {"output": summary["output"], "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
            "tokens_per_s": summary["tokens_per_s"], "seconds": summary["seconds"], "steps": summary["steps"]}


def load(base_dir: Path, adapter, rope_factor: float, quant: str, model_dir=None, attn: str = "full"):
    """A model for evaluation (fp32, eval mode): the base (or a fully fine-tuned model_dir), an optional LoRA
    adapter, the RoPE factor fixed at every length, the attention used by every forward."""
    model, _ = _generate.load_model(model_dir or base_dir, adapter, quant, torch.float32, rope_factor=rope_factor)
    model.set_attention(attn)       # S²-Attn: groups of 1/4 of the window, segment shift (the defaults)
    return model


def rope_factor_of(model) -> float:
    scaling = model.args.rope_scaling
    return 1.0 if scaling is None else float(scaling["factor"])


def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T - 1) nll; [:, t] = -log p(ids[:, t + 1] | ids[:, :t + 1])."""
    return _eval.token_nll(model, ids)


def passkey(model, tokenizer, seq_len: int, trials: int, seed: int) -> dict:
    """eval.py --task passkey at one length: {accuracy, correct, trials, depth_accuracy, ...}."""
    r = _eval.evaluate_passkey(model, tokenizer, seq_len, trials, seed, progress=False)
    return {k: r[k] for k in ("accuracy", "correct", "trials", "depth_accuracy", "seconds")}


def one_line_errors_main(main) -> int:
    from infra import cli
    return cli.run(main)

# =========================================================================== END OF PROJECT INTERNALS


# --------------------------------------------------------------------------- 1. the corpus

class TextSource:
    """Contiguous runs of natural tokens from a split's documents, drawn with a seeded generator."""

    def __init__(self, docs: list[np.ndarray]):
        self.docs = docs

    def take(self, rng: np.random.Generator, n: int) -> np.ndarray:
        fits = [i for i, d in enumerate(self.docs) if len(d) >= n]
        if not fits:
            raise ValueError(f"no document has {n} tokens")
        room = np.array([len(self.docs[i]) - n + 1 for i in fits], dtype=np.float64)
        i = fits[int(rng.choice(len(fits), p=room / room.sum()))]
        start = int(rng.integers(0, len(self.docs[i]) - n + 1))
        return self.docs[i][start:start + n]


class PasskeyEpisodes:
    """Passkey episodes in eval.py's format, answered: tokens of passkey_text(n, depth, K) + " K." + newline.
    eval.py's prompt (the same text without the answer) is a token prefix of an episode (checked)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.fixed = len(tokenizer.encode(passkey_text(0, 0.5, "12345") + " 12345.\n", bos=False))
        self.per_word = (len(tokenizer.encode(passkey_text(200, 0.5, "12345"), bos=False))
                         - len(tokenizer.encode(passkey_text(0, 0.5, "12345"), bos=False))) / 200
        self.not_prefix = 0

    def sample(self, rng: np.random.Generator, max_len: int) -> list[int] | None:
        if max_len < self.fixed:
            return None
        key, depth = str(int(rng.integers(10000, 100000))), float(rng.random())
        n = int(rng.integers(0, int((max_len - self.fixed) / self.per_word) + 1))
        while True:
            prompt = passkey_text(n, depth, key)
            ids = self.tok.encode(prompt + f" {key}.\n", bos=False)
            if len(ids) <= max_len or n == 0:
                break
            n = max(0, n - max(1, int((len(ids) - max_len) / self.per_word)))
        if len(ids) > max_len:
            return None
        head = self.tok.encode(prompt, bos=False)
        self.not_prefix += ids[:len(head)] != head
        return ids


class Facts:
    """Key-value facts in token space, on byte-fallback ids 0x80-0xFF, which pg19-mini's text never produces;
    8 keys x 8 values, two kinds:
      lookup  a statement is ONE "pair" token P(k, v); a query is the key token K(k) followed by its value V(v).
              A statement and a query share no id, so V(v) is read from the statement by attending to it by
              content: a one-layer lookup that needs no positional information.
      copy    a statement is the two tokens C(k) W(v); a query is the same two tokens again: W(v) is predicted
              by finding the earlier C(k) and copying the token AFTER it, an induction circuit (a previous-
              token head, i.e. relative position 1, and a content match), as in passkey retrieval."""

    N = 8

    def __init__(self, tokenizer):
        ids = byte_token_ids(tokenizer, range(0x80, 0x100))
        n = self.N
        self.key, self.value = np.asarray(ids[:n]), np.asarray(ids[n:2 * n])
        self.pair = np.asarray(ids[2 * n:2 * n + n * n]).reshape(n, n)
        self.ckey, self.cvalue = np.asarray(ids[2 * n + n * n:3 * n + n * n]), np.asarray(ids[3 * n + n * n:4 * n + n * n])


# token kinds (training sequences and probes)
TEXT, EPISODE, BOS_KIND, STATEMENT, QUERY_KEY, VALUE, C_STATEMENT, C_QUERY_KEY, C_VALUE = range(9)
KIND_NAMES = ("text", "episode", "bos", "statement", "query_key", "value", "copy_statement", "copy_query_key",
              "copy_value")
FACT_KINDS = (STATEMENT, QUERY_KEY, VALUE, C_STATEMENT, C_QUERY_KEY, C_VALUE)


def build_sequence(rng, text: TextSource, episodes, ctx: int, c: dict, bos: int, facts: Facts):
    """One training sequence of exactly ctx tokens: BOS, maybe a passkey episode, then natural text into which
    the facts are inserted. Every key k gets one value for the sequence and ONE statement P(k, v), at a token
    position uniform over the sequence; queries (K(k), V(v)) come at positions uniform over the sequence,
    ctx * queries_per_token of them, each asking a key already stated (a random one). So the distance from a
    query to its evidence is spread over the whole sequence: < 256 in pretraining, < 1024 in the extension.
    Returns (tokens, kind, fact_distances): kind per token, and for every query the distance from its value
    token back to the key's statement (the value is predicted from the key token, d - 1 positions later)."""
    tokens, kind, fact_d = [bos], [BOS_KIND], []
    if episodes is not None and rng.random() < c["passkey_prob"]:
        ep = episodes.sample(rng, ctx - 1)
        if ep is not None:
            tokens += ep
            kind += [EPISODE] * len(ep)
    natural = text.take(rng, ctx)
    start = len(tokens)
    room = max(ctx - start, 2)
    n_q = int(round(room * c["queries_per_token"]))
    events = []                        # (position, order, what, key): statements first at equal positions
    for what in ("lookup", "copy"):
        events += [(p, 0, what, k) for p, k in zip(rng.integers(start, start + room, size=Facts.N).tolist(),
                                                     rng.permutation(Facts.N).tolist())]
        events += [(p, 1, what, -1) for p in rng.integers(start, start + room, size=n_q).tolist()]
    events.sort()
    values = {w: rng.integers(0, Facts.N, size=Facts.N) for w in ("lookup", "copy")}
    stated: dict[str, dict[int, int]] = {"lookup": {}, "copy": {}}
    fact_d = {"lookup": [], "copy": []}
    pos = 0
    while len(tokens) < ctx:
        if events and len(tokens) >= events[0][0]:
            _, order, what, k = events.pop(0)
            v = values[what]
            if order == 0 and what == "lookup":
                stated[what][k] = len(tokens)
                tokens.append(int(facts.pair[k, v[k]]))
                kind.append(STATEMENT)
            elif order == 0:
                stated[what][k] = len(tokens)
                tokens += [int(facts.ckey[k]), int(facts.cvalue[v[k]])]
                kind += [C_STATEMENT, C_STATEMENT]
            elif stated[what]:
                k = int(rng.choice(sorted(stated[what])))
                fact_d[what].append((len(tokens) + 1, len(tokens) + 1 - stated[what][k]))
                if what == "lookup":
                    tokens += [int(facts.key[k]), int(facts.value[v[k]])]
                    kind += [QUERY_KEY, VALUE]
                else:
                    tokens += [int(facts.ckey[k]), int(facts.cvalue[v[k]])]
                    kind += [C_QUERY_KEY, C_VALUE]
            continue
        n = int(rng.integers(c["chunk"][0], c["chunk"][1] + 1))
        n = max(1, min(n, (events[0][0] if events else ctx) - len(tokens)))
        tokens += natural[pos:pos + n].tolist()
        kind += [TEXT] * n
        pos += n
    return (np.asarray(tokens[:ctx], dtype=np.int64), np.asarray(kind[:ctx], dtype=np.int8),
            {w: [d for at, d in fd if at < ctx] for w, fd in fact_d.items()})


def build_training_file(path: Path, rng, text, episodes, facts, ctx, n_sequences, c, bos) -> dict:
    """n_sequences sequences of ctx tokens, back to back, as a uint16 .bin; returns statistics."""
    seqs, kinds, fact_d = [], [], {"lookup": [], "copy": []}
    for _ in range(n_sequences):
        s, k, fd = build_sequence(rng, text, episodes, ctx, c, bos, facts)
        seqs.append(s)
        kinds.append(k)
        for w in fact_d:
            fact_d[w] += fd[w]
    write_tokens(path, np.concatenate(seqs))
    kinds = np.concatenate(kinds)
    edges = [0, 64, 256, 512, 1024]
    return {"sequences": n_sequences, "ctx": ctx, "tokens": int(kinds.size),
            "fraction": {name: float((kinds == i).mean()) for i, name in enumerate(KIND_NAMES)},
            "queries": {w: len(d) for w, d in fact_d.items()},
            "query_distance_counts": {w: {f"{a}-{b}": int(((np.asarray(d) >= a) & (np.asarray(d) < b)).sum())
                                          for a, b in zip(edges, edges[1:]) if a < ctx}
                                      for w, d in fact_d.items()}}


def write_tokens(path: Path, tokens: np.ndarray) -> None:
    if tokens.max() >= 2 ** 16:
        raise ValueError("token ids do not fit uint16")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tokens.astype(np.uint16).tofile(tmp)
    os.replace(tmp, path)


def control_file(long_path: Path, out_path: Path, long_ctx: int, short_ctx: int) -> None:
    """The extension tokens cut into short_ctx chunks, placed so that train.py's sampler gives control's step k
    (4x as many short sequences) exactly the tokens of the long variants' step k."""
    tokens = np.fromfile(long_path, dtype=np.uint16)
    q = long_ctx // short_ctx
    n_long = tokens.size // long_ctx
    long_order, short_order = sampler_order(n_long, SEED), sampler_order(n_long * q, SEED)
    chunks = tokens.reshape(n_long, q, short_ctx)
    out = np.empty((n_long * q, short_ctx), dtype=np.uint16)
    for i in range(n_long):
        for j in range(q):
            out[short_order[q * i + j]] = chunks[long_order[i], j]
    write_tokens(out_path, out.reshape(-1).astype(np.int64))


def bands(cfg: dict) -> list[tuple[int, int]]:
    s, L = cfg["short_ctx"], cfg["long_ctx"]
    return [(s // 4, s), (s, 2 * s), (2 * s, L)]


def band_name(b) -> str:
    return f"{b[0]}-{b[1]}"


def build_probes(rng, text: TextSource, facts: Facts, cfg: dict, bos: int) -> dict:
    """Evaluation probes of long_ctx tokens: BOS + natural text, ending with `queries` copy queries (C(k) W(v))
    and then `queries` lookup queries (K(k) V(v)), on distinct keys. Each queried key is stated once, e tokens
    before the end of the probe (its first token, for a copy statement), e uniform in the probe's band [lo,
    hi - 1] ([lo + 1, hi - 1] for copies, so that a copy statement is either wholly inside a window or not
    at all); the other keys of each kind are stated (with their own values) in the 72 tokens before the
    queries, as distractors. probes_per_band probes per band; "distance" holds the e of the asked statements."""
    e, L = cfg["eval"], cfg["long_ctx"]
    nq = e["queries"]
    q0 = L - 4 * nq                                   # first query key position
    probes, kinds, band_of, dist = [], [], [], []
    for bi, (lo, hi) in enumerate(bands(cfg)):
        lo = max(lo, 4 * nq + 2)
        for _ in range(e["probes_per_band"]):
            p = np.empty(L, dtype=np.int64)
            kind = np.full(L, TEXT, dtype=np.int8)
            p[0], kind[0] = bos, BOS_KIND
            p[1:q0] = text.take(rng, q0 - 1)
            taken: set[int] = set()

            def place(candidates, n, width):
                """n statement distances from candidates, each occupying [e, e - width + 1] disjoint from taken."""
                out = []
                for e_ in rng.permutation(candidates):
                    span = set(range(int(e_) - width + 1, int(e_) + 1))
                    if not span & taken and all(x > 4 * nq for x in span):
                        taken.update(span | {int(e_) + 1, int(e_) - width})     # not adjacent either
                        out.append(int(e_))
                        if len(out) == n:
                            return out
                raise AssertionError("no room for the statements")

            far = []
            for what, width, low in (("copy", 2, lo + 1), ("lookup", 1, lo)):
                keys = rng.permutation(Facts.N)
                values = rng.integers(0, Facts.N, size=Facts.N)
                asked, others = keys[:nq], keys[nq:]
                ends = place(np.arange(low, hi), nq, width)
                near = place(np.arange(4 * nq + 2, 4 * nq + 73), len(others), width)
                for k, e_ in zip(np.concatenate([asked, others]), ends + near):
                    if what == "lookup":
                        p[L - e_], kind[L - e_] = facts.pair[k, values[k]], STATEMENT
                    else:
                        p[L - e_], p[L - e_ + 1] = facts.ckey[k], facts.cvalue[values[k]]
                        kind[L - e_:L - e_ + 2] = C_STATEMENT
                q = q0 if what == "copy" else q0 + 2 * nq
                for i, k in enumerate(asked):
                    if what == "lookup":
                        p[q + 2 * i], p[q + 2 * i + 1] = facts.key[k], facts.value[values[k]]
                        kind[q + 2 * i], kind[q + 2 * i + 1] = QUERY_KEY, VALUE
                    else:
                        p[q + 2 * i], p[q + 2 * i + 1] = facts.ckey[k], facts.cvalue[values[k]]
                        kind[q + 2 * i], kind[q + 2 * i + 1] = C_QUERY_KEY, C_VALUE
                far += ends
            probes.append(p)
            kinds.append(kind)
            band_of.append(bi)
            dist.append(np.asarray(far))
    return {"tokens": np.stack(probes), "kind": np.stack(kinds), "band": np.asarray(band_of),
            "distance": np.stack(dist)}


def prepare_corpus(cfg: dict, data_dir: Path, tok_dir: Path, cache_dir: Path) -> tuple[Path, dict]:
    """Build (or reuse) the pretraining, extension and control token files and the probes."""
    c = cfg["corpus"]
    key = config_key([c, cfg["short_ctx"], cfg["long_ctx"], cfg["pretrain"]["steps"], cfg["pretrain"]["batch_size"],
                      cfg["eval"], tok_dir.name, data_fingerprint(data_dir, "train"),
                      data_fingerprint(data_dir, "validation"), "v2"])
    out = cache_dir / f"longctx-corpus-{key}"
    if (out / "corpus.json").is_file():
        return out, json.loads((out / "corpus.json").read_text())
    tokenizer = load_tokenizer(tok_dir)
    bos = tokenizer.bos_id
    train_text = TextSource(split_documents(data_dir, "train", tokenizer, cache_dir / "tokens"))
    valid_text = TextSource(split_documents(data_dir, "validation", tokenizer, cache_dir / "tokens"))
    episodes, facts = PasskeyEpisodes(tokenizer), Facts(tokenizer)
    p = cfg["pretrain"]
    stats = {"pretrain": build_training_file(out / "pretrain.bin", np.random.default_rng([SEED, 1]), train_text,
                                             episodes, facts, cfg["short_ctx"], p["steps"] * p["batch_size"], c, bos),
             "finetune": build_training_file(out / "finetune.bin", np.random.default_rng([SEED, 2]), train_text,
                                             episodes, facts, cfg["long_ctx"], c["finetune_sequences"], c, bos)}
    control_file(out / "finetune.bin", out / "control.bin", cfg["long_ctx"], cfg["short_ctx"])
    probes = build_probes(np.random.default_rng([SEED, 3]), valid_text, facts, cfg, bos)
    np.savez(out / "probes.npz", **probes)
    stats["passkey_episode_fixed_tokens"] = episodes.fixed
    stats["passkey_prompt_not_prefix"] = episodes.not_prefix
    stats["probes"] = {"n": int(len(probes["band"])), "queries_per_probe": cfg["eval"]["queries"],
                       "evidence_distance_from_end": {
                           band_name(b): [int(probes["distance"][probes["band"] == i].min()),
                                          int(probes["distance"][probes["band"] == i].max())]
                           for i, b in enumerate(bands(cfg))}}
    write_json(out / "corpus.json", stats)          # last: marks the cache entry complete
    return out, stats


# --------------------------------------------------------------------------- 2. variants

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


def train_cached(name: str, flags: list[str], base_dir: Path, runs_dir: Path, retrain: bool) -> tuple[dict, bool]:
    """train.py with these flags on this base, unless the same run is already complete in runs_dir."""
    run_dir = runs_dir / f"{name}-{config_key([flags, base_dir.name])}"
    done = run_dir / "done.json"
    if done.is_file() and not retrain:
        return json.loads(done.read_text()), True
    argv = ["--model", str(base_dir), "--out", str(run_dir), "--overwrite", "--log-every",
            str(max(1, int(flags[flags.index("--max-steps") + 1]) // 4))] + flags
    log(f"train {name}: python train.py {' '.join(argv)}")
    summary = finetune(argv)
    write_json(done, summary)
    return summary, False


# --------------------------------------------------------------------------- 3. evaluation

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
                out = token_nll(model, torch.from_numpy(window)).double().numpy()     # (B, L - 1)
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
    ppl = {(label(r), r["band"], r["eval_ctx"]): r["ppl"] for r in results}
    n_tok = {r["band"]: r["n_tokens"] for r in results}
    lines = []
    for prefix, what in (("", "lookup facts (one pair token P(k,v); the value is found by content)"),
                         ("copy ", "copy facts (C(k) W(v) repeated; the value is the token after the earlier key)")):
        band_names = fact_bands(cfg, prefix)
        if not all(b in n_tok for b in band_names):
            continue
        head = [f"{b[len(prefix):]} @{c}" for b in band_names for c in ctxs]
        lines += [f"Perplexity of the values of {what}, by the distance of their evidence (tokens back; "
                  f"{n_tok[band_names[0]]} targets per band) and the evaluation context; chance = {Facts.N}:", "",
                  "| variant (steps) | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{ppl[(n, b, c)]:.2f}" for b in band_names for c in ctxs) + " |")
        lines.append("")
    head2 = [f"{b} @{c}" for b in ("all", "text") for c in ctxs]
    lines += [f"Perplexity of all targets / the ordinary-text targets in the last {cfg['short_ctx'] - 1} positions "
              f"of the probes ({n_tok['all']} / {n_tok['text']} targets):", "",
              "| variant (steps) | " + " | ".join(head2) + " |", "|---|" + "---:|" * len(head2)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{ppl[(n, b, c)]:.2f}" for b in ("all", "text") for c in ctxs) + " |")
    lens = list(cfg["passkey"]["seq_len"])
    acc = {(label(r), r["seq_len"]): (r["accuracy"], r["trials"]) for r in passkey_rows}
    pk_names = [n for n in names if any((n, L) in acc for L in lens)]
    if pk_names:
        trials = sorted({t for _, t in acc.values()})
        lines += ["", f"Passkey retrieval accuracy (eval.py's task, {'/'.join(map(str, trials))} trials per length):", "",
                  "| variant (steps) | " + " | ".join(f"passkey @{L}" for L in lens) + " |",
                  "|---|" + "---:|" * len(lens)]
        for n in pk_names:
            lines.append(f"| {n} | " + " | ".join(f"{100 * acc[(n, L)][0]:.0f}%" if (n, L) in acc else "-"
                                                  for L in lens) + " |")
    return "\n".join(lines)


def print_tables(path: Path) -> None:
    report = json.loads(Path(path).read_text())
    print(markdown_tables(report["results"], report["passkey"], report["config"]))


def plot(results, passkey_rows, cfg, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
        for ax, band in zip(axes, panels):
            ys = [next(r["ppl"] for r in results if label(r) == n and r["band"] == band and r["eval_ctx"] == c)
                  for c in ctxs]
            ax.plot(ctxs, ys, label=n, **style)
        accs = [next((r["accuracy"] for r in passkey_rows if label(r) == n and r["seq_len"] == L), float("nan"))
                for L in lens]
        axes[-1].plot(lens, [100 * a for a in accs], label=n, **style)
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
    axes[-1].set_xscale("log", base=2)
    axes[-1].set_xticks(lens, [str(c) for c in lens])
    axes[-1].set_ylim(-5, 105)
    axes[-1].set_title("passkey retrieval")
    axes[-1].set_ylabel("accuracy (%)")
    axes[-1].set_xlabel("prompt length (tokens)")
    axes[-1].grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    mini_paper.save_figure(fig, path, dpi=100)
    return True


# --------------------------------------------------------------------------- driver

def run(args) -> dict:
    if args.table:
        print_tables(Path(args.out) if args.out else (DIAGNOSIS_OUT if args.diagnose else DEFAULT_OUT))
        return {}
    cfg = CONFIGS["smoke" if args.smoke else "full"]
    if args.pretrain_steps is not None:
        cfg = {**cfg, "pretrain": {**cfg["pretrain"], "steps": args.pretrain_steps}}
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    data_dir, cache_dir = Path(args.data_dir), Path(args.cache_dir)
    if not (data_dir / "train").is_dir() or not (data_dir / "validation").is_dir():
        raise FileNotFoundError(f"{data_dir}: expected a PG19-layout folder with train/ and validation/")
    out = Path(args.out) if args.out else (DIAGNOSIS_OUT if args.diagnose else DEFAULT_OUT)
    plan = {b: list(v) for b, v in (DIAGNOSE_RUNS if args.diagnose else DEFAULT_RUNS).items()}
    if args.variants:
        plan = {b: [v for v in args.variants if v not in UNTRAINED] for b in (args.budgets or plan)}
    elif args.budgets:
        plan = {b: plan.get(b, DEFAULT_RUNS["1x"]) for b in args.budgets}
    for b in plan:
        if b not in cfg["budgets"]:
            raise ValueError(f"unknown budget {b}; choose from {', '.join(cfg['budgets'])}")
    untrained = [v for v in UNTRAINED if not args.variants or v in args.variants]
    if args.diagnose and not args.variants:
        untrained = []
    timings, t_start = {}, time.perf_counter()

    t = time.perf_counter()
    tok_key = config_key([cfg["tokenizer"], data_fingerprint(data_dir, "train")])   # = mini_paper's cache key
    tok_dir = cache_dir / f"tokenizer-{tok_key}"
    if not (tok_dir / "tokenizer.model").is_file():
        train_tokenizer(data_dir, cfg["tokenizer"], tok_dir)
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    corpus, corpus_stats = prepare_corpus(cfg, data_dir, tok_dir, cache_dir)
    timings["corpus"] = time.perf_counter() - t
    log(f"corpus {corpus.name}: {timings['corpus']:.1f} s; " + json.dumps(
        {k: corpus_stats[k] for k in ("pretrain", "finetune")}))

    t = time.perf_counter()
    base_dir = cache_dir / f"base-{config_key([cfg['model'], cfg['short_ctx'], cfg['pretrain'], tok_dir.name, corpus.name])}"
    if (base_dir / "pretrain.json").is_file():
        log(f"pretrain: cached {base_dir}")
        pre = json.loads((base_dir / "pretrain.json").read_text())
    else:
        pre = pretrain_base(cfg, corpus / "pretrain.bin", tok_dir, base_dir, cache_dir)
    timings["pretrain"] = time.perf_counter() - t
    log(f"pretrain: {timings['pretrain']:.1f} s (loss {pre['first_loss']:.3f} -> {pre['last_loss']:.3f})")

    specs = variant_flags(cfg, corpus)
    for v in [v for b in plan.values() for v in b] + untrained:
        if v not in specs:
            raise ValueError(f"unknown variant {v}; choose from {', '.join(specs)}")
    runs_dir = cache_dir / f"runs-{base_dir.name}"
    trained, train_info = {}, {}
    tokenizer = load_tokenizer(base_dir)
    probes = dict(np.load(corpus / "probes.npz"))
    masks = band_masks(cfg, probes)
    results, passkey_rows = [], []
    jobs = [(v, 0, None) for v in untrained] + [(v, cfg["finetune"]["steps"] * cfg["budgets"][b], b)
                                                 for b, names in plan.items() for v in names]
    pk = cfg["passkey"]
    timings["eval"] = 0.0

    diag_extra = {}

    def report_now(final: bool) -> dict:
        report = {
            "results": results, "passkey": passkey_rows, "complete": final, **diag_extra,
            "config": {**cfg, "mode": "smoke" if args.smoke else "full", "seed": SEED, "data_dir": str(data_dir),
                       "corpus": {**corpus_stats, "dir": corpus.name}, "base_dir": base_dir.name,
                       "pretrain": {**cfg["pretrain"], **pre}, "plan": plan, "train": train_info,
                       "variants": {n: specs[n]["eval"] for n in dict.fromkeys(j[0] for j in jobs)},
                       "bands": BAND_ORDER(cfg), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "command": "python bench/long_context.py " + " ".join(args.argv)},
            "seconds": time.perf_counter() - t_start, "timings": timings,
        }
        write_json(out, report)         # after every variant: an interrupted run keeps what it finished
        return report

    for name, steps, budget in jobs:    # each variant trained (or found in the cache), then evaluated
        spec = specs[name]
        source = spec["train"] if isinstance(spec["train"], str) else name
        if steps and (source, steps) not in trained:
            flags = specs[source]["train"] + ["--max-steps", str(steps)]
            t = time.perf_counter()
            summary, cached = train_cached(source, flags, base_dir, runs_dir, args.retrain)
            took = time.perf_counter() - t
            timings[f"train {source} {steps}"] = took
            trained[(source, steps)] = Path(summary["output"])
            train_info[f"{source} ({steps})"] = {**summary, "flags": flags, "cached": cached}
            log(f"train {source} ({steps} steps): " + ("cached" if cached else f"{took:.0f} s")
                + f", loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
        t = time.perf_counter()
        output = trained.get((source, steps))
        full_model = output is not None and (output / "config.json").is_file()     # full_ft saves a model
        ev = spec["eval"]
        model = load(base_dir, None if output is None or full_model else output, ev["rope_factor"], ev["quant"],
                     model_dir=output if full_model else None, attn=ev.get("attn", "full"))
        if rope_factor_of(model) != ev["rope_factor"]:
            raise AssertionError(f"{name}: RoPE factor {rope_factor_of(model)}, expected {ev['rope_factor']}")
        tag = {"variant": name, "steps": steps, "budget": budget, "rope_factor": ev["rope_factor"],
               "quant": ev["quant"], "attn": ev.get("attn", "full")}
        rows = score_probes(model, cfg, probes, masks)
        results += [{**tag, **r} for r in rows]
        if ev.get("attn", "full") == "full":     # passkey decodes with the KV cache: full attention only
            for L in pk["seq_len"]:
                passkey_rows.append({**tag, "seq_len": L, **passkey(model, tokenizer, L, pk["trials"], pk["seed"])})
        timings[f"eval {name} {steps}"] = time.perf_counter() - t
        timings["eval"] += timings[f"eval {name} {steps}"]
        by = {(r["band"], r["eval_ctx"]): r["ppl"] for r in rows}
        log(f"eval {name} ({steps}): " + "; ".join(
            f"{b} " + "/".join(f"{by[(b, c)]:.1f}" for c in cfg["eval"]["ctx"]) for b in BAND_ORDER(cfg))
            + "; passkey " + "/".join(f"{r['accuracy']:.2f}" for r in passkey_rows if r["variant"] == name
                                      and r["steps"] == steps) + f" ({timings[f'eval {name} {steps}']:.0f} s)")
        del model
        report_now(False)

    if args.diagnose:
        timings["answerable"] = -time.perf_counter()
        answerable = answerable_fractions(cfg, corpus, Facts(tokenizer))
        timings["answerable"] += time.perf_counter()
        log("lookup queries of the extension corpus whose evidence is inside their S²-Attn group: "
            + json.dumps(answerable))
        diag_extra["answerable_under_s2"] = answerable
    report = report_now(True)
    plotted = plot(results, passkey_rows, cfg, out.with_suffix(".png"))
    log("\ntimings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {report['seconds']:.0f} s\n")
    log(markdown_tables(results, passkey_rows, cfg))
    log(f"\nwrote {out}" + (f" and {out.with_suffix('.png')}" if plotted else ""))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="PG19-layout folder (train/, validation/)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="tokenizer, corpus, base and training runs")
    p.add_argument("--out", default=None, help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; with "
                                               f"--diagnose {DIAGNOSIS_OUT.relative_to(ROOT)}); the plot goes beside it")
    p.add_argument("--smoke", action="store_true", help="tiny configuration that runs every stage in seconds")
    p.add_argument("--diagnose", action="store_true", help="the S²-Attn transfer experiments (DIAGNOSIS)")
    p.add_argument("--variants", nargs="+", default=None, help="only these variants")
    p.add_argument("--budgets", nargs="+", default=None, help="only these step budgets (1x, 4x)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the base's pretraining steps")
    p.add_argument("--retrain", action="store_true", help="retrain variants even when a complete run is cached")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    p.add_argument("--table", action="store_true", help="only print the markdown tables of --out (default "
                                                         f"{DEFAULT_OUT.relative_to(ROOT)}); runs nothing")
    return p


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(one_line_errors_main(main))

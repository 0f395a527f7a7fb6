"""The long-context miniature's text (bench/long_context.py): pg19-mini with key-value facts written in, so that
some tokens can be predicted only from far back, and the probes that score exactly those tokens.

  facts       on byte-fallback ids 0x80-0xFF, which pg19-mini's text never produces: 8 keys, 8 values, two
              kinds (class Facts): lookup (a statement is ONE pair token P(k, v); a query K(k) V(v): the value is
              found by content) and copy (a statement C(k) W(v), repeated as the query: the value is the token
              after the earlier key, an induction circuit like passkey retrieval). (A first design, verbatim
              copies of text spans at a distance, was dropped: the 5.3M base did not learn in-context copying of
              text in its pretraining budget; it does not learn the copy facts either, but it learns the lookups.)
  sequences   BOS, with probability passkey_prob a passkey episode in eval.py's exact format (any depth, any
              length that fits), answered, then natural text with, per kind, the 8 statements and ctx / 16 queries
              at uniform positions, so the distances from query to evidence spread over the whole window
              (build_sequence). The extension corpus: 1024-token sequences of the train split, and the same
              tokens cut at 256 for `control`, placed so that its step k reads the others' step k (control_file).
              (The base is bench/passkey_base.py's, trained without facts.)
  probes      1024 tokens of the held-out validation split ending with 4 copy and 4 lookup queries whose
              statements lie in one band of distances (64-256, 256-512, 512-1024), the other keys stated just
              before the queries as distractors (build_probes).
Deterministic: numpy generators seeded with (42, purpose); built once per configuration, cached in --cache-dir.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import benchlib
import miniature
from miniature import SEED

import data
import eval as evaluation
from infra import sources


def split_documents(data_dir: Path, split: str, tokenizer, cache_dir: Path) -> list[np.ndarray]:
    """The documents of a PG19-layout split as token arrays, without their leading BOS."""
    corpus = sources.tokenize_source(data_dir, tokenizer, split=split, cache_dir=cache_dir, progress=False)
    skip = 1 if corpus.bos else 0
    return [np.asarray(corpus.document(i)[skip:], dtype=np.int64) for i in range(len(corpus))]


def byte_token_ids(tokenizer, byte_values) -> list[int]:
    """The ids of the tokenizer's byte-fallback pieces <0xNN>."""
    ids = [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in byte_values]
    if len(set(ids)) != len(ids) or min(ids) <= max(tokenizer.bos_id, tokenizer.eos_id, 0):
        raise ValueError("the tokenizer has no byte-fallback pieces for these bytes")
    return ids


def sampler_order(n: int, seed: int) -> np.ndarray:
    """The order in which train.py reads n sequences in its first epoch (data.ShuffledSampler)."""
    return np.asarray(data.ShuffledSampler(n, seed).epoch_indices(0))


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
    """Passkey episodes in eval.py's format, answered: tokens of evaluation.passkey_text(n, depth, K) + " K." + newline.
    eval.py's prompt (the same text without the answer) is a token prefix of an episode (checked)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.fixed = len(tokenizer.encode(evaluation.passkey_text(0, 0.5, "12345") + " 12345.\n", bos=False))
        self.per_word = (len(tokenizer.encode(evaluation.passkey_text(200, 0.5, "12345"), bos=False))
                         - len(tokenizer.encode(evaluation.passkey_text(0, 0.5, "12345"), bos=False))) / 200
        self.not_prefix = 0

    def sample(self, rng: np.random.Generator, max_len: int) -> list[int] | None:
        if max_len < self.fixed:
            return None
        key, depth = str(int(rng.integers(10000, 100000))), float(rng.random())
        n = int(rng.integers(0, int((max_len - self.fixed) / self.per_word) + 1))
        while True:
            prompt = evaluation.passkey_text(n, depth, key)
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
        ids, n = np.asarray(byte_token_ids(tokenizer, range(0x80, 0x100))), self.N
        m = 2 * n + n * n                       # after the keys, the values and the pairs
        self.key, self.value, self.pair = ids[:n], ids[n:2 * n], ids[2 * n:m].reshape(n, n)
        self.ckey, self.cvalue = ids[m:m + n], ids[m + n:m + 2 * n]

    def statement(self, what: str, k: int, v: int) -> tuple[list[int], list[int]]:
        """(ids, kinds) stating that key k has value v."""
        if what == "lookup":
            return [int(self.pair[k, v])], [STATEMENT]
        return [int(self.ckey[k]), int(self.cvalue[v])], [C_STATEMENT, C_STATEMENT]

    def query(self, what: str, k: int, v: int) -> tuple[list[int], list[int]]:
        """(ids, kinds) asking key k, answered v (the second token is the target scored)."""
        if what == "lookup":
            return [int(self.key[k]), int(self.value[v])], [QUERY_KEY, VALUE]
        return [int(self.ckey[k]), int(self.cvalue[v])], [C_QUERY_KEY, C_VALUE]


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
    tokens, kind = [bos], [BOS_KIND]
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
    for what in ("lookup", "copy") if c.get("facts", True) else ():
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
            if order == 0:
                stated[what][k] = len(tokens)
                ids, kinds = facts.statement(what, k, values[what][k])
            elif stated[what]:
                k = int(rng.choice(sorted(stated[what])))
                fact_d[what].append((len(tokens) + 1, len(tokens) + 1 - stated[what][k]))
                ids, kinds = facts.query(what, k, values[what][k])
            else:
                continue
            tokens += ids
            kind += kinds
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
                    ids, id_kinds = facts.statement(what, k, values[k])
                    p[L - e_:L - e_ + len(ids)], kind[L - e_:L - e_ + len(ids)] = ids, id_kinds
                q = q0 if what == "copy" else q0 + 2 * nq
                for i, k in enumerate(asked):
                    p[q + 2 * i:q + 2 * i + 2], kind[q + 2 * i:q + 2 * i + 2] = facts.query(what, k, values[k])
                far += ends
            probes.append(p)
            kinds.append(kind)
            band_of.append(bi)
            dist.append(np.asarray(far))
    return {"tokens": np.stack(probes), "kind": np.stack(kinds), "band": np.asarray(band_of),
            "distance": np.stack(dist)}


def prepare_corpus(cfg: dict, data_dir: Path, tok_dir: Path, cache_dir: Path) -> tuple[Path, dict]:
    """Build (or reuse) the extension and control token files and the probes."""
    c = cfg["corpus"]
    key = benchlib.config_key([c, cfg["short_ctx"], cfg["long_ctx"], cfg["eval"], tok_dir.name,
                               miniature.data_fingerprint(data_dir, "train"),
                               miniature.data_fingerprint(data_dir, "validation"), "v3"])
    out = cache_dir / f"longctx-corpus-{key}"
    if (out / "corpus.json").is_file():
        return out, json.loads((out / "corpus.json").read_text())
    tokenizer = sources.load_tokenizer(tok_dir)
    bos = tokenizer.bos_id
    train_text = TextSource(split_documents(data_dir, "train", tokenizer, cache_dir / "tokens"))
    valid_text = TextSource(split_documents(data_dir, "validation", tokenizer, cache_dir / "tokens"))
    episodes, facts = PasskeyEpisodes(tokenizer), Facts(tokenizer)
    stats = {"finetune": build_training_file(out / "finetune.bin", np.random.default_rng([SEED, 2]), train_text,
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
    benchlib.write_json(out / "corpus.json", stats, indent=1)          # last: marks the cache entry complete
    return out, stats

"""The offline demo of `python train.py` with no --model: the whole method on a model that needs no download.

A small random LLaMA (saved as a real HF checkpoint, so it is then loaded like any model: NF4, LoRA, PI and all) is
trained on a synthetic long-range key-value recall corpus in which the labelled tokens can only be predicted by
attending far back. Its "trained" context is a quarter of --ctx, so Position Interpolation (factor 4) is really used,
and the log says at the end whether the loss got below the floor that only long-range recall beats.

Why the demo recipe differs from the paper's: LoRA+ (trainable embeddings and norms) and a large LoRA scale (alpha/r
of 4) let the adapter learn the recall at ctx 8192 within the demo's 80 steps (about 2,000 labelled tokens each); in
trials without them (r=64, alpha=16, LoRA alone) the loss stayed at or above the floor for hundreds of steps. The
frozen lm_head is initialised fan-in (std dim^-1/2) so that it can express a peaked distribution at all.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

import data
from infra import hf
from model import ModelArgs, Transformer

ARCH = dict(vocab_size=32, dim=64, intermediate_size=128, n_layers=2, n_heads=4)


def model_args(ctx: int) -> ModelArgs:
    """The demo's LLaMA, "trained" for a quarter of the demo's context."""
    return ModelArgs(**ARCH, max_position_embeddings=max(1, ctx // 4))


BANNER = ("=" * 78 + "\nDEMO: no --model given, so this trains a small RANDOM LLaMA on the built-in synthetic\n"
          "long-range recall corpus, with the real method end to end (NF4 base, LoRA, PI, S²-Attn, gradient\n"
          "checkpointing). Pass --model DIR --data PATH for real training.\n" + "=" * 78)


def threads() -> int | None:
    """torch's CPU threads for the demo when --threads is not given (None: OMP_NUM_THREADS decides). Its matrices
    are 64 wide, so threads beyond a few only add overhead, and threads that must wait for busy cores cost far more
    than they bring: min(4, the cores the load average leaves idle), at least 1."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, min(4, len(os.sched_getaffinity(0)) - int(os.getloadavg()[0])))


def make_base(out_dir: Path, ctx: int, seed: int) -> Path:
    """A random LLaMA saved as an HF checkpoint in out_dir/demo-base (deterministic: a resumed demo gets the
    same base)."""
    torch.manual_seed(seed)
    base = Transformer(model_args(ctx))
    base.init_weights(std=ARCH["dim"] ** -0.5)      # fan-in (the module docstring says why)
    return hf.save_model(base, Path(out_dir) / "demo-base")


def verdict(rows: list[dict], corpus: "SyntheticDataset") -> str:
    """What the demo's loss says: below the floor ln(n_values) only if the long-range recall was learned."""
    tail = rows[-5:]
    last = sum(r["loss"] for r in tail) / len(tail)
    nearest = corpus.distance - corpus.n_queries - corpus.n_statements + 1
    learned = ("below the floor: the long-range recall was learned" if last < corpus.floor - 0.1 else
               "not below the floor: the long-range recall was not learned in this run")
    return (f"DEMO: each labelled token is the value of a key last stated {nearest}-{corpus.distance - 1} tokens "
            f"earlier; without attending that far back the best loss is the floor ln({corpus.n_values}) = "
            f"{corpus.floor:.3f}. Loss: first step {rows[0]['loss']:.3f}, mean of the last {len(tail)} steps "
            f"{last:.3f} ({learned})")


class SyntheticDataset:
    """Key-value recall over long distances: the labelled tokens can only be predicted by attending about
    `distance` tokens back, and the lookup is by content (which key), not by an exact relative position.

    Vocabulary (ids from 3 up, above LLaMA's unk/bos/eos): `n_keys` key ids, `n_values` value ids, one "pair"
    id for every (key, value) combination, and the remaining ids as filler (n_keys = n_values <= 8, as many
    as the vocabulary holds; the demo's 32 ids give 4 and 4).
    Sequence i (numpy's generator seeded with (seed, i), so any item is reproducible on its own):
      - a dictionary: every key gets a uniformly random value, fixed for the whole sequence;
      - after BOS the sequence is a run of episodes of `distance` tokens, cut at ctx. An episode's first
        quarter states the dictionary (pair ids, each key once in every run of n_keys, random order), its
        middle half is random filler, its last quarter asks: random key ids;
      - labels[t + 1] = the value id of the key at query position t (the loss at position t predicts
        labels[t + 1]); -100 everywhere else. Value ids never occur in input_ids.
    Why it is long-range: nothing near a query says anything about its value; the nearest tokens that do are
    the statements of that key in the episode's first quarter, between distance / 2 + 1 and distance - 1
    tokens back (513 to 1,023 at ctx 8,192). A model that does not look that far can at best learn that the
    answer is one of the value ids: a loss of ln(n_values), the `floor` (ln 4 = 1.386 in the demo).
    Attending from the query key to the pair ids holding that key (a content match, whatever the exact
    distance) and reading their value brings the loss towards 0. The default distance is ctx // 8 (1,024 at
    ctx 8,192): half an S²-Attn group at the default group_size_ratio 1/4, so every query and its episode's
    statements lie in one group of the plain or of the shifted head half, and one attention layer can do it.
    """

    def __init__(self, vocab_size: int, ctx: int, n_sequences: int, seed: int, distance: int | None = None,
                 bos_id: int = 1):
        # n <= 8 keys and n values need 2n + n^2 ids, plus at least one filler id above the 3 special ids
        n = max([m for m in range(1, 9) if 3 + 2 * m + m * m + 1 <= vocab_size], default=0)
        if n < 2:
            raise ValueError(f"synthetic corpus needs a vocabulary of at least 12 ids, got {vocab_size}")
        self.distance = distance if distance is not None else max(2, ctx // 8)
        if not 2 <= self.distance < ctx - 1:
            raise ValueError(f"synthetic distance {self.distance} must be in [2, ctx - 1) with ctx={ctx}")
        self.n_queries = max(1, self.distance // 4)                     # per episode, its last quarter
        self.n_keys = min(n, self.distance - self.n_queries)
        self.n_statements = max(self.n_keys, self.distance // 4)        # per episode, its first quarter
        self.n_values = n
        self.key0 = 3                                                   # id layout: keys, values, pairs, filler
        self.value0 = self.key0 + self.n_keys
        self.pair0 = self.value0 + self.n_values
        self.filler0 = self.pair0 + self.n_keys * self.n_values
        self.floor = math.log(self.n_values)
        self.vocab_size, self.ctx, self.n, self.seed, self.bos_id = vocab_size, ctx, n_sequences, seed, bos_id

    def __len__(self):
        return self.n

    def tokens_and_labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and labels of sequence i, as int64 arrays of length ctx."""
        rng = np.random.default_rng([self.seed, i])
        values = rng.integers(0, self.n_values, size=self.n_keys)        # the sequence's dictionary
        D, Q, K, S = self.distance, self.n_queries, self.n_keys, self.n_statements
        n_episodes = -(-(self.ctx - 1) // D)
        length = 1 + n_episodes * D
        ids = rng.integers(self.filler0, self.vocab_size, size=length)
        ids[0] = self.bos_id
        labels = np.full(length + 1, data.IGNORE_INDEX, dtype=np.int64)
        for start in range(1, length, D):
            # every key once in each run of K statements, so each is stated at least once per episode
            keys = np.concatenate([rng.permutation(K) for _ in range(-(-S // K))])[:S]
            ids[start:start + S] = self.pair0 + keys * self.n_values + values[keys]
            asked = rng.integers(0, K, size=Q)
            ids[start + D - Q:start + D] = self.key0 + asked
            labels[start + D - Q + 1:start + D + 1] = self.value0 + values[asked]   # one after each query
        return ids[:self.ctx].astype(np.int64), labels[:self.ctx]

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        ids, labels = self.tokens_and_labels(i)
        return data.example(torch.from_numpy(ids), torch.from_numpy(labels))

"""Data for LongQLoRA: the token stream cut into the pretraining and SFT sequences the model is fed.

Continued pretraining on long texts (LongQLoRA arXiv 2311.04879, LongLoRA arXiv 2309.12307): infra/sources.py
turns a source into BOS-led documents (`BOS + text`, tokenized once), and every training sequence is `ctx` tokens:
  * packing (LongLoRA, our default): the stream `BOS d1 EOS BOS d2 EOS ... BOS dn` cut into consecutive chunks
    of ctx tokens, the incomplete tail dropped; labels = input_ids;
  * truncation (LongQLoRA's recipe): one sequence per document, `(BOS + doc)[:ctx]`, shorter documents
    right-padded (labels -100 and padding_mask False on the padding).
SFT on long instructions uses LongQLoRA's template or FastChat's Vicuna v1.1 (`chat_pieces`); only the answers
(and their EOS) are learned. The sampler shuffles per epoch from the seed and resumes mid-epoch.

A batch: {"input_ids": LongTensor (B, T), "labels": LongTensor (B, T), -100 = ignored, "padding_mask": BoolTensor
(B, T), True = real token, or None when every token is real}. labels are *aligned* with input_ids (the model
shifts: the loss at position t predicts labels[t + 1] from input_ids[: t + 1]).

    python data.py tokenize SRC --model DIR [--split validation] [--cache-dir DIR]   (fills the token cache)
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from infra import cli
from infra.sources import TokenCorpus, Tokenizer, iter_jsonl, load_tokenizer, tokenize_source, warn_replaced

IGNORE_INDEX = -100


# ----------------------------------------------------------- pretraining datasets, collate, sampler

def example(input_ids, labels, padding_mask=None) -> dict:
    return {"input_ids": input_ids, "labels": labels, "padding_mask": padding_mask}


class PackedDataset:
    """LongLoRA packing (see the module docstring). EOS joins documents, none follows the last one; a chunk may
    start mid-document. The stream is never materialised: a chunk is gathered from the memory-mapped documents."""

    def __init__(self, corpus: TokenCorpus, ctx: int, eos_id: int):
        self.corpus, self.ctx, self.eos_id = corpus, ctx, eos_id
        self.lengths = np.diff(corpus.offsets)
        self.starts = corpus.offsets[:-1] + np.arange(len(corpus))     # after the EOS of every earlier document
        self.stream_len = corpus.n_tokens + len(corpus) - 1
        if self.stream_len < ctx:
            raise ValueError(f"{corpus.path or 'corpus'}: {self.stream_len} tokens, fewer than ctx={ctx}")

    def __len__(self):
        return self.stream_len // self.ctx

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        pos = np.arange(i * self.ctx, (i + 1) * self.ctx)              # positions in the stream
        doc = np.searchsorted(self.starts, pos, side="right") - 1
        inside = pos - self.starts[doc]
        is_eos = inside == self.lengths[doc]                             # the EOS that joins doc to doc + 1
        ids = np.asarray(self.corpus.tokens[np.where(is_eos, 0, self.corpus.offsets[doc] + inside)], dtype=np.int64)
        ids[is_eos] = self.eos_id
        return example(torch.from_numpy(ids), torch.from_numpy(ids.copy()))


def pad_right(ids: list[int], labels: list[int], ctx: int, pad_id: int) -> dict:
    """Right-pads to ctx with pad_id / -100 / mask False; padding_mask is None when nothing is padded."""
    n = len(ids)
    input_ids = torch.tensor(ids + [pad_id] * (ctx - n), dtype=torch.long)
    labels = torch.tensor(labels + [IGNORE_INDEX] * (ctx - n), dtype=torch.long)
    return example(input_ids, labels, None if n == ctx else torch.arange(ctx) < n)


class TruncatedDataset:
    """LongQLoRA: one sequence per document, `(BOS + doc)[:ctx]`; shorter documents right-padded."""

    def __init__(self, corpus: TokenCorpus, ctx: int, pad_id: int):
        self.corpus, self.ctx, self.pad_id = corpus, ctx, pad_id

    def __len__(self):
        return len(self.corpus)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids = np.asarray(self.corpus.document(i)[:self.ctx], dtype=np.int64).tolist()
        return pad_right(ids, ids, self.ctx, self.pad_id)


def collate(examples: list[dict], pad_id: int = 0) -> dict:
    """Stacks examples into a batch, right-padding unequal lengths like `pad_right`."""
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = e["input_ids"]
        labels[b, :n] = e["labels"]
        mask[b, :n] = True if e["padding_mask"] is None else e["padding_mask"]
    return {"input_ids": input_ids, "labels": labels, "padding_mask": None if bool(mask.all()) else mask}


class ShuffledSampler:
    """An endless stream of dataset indices: a permutation of range(n) per epoch, from (seed, epoch) only, so the
    state is (epoch, position) and `load_state_dict` resumes at the exact next index. Rank r of world_size takes
    positions r, r + world_size, ... of the permutation cut to a multiple of world_size: disjoint indices, as many
    per rank, so the gradient all-reduces stay in step."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range(world_size={world_size})")
        if n < world_size:
            raise ValueError(f"{n} examples cannot be shared among {world_size} ranks")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.position, self._cached = 0, 0, (None, None)     # _cached: (epoch, its indices)

    def __len__(self):  # indices per epoch for this rank
        return self.n // self.world_size

    def epoch_indices(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._cached = (epoch, perm[:len(self) * self.world_size][self.rank::self.world_size])
        return self._cached[1]

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        self.position += 1
        return int(self.epoch_indices(self.epoch)[self.position - 1])

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("n", "seed", "rank", "world_size", "epoch", "position")}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n", "seed", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]}, "
                                 f"but this run has {key}={getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def batches(dataset, sampler: ShuffledSampler, batch_size: int, pad_id: int = 0):
    """Endless batches; when a batch is yielded the sampler has consumed exactly its indices."""
    while True:
        yield collate([dataset[next(sampler)] for _ in range(batch_size)], pad_id)


# --------------------------------------------------------------------------- SFT chat templates

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# The prompt of turn k (k = 0 opens with the system sentence); chat_pieces adds the answers and BOS.
TEMPLATES = {"vicuna": lambda k, human: f"{SYSTEM} " * (k == 0) + f"USER: {human} ASSISTANT:",
             "longqlora": lambda k, human: SYSTEM * (k == 0) + f"\nUSER: {human}\nASSISTANT: "}


def sft_turns(record, where) -> list[tuple[str, str]]:
    """[(human, assistant), ...] from {"input", "output"} (LongQLoRA) or {"conversation": [{"human",
    "assistant"}, ...]} (multi-turn). Texts are stripped: the template supplies the spaces."""
    if isinstance(record, dict) and "conversation" in record:
        conv = record["conversation"]
        if not isinstance(conv, list) or not conv:
            raise ValueError(f"{where}: \"conversation\" must be a non-empty list of turns")
        for k, turn in enumerate(conv):
            if not (isinstance(turn, dict) and all(isinstance(turn.get(f), str) for f in ("human", "assistant"))):
                raise ValueError(f"{where}: conversation turn {k} needs string fields \"human\" and \"assistant\"")
        return [(turn["human"].strip(), turn["assistant"].strip()) for turn in conv]
    if isinstance(record, dict) and isinstance(record.get("input"), str) and isinstance(record.get("output"), str):
        return [(record["input"].strip(), record["output"].strip())]
    raise ValueError(f"{where}: expected {{\"input\", \"output\"}} strings or a \"conversation\" list")


def chat_pieces(tokenizer: Tokenizer, turns, template: str = "vicuna") -> list[tuple[list[int], bool]]:
    """The token pieces of a conversation [(human, assistant), ...] as (ids, is_answer).

    vicuna     FastChat's vicuna_v1.1 (sep_style ADD_COLON_TWO, sep " ", sep2 "</s>"), what Vicuna was trained on:
                   BOS + SYSTEM + " USER: h1 ASSISTANT: a1</s>USER: h2 ASSISTANT: a2</s>..."
    longqlora  what LongQLoRA's SFT script trains its Vicuna-13B-8k with: no BOS,
                   SYSTEM + "\nUSER: h1\nASSISTANT: " + a1 + EOS (+ "\nUSER: h2\nASSISTANT: " + a2 + EOS ...)
    Answers are encoded on their own and followed by EOS, so the label mask is exact: sentencepiece puts the
    word-boundary marker at the start of each encoded piece, exactly where the whole string would have it.
    A turn whose assistant text is None ends the pieces after its prompt (a generation prompt).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose one of {', '.join(sorted(TEMPLATES))}")
    pieces = [([tokenizer.bos_id], False)] if template == "vicuna" and tokenizer.bos_id >= 0 else []
    for k, (human, assistant) in enumerate(turns):
        pieces.append((tokenizer.encode(TEMPLATES[template](k, human), bos=False), False))
        if assistant is None:
            break
        pieces.append((tokenizer.encode(assistant, bos=False, eos=True), True))
    return pieces


def chat_prompt_ids(tokenizer: Tokenizer, history, message: str, template: str = "vicuna") -> list[int]:
    """Prompt for generating the next answer: the history [(human, assistant)], then the new message."""
    return [i for ids, _ in chat_pieces(tokenizer, [*history, (message.strip(), None)], template) for i in ids]


def build_sft_example(tokenizer: Tokenizer, turns, ctx: int, template: str = "vicuna") -> dict:
    """A conversation truncated to ctx and right-padded; labels are -100 except the answers and their EOS.
    An example whose prompt alone fills ctx has no labelled token left (it then adds nothing to the loss)."""
    ids, labels = [], []
    for piece, is_answer in chat_pieces(tokenizer, turns, template):
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    return pad_right(ids[:ctx], labels[:ctx], ctx, tokenizer.pad_id)


class SFTDataset:
    """JSONL(.gz) of SFT records (see `sft_turns`), validated when loaded, tokenized on access."""

    def __init__(self, path, tokenizer: Tokenizer, ctx: int, template: str = "vicuna"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: SFT file not found")
        # BOS or nothing; an unknown template is refused now, not at the first batch
        head = sum(len(ids) for ids, _ in chat_pieces(tokenizer, [], template))
        self.tokenizer, self.ctx, self.template = tokenizer, ctx, template
        replaced = {}
        records = iter_jsonl(path, replaced, path.name)
        self.conversations = [sft_turns(obj, f"{path}:{lineno}") for lineno, obj in records]
        warn_replaced(replaced)
        if not self.conversations:
            raise ValueError(f"{path}: empty SFT file")
        # The first answer (at least its EOS) follows BOS + the first prompt; where that fills ctx, no answer token
        # is left, and if that is every example, training runs at loss 0 and grad-norm 0. 256 prompts a call, on
        # all cores, so that a large file is never held as token lists all at once.
        prompts = [TEMPLATES[template](0, turns[0][0]) for turns in self.conversations]
        lost = sum(head + len(ids) >= ctx for i in range(0, len(prompts), 256)
                   for ids in tokenizer.encode_batch(prompts[i:i + 256], False))
        what = f"examples have no answer token within ctx {ctx} (prompt too long)"
        if lost == len(self):
            raise ValueError(f"{path}: all {lost} {what}; nothing to learn")
        if lost:
            warnings.warn(f"{path}: {lost} of {len(self)} {what}; they add nothing to the loss", stacklevel=2)

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, i):
        return build_sft_example(self.tokenizer, self.conversations[i], self.ctx, self.template)


# --------------------------------------------------------------------------- command line

def main(argv=None) -> None:
    parser = cli.one_line_errors(argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n")[0]))
    tok = cli.one_line_errors(parser.add_subparsers(dest="command", required=True).add_parser(
        "tokenize", help="tokenize a text source into the cache", formatter_class=cli.DefaultsHelp))
    tok.add_argument("source", help="a .txt, .jsonl(.gz) or .bin file, or a folder of them (see infra/sources.py)")
    tok.add_argument("--model", required=True, help="model folder with tokenizer.model")
    tok.add_argument("--split", default=None, help="split of a PG19-layout folder")
    tok.add_argument("--cache-dir", default=None, help="token cache (default: $LONGQLORA_CACHE or ~/.cache/longqlora)")
    args = parser.parse_args(argv)
    corpus = tokenize_source(args.source, load_tokenizer(args.model), split=args.split, cache_dir=args.cache_dir)
    print(f"{len(corpus)} documents, {corpus.n_tokens} tokens -> {corpus.path}")


if __name__ == "__main__":
    sys.exit(cli.run(main))

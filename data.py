"""Data for LongQLoRA: text sources, a token cache, and the pretraining and SFT sequences the model is fed.

Continued pretraining on long texts (LongQLoRA arXiv 2311.04879, LongLoRA arXiv 2309.12307): every document is
tokenized with the model's sentencepiece `tokenizer.model` as `BOS + text`, then cut into sequences of exactly
`ctx` tokens by
  * packing (LongLoRA, our default): the stream `BOS d1 EOS BOS d2 EOS ... BOS dn` cut into consecutive chunks
    of ctx tokens, the incomplete tail dropped; labels = input_ids;
  * truncation (LongQLoRA's recipe): one sequence per document, `(BOS + doc)[:ctx]`, shorter documents
    right-padded (labels -100 and padding_mask False on the padding).
SFT on long instructions uses LongQLoRA's template or FastChat's Vicuna v1.1 (`chat_pieces`); only the answers
(and their EOS) are learned. Perplexity data: the PG19 / Proof-pile texts, or LongLoRA's pre-tokenized flat
`.bin` token files (uint16, or uint32 for vocabularies of more than 65,536 ids).

A source is a .txt file (one document), a .jsonl / .jsonl.gz file (one {"text": ...} object per line), a .bin
token file, a PG19-layout folder (train/, validation/, test/ of .txt books: a split must be chosen), or any
other folder of .txt / .jsonl / .jsonl.gz files (recursive, sorted by relative path, hidden entries skipped).

A batch is a dict of equal-length tensors; labels are *aligned* with input_ids (the model shifts: the loss at
position t predicts labels[t + 1] from input_ids[: t + 1]):
    {"input_ids": LongTensor (B, T), "labels": LongTensor (B, T) with -100 = ignored,
     "padding_mask": BoolTensor (B, T) with True = real token, or None when every token is real}

Text is tokenized once and cached as a flat token file (`<name>.bin`, uint16/uint32) beside a small JSON index
(`<name>.json`) with the document offsets and the fingerprints of the tokenizer and of the source files; a
second run memory-maps the cache. All files are written atomically (temporary file, then `os.replace`): after
an error nothing half-written is left.

    python data.py tokenize SRC --model DIR [--split validation] [--cache-dir DIR]
    python data.py download pg19 --split validation --out data/pg19      (download.py's command line)
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from tqdm import tqdm

import atomic
import cli
import download

IGNORE_INDEX = -100
PG19_SPLITS = ("train", "validation", "test")
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
CACHE_FORMAT = 1


# --------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """The model's sentencepiece `tokenizer.model` and the BOS/EOS ids it defines. pad_id: the model's, else EOS
    (LLaMA has none); padding is always masked, so it only has to be a valid embedding row."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: not found; the model folder must contain the sentencepiece tokenizer.model")
        raw = self.path.read_bytes()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(raw)
        except Exception as e:  # RuntimeError or OSError, depending on the sentencepiece version
            raise ValueError(f"{self.path}: not a sentencepiece model ({e})") from None
        self.fingerprint = hashlib.sha256(raw).hexdigest()        # keys the token cache
        self.vocab_size, self.bos_id, self.eos_id = self.sp.get_piece_size(), self.sp.bos_id(), self.sp.eos_id()
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id >= 0 else 0)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self._add_special(self.sp.encode(text, out_type=int), bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        out = self.sp.encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)  # all cores
        return [self._add_special(ids, bos, eos) for ids in out]

    def _add_special(self, ids, bos, eos):
        head = [self.bos_id] if bos and self.bos_id >= 0 else []
        return head + ids + ([self.eos_id] if eos and self.eos_id >= 0 else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tokenizer(model_dir) -> Tokenizer:
    """`model_dir/tokenizer.model`, or the path of a .model file itself."""
    path = Path(model_dir)
    return Tokenizer(path / "tokenizer.model" if path.is_dir() else path)


# --------------------------------------------------------------------------- text sources

def is_pg19_layout(path: Path) -> bool:
    return path.is_dir() and any((path / split).is_dir() for split in PG19_SPLITS)


def source_root(path: Path, split) -> Path:
    """The folder that document names (and fingerprints) are relative to."""
    return path.parent if path.is_file() else (path / split if split is not None else path)


def source_files(path, split=None) -> list[Path]:
    """The files a source reads (see the module docstring), in a fixed order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".bin" or path.name.endswith(TEXT_SUFFIXES):
            return [path]
        raise ValueError(f"{path}: unsupported file type (expected .txt, .jsonl, .jsonl.gz, .bin or a folder)")
    if split is None and is_pg19_layout(path):
        raise ValueError(f"{path}: PG19-layout folder; choose a split ({', '.join(PG19_SPLITS)})")
    root = source_root(path, split)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: split folder not found (PG19 layout: {path}/{{train,validation,test}}/)")
    files = [f for f in root.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES)
             and not any(part.startswith(".") for part in f.relative_to(root).parts)]
    if not files:
        raise ValueError(f"{root}: empty source: no .txt, .jsonl or .jsonl.gz files found")
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def decode_utf8(raw: bytes, replaced: dict, name: str) -> str:
    """UTF-8 text; invalid bytes become U+FFFD and are counted in replaced[name]."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # A U+FFFD already present in the file is text, not a replacement.
        replaced[name] = replaced.get(name, 0) + text.count("\ufffd") - raw.count("\ufffd".encode())
        return text


def iter_jsonl(path: Path, replaced: dict, name: str):
    """(line number, parsed object) for each non-blank line of a .jsonl(.gz)."""
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(decode_utf8(raw, replaced, name))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                yield lineno, obj
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: corrupt gzip file ({e})") from None


def warn_replaced(replaced: dict):
    """One warning for the whole source, not one per file or line."""
    if replaced:
        warnings.warn(f"{sum(replaced.values())} characters were not valid UTF-8 and were replaced by U+FFFD in: "
                      f"{', '.join(sorted(replaced))}", stacklevel=3)


def iter_documents(path, split=None):
    """(name, text) for each document of a text source: a .txt is named by its path relative to the source,
    a .jsonl line `file:line`. Invalid UTF-8 is replaced, and reported in one warning at the end."""
    path = Path(path)
    files = source_files(path, split)
    if files == [path] and path.suffix == ".bin":
        raise ValueError(f"{path}: a pre-tokenized token file has no text; use load_token_file()")
    root, replaced = source_root(path, split), {}
    for f in files:
        rel = f.relative_to(root).as_posix()
        if f.name.endswith(".txt"):
            yield rel, decode_utf8(f.read_bytes(), replaced, rel).removeprefix("\ufeff")  # a BOM is not text
            continue
        for lineno, obj in iter_jsonl(f, replaced, rel):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{f}:{lineno}: expected a JSON object with a string field \"text\"")
            yield f"{rel}:{lineno}", obj["text"]
    warn_replaced(replaced)


# ------------------------------------------------------- flat token files (LongLoRA's .bin), token cache

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, so vocabularies of up to 65,536 ids; larger ones need uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def check_token_ids(tokens: np.ndarray, vocab_size: int, where) -> None:
    chunk = 1 << 24         # a large memmap is scanned, never copied whole
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start:start + chunk])
        if int(part.max()) >= vocab_size:
            pos = int(np.flatnonzero(part >= vocab_size)[0])
            raise ValueError(f"{where}: token id {int(part[pos])} at position {start + pos} is outside the "
                             f"model's vocabulary of {vocab_size} ids (wrong tokenizer or dtype?)")


def load_token_file(path, vocab_size=None, dtype=None) -> np.ndarray:
    """Memory-maps a flat token file (LongLoRA's `pg19-validation.bin` etc.: no header, native byte order),
    by default as `token_dtype(vocab_size)`, or LongLoRA's uint16 when vocab_size is unknown, and checks its ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: token file not found")
    if dtype is None:
        dtype = token_dtype(vocab_size) if vocab_size else np.uint16
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"{path}: token dtype must be uint16 or uint32, not {dtype}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty token file")
    if size % dtype.itemsize:
        raise ValueError(f"{path}: size {size} bytes is not a multiple of {dtype.itemsize} "
                         f"({dtype.name} tokens); truncated file or wrong dtype")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if vocab_size is not None:
        check_token_ids(tokens, vocab_size, path)
    return tokens


@dataclass
class TokenCorpus:
    """Documents in one flat array: document i is tokens[offsets[i]:offsets[i + 1]]. bos: each starts with BOS
    (tokenized text); False for a `.bin` token file, one stream of unknown layout and so a single document."""
    tokens: np.ndarray
    offsets: np.ndarray
    names: list
    bos: bool
    path: Path | None = None

    def __len__(self):
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, i) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def source_fingerprint(files, root: Path) -> str:
    """Changes when a file is added, removed, resized or touched."""
    stats = [(f, f.stat()) for f in files]
    return sha256_json([[f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns] for f, st in stats])


def cache_paths(source: Path, split, tokenizer: Tokenizer, cache_dir) -> tuple[Path, Path]:
    """(token file, index) of a source's cache entry, named readably (source name, split) and uniquely (a hash
    of the absolute source path, split and tokenizer), so one folder serves every source. The default folder is
    `$LONGQLORA_CACHE`, else `$XDG_CACHE_HOME/longqlora` (~/.cache/longqlora), never beside the source: data
    folders are often shared or read-only, and root passes every writability probe anyway."""
    if cache_dir is None:
        cache_dir = os.environ.get("LONGQLORA_CACHE") or (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longqlora")
    key = sha256_json([str(source.resolve()), split, tokenizer.fingerprint])[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.name) or "source"
    stem = f"{name}-{split}-{key}" if split else f"{name}-{key}"
    return Path(cache_dir) / f"{stem}.bin", Path(cache_dir) / f"{stem}.json"


def read_cache(bin_path: Path, index_path: Path, tokenizer_sha: str, source_sha: str):
    """The cached corpus, or None when it is missing, stale or inconsistent (then it is rebuilt)."""
    try:
        index = json.loads(index_path.read_text())
        if (index.get("format") != CACHE_FORMAT or index.get("tokenizer_sha256") != tokenizer_sha
                or index.get("source_sha256") != source_sha):
            return None
        dtype = np.dtype(index["dtype"])
        offsets = np.asarray(index["offsets"], dtype=np.int64)
        if bin_path.stat().st_size != int(offsets[-1]) * dtype.itemsize:
            return None
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        return TokenCorpus(tokens, offsets, index["names"], bool(index["bos"]), bin_path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def batched_documents(docs, max_docs=64, max_chars=64 << 20):
    """Groups of (name, text) pairs, for sentencepiece to encode each group on all cores at once."""
    group, chars = [], 0
    for name, text in docs:
        group.append((name, text))
        chars += len(text)
        if len(group) >= max_docs or chars >= max_chars:
            yield group
            group, chars = [], 0
    if group:
        yield group


def write_cache(source: Path, split, files, tokenizer: Tokenizer, bin_path: Path, index_path: Path,
                source_sha: str, progress: bool) -> TokenCorpus:
    """Every non-empty document as BOS + text into `bin_path`, then the index: its presence marks a complete cache."""
    dtype = token_dtype(tokenizer.vocab_size)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = bin_path.with_name(f"{bin_path.name}.tmp-{os.getpid()}")
    offsets, names, skipped = [0], [], 0
    with_total = all(f.name.endswith(".txt") for f in files)     # a .txt file is one document
    bar = tqdm(total=len(files) if with_total else None, unit="doc", desc=f"tokenizing {source.name}",
               disable=not progress, dynamic_ncols=True)
    try:
        with open(tmp, "wb") as out:
            for group in batched_documents(iter_documents(source, split)):
                for (name, _), ids in zip(group, tokenizer.encode_batch([t for _, t in group], bos=False)):
                    if not ids:
                        skipped += 1
                        continue
                    if tokenizer.bos_id >= 0:
                        ids = [tokenizer.bos_id] + ids
                    out.write(np.asarray(ids, dtype=dtype).tobytes())
                    offsets.append(offsets[-1] + len(ids))
                    names.append(name)
                bar.update(len(group))
        if not names:
            raise ValueError(f"{source}: empty source: no text in {len(files)} file(s)")
        index = {"format": CACHE_FORMAT, "source": str(source.resolve()), "split": split, "source_sha256": source_sha,
                 "tokenizer": str(tokenizer.path.resolve()), "tokenizer_sha256": tokenizer.fingerprint,
                 "dtype": dtype.name, "bos": tokenizer.bos_id >= 0, "eos": False, "n_documents": len(names),
                 "n_tokens": offsets[-1], "skipped_empty": skipped, "offsets": offsets, "names": names}
        # An old index must never describe the new token file, so it goes first.
        index_path.unlink(missing_ok=True)
        os.replace(tmp, bin_path)
        atomic.write_json(index_path, index, indent=None)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    return TokenCorpus(np.memmap(bin_path, dtype=dtype, mode="r"), np.asarray(offsets, dtype=np.int64),
                       names, tokenizer.bos_id >= 0, bin_path)


def tokenize_source(path, tokenizer: Tokenizer | None, split=None, cache_dir=None, vocab_size=None,
                    progress=True, dtype=None) -> TokenCorpus:
    """The tokens of a source, tokenized once and cached; a `.bin` token file is memory-mapped as it is (one
    document) and needs no tokenizer. Every id is checked against vocab_size (default: the tokenizer's)."""
    path = Path(path)
    vocab = vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
    if path.suffix == ".bin" and not path.is_dir():
        tokens = load_token_file(path, vocab_size=vocab, dtype=dtype)
        return TokenCorpus(tokens, np.array([0, len(tokens)], dtype=np.int64), [path.name], False, path)
    files = source_files(path, split)
    if tokenizer is None:
        raise ValueError(f"{path}: a text source needs the model's tokenizer")
    source_sha = source_fingerprint(files, source_root(path, split))
    bin_path, index_path = cache_paths(path, split, tokenizer, cache_dir)
    corpus = read_cache(bin_path, index_path, tokenizer.fingerprint, source_sha)
    if corpus is None:
        corpus = write_cache(path, split, files, tokenizer, bin_path, index_path, source_sha, progress)
    if vocab is not None and vocab < tokenizer.vocab_size:
        check_token_ids(corpus.tokens, vocab, path)
    return corpus


# ----------------------------------------------------------- pretraining datasets, collate, sampler

def example(input_ids, labels, padding_mask=None) -> dict:
    return {"input_ids": input_ids, "labels": labels, "padding_mask": padding_mask}


class PackedDataset:
    """LongLoRA packing (see the module docstring). EOS joins documents, none follows the last one; a chunk may
    start mid-document. The stream is never materialised: a chunk is gathered from the memory-mapped documents."""

    def __init__(self, corpus: TokenCorpus, ctx: int, eos_id: int):
        if ctx < 1:
            raise ValueError(f"ctx must be positive, got {ctx}")
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
        ids = torch.from_numpy(ids)
        return example(ids, ids.clone())


def pad_right(ids: list[int], labels: list[int], ctx: int, pad_id: int) -> dict:
    """Right-pads to ctx with pad_id / -100 / mask False; padding_mask is None when nothing is padded."""
    n = len(ids)
    input_ids = torch.tensor(ids + [pad_id] * (ctx - n), dtype=torch.long)
    labels = torch.tensor(labels + [IGNORE_INDEX] * (ctx - n), dtype=torch.long)
    return example(input_ids, labels, None if n == ctx else torch.arange(ctx) < n)


class TruncatedDataset:
    """LongQLoRA: one sequence per document, `(BOS + doc)[:ctx]`; shorter documents right-padded."""

    def __init__(self, corpus: TokenCorpus, ctx: int, pad_id: int):
        if ctx < 1:
            raise ValueError(f"ctx must be positive, got {ctx}")
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
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
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
    """An endless stream of dataset indices: a fresh permutation of range(n) each epoch, depending only on
    (seed, epoch), so the state is just (epoch, position) and `load_state_dict` resumes at the exact next index.
    Rank r of world_size takes positions r, r + world_size, ... of the permutation cut to a multiple of
    world_size: disjoint indices, and as many per rank, so the gradient all-reduces stay in step."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range(world_size={world_size})")
        if n < world_size:
            raise ValueError(f"{n} examples cannot be shared among {world_size} ranks")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._cached = (None, None)

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
        return {"n": self.n, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "epoch": self.epoch, "position": self.position}

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
TEMPLATES = ("longqlora", "vicuna")


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")


def sft_turns(record, where) -> list[tuple[str, str]]:
    """[(human, assistant), ...] from {"input", "output"} (LongQLoRA) or {"conversation": [{"human",
    "assistant"}, ...]} (multi-turn). Texts are stripped: the template supplies the spaces."""
    if isinstance(record, dict) and "conversation" in record:
        conv = record["conversation"]
        if not isinstance(conv, list) or not conv:
            raise ValueError(f"{where}: \"conversation\" must be a non-empty list of turns")
        for k, turn in enumerate(conv):
            if not (isinstance(turn, dict) and isinstance(turn.get("human"), str)
                    and isinstance(turn.get("assistant"), str)):
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
    check_template(template)
    vicuna = template == "vicuna"
    pieces = [([tokenizer.bos_id], False)] if vicuna and tokenizer.bos_id >= 0 else []
    for k, (human, assistant) in enumerate(turns):
        if vicuna:
            prompt = (SYSTEM + " " if k == 0 else "") + f"USER: {human} ASSISTANT:"
        else:
            prompt = (SYSTEM if k == 0 else "") + f"\nUSER: {human}\nASSISTANT: "
        pieces.append((tokenizer.encode(prompt, bos=False), False))
        if assistant is None:
            break
        pieces.append((tokenizer.encode(assistant, bos=False, eos=True), True))
    return pieces


def chat_prompt_ids(tokenizer: Tokenizer, history, message: str, template: str = "vicuna") -> list[int]:
    """Prompt for generating the next answer: the history [(human, assistant)], then the new message."""
    pieces = chat_pieces(tokenizer, list(history) + [(message.strip(), None)], template)
    return [i for ids, _ in pieces for i in ids]


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
        check_template(template)
        self.tokenizer, self.ctx, self.template = tokenizer, ctx, template
        replaced = {}
        records = iter_jsonl(path, replaced, path.name)
        self.conversations = [sft_turns(obj, f"{path}:{lineno}") for lineno, obj in records]
        warn_replaced(replaced)
        if not self.conversations:
            raise ValueError(f"{path}: empty SFT file")

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, i):
        return build_sft_example(self.tokenizer, self.conversations[i], self.ctx, self.template)


# --------------------------------------------------------------------------- command line

def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["download"]:            # `python data.py download pg19 ...` is download.py's command line
        return download.main(argv[1:])
    parser = cli.one_line_errors(argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n")[0]))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("download", help="download a public dataset (see python download.py --help)")
    tok = cli.one_line_errors(sub.add_parser("tokenize", help="tokenize a text source into the cache"))
    tok.add_argument("source")
    tok.add_argument("--model", required=True, help="model folder with tokenizer.model")
    tok.add_argument("--split", default=None, help="split of a PG19-layout folder")
    tok.add_argument("--cache-dir", default=None, help="token cache folder [$LONGQLORA_CACHE or ~/.cache/longqlora]")
    args = parser.parse_args(argv)
    corpus = tokenize_source(args.source, load_tokenizer(args.model), split=args.split, cache_dir=args.cache_dir)
    print(f"{len(corpus)} documents, {corpus.n_tokens} tokens -> {corpus.path}")


if __name__ == "__main__":
    sys.exit(cli.run(main))

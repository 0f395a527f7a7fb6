"""Text to tokens, once: the text sources LongQLoRA reads, the model's tokenizer, and the token cache.

Every document is tokenized with the model's sentencepiece `tokenizer.model` as `BOS + text` (LongLoRA and
LongQLoRA feed BOS-led documents); data.py cuts the resulting token stream into training sequences.

A source is a .txt file (one document), a .jsonl / .jsonl.gz file (one {"text": ...} object per line), a .bin
token file (LongLoRA's pre-tokenized PG19 / Proof-pile: uint16, or uint32 for vocabularies of more than 65,536
ids), a PG19-layout folder (train/, validation/, test/ of .txt books: a split must be chosen), or any other
folder of .txt / .jsonl / .jsonl.gz files (recursive, sorted by relative path, hidden entries skipped).
Invalid UTF-8 is replaced by U+FFFD and reported in one warning per source.

The token cache (`python data.py tokenize SRC --model DIR`, or any first use) is a flat token file `<name>.bin` beside
a JSON index `<name>.json` (document offsets, content hashes of the tokenizer, the source files and the token file); a
changed tokenizer, source or token file rebuilds it. The index is written last: it marks a complete cache.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from infra import atomic
from infra.download import PG19_SPLITS, hash_file
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
CACHE_FORMAT = 2       # 2: the index holds the content hash of the token file


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
        self.pad_id = next(i for i in (self.sp.pad_id(), self.eos_id, 0) if i >= 0)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos, eos)[0]

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        head, tail = [self.bos_id] * (bos and self.bos_id >= 0), [self.eos_id] * (eos and self.eos_id >= 0)
        out = self.sp.encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)  # all cores
        return [head + ids + tail for ids in out]

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


def jsonl_lines(path: Path):
    """(line number, raw line) for each non-blank line of a .jsonl(.gz)."""
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
            yield from ((lineno, raw) for lineno, raw in enumerate(f, start=1) if raw.strip())
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: corrupt gzip file ({e})") from None


def iter_jsonl(path: Path, replaced: dict, name: str):
    """(line number, parsed object) for each non-blank line of a .jsonl(.gz)."""
    for lineno, raw in jsonl_lines(path):
        try:
            obj = json.loads(decode_utf8(raw, replaced, name))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        yield lineno, obj


def warn_replaced(replaced: dict):
    """One warning for the whole source, not one per file or line."""
    if replaced:
        warnings.warn(f"{sum(replaced.values())} characters were not valid UTF-8 and were replaced by U+FFFD in: "
                      f"{', '.join(sorted(replaced))}", stacklevel=3)


def iter_documents(path, split=None):
    """(name, text) for each document of a text source: a .txt is named by its path relative to the source,
    a .jsonl line `file:line`. Invalid UTF-8 is replaced, and reported in one warning at the end."""
    path = Path(path)
    root, replaced = source_root(path, split), {}
    for f in source_files(path, split):    # a .bin has no text: tokenize_source memory-maps it instead
        rel = f.relative_to(root).as_posix()
        if f.name.endswith(".txt"):
            text = decode_utf8(f.read_bytes(), replaced, rel).removeprefix("\ufeff")  # a BOM is not text
            if replaced.get(rel, 0) > max(100, len(text) // 100):   # a few bad bytes are replaced, not a binary
                raise ValueError(f"{f}: not UTF-8 text ({replaced[rel]} of {len(text)} characters are invalid; "
                                 f"a binary file, or another encoding?)")
            yield rel, text
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
    dtype = np.dtype(dtype or (token_dtype(vocab_size) if vocab_size else np.uint16))   # eval.py: uint16 or uint32
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


def content_hash(path: Path) -> str:
    return hash_file(path, hashlib.blake2b()).hexdigest()


def source_fingerprint(files, root: Path) -> str:
    """Changes when a file is added, removed or changed, even rewritten in place with its size and time kept."""
    return sha256_json([[f.relative_to(root).as_posix(), content_hash(f)] for f in files])


def cache_paths(source: Path, split, tokenizer: Tokenizer, cache_dir) -> tuple[Path, Path]:
    """(token file, index) of a source's cache entry, named by source name, split and a hash of the absolute
    source path, split and tokenizer. The folder: `$LONGQLORA_CACHE`, else `$XDG_CACHE_HOME/longqlora`
    (~/.cache/longqlora), never beside the source (data folders are often shared or read-only)."""
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
        keys = [index.get("format"), index.get("tokenizer_sha256"), index.get("source_sha256")]
        dtype, offsets = np.dtype(index["dtype"]), np.asarray(index["offsets"], dtype=np.int64)
        if (keys != [CACHE_FORMAT, tokenizer_sha, source_sha] or bin_path.stat().st_size != offsets[-1] * dtype.itemsize
                or content_hash(bin_path) != index["tokens_blake2b"]):     # stale, or the token file was damaged
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


def encode_or_explain(tokenizer: Tokenizer, group) -> list[list[int]]:
    """The token ids of a group of (name, text); running out of memory names the largest document and its size."""
    try:
        return tokenizer.encode_batch([t for _, t in group])
    except MemoryError:
        name, text = max(group, key=lambda d: len(d[1]))
        raise ValueError(f"{name}: out of memory tokenizing a document of {len(text):,} characters (its ids need "
                          f"~{8 * len(text) / 1e9:.1f} GB while sentencepiece builds them): split it into smaller "
                          "documents (one per line of a .jsonl, or one .txt each)") from None


def write_cache(source: Path, split, files, tokenizer: Tokenizer, bin_path: Path, index_path: Path,
                source_sha: str, progress: bool) -> TokenCorpus:
    """Every non-empty document as BOS + text into `bin_path`, then the index: its presence marks a complete cache."""
    dtype = token_dtype(tokenizer.vocab_size)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = bin_path.with_name(f"{bin_path.name}.tmp-{os.getpid()}")
    offsets, names, skipped = [0], [], 0
    # The documents are counted first (cheap next to tokenizing them) so that the bar has a total and an ETA.
    total = sum(1 if f.name.endswith(".txt") else sum(1 for _ in jsonl_lines(f)) for f in files) if progress else None
    bar = tqdm(total=total, unit="doc", desc=f"tokenizing {source.name}", disable=not progress, dynamic_ncols=True)
    try:
        with open(tmp, "wb") as out:
            for group in batched_documents(iter_documents(source, split)):
                for (name, _), ids in zip(group, encode_or_explain(tokenizer, group)):
                    if len(ids) == (tokenizer.bos_id >= 0):     # BOS alone: an empty document, skipped
                        skipped += 1
                        continue
                    out.write(np.asarray(ids, dtype=dtype).tobytes())
                    offsets.append(offsets[-1] + len(ids))
                    names.append(name)
                bar.update(len(group))
        if not names:
            raise ValueError(f"{source}: empty source: no text in {len(files)} file(s)")
        index = {"format": CACHE_FORMAT, "source": str(source.resolve()), "split": split, "source_sha256": source_sha,
                 "tokenizer": str(tokenizer.path.resolve()), "tokenizer_sha256": tokenizer.fingerprint,
                 "dtype": dtype.name, "bos": tokenizer.bos_id >= 0, "eos": False, "n_documents": len(names),
                 "n_tokens": offsets[-1], "skipped_empty": skipped, "tokens_blake2b": content_hash(tmp),
                 "offsets": offsets, "names": names}
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
    source_sha = source_fingerprint(files, source_root(path, split))
    bin_path, index_path = cache_paths(path, split, tokenizer, cache_dir)
    corpus = read_cache(bin_path, index_path, tokenizer.fingerprint, source_sha)
    if corpus is None:
        corpus = write_cache(path, split, files, tokenizer, bin_path, index_path, source_sha, progress)
    if vocab is not None and vocab < tokenizer.vocab_size:     # the cache holds the tokenizer's ids only
        check_token_ids(corpus.tokens, vocab, path)
    return corpus

"""data.py: sources, token cache, packing/truncation layouts, sampler, SFT masks, synthetic corpus, bad inputs."""
import gzip
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from infra import cli
import data
from infra import sources
from infra import demo
from conftest import PG19_MINI, ROOT, TOKENIZER_VOCAB, sentencepiece_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    (d / "tokenizer.model").write_bytes(sentencepiece_model())
    return d


@pytest.fixture(scope="session")
def tok(model_dir):
    return sources.load_tokenizer(model_dir)


class CountingTokenizer(sources.Tokenizer):
    """Counts how many documents reach sentencepiece."""

    def __init__(self, path):
        super().__init__(path)
        self.documents_encoded = 0

    def encode_batch(self, texts, bos=True, eos=False):
        self.documents_encoded += len(texts)
        return super().encode_batch(texts, bos, eos)


def leftovers(folder):
    """Files in folder (recursively) that are not a finished cache entry."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and not p.name.endswith((".bin", ".json")))


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# ----------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------

def test_tokenizer_ids_and_roundtrip(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (TOKENIZER_VOCAB, 1, 2)
    assert tok.pad_id == 2  # the model defines no pad: EOS
    ids = tok.encode("To be, or not to be", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tok.encode("To be", bos=False) == ids[1:len(tok.encode("To be", bos=False)) + 1]
    assert tok.decode(ids) == "To be, or not to be"
    assert tok.encode_batch(["To be", "or not"], bos=False) == [tok.encode("To be", False), tok.encode("or not", False)]


def test_missing_tokenizer_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.model")):
        sources.load_tokenizer(tmp_path)
    write(tmp_path / "tokenizer.model", b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        sources.load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------

def test_folder_source_recursive_sorted_all_formats(tmp_path):
    src = tmp_path / "src"
    write(src / "b.txt", "bee")
    write(src / "a" / "z.txt", "zed")
    write(src / "c.jsonl", '{"text": "one"}\n\n{"text": "two", "meta": 1}\n')
    with gzip.open(src / "d.jsonl.gz", "wt") as f:
        f.write('{"text": "three"}\n')
    write(src / "notes.md", "ignored")
    write(src / ".longqlora_cache" / "x.txt", "ignored: hidden")
    docs = list(sources.iter_documents(src))
    assert docs == [("a/z.txt", "zed"), ("b.txt", "bee"), ("c.jsonl:1", "one"), ("c.jsonl:3", "two"),
                    ("d.jsonl.gz:1", "three")]
    assert list(sources.iter_documents(src / "c.jsonl")) == [("c.jsonl:1", "one"), ("c.jsonl:3", "two")]
    assert list(sources.iter_documents(src / "b.txt")) == [("b.txt", "bee")]


def test_pg19_layout_needs_split():
    names = [name for name, _ in sources.iter_documents(PG19_MINI, split="validation")]
    assert names == sorted(p.name for p in (PG19_MINI / "validation").glob("*.txt")) and len(names) == 3
    with pytest.raises(ValueError, match="PG19-layout folder; choose a split"):
        sources.source_files(PG19_MINI)
    with pytest.raises(FileNotFoundError, match="valid: split folder not found"):
        sources.source_files(PG19_MINI, split="valid")


def test_utf8_bom_stripped(tmp_path):
    write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello")
    assert list(sources.iter_documents(tmp_path / "bom.txt")) == [("bom.txt", "hello")]


# ----------------------------------------------------------------------------------------------------
# token files and cache
# ----------------------------------------------------------------------------------------------------

def test_bin_uint16_uint32_and_text_give_same_tokens(tmp_path, tok):
    corpus = sources.tokenize_source(PG19_MINI, tok, split="validation", cache_dir=tmp_path / "cache", progress=False)
    assert corpus.tokens.dtype == np.uint16 and len(corpus) == 3
    # each document is BOS + the text's tokens
    first_text = (PG19_MINI / "validation" / corpus.names[0]).read_text(encoding="utf-8")
    assert corpus.document(0).tolist() == tok.encode(first_text, bos=True)
    flat = np.asarray(corpus.tokens)
    flat.astype(np.uint16).tofile(tmp_path / "pg19-validation.bin")
    flat.astype(np.uint32).tofile(tmp_path / "pg19-validation-u32.bin")
    u16 = sources.load_token_file(tmp_path / "pg19-validation.bin", vocab_size=tok.vocab_size)
    u32 = sources.load_token_file(tmp_path / "pg19-validation-u32.bin", vocab_size=tok.vocab_size, dtype="uint32")
    assert u16.dtype == np.uint16 and u32.dtype == np.uint32
    np.testing.assert_array_equal(u16, flat)
    np.testing.assert_array_equal(u32, flat)
    via_source = sources.tokenize_source(tmp_path / "pg19-validation.bin", tok)
    np.testing.assert_array_equal(via_source.tokens, flat)
    assert len(via_source) == 1 and not via_source.bos
    # dtype follows the vocabulary: a 100k vocabulary reads the same file as uint32
    assert sources.token_dtype(32000) == np.uint16 and sources.token_dtype(65536) == np.uint16
    assert sources.token_dtype(65537) == np.uint32
    np.testing.assert_array_equal(sources.load_token_file(tmp_path / "pg19-validation-u32.bin", vocab_size=100_000), flat)


def test_cache_reused_and_invalidated(tmp_path, model_dir):
    tok = CountingTokenizer(model_dir / "tokenizer.model")
    src = tmp_path / "books"
    write(src / "a.txt", "It was the best of times.")
    write(src / "b.txt", "It was the worst of times.")
    cache = tmp_path / "cache"
    first = sources.tokenize_source(src, tok, cache_dir=cache, progress=False)
    assert tok.documents_encoded == 2
    bins = list(cache.glob("*.bin"))
    index = json.loads(next(cache.glob("*.json")).read_text())
    assert len(bins) == 1 and index["n_documents"] == 2 and index["dtype"] == "uint16"
    assert index["tokenizer_sha256"] == tok.fingerprint and index["bos"] is True and index["eos"] is False
    assert index["offsets"] == first.offsets.tolist() and index["names"] == ["a.txt", "b.txt"]
    mtime = bins[0].stat().st_mtime_ns

    second = sources.tokenize_source(src, tok, cache_dir=cache, progress=False)
    assert tok.documents_encoded == 2, "second run must read the cache"
    assert bins[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.tokens, first.tokens)
    assert second.path == bins[0]

    write(src / "b.txt", "It was the age of wisdom, it was the age of foolishness.")
    third = sources.tokenize_source(src, tok, cache_dir=cache, progress=False)
    assert tok.documents_encoded == 4, "a changed source is tokenized again"
    assert third.document(1).tolist() == tok.encode("It was the age of wisdom, it was the age of foolishness.")
    assert leftovers(cache) == []


def test_source_or_cache_rewritten_in_place_is_noticed(tmp_path, model_dir):
    tok = CountingTokenizer(model_dir / "tokenizer.model")
    src = write(tmp_path / "src" / "a.txt", "It was the best of times, it was the worst of times.")
    first = sources.tokenize_source(src, tok, cache_dir=tmp_path / "cache", progress=False)
    good = np.array(first.tokens)
    first.path.write_bytes(np.full(first.n_tokens, 60000, dtype=np.uint16).tobytes())   # same size, bad ids
    again = sources.tokenize_source(src, tok, cache_dir=tmp_path / "cache", progress=False)
    assert tok.documents_encoded == 2 and np.array_equal(again.tokens, good)           # rebuilt
    st = src.stat()
    write(src, "It was the age of wisdom, it was the age of folly!!!")   # same size...
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))                                   # ... and the same time
    assert src.stat().st_size == st.st_size
    third = sources.tokenize_source(src, tok, cache_dir=tmp_path / "cache", progress=False)
    assert tok.documents_encoded == 3 and third.document(0).tolist() == tok.encode(src.read_text())


def test_tokenizing_jsonl_shows_a_total(tmp_path, tok, monkeypatch):
    totals = []

    class Bar(sources.tqdm):
        def __init__(self, *args, **kwargs):
            totals.append(kwargs.get("total"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sources, "tqdm", Bar)
    write(tmp_path / "src" / "a.jsonl", '{"text": "one"}\n\n{"text": "two"}\n{"text": "three"}\n')
    with gzip.open(tmp_path / "src" / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "four"}\n{"text": "five"}')
    write(tmp_path / "src" / "c.txt", "six")
    corpus = sources.tokenize_source(tmp_path / "src", tok, cache_dir=tmp_path / "cache", progress=True)
    assert len(corpus) == 6 and totals == [6]


def test_random_bytes_are_not_text(tmp_path, tok):
    src = write(tmp_path / "src" / "noise.txt", np.random.default_rng(0).bytes(100_000))
    for _ in range(2):      # nothing is cached, so a rerun is refused as well
        with pytest.raises(ValueError, match=r"noise\.txt: not UTF-8 text \(\d+ of \d+ characters are invalid"):
            sources.tokenize_source(src, tok, cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").rglob("*.*"))


def test_default_cache_dir_is_the_user_cache(tmp_path, tok, monkeypatch):
    monkeypatch.delenv("LONGQLORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    src = write(tmp_path / "src" / "a.txt", "hello world")
    corpus = sources.tokenize_source(src.parent, tok, progress=False)
    assert corpus.path.parent == tmp_path / "xdg" / "longqlora"
    assert [p.name for p in src.parent.iterdir()] == ["a.txt"]       # nothing written beside the data
    monkeypatch.setenv("LONGQLORA_CACHE", str(tmp_path / "mine"))
    assert sources.tokenize_source(src, tok, progress=False).path.parent == tmp_path / "mine"


# ----------------------------------------------------------------------------------------------------
# pretraining layouts
# ----------------------------------------------------------------------------------------------------

def small_corpus(docs):
    lengths = [len(d) for d in docs]
    return sources.TokenCorpus(np.concatenate(docs).astype(np.uint16), np.concatenate([[0], np.cumsum(lengths)]),
                            [f"d{i}" for i in range(len(docs))], True)


EOS = 2


def test_packing_layout_exact():
    docs = [np.array([1, 10, 11, 12]), np.array([1, 20]), np.array([1, 30, 31, 32, 33, 34]), np.array([1, 40])]
    ds = data.PackedDataset(small_corpus(docs), ctx=5, eos_id=EOS)
    stream = [1, 10, 11, 12, EOS, 1, 20, EOS, 1, 30, 31, 32, 33, 34, EOS, 1, 40]  # 17 tokens: 3 chunks, tail dropped
    assert len(ds) == 3
    for i in range(3):
        ex = ds[i]
        assert ex["input_ids"].dtype == torch.long and ex["input_ids"].tolist() == stream[5 * i:5 * i + 5]
        assert torch.equal(ex["labels"], ex["input_ids"]) and ex["padding_mask"] is None
    with pytest.raises(IndexError):
        ds[3]
    # chunk of one token each: every position, EOS joins included
    one = data.PackedDataset(small_corpus(docs), ctx=1, eos_id=EOS)
    assert [one[i]["input_ids"].item() for i in range(len(one))] == stream
    with pytest.raises(ValueError, match="fewer than ctx=18"):
        data.PackedDataset(small_corpus(docs), ctx=18, eos_id=EOS)


def test_packing_real_corpus(tmp_path, tok):
    corpus = sources.tokenize_source(PG19_MINI, tok, split="validation", cache_dir=tmp_path, progress=False)
    ds = data.PackedDataset(corpus, ctx=4096, eos_id=tok.eos_id)
    assert len(ds) == (corpus.n_tokens + len(corpus) - 1) // 4096
    stream = np.concatenate([np.append(corpus.document(i), tok.eos_id) for i in range(len(corpus))])[:-1]
    for i in (0, len(ds) // 2, len(ds) - 1):
        assert ds[i]["input_ids"].tolist() == stream[4096 * i:4096 * (i + 1)].tolist()
    assert int((stream[:len(ds) * 4096] == tok.eos_id).sum()) == len(corpus) - 1


def test_truncation_layout():
    docs = [np.array([1, 10, 11, 12, 13, 14, 15]), np.array([1, 20, 21])]
    ds = data.TruncatedDataset(small_corpus(docs), ctx=5, pad_id=0)
    assert len(ds) == 2
    long, short = ds[0], ds[1]
    assert long["input_ids"].tolist() == [1, 10, 11, 12, 13] and long["labels"].tolist() == [1, 10, 11, 12, 13]
    assert long["padding_mask"] is None
    assert short["input_ids"].tolist() == [1, 20, 21, 0, 0]
    assert short["labels"].tolist() == [1, 20, 21, -100, -100]
    assert short["padding_mask"].tolist() == [True, True, True, False, False]
    batch = data.collate([long, short])
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype == torch.long
    assert batch["padding_mask"].dtype == torch.bool
    assert batch["padding_mask"].tolist() == [[True] * 5, [True, True, True, False, False]]
    assert batch["labels"][1].tolist() == [1, 20, 21, -100, -100]
    assert data.collate([long, long])["padding_mask"] is None


def test_collate_pads_unequal_lengths():
    a = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "padding_mask": None}
    b = {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "padding_mask": None}
    batch = data.collate([a, b], pad_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["padding_mask"].tolist() == [[True, True, True], [True, False, False]]


# ----------------------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------------------

def take(sampler, k):
    return [next(sampler) for _ in range(k)]


def test_sampler_deterministic_epochs():
    a, b = data.ShuffledSampler(10, seed=42), data.ShuffledSampler(10, seed=42)
    first = take(a, 30)
    assert first == take(b, 30)
    for e in range(3):
        assert sorted(first[10 * e:10 * e + 10]) == list(range(10))
    assert first[:10] != first[10:20], "each epoch has its own permutation"
    assert first[:10] != list(range(10))
    assert take(data.ShuffledSampler(10, seed=43), 10) != first[:10]
    assert a.epoch == 2 and a.position == 10 and len(a) == 10


def test_sampler_resume_exact():
    straight = data.ShuffledSampler(7, seed=3)
    expected = take(straight, 20)
    first = data.ShuffledSampler(7, seed=3)
    take(first, 9)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    assert state["epoch"] == 1 and state["position"] == 2
    resumed = data.ShuffledSampler(7, seed=3)
    resumed.load_state_dict(state)
    assert take(resumed, 11) == expected[9:]
    with pytest.raises(ValueError, match="seed=3.*seed=4"):
        data.ShuffledSampler(7, seed=4).load_state_dict(state)


def test_sampler_rank_sharding():
    full = np.random.default_rng([5, 0]).permutation(11)[:10]  # truncated to a multiple of world_size
    ranks = [data.ShuffledSampler(11, seed=5, rank=r, world_size=2) for r in range(2)]
    per_rank = [take(s, 5) for s in ranks]
    assert per_rank[0] == full[0::2].tolist() and per_rank[1] == full[1::2].tolist()
    assert not set(per_rank[0]) & set(per_rank[1])
    assert all(len(s) == 5 for s in ranks)
    assert take(ranks[0], 1)[0] in range(11) and ranks[0].epoch == 1
    with pytest.raises(ValueError, match="rank 2"):
        data.ShuffledSampler(11, seed=5, rank=2, world_size=2)


def test_batches_resume_at_exact_batch():
    ds = demo.SyntheticDataset(vocab_size=64, ctx=16, n_sequences=5, seed=0)
    sampler = data.ShuffledSampler(len(ds), seed=1)
    stream = data.batches(ds, sampler, batch_size=2)
    got = [next(stream) for _ in range(4)]
    state = sampler.state_dict()
    after = next(stream)
    resumed_sampler = data.ShuffledSampler(len(ds), seed=1)
    resumed_sampler.load_state_dict(state)
    again = next(data.batches(ds, resumed_sampler, batch_size=2))
    assert torch.equal(after["input_ids"], again["input_ids"]) and torch.equal(after["labels"], again["labels"])
    assert got[0]["input_ids"].shape == (2, 16) and got[0]["padding_mask"] is None


# ----------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------

def fastchat_vicuna(turns):
    """FastChat's vicuna_v1.1 string: ADD_COLON_TWO, sep=' ', sep2='</s>'."""
    text = data.SYSTEM + " "
    for human, assistant in turns:
        text += f"USER: {human} ASSISTANT: {assistant}</s>"
    return text


def answer_spans(labels):
    """Runs of labelled positions."""
    spans, cur = [], []
    for v in labels.tolist() + [-100]:
        if v != -100:
            cur.append(v)
        elif cur:
            spans.append(cur)
            cur = []
    return spans


def test_sft_input_output_mask(tmp_path, tok):
    path = write(tmp_path / "sft.jsonl", json.dumps({"input": "  Summarize the play. ", "output": "A prince avenges his father."}) + "\n")
    ds = data.SFTDataset(path, tok, ctx=512)
    ex = ds[0]
    ids, labels, mask = ex["input_ids"], ex["labels"], ex["padding_mask"]
    n = int(mask.sum())
    assert mask[:n].all() and not mask[n:].any()
    answer = tok.encode("A prince avenges his father.", bos=False) + [tok.eos_id]
    assert answer_spans(labels) == [answer]
    assert labels[n - len(answer):n].tolist() == answer and (labels[:n - len(answer)] == -100).all()
    assert (labels[n:] == -100).all() and (ids[n:] == tok.pad_id).all()
    # exactly FastChat's token ids: BOS + the string split at "</s>" (which becomes the EOS id)
    text = fastchat_vicuna([("Summarize the play.", "A prince avenges his father.")])
    assert ids[:n].tolist() == tok.encode(text[:-len("</s>")], bos=True) + [tok.eos_id]
    assert tok.decode(ids[:n]) == text[:-len("</s>")]


def test_sft_conversation_mask_and_template(tmp_path, tok, monkeypatch):
    turns = [("Who is Hamlet?", "The Prince of Denmark."), ("And Ophelia?", "Polonius's daughter.")]
    record = {"conversation": [{"human": h, "assistant": a} for h, a in turns]}
    path = write(tmp_path / "conv.jsonl", json.dumps(record) + "\n")
    encoded = []
    monkeypatch.setattr(tok, "encode", lambda text, bos=True, eos=False: encoded.append(text) or
                        sources.Tokenizer.encode(tok, text, bos, eos))
    ex = data.SFTDataset(path, tok, ctx=1024)[0]
    # the pieces are exactly FastChat's text between the implicit spaces and the "</s>" separators
    assert encoded == [data.SYSTEM + " USER: Who is Hamlet? ASSISTANT:", "The Prince of Denmark.",
                       "USER: And Ophelia? ASSISTANT:", "Polonius's daughter."]
    n = int(ex["padding_mask"].sum())
    ids = ex["input_ids"][:n].tolist()
    answers = [tok.encode(a, bos=False) + [tok.eos_id] for _, a in turns]
    assert answer_spans(ex["labels"]) == answers
    segments = fastchat_vicuna(turns).split("</s>")[:-1]
    expected = tok.encode(segments[0], bos=True) + [tok.eos_id] + tok.encode(segments[1], bos=False) + [tok.eos_id]
    assert ids == expected
    assert tok.decode(ids) == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                               "gives helpful, detailed, and polite answers to the user's questions. USER: Who is "
                               "Hamlet? ASSISTANT: The Prince of Denmark. USER: And Ophelia? ASSISTANT: "
                               "Polonius's daughter.")
    # a generation prompt is the same ids up to the second "ASSISTANT:"
    prompt = data.chat_prompt_ids(tok, turns[:1], "And Ophelia?")
    assert prompt == ids[:len(prompt)] and ids[len(prompt):] == answers[1]
    assert tok.decode(prompt).endswith("USER: And Ophelia? ASSISTANT:")


def test_longqlora_template_has_no_bos_and_newlines(tmp_path, tok):
    """LongQLoRA's own SFT format: SYSTEM + "\nUSER: {input}\nASSISTANT: " then the answer and EOS, no BOS."""
    path = write(tmp_path / "sft.jsonl", json.dumps({"input": "Who is Hamlet?", "output": "The Prince."}) + "\n")
    ex = data.SFTDataset(path, tok, ctx=512, template="longqlora")[0]
    n = int(ex["padding_mask"].sum())
    prompt = data.SYSTEM + "\nUSER: Who is Hamlet?\nASSISTANT: "
    answer = tok.encode("The Prince.", bos=False) + [tok.eos_id]
    assert ex["input_ids"][:n].tolist() == tok.encode(prompt, bos=False) + answer
    assert ex["input_ids"][0] != tok.bos_id and answer_spans(ex["labels"]) == [answer]
    assert data.chat_prompt_ids(tok, [], "Who is Hamlet?", "longqlora") == tok.encode(prompt, bos=False)
    second = data.chat_prompt_ids(tok, [("Who is Hamlet?", "The Prince.")], "And?", "longqlora")
    assert second == tok.encode(prompt, bos=False) + answer + tok.encode("\nUSER: And?\nASSISTANT: ", bos=False)
    with pytest.raises(ValueError, match="unknown chat template 'alpaca'"):
        data.SFTDataset(path, tok, ctx=512, template="alpaca")


def test_sft_truncation(tok):
    turns = [("Tell me everything.", "word " * 300)]
    full = data.build_sft_example(tok, turns, ctx=2048)
    n = int(full["padding_mask"].sum())
    cut = data.build_sft_example(tok, turns, ctx=n - 10)
    assert cut["padding_mask"] is None and len(cut["input_ids"]) == n - 10
    assert torch.equal(cut["input_ids"], full["input_ids"][:n - 10])
    assert torch.equal(cut["labels"], full["labels"][:n - 10])
    assert cut["labels"][-1] != -100 and tok.eos_id not in cut["labels"].tolist()


# ----------------------------------------------------------------------------------------------------
# synthetic long-range corpus
# ----------------------------------------------------------------------------------------------------

def test_synthetic_deterministic_and_long_range():
    ds = demo.SyntheticDataset(vocab_size=512, ctx=8192, n_sequences=4, seed=7)
    again = demo.SyntheticDataset(vocab_size=512, ctx=8192, n_sequences=4, seed=7)
    other = demo.SyntheticDataset(vocab_size=512, ctx=8192, n_sequences=4, seed=8)
    ex = ds[2]
    assert torch.equal(ex["input_ids"], again[2]["input_ids"]) and torch.equal(ex["labels"], again[2]["labels"])
    assert not torch.equal(ex["input_ids"], other[2]["input_ids"])
    assert not torch.equal(ds[0]["input_ids"], ds[1]["input_ids"])
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids.shape == labels.shape == (8192,) and ids[0] == 1 and ex["padding_mask"] is None
    assert ids[1:].min() >= 3 and ids.max() < 512
    D, K, V, Q, S = ds.distance, ds.n_keys, ds.n_values, ds.n_queries, ds.n_statements
    assert (D, K, V, Q, S) == (1024, 8, 8, 256, 256) and ds.floor == pytest.approx(math.log(8))
    is_key = (ids >= ds.key0) & (ids < ds.key0 + K)
    is_pair = (ids >= ds.pair0) & (ids < ds.pair0 + K * V)
    # layout: every episode of D tokens opens with S pair ids (each key once in every run of K) and closes
    # with Q queries (key ids)
    for start in range(1, 8192, D):
        assert is_pair[start:start + S].all() and not is_pair[start + S:start + D].any()
        for run in range(start, start + S, K):
            assert sorted(((ids[run:run + K] - ds.pair0) // V).tolist()) == list(range(K))
        assert is_key[start + D - Q:start + D].all() and not is_key[start:start + D - Q].any()
    assert not ((ids >= ds.value0) & (ids < ds.value0 + V)).any()       # answers never appear in the input
    # one dictionary per sequence: every statement of a key gives it the same value
    pair_pos = is_pair.nonzero().squeeze(1)
    key_of, value_of = (ids[pair_pos] - ds.pair0) // V, (ids[pair_pos] - ds.pair0) % V
    for k in range(K):
        assert len(set(value_of[key_of == k].tolist())) == 1
    # labels exactly one after each query: the value of the queried key
    labelled = (labels != -100).nonzero().squeeze(1)
    assert torch.equal(labelled, is_key.nonzero().squeeze(1)[:len(labelled)] + 1)
    assert len(labelled) == 8 * Q - 2           # ctx cuts the last query and the answer of the one before
    queried = ids[labelled - 1] - ds.key0
    value = {int(k): int(v) for k, v in zip(key_of, value_of)}
    assert labels[labelled].tolist() == [ds.value0 + value[int(k)] for k in queried]
    # long-range: the nearest statement of the queried key lies D - Q - S + 1 .. D - 1 tokens back
    gaps = []
    for p, k in zip((labelled - 1).tolist(), queried.tolist()):
        before = pair_pos[(pair_pos < p) & (key_of == k)]
        gaps.append(p - before.max().item())
    assert min(gaps) >= D - Q - S + 1 == 513 and max(gaps) <= D - 1
    batch = data.collate([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 8192)


def test_synthetic_small_vocab_and_context():
    ds = demo.SyntheticDataset(vocab_size=32, ctx=512, n_sequences=2, seed=0)     # the demo's vocabulary
    assert (ds.n_keys, ds.n_values, ds.distance, ds.n_queries, ds.n_statements) == (4, 4, 64, 16, 16)
    assert ds.filler0 == 27 and ds.floor == pytest.approx(math.log(4))
    ids, labels = ds[1]["input_ids"], ds[1]["labels"]
    assert ids.max() < 32 and (labels != -100).sum() == 8 * 16 - 2
    tiny = demo.SyntheticDataset(vocab_size=64, ctx=16, n_sequences=1, seed=0)    # distance 2: one key
    assert tiny.n_keys == 1 and tiny[0]["input_ids"].shape == (16,)


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="distance"):
        demo.SyntheticDataset(vocab_size=512, ctx=8, n_sequences=1, seed=0, distance=8)
    with pytest.raises(ValueError, match="distance"):
        demo.SyntheticDataset(vocab_size=512, ctx=64, n_sequences=1, seed=0, distance=1)
    with pytest.raises(ValueError, match="at least 12"):
        demo.SyntheticDataset(vocab_size=11, ctx=64, n_sequences=1, seed=0)
    with pytest.raises(IndexError):
        demo.SyntheticDataset(vocab_size=64, ctx=64, n_sequences=1, seed=0)[1]


# ----------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------

def test_empty_sources(tmp_path, tok):
    cache = tmp_path / "cache"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="nothing: empty source: no .txt"):
        sources.tokenize_source(tmp_path / "nothing", tok, cache_dir=cache)
    write(tmp_path / "blank" / "a.txt", "")
    write(tmp_path / "blank" / "b.txt", "   \n")
    with pytest.raises(ValueError, match="blank: empty source: no text in 2 file"):
        sources.tokenize_source(tmp_path / "blank", tok, cache_dir=cache, progress=False)
    with pytest.raises(FileNotFoundError, match="missing: no such file"):
        sources.tokenize_source(tmp_path / "missing", tok, cache_dir=cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_non_utf8_counted_once(tmp_path, tok):
    src = tmp_path / "src"
    write(src / "bad.txt", b"caf\xe9 and \xff\xfe done, \xef\xbf\xbd is a real U+FFFD")
    write(src / "good.txt", "fine \ufffd already here")
    write(src / "lines.jsonl", b'{"text": "ok"}\n{"text": "x\xc3"}\n')
    with pytest.warns(UserWarning) as record:
        corpus = sources.tokenize_source(src, tok, cache_dir=tmp_path / "cache", progress=False)
    messages = [str(w.message) for w in record if "UTF-8" in str(w.message)]
    assert messages == ["4 characters were not valid UTF-8 and were replaced by U+FFFD in: bad.txt, lines.jsonl"]
    assert len(corpus) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sources.tokenize_source(src, tok, cache_dir=tmp_path / "cache", progress=False)  # cached: silent


def test_malformed_jsonl_names_file_and_line(tmp_path, tok):
    cache = tmp_path / "cache"
    path = write(tmp_path / "corpus.jsonl", '{"text": "good"}\n{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:3: malformed JSON"):
        sources.tokenize_source(path, tok, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == [], "nothing half-written"
    path = write(tmp_path / "notext.jsonl", '{"text": "good"}\n{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"notext\.jsonl:2: expected a JSON object with a string field \"text\""):
        sources.tokenize_source(path, tok, cache_dir=cache, progress=False)
    path = write(tmp_path / "num.jsonl", '{"text": 5}\n')
    with pytest.raises(ValueError, match=r"num\.jsonl:1: .*string field"):
        list(sources.iter_documents(path))
    path = write(tmp_path / "bad.jsonl.gz", b"\x1f\x8b not gzip at all")
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz: corrupt gzip"):
        list(sources.iter_documents(path))
    assert list(cache.iterdir()) == []


def test_bin_bad_inputs(tmp_path):
    odd = write(tmp_path / "odd.bin", b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"odd\.bin: size 3 bytes is not a multiple of 2 \(uint16"):
        sources.load_token_file(odd)
    three = write(tmp_path / "six.bin", np.array([1, 2, 3], dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match=r"six\.bin: size 6 bytes is not a multiple of 4 \(uint32"):
        sources.load_token_file(three, dtype="uint32")
    big = write(tmp_path / "big.bin", np.array([1, 5, 511, 512, 9], dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match=r"big\.bin: token id 512 at position 3 is outside the model's vocabulary of 512"):
        sources.load_token_file(big, vocab_size=512)
    with pytest.raises(ValueError, match=r"big\.bin: token id 512 at position 3"):
        sources.tokenize_source(big, None, vocab_size=512)
    assert sources.load_token_file(big, vocab_size=513).tolist() == [1, 5, 511, 512, 9]
    with pytest.raises(ValueError, match=r"empty\.bin: empty token file"):
        sources.load_token_file(write(tmp_path / "empty.bin", b""))
    with pytest.raises(ValueError, match="unsupported file type"):
        sources.source_files(write(tmp_path / "x.parquet", b"PAR1"))


def test_text_tokens_beyond_model_vocab(tmp_path, tok):
    src = write(tmp_path / "a.txt", "zebra quartz")
    with pytest.raises(ValueError, match=r"a\.txt: token id \d+ at position \d+ is outside the model's vocabulary of 10"):
        sources.tokenize_source(src, tok, cache_dir=tmp_path / "cache", vocab_size=10, progress=False)


def test_failure_mid_tokenization_leaves_nothing(tmp_path, model_dir):
    class Exploding(sources.Tokenizer):
        def encode_batch(self, texts, bos=True, eos=False):
            raise KeyboardInterrupt

    src = write(tmp_path / "a.txt", "some text")
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        sources.tokenize_source(src, Exploding(model_dir / "tokenizer.model"), cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []


def test_sft_bad_lines(tmp_path, tok):
    bad = write(tmp_path / "s.jsonl", '{"input": "q", "output": "a"}\n{"input": "q"}\n')
    with pytest.raises(ValueError, match=r"s\.jsonl:2: expected \{\"input\", \"output\"\}"):
        data.SFTDataset(bad, tok, ctx=64)
    bad = write(tmp_path / "c.jsonl", '{"conversation": [{"human": "h", "assistant": "a"}, {"human": "h"}]}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:1: conversation turn 1 needs"):
        data.SFTDataset(bad, tok, ctx=64)
    with pytest.raises(ValueError, match=r"e\.jsonl: empty SFT file"):
        data.SFTDataset(write(tmp_path / "e.jsonl", "\n"), tok, ctx=64)


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------

def test_cli_tokenize_and_errors(tmp_path, model_dir, capsys):
    src = write(tmp_path / "src" / "a.txt", "hello world")
    # the real entry point once, in a fresh interpreter
    ok = subprocess.run([sys.executable, str(ROOT / "data.py"), "tokenize", str(src.parent), "--model", str(model_dir),
                         "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("1 documents, ") and str(tmp_path / "cache") in ok.stdout
    assert cli.run(data.main, ["tokenize", str(src.parent), "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {tmp_path / 'tokenizer.model'}: not found; the model "
                                "folder must contain the sentencepiece tokenizer.model"]
    with pytest.raises(SystemExit) as exit_info:
        data.main(["tokenize"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_sft_without_any_answer_token_within_ctx_is_refused(tmp_path, tok):
    """A prompt longer than ctx leaves no answer token: all such examples would train at loss 0 with grad-norm 0."""
    long = json.dumps({"input": "word " * 300, "output": "An answer."}) + "\n"
    short = json.dumps({"input": "Who?", "output": "An answer."}) + "\n"
    path = write(tmp_path / "long.jsonl", long * 3)
    with pytest.raises(ValueError, match=r"long\.jsonl: all 3 examples have no answer token within ctx 128"):
        data.SFTDataset(path, tok, ctx=128)
    with pytest.warns(UserWarning, match=r"mixed\.jsonl: 2 of 3 examples have no answer token within ctx 128"):
        ds = data.SFTDataset(write(tmp_path / "mixed.jsonl", long + short + long), tok, ctx=128)
    assert len(ds) == 3 and (ds[1]["labels"][1:] != -100).any() and (ds[2]["labels"] == -100).all()
    with pytest.warns(UserWarning, match=r"big\.jsonl: 300 of 301 examples"):     # counted across encode calls
        data.SFTDataset(write(tmp_path / "big.jsonl", long * 300 + short), tok, ctx=128)

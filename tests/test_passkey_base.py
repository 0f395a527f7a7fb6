"""bench/passkey_base.py: the two phases' sequences, and --smoke end to end (one torch thread).

The sequence tests check what each phase teaches: a copy document is a period of distinct alphabet tokens
repeated, so every token after the first period is a copy; a passkey sequence opens with an answered episode of
which eval.py's prompt is a prefix. The smoke test checks the report (both phases ran their planned steps under
one schedule, passkey rows at every length, a finite text perplexity) and that a rerun reuses the cached base.
Accuracy is never asserted at smoke scale.
"""
import json
import math
import sys

import numpy as np
import pytest

from conftest import ROOT, sentencepiece_model, smoke_on_one_thread
from infra.sources import Tokenizer

sys.path.insert(0, str(ROOT / "bench"))
import fact_corpus as fc  # noqa: E402
import passkey_base as pb  # noqa: E402

import eval as evaluation  # noqa: E402

SMOKE = pb.CONFIGS["smoke"]


def test_copy_document_repeats_a_period_of_distinct_alphabet_tokens():
    rng, alphabet, c = np.random.default_rng(0), np.arange(100, 164), pb.CONFIGS["full"]["copy"]
    for _ in range(50):
        doc = pb.copy_document(rng, alphabet, c, bos=1)
        assert len(doc) == c["ctx"] and doc[0] == 1
        body = doc[1:]
        period = next(n for n in range(1, len(body)) if body[n] == body[0])
        assert c["distinct"][0] <= period <= c["distinct"][1]
        assert len(set(body[:period].tolist())) == period and np.isin(body, alphabet).all()
        np.testing.assert_array_equal(body, np.resize(body[:period], len(body)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(sentencepiece_model())
    return Tokenizer(path)


def test_copy_alphabet_is_the_digits_then_the_most_frequent_tokens(tokenizer):
    digits = [tokenizer.encode(str(d), bos=False)[-1] for d in range(10)]
    a, b, c = [t for t in range(300, 400) if t not in digits][:3]
    docs = [np.array([c, a, b, a, b, a, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, *digits, *digits, *digits, *digits])]
    alphabet = pb.copy_alphabet(tokenizer, docs, 13)
    assert alphabet.tolist() == digits + [a, b, c] and len(set(digits)) == 10


def test_passkey_sequence_opens_with_an_answered_episode(tokenizer):
    rng, c = np.random.default_rng(1), {**SMOKE["passkey"], "ctx": 256, "passkey_prob": 1.0}
    filler = tokenizer.vocab_size + 7                    # a text id no episode holds
    text, episodes = fc.TextSource([np.full(1000, filler)]), fc.PasskeyEpisodes(tokenizer)
    for _ in range(10):
        seq, held = pb.passkey_sequence(rng, text, episodes, c, tokenizer.bos_id)
        assert len(seq) == 256 and seq[0] == tokenizer.bos_id and held
        episode = tokenizer.decode(seq[1:][seq[1:] != filler].tolist())
        assert episode.startswith(evaluation.PASSKEY_TASK)
        prompt, answer = episode.rsplit(evaluation.PASSKEY_QUESTION, 1)
        key = prompt.split(evaluation.PASSKEY_LINE.split("{key}")[0])[1].split(".")[0]
        assert evaluation.passkey_correct(answer, key)


def run_smoke(*argv):
    return smoke_on_one_thread(pb.main, *argv)


@pytest.fixture(scope="module")
def smoke(tiny_pg19, tmp_path_factory):
    out = tmp_path_factory.mktemp("passkey_base")
    args = ["--data-dir", str(tiny_pg19), "--cache-dir", str(out / "cache"), "--out", str(out / "passkey_base.json")]
    return run_smoke(*args), out, args


def test_report_has_both_phases_passkey_rows_and_text_ppl(smoke):
    report, out, _ = smoke
    assert json.loads((out / "passkey_base.json").read_text()) == json.loads(json.dumps(report))
    phases = report["base"]["phases"]
    assert [p["phase"] for p in phases] == ["copy", "passkey"]
    for p in phases:
        assert p["steps"] == SMOKE[p["phase"]]["steps"] > 0
        assert p["tokens"] == p["steps"] * SMOKE[p["phase"]]["batch_size"] * SMOKE[p["phase"]]["ctx"]
        assert math.isfinite(p["first_loss"]) and math.isfinite(p["last_loss"]) and p["seconds"] > 0
    assert report["base"]["steps"] == sum(p["steps"] for p in phases)
    assert 0 < phases[1]["sequences_with_episode"] <= SMOKE["passkey"]["steps"] * SMOKE["passkey"]["batch_size"]
    assert len(set(report["base"]["copy_alphabet"])) == SMOKE["copy"]["alphabet"]
    assert [r["seq_len"] for r in report["passkey"]] == list(SMOKE["eval"]["seq_len"])
    for r in report["passkey"]:
        assert r["trials"] == SMOKE["eval"]["trials"] and 0 <= r["accuracy"] <= 1
        assert r["correct"] == round(r["accuracy"] * r["trials"])
    assert math.isfinite(report["text_ppl"]["ppl"]) and report["text_ppl"]["seq_len"] == SMOKE["passkey"]["ctx"]
    assert report["config"]["mode"] == "smoke" and not report["base"]["cached"]
    assert {"tokenizer", "train", "eval"} <= set(report["timings"])


def test_rerun_reuses_the_cached_base(smoke):
    report, out, args = smoke
    again = run_smoke(*args[:-1], str(out / "again.json"))
    assert again["base"]["cached"] and again["base"]["dir"] == report["base"]["dir"]
    assert [r["correct"] for r in again["passkey"]] == [r["correct"] for r in report["passkey"]]

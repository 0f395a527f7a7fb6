"""bench/long_context.py and bench/fact_corpus.py: the corpus and probes, and --smoke end to end (one torch thread).

The corpus tests check the properties the study relies on: every fact is stated once and queried only after its
statement, with its own value, at distances spread over the window (both kinds: lookup and copy); every probe's evidence is invisible below
its band and visible from its band up, and
`control` reads exactly the tokens of the long variants at every step. The smoke test checks the report:
every variant x context x band, the same targets for every variant and context, finite perplexities, passkey
rows, caching of the corpus, the base and the trained runs.
"""
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, smoke_on_one_thread

sys.path.insert(0, str(ROOT / "bench"))
import fact_corpus as fc  # noqa: E402
import long_context as lc  # noqa: E402

SMOKE = lc.CONFIGS["smoke"]


class FakeTokenizer:
    bos_id, eos_id = 1, 2

    class sp:                                            # byte-fallback pieces <0xNN> -> 4000 + NN
        @staticmethod
        def piece_to_id(piece):
            return 4000 + int(piece[3:5], 16)

    def encode(self, text, bos=True):
        return ([1] if bos else []) + [3 + (ord(ch) % 50) for ch in text]


FACTS = fc.Facts(FakeTokenizer())


def random_docs(n_docs=3, length=3000, seed=0):
    rng = np.random.default_rng(seed)
    return fc.TextSource([rng.integers(3, 3900, size=length) for _ in range(n_docs)])


def decode_facts(tokens, kind):
    """lookup: (position, key, value) of every statement and (position of the value, key, value) of every query;
    copy: the same, from the kinds (a copy statement and a copy query are the same two tokens)."""
    pair = {int(FACTS.pair[k, v]): (k, v) for k in range(fc.Facts.N) for v in range(fc.Facts.N)}
    key = {int(t): k for k, t in enumerate(FACTS.key)}
    value = {int(t): v for v, t in enumerate(FACTS.value)}
    ckey = {int(t): k for k, t in enumerate(FACTS.ckey)}
    cvalue = {int(t): v for v, t in enumerate(FACTS.cvalue)}
    out = {"lookup": ([], []), "copy": ([], [])}
    for i, t in enumerate(tokens):
        t = int(t)
        if t in pair:
            out["lookup"][0].append((i, *pair[t]))
        if i + 1 == len(tokens):
            break
        nxt = int(tokens[i + 1])
        if t in key:
            out["lookup"][1].append((i + 1, key[t], value[nxt]))
        if t in ckey:
            assert nxt in cvalue
            which = 0 if kind[i] == fc.C_STATEMENT else 1
            assert kind[i + 1] == (fc.C_STATEMENT if which == 0 else fc.C_VALUE)
            out["copy"][which].append((i + (which == 1), ckey[t], cvalue[nxt]))
    return out


def test_training_sequences_state_each_fact_once_and_query_it_later():
    cfg = {**lc.CONFIGS["full"]["corpus"], "facts": True}
    rng = np.random.default_rng(0)
    episodes = fc.PasskeyEpisodes(FakeTokenizer())
    seen_episode, all_d = False, []
    for ctx in (256, 1024):
        for _ in range(20):
            tokens, kind, fact_d = fc.build_sequence(rng, random_docs(), episodes, ctx, cfg, bos=1, facts=FACTS)
            assert tokens.shape == kind.shape == (ctx,) and tokens[0] == 1
            seen_episode |= bool((kind == fc.EPISODE).any())
            for what, (stmts, queries) in decode_facts(tokens, kind).items():
                assert len({k for _, k, _ in stmts}) == len(stmts) <= fc.Facts.N        # each key stated once
                stated = {k: (i, v) for i, k, v in stmts}
                d = []
                for i, k, v in queries:
                    assert kind[i] == (fc.VALUE if what == "lookup" else fc.C_VALUE)
                    assert k in stated and stated[k][0] < i - 1 and stated[k][1] == v    # asked after, right value
                    d.append(i - stated[k][0])
                assert sorted(d) == sorted(fact_d[what]) and all(x < ctx for x in d)
                all_d += d
            assert (kind == fc.STATEMENT).sum() == len(decode_facts(tokens, kind)["lookup"][0])
    assert seen_episode
    assert max(all_d) > 512 and min(all_d) < 64            # distances spread over the whole window


def test_without_facts_a_sequence_is_an_episode_and_text():
    cfg = lc.CONFIGS["full"]["corpus"]
    assert cfg["facts"] is False
    rng, episodes, seen = np.random.default_rng(3), fc.PasskeyEpisodes(FakeTokenizer()), 0
    for _ in range(20):
        tokens, kind, fact_d = fc.build_sequence(rng, random_docs(), episodes, 1024, cfg, bos=1, facts=FACTS)
        assert len(tokens) == 1024 and set(np.unique(kind)) <= {fc.BOS_KIND, fc.EPISODE, fc.TEXT}
        assert fact_d == {"lookup": [], "copy": []}
        seen += bool((kind == fc.EPISODE).any())
    assert 5 <= seen <= 18                                  # passkey_prob 0.55


def test_probes_put_the_evidence_in_its_band():
    cfg = lc.CONFIGS["full"]
    probes = fc.build_probes(np.random.default_rng(1), random_docs(length=5000), FACTS, cfg, bos=1)
    L, nq = cfg["long_ctx"], cfg["eval"]["queries"]
    assert probes["tokens"].shape == (3 * cfg["eval"]["probes_per_band"], L)
    for p, kind, b in zip(probes["tokens"], probes["kind"], probes["band"]):
        lo, hi = fc.bands(cfg)[b]
        facts = decode_facts(p, kind)
        assert [i for i, _, _ in facts["copy"][1]] == list(range(L - 4 * nq + 1, L - 2 * nq, 2))
        assert [i for i, _, _ in facts["lookup"][1]] == list(range(L - 2 * nq + 1, L, 2))
        for what, (stmts, queries) in facts.items():
            assert len(stmts) == fc.Facts.N and len(queries) == nq
            stated = {k: (i, v) for i, k, v in stmts}
            for i, k, v in queries:
                s, v_stated = stated[k]
                assert v == v_stated and lo <= L - s < hi               # the evidence lies in the band
                last = s + (what == "copy")                             # a copy statement is two tokens
                for ctx in cfg["eval"]["ctx"]:
                    first = L - ctx + 1         # the first probe position inside BOS + the last ctx - 1 tokens
                    if ctx <= lo:
                        assert last < first                             # none of the statement is visible
                    if ctx >= hi:
                        assert s >= first
        assert (kind == fc.VALUE).sum() == (kind == fc.C_VALUE).sum() == nq


def test_band_masks_score_the_same_targets_inside_every_window():
    cfg = lc.CONFIGS["full"]
    probes = fc.build_probes(np.random.default_rng(2), random_docs(length=5000), FACTS, cfg, bos=1)
    masks = lc.band_masks(cfg, probes)
    L, nq = cfg["long_ctx"], cfg["eval"]["queries"]
    per_band = cfg["eval"]["probes_per_band"]
    for prefix, target in (("", fc.VALUE), ("copy ", fc.C_VALUE)):
        for name in lc.fact_bands(cfg, prefix):
            assert masks[name].sum() == per_band * nq
            assert (probes["kind"][masks[name]] == target).all()
    assert masks["all"].sum() == 3 * per_band * (cfg["short_ctx"] - 1)
    window = masks["all"]
    facts = np.isin(probes["kind"], fc.FACT_KINDS) & window
    assert masks["text"].sum() + facts.sum() == window.sum()
    assert not masks["all"][:, :L - cfg["short_ctx"] + 1].any()


def test_control_reads_the_long_variants_tokens_step_by_step(tmp_path):
    long_ctx, short_ctx, n_long, per_step = 16, 4, 12, 2
    tokens = np.arange(n_long * long_ctx) % 60000
    fc.write_tokens(tmp_path / "long.bin", tokens)
    fc.control_file(tmp_path / "long.bin", tmp_path / "short.bin", long_ctx, short_ctx)
    long_seqs = np.fromfile(tmp_path / "long.bin", dtype=np.uint16).reshape(n_long, long_ctx)
    short_seqs = np.fromfile(tmp_path / "short.bin", dtype=np.uint16).reshape(-1, short_ctx)
    lo, so = fc.sampler_order(n_long, fc.SEED), fc.sampler_order(len(short_seqs), fc.SEED)
    q = long_ctx // short_ctx
    for step in range(n_long // per_step):
        a = np.sort(long_seqs[lo[step * per_step:(step + 1) * per_step]].reshape(-1))
        b = np.sort(short_seqs[so[step * per_step * q:(step + 1) * per_step * q]].reshape(-1))
        np.testing.assert_array_equal(a, b)


def run_smoke(*argv):
    return smoke_on_one_thread(lc.main, *argv)


@pytest.fixture(scope="module")
def smoke(tiny_pg19, tmp_path_factory):
    out = tmp_path_factory.mktemp("longctx")
    args = ["--data-dir", str(tiny_pg19), "--cache-dir", str(out / "cache")]
    report = run_smoke(*args, "--out", str(out / "results" / "long_context.json"))
    return report, out, args


def test_report_has_every_variant_context_and_band(smoke):
    report, out, _ = smoke
    on_disk = json.loads((out / "results" / "long_context.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(report["results"]))
    assert (out / "results" / "long_context.png").stat().st_size > 1000
    steps = {b: SMOKE["finetune"]["steps"] * k for b, k in SMOKE["budgets"].items()}
    expected = [(v, 0) for v in lc.UNTRAINED] + [(v, steps[b]) for b, vs in lc.DEFAULT_RUNS.items() for v in vs]
    bands = lc.BAND_ORDER(SMOKE)
    got = {(r["variant"], r["steps"], r["eval_ctx"], r["band"]) for r in report["results"]}
    assert got == {(v, s, c, b) for v, s in expected for c in SMOKE["eval"]["ctx"] for b in bands}
    assert len(report["results"]) == len(got)
    assert all(math.isfinite(r["ppl"]) and r["ppl"] >= 1 and r["ppl_lo"] <= r["ppl"] <= r["ppl_hi"]
               for r in report["results"])
    assert {"tokenizer", "corpus", "base", "eval"} <= set(report["timings"]) and report["seconds"] > 0


def test_every_variant_scores_the_same_targets(smoke):
    report, _, _ = smoke
    per_band = {}
    for r in report["results"]:
        per_band.setdefault(r["band"], set()).add(r["n_tokens"])
    assert all(len(n) == 1 for n in per_band.values()), per_band       # same count for every variant and ctx
    Q, P = SMOKE["eval"]["queries"], SMOKE["eval"]["probes_per_band"]
    assert per_band[fc.band_name(fc.bands(SMOKE)[0])] == per_band["copy " + fc.band_name(fc.bands(SMOKE)[0])] == {P * Q}
    assert per_band["all"] == {3 * P * (SMOKE["short_ctx"] - 1)}


def test_passkey_rows_and_settings(smoke):
    report, _, _ = smoke
    full_attn = {(r["variant"], r["steps"]) for r in report["results"] if r["attn"] == "full"}
    got = {(r["variant"], r["steps"], r["protocol"], r["seq_len"]) for r in report["passkey"]}
    pk = SMOKE["passkey"]
    assert got == {(v, s, p, L) for v, s in full_attn for p, lens in pk["protocols"].items() for L in lens}
    assert len(got) == len(report["passkey"])
    for r in report["passkey"]:
        assert 0 <= r["accuracy"] <= 1 and r["trials"] == pk["trials"]
        assert r["correct"] == round(r["accuracy"] * r["trials"])
        assert set(r["depth_accuracy"]) == {"0-20%", "20-40%", "40-60%", "60-80%", "80-100%"}
    factor = SMOKE["long_ctx"] // SMOKE["short_ctx"]
    rope = {r["variant"]: r["rope_factor"] for r in report["results"]}
    assert rope["base"] == 1
    assert rope["pi"] == rope["longqlora"] == rope["full_ft"] == rope["s2_growing_groups"] == factor
    # every trained run whose attention differs is a different model: none agrees with another on the far band
    # (a remedy whose schedule never switches at smoke size trains exactly longqlora, and is left out)
    specs, accum = lc.variant_flags(SMOKE, Path("corpus")), SMOKE["finetune"]["sequences"]
    reference = {s: lc.spans(specs["longqlora"], s, accum, SMOKE["long_ctx"]) for s in (2, 8, 16, 32)}
    far = fc.band_name(fc.bands(SMOKE)[-1])
    values = [r["nll"] for r in report["results"] if r["band"] == far and r["eval_ctx"] == SMOKE["long_ctx"]
              and not (r["variant"] in lc.REMEDIES and r["steps"] and
                       lc.spans(specs[r["variant"]], r["steps"], accum, SMOKE["long_ctx"]) == reference[r["steps"]])]
    assert len(values) >= 14 and len(set(values)) == len(values)
    flags = report["config"]["train"]
    assert "--s2-shift" in flags["longqlora_roll (2)"]["flags"]
    roll = flags["longqlora_roll (2)"]["flags"]
    assert roll[len(roll) - 1 - roll[::-1].index("--s2-shift") + 1] == "roll"


def test_remedy_rows_compare_with_full_attention_at_the_same_steps(smoke):
    report, _, _ = smoke
    rows = {(r["variant"], r["steps"]): r for r in report["remedies"]}
    steps = {b: SMOKE["finetune"]["steps"] * k for b, k in SMOKE["budgets"].items()}
    assert set(rows) == {(v, steps[b]) for b, vs in lc.DEFAULT_RUNS.items() for v in vs
                         if v in ("longqlora", "lora_full_attn", *lc.REMEDIES)}
    ppl = {(r["variant"], r["steps"], r["band"]): r["ppl"] for r in report["results"]
           if r["eval_ctx"] == SMOKE["long_ctx"]}
    pk = {(r["variant"], r["steps"]): r for r in report["passkey"]
          if r["protocol"] == "ours" and r["seq_len"] == SMOKE["passkey"]["at"]}
    for (v, s), r in rows.items():
        assert r["text_ppl"] == ppl[(v, s, "text")] and r["passkey"] == pk[(v, s)]["accuracy"]
        assert 0 <= r["passkey_far"] <= 1
        ref = rows[("lora_full_attn", s)]
        assert r["qualifies"] == (v in lc.REMEDIES and r["passkey"] >= 0.9 * ref["passkey"]
                                  and r["passkey_far"] >= 0.9 * ref["passkey_far"] and r["flops_ratio"] <= 1.3)
    assert rows[("longqlora", steps["4x"])]["flops_ratio"] == 1


def test_remedy_schedules_and_their_flops():
    cfg = lc.CONFIGS["full"]
    specs, accum, L = lc.variant_flags(cfg, Path("corpus")), cfg["finetune"]["sequences"], cfg["long_ctx"]
    full = lambda name: [s == L for s in lc.spans(specs[name], 30, accum, L)]     # noqa: E731
    assert full("s2_full_last_10") == [False] * 27 * accum + [True] * 3 * accum
    assert full("s2_full_last_25") == [False] * 22 * accum + [True] * 8 * accum
    assert full("s2_3_of_4_micro") == [False, False, False, True] * 30
    assert lc.spans(specs["s2_growing_groups"], 8, accum, L) == [256] * 16 + [512] * 8 + [1024] * 8
    assert set(lc.spans(specs["s2_group_1_2"], 30, accum, L)) == {512}
    assert set(lc.spans(specs["lora_full_attn"], 30, accum, L)) == {L}
    shape = lc.model_shape(cfg["base"]["model"], cfg["tokenizer"]["vocab_size"])

    def per_token(span):
        return lc.benchlib.train_flops_per_token(**shape, lora_r=64, span=span)["executed"]
    assert lc.flops_ratio(specs["lora_full_attn"], 30, accum, shape, L) == pytest.approx(per_token(L) / per_token(256))
    assert lc.flops_ratio(specs["s2_3_of_4_micro"], 30, accum, shape, L) == pytest.approx(
        (3 * per_token(256) + per_token(L)) / (4 * per_token(256)))
    assert lc.flops_ratio(specs["longqlora"], 30, accum, shape, L) == 1


def test_attention_schedule_sets_the_attention_before_every_micro_batch(monkeypatch):
    seen = []

    class Model:
        def set_attention(self, mode, ratio, shift):
            self.mode = (mode, ratio, shift)

        def loss(self, *x, **k):
            seen.append(self.mode)

    monkeypatch.setattr(lc.train, "build_model", lambda args: (Model(), [], 4.0))
    build = lc.train.build_model
    with lc.attention_schedule(lc.growing_groups, 4, 2):
        model, _, factor = lc.train.build_model(SimpleNamespace(s2_shift="roll"))
        for _ in range(8):
            model.loss()
    assert lc.train.build_model is build and factor == 4.0
    assert seen == [("s2", 0.25, "roll")] * 4 + [("s2", 0.5, "roll")] * 2 + [("full", 1.0, "roll")] * 2


def test_rerun_uses_every_cache_and_a_fresh_evaluation_agrees(smoke):
    _, out, args = smoke
    first = json.loads((out / "results" / "long_context.json").read_text())
    for fresh in (False, True):
        if fresh:               # the evaluations recomputed from the cached base and adapter
            for f in (out / "cache").glob("runs-*/evals/*.json"):
                f.unlink()
        report = run_smoke(*args, "--variants", "base", "longqlora", "--budgets", "1x",
                           "--out", str(out / "again" / f"r{fresh}.json"))
        assert report["timings"]["base"] < 5 and report["config"]["base_train"]["cached"]
        assert all(info["cached"] for info in report["config"]["train"].values())
        assert (report["timings"]["eval longqlora 2"] == first["timings"]["eval longqlora 2"]) != fresh
        again = {(r["variant"], r["steps"], r["eval_ctx"], r["band"]): r["ppl"] for r in report["results"]}
        assert len(again) == 2 * len(SMOKE["eval"]["ctx"]) * len(lc.BAND_ORDER(SMOKE))
        for r in first["results"]:
            key = (r["variant"], r["steps"], r["eval_ctx"], r["band"])
            if key in again:
                assert again[key] == pytest.approx(r["ppl"], rel=1e-6)
        pk = {(r["variant"], r["protocol"], r["seq_len"]): r["correct"] for r in report["passkey"]}
        assert pk == {(r["variant"], r["protocol"], r["seq_len"]): r["correct"] for r in first["passkey"]
                      if r["variant"] in ("base", "longqlora") and r["steps"] in (0, 2)}


def test_table_prints_the_markdown_of_an_existing_json(smoke, capsys):
    _, out, _ = smoke
    capsys.readouterr()
    assert lc.main(["--table", "--out", str(out / "results" / "long_context.json")]) == {}
    text = capsys.readouterr().out
    assert "| variant (steps) |" in text and "| base |" in text and "| longqlora (2) |" in text
    assert "Passkey retrieval accuracy" in text and "passkey @320" in text and "LongLoRA's protocol" in text
    assert "by the depth of the key" in text and "| s2_growing_groups (8) |" in text


def test_diagnose_runs_its_variants_and_counts_the_answerable_queries(smoke):
    _, out, args = smoke
    report = run_smoke(*args, "--diagnose", "--out", str(out / "diag" / "d.json"))
    assert {r["variant"] for r in report["results"]} == set(lc.DIAGNOSE_RUNS["1x"])
    a = report["answerable_under_s2"]
    assert a["queries"] > 0
    for ratio in ("1/8", "1/4", "1/2"):
        f = a[ratio]
        assert 0 <= f["unshifted_heads"] <= f["either"] <= 1 and f["shifted_heads"] <= f["either"]
    assert a["1/8"]["either"] <= a["1/2"]["either"]
    rope = {r["variant"]: r["rope_factor"] for r in report["results"]}
    assert set(rope.values()) == {SMOKE["long_ctx"] // SMOKE["short_ctx"]}

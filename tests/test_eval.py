"""eval.py: perplexity protocols against HF transformers, data sources, passkey prompts, CLI and its errors."""
import json
import math
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PG19_MINI, ROOT, hf_model, make_hf_checkpoint

from infra import cli
from infra import eval_data
from infra import sources
import eval as ev
import generate as gen

N_TOKENS = 420


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("eval") / "tiny")


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 512, N_TOKENS).astype(np.uint16)


def rel(a, b):
    return abs(a - b) / abs(b)


def load(path, **kw):
    """eval.py's model loader (generate.load_model) without the note of where the RoPE scaling came from."""
    return gen.load_model(path, **{"dtype": torch.float32, **kw})[0]


# --------------------------------------------------------------------------- HF reference, written independently

def hf_reference_ppl(path, tokens, seq_len, protocol, stride, factor):
    """The three protocols as plain loops over HF LlamaForCausalLM and HF's own loss."""
    from transformers import LlamaConfig

    cfg = LlamaConfig.from_pretrained(path)
    if factor is not None:
        cfg.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": 10000.0}
    model = hf_model(path, config=cfg)
    ids = torch.as_tensor(tokens.astype(np.int64))[None]
    n = ids.shape[1]
    with torch.no_grad():
        if protocol in ("longlora", "longqlora", "disjoint"):
            starts = list(range(0, n - seq_len, stride))
            starts.pop()
            losses = [model(ids[:, s:s + seq_len], labels=ids[:, s:s + seq_len]).loss.item() for s in starts]
            return math.exp(sum(losses) / len(losses)), len(starts) * (seq_len - 1)
        total, count, done = 0.0, 0, 1          # done: first target position not scored yet
        ends = list(range(seq_len, n, stride)) + [n]
        for end in ends:
            start = max(0, end - seq_len)
            x = ids[:, start:end]
            labels = x.clone()
            labels[:, :done - start] = -100
            k = end - done
            total += model(x, labels=labels).loss.item() * k
            count += k
            done = end
        return math.exp(total / count), count


@pytest.mark.parametrize("factor", [None, 2.0], ids=["plain", "PI2"])
@pytest.mark.parametrize("protocol,stride", [("longlora", 24), ("longqlora", 64), ("disjoint", 64), ("sliding", 20),
                                             ("longqlora", None), ("longlora", None)])
def test_perplexity_equals_hf(ckpt, tokens, protocol, stride, factor):
    model = load(ckpt, dtype=torch.float32, rope_factor=factor)
    if stride is None:      # the published defaults, 8192 and 256, on a stream with two starts (one is dropped)
        tokens = np.tile(tokens, 8200 // len(tokens) * 2 + 1 if protocol == "longqlora" else 1)
    ours = ev.evaluate_perplexity(model, tokens, 64, protocol, stride=stride, progress=False)
    stride = stride or {"longqlora": 8192, "longlora": 256}[protocol]
    ref_ppl, ref_tokens = hf_reference_ppl(ckpt, tokens, 64, protocol, stride, factor)
    assert rel(ours["ppl"], ref_ppl) < 1e-4
    assert ours["tokens"] == ref_tokens
    assert math.isclose(ours["nll"], math.log(ours["ppl"]))


def test_inference_rope_rule_is_the_same_at_every_length(ckpt, tokens, tmp_path):
    """--rope-factor > the adapter's longqlora.json > the checkpoint's config; an adapter with no record on a base
    with no scaling is an error, never a per-length guess."""
    import lora
    from infra.adapter import save_adapter
    from infra.rope_scaling import inference_scaling

    pi = lambda f: {"factor": f, "rope_type": "linear"}                                      # noqa: E731
    assert inference_scaling(None, None) == (None, "the checkpoint's config.json")
    assert inference_scaling(None, pi(4.0))[0] == pi(4.0)
    assert inference_scaling(1, pi(4.0)) == (None, "--rope-factor")
    assert inference_scaling(3, None, "a", {"rope_scaling": pi(2.0)})[0] == pi(3.0)
    assert inference_scaling(None, pi(4.0), "a", {"rope_scaling": pi(2.0)})[0] == pi(2.0)
    assert inference_scaling(None, None, "a", {"rope_scaling": None})[0] is None    # trained without PI
    assert inference_scaling(None, pi(4.0), "a", None)[0] == pi(4.0)            # the base carries it
    with pytest.raises(ValueError, match="a: the RoPE scaling this adapter was trained with is unknown.*--rope-factor"):
        inference_scaling(None, None, "a", None)
    # through the loader: an adapter saved by train.py carries its factor, used at every length
    model = load(ckpt)
    lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    save_adapter(model, tmp_path / "with", training={"rope_scaling": pi(2.0), "ctx": 256})
    save_adapter(model, tmp_path / "without")
    loaded, source = gen.load_model(ckpt, adapter=tmp_path / "with", dtype=torch.float32)
    assert loaded.args.rope_scaling == pi(2.0) and source == str(tmp_path / "with" / "longqlora.json")
    ours = ev.evaluate_perplexity(loaded, tokens, 64, "longlora", stride=16, progress=False)
    ref, _ = hf_reference_ppl(ckpt, tokens, 64, "longlora", 16, 2.0)       # PI 2 at 64 < the trained 128 tokens
    assert rel(ours["ppl"], ref) < 1e-4
    with pytest.raises(ValueError, match="without: the RoPE scaling this adapter was trained with is unknown"):
        gen.load_model(ckpt, adapter=tmp_path / "without")
    assert load(ckpt, adapter=tmp_path / "without", rope_factor=2).args.rope_scaling == pi(2.0)


def test_batch_size_does_not_change_the_result(ckpt, tokens):
    model = load(ckpt, dtype=torch.float32)
    for protocol in ev.PROTOCOLS:
        one = ev.evaluate_perplexity(model, tokens, 32, protocol, stride={"longlora": 48, "longqlora": 40}.get(protocol),
                                     progress=False)
        three = ev.evaluate_perplexity(model, tokens, 32, protocol, stride=one["stride"], batch_size=3, progress=False)
        assert rel(three["ppl"], one["ppl"]) < 1e-6 and three["windows"] == one["windows"]


def test_adapter_equals_merged_model(ckpt, tokens, tmp_path):
    import lora
    from infra.adapter import save_adapter
    from infra.merge import merge_and_export

    model = load(ckpt, dtype=torch.float32)
    lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.normal_(0, 0.2)
    save_adapter(model, tmp_path / "adapter", training={"rope_scaling": None, "ctx": 128})
    merged, _, _ = merge_and_export(ckpt, tmp_path / "adapter", tmp_path / "merged")

    base = ev.evaluate_perplexity(load(ckpt, dtype=torch.float32), tokens, 64, "sliding", progress=False)
    with_adapter = load(ckpt, adapter=tmp_path / "adapter", dtype=torch.float32)
    ours = ev.evaluate_perplexity(with_adapter, tokens, 64, "sliding", progress=False)
    ref = ev.evaluate_perplexity(load(merged, dtype=torch.float32), tokens, 64, "sliding", progress=False)
    assert rel(ours["ppl"], ref["ppl"]) < 1e-5
    assert rel(ours["ppl"], base["ppl"]) > 1e-3      # the adapter really changes the model


def test_nf4_base_equals_dense_model_with_dequantized_weights(ckpt, tokens):
    from model import DECODER_LINEARS
    from quant import dequantize_nf4, quantize_nf4

    nf4 = load(ckpt, quant="nf4", dtype=torch.float32)
    dense = load(ckpt, dtype=torch.float32)
    with torch.no_grad():
        for name, m in dense.named_modules():
            if name.rsplit(".", 1)[-1] in DECODER_LINEARS:
                m.weight.copy_(dequantize_nf4(*quantize_nf4(m.weight), dtype=torch.float32))
    a = ev.evaluate_perplexity(nf4, tokens, 64, "sliding", progress=False)
    b = ev.evaluate_perplexity(dense, tokens, 64, "sliding", progress=False)
    assert rel(a["ppl"], b["ppl"]) < 1e-5


def test_s2_attention_at_evaluation_is_an_ablation(ckpt, tokens):
    model = load(ckpt, dtype=torch.float32)
    full = ev.evaluate_perplexity(model, tokens, 64, "disjoint", progress=False)
    model.set_attention("s2")
    s2 = ev.evaluate_perplexity(model, tokens, 64, "disjoint", progress=False)
    assert math.isfinite(s2["ppl"]) and rel(s2["ppl"], full["ppl"]) > 1e-4
    assert s2["tokens"] == full["tokens"]


# --------------------------------------------------------------------------- windows

@pytest.mark.parametrize("n", [300, 301, 64, 20])
def test_sliding_scores_the_same_tokens_at_every_length(n):
    sets = {}
    for L in (16, 32, 64):
        windows = ev.perplexity_windows(n, L, "sliding")
        positions = [t for _, first, end in windows for t in range(first, end)]
        assert len(positions) == len(set(positions)) == n - 1          # each token once
        sets[L] = sorted(positions)
        for start, first, end in windows:
            assert end - start == min(L, n)                            # right-aligned, full length
            assert first - start >= (1 if start == 0 else L - L // 2)  # context of the first target
    assert sets[16] == sets[32] == sets[64] == list(range(1, n))


def test_sliding_token_counts_match_across_lengths(ckpt, tokens):
    model = load(ckpt, dtype=torch.float32)
    counts = {L: ev.evaluate_perplexity(model, tokens[:200], L, "sliding", batch_size=8, progress=False)["tokens"]
              for L in (16, 32, 64)}
    assert set(counts.values()) == {199}


def test_longlora_windows_drop_the_last_start():
    # range(0, 1000 - 100, 256) = 0, 256, 512, 768; LongLoRA pops 768.
    assert ev.perplexity_windows(1000, 100, "longlora") == [(0, 1, 100), (256, 257, 356), (512, 513, 612)]
    assert [w[0] for w in ev.perplexity_windows(1000, 100, "disjoint")] == [0, 100, 200, 300, 400, 500, 600, 700]
    with pytest.raises(ValueError, match="too few"):
        ev.perplexity_windows(150, 100, "disjoint")
    with pytest.raises(ValueError, match="smaller than seq_len"):
        ev.perplexity_windows(500, 100, "sliding", stride=100)
    with pytest.raises(ValueError, match="unknown protocol 'disjiont'"):
        ev.perplexity_windows(1000, 100, "disjiont", stride=100)     # never scored as disjoint


def test_published_protocols_windows_at_seq_len_below_the_stride():
    """LongQLoRA's evaluate.py steps 8192 tokens whatever seq_len is; LongLoRA's eval.py 256. Both drop the
    last start of range(0, N - L, stride)."""
    # range(0, 20000 - 1024, 8192) = 0, 8192, 16384; the last is dropped
    assert ev.perplexity_windows(20000, 1024, "longqlora") == [(0, 1, 1024), (8192, 8193, 9216)]
    assert len(ev.perplexity_windows(100_000, 8192, "longqlora")) == len(range(0, 100_000 - 8192, 8192)) - 1
    assert ev.perplexity_windows(100_000, 8192, "longqlora") == ev.perplexity_windows(100_000, 8192, "disjoint")
    assert len(ev.perplexity_windows(20000, 1024, "longlora")) == len(range(0, 20000 - 1024, 256)) - 1 == 74
    with pytest.raises(ValueError, match="too few"):
        ev.perplexity_windows(9000, 1024, "longqlora")       # one start (0) only, and it is dropped


def test_published_protocols_default_quantization_and_dtype(capsys):
    def resolved(*argv, cuda=False):
        args = ev.parse_args(["--model", "m", *argv])
        eval_data.apply_eval_defaults(args, cuda)
        return args.stride, args.quant, args.dtype, args.trials
    assert resolved() == (None, "none", "auto", 20)
    assert resolved("--protocol", "longqlora", cuda=True) == (8192, "nf4", "fp16", 10)
    assert resolved("--protocol", "longlora", cuda=True) == (256, "none", "fp16", 10)
    assert resolved("--protocol", "longqlora", "--quant", "none", "--dtype", "bf16", "--stride", "64") == (
        64, "none", "bf16", 10)
    capsys.readouterr()
    assert resolved("--protocol", "longqlora") == (8192, "nf4", "fp32", 10)       # no CUDA: fp32, and said so
    assert "computes in fp16; without CUDA this uses fp32" in capsys.readouterr().out
    assert resolved("--task", "passkey", "--protocol", "longlora", cuda=True)[1:] == ("none", "fp16", 10)
    assert resolved("--task", "passkey", "--trials", "3")[1:] == ("none", "auto", 3)
    with pytest.raises(ValueError, match="--task passkey: --protocol longlora"):
        ev.parse_args(["--model", "m", "--task", "passkey", "--protocol", "longqlora"])
    help_text = " ".join(ev.build_parser().format_help().split())
    assert "longqlora = LongQLoRA's evaluate.py (stride 8192 whatever seq_len, --quant nf4, --dtype fp16" in help_text


def test_published_protocols_prefer_longloras_bin_files(tmp_path):
    shutil.copytree(PG19_MINI / "validation", tmp_path / "pg19" / "validation")
    (tmp_path / "pg19-validation.bin").write_bytes(np.arange(10, dtype=np.uint16).tobytes())
    assert eval_data.find_dataset("pg19", "validation", tmp_path) == (tmp_path / "pg19", "validation")
    assert eval_data.find_dataset("pg19", "validation", tmp_path, prefer_bin=True) == (
        tmp_path / "pg19-validation.bin", None)


# --------------------------------------------------------------------------- sources

@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    for f in sorted((PG19_MINI / "validation").glob("*.txt"))[:2]:
        (folder / f.name).write_text(f.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return folder


def test_bin_and_text_sources_agree(ckpt, text_source, tmp_path):
    tok = sources.load_tokenizer(ckpt)
    text_tokens = sources.tokenize_source(text_source, tok, vocab_size=512, cache_dir=tmp_path / "cache",
                                          progress=False).tokens
    assert len(text_tokens) > 1000 and text_tokens[0] == tok.bos_id
    np.asarray(text_tokens, dtype=np.uint16).tofile(tmp_path / "u16.bin")
    np.asarray(text_tokens, dtype=np.uint32).tofile(tmp_path / "u32.bin")
    u16 = sources.tokenize_source(tmp_path / "u16.bin", None, vocab_size=512).tokens
    u32 = sources.tokenize_source(tmp_path / "u32.bin", None, vocab_size=512, dtype="uint32").tokens
    assert np.array_equal(u16, text_tokens) and np.array_equal(u32, text_tokens)

    model = load(ckpt, dtype=torch.float32)
    ppl = {name: ev.evaluate_perplexity(model, t[:1200], 128, "disjoint", progress=False)["ppl"]
           for name, t in (("text", text_tokens), ("u16", u16), ("u32", u32))}
    assert ppl["text"] == ppl["u16"] == ppl["u32"]
    # max_tokens keeps a prefix
    assert np.array_equal(sources.tokenize_source(tmp_path / "u16.bin", None).tokens[:100], text_tokens[:100])


def test_find_dataset_layouts(tmp_path):
    shutil.copytree(PG19_MINI / "validation", tmp_path / "pg19" / "validation")
    assert eval_data.find_dataset("pg19", "validation", tmp_path) == (tmp_path / "pg19", "validation")
    (tmp_path / "pg19-test.bin").write_bytes(np.arange(10, dtype=np.uint16).tobytes())
    assert eval_data.find_dataset("pg19", "test", tmp_path) == (tmp_path / "pg19-test.bin", None)
    assert eval_data.find_dataset("pg19", "validation", tmp_path / "pg19") == (tmp_path / "pg19", "validation")
    (tmp_path / "proof-pile").mkdir()
    (tmp_path / "proof-pile" / "test.jsonl").write_text('{"text": "a b c"}\n')
    assert eval_data.find_dataset("proof-pile", "test", tmp_path) == (tmp_path / "proof-pile" / "test.jsonl", None)
    (tmp_path / "proof-pile-test.bin").write_bytes(np.arange(10, dtype=np.uint16).tobytes())
    assert eval_data.find_dataset("proof-pile", "test", tmp_path) == (tmp_path / "proof-pile-test.bin", None)


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        eval_data.find_dataset("pg19", "validation", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "pg19" / "validation") in msg and str(tmp_path / "pg19-validation.bin") in msg
    assert f"python -m infra.download pg19 --split validation --out {tmp_path / 'pg19'}" in msg
    assert "--download" in msg
    with pytest.raises(FileNotFoundError, match="proof-pile-test.bin"):
        eval_data.find_dataset("proof-pile", "test", tmp_path)


# --------------------------------------------------------------------------- passkey

@pytest.mark.parametrize("target", [180, 400, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_prompt(ckpt, target, depth):
    tok = sources.load_tokenizer(ckpt)
    ids = ev.passkey_prompt(tok, target, depth, "48213")
    assert target - 4 <= len(ids) <= target
    assert ids[0] == tok.bos_id
    text = tok.decode(ids)
    line = ev.PASSKEY_LINE.format(key="48213")
    assert text.count(line) == 1 and text.count("48213") == 2
    assert text.startswith(ev.PASSKEY_TASK) and text.endswith(ev.PASSKEY_QUESTION)
    before, after = text.split(line)
    n_before = len(before.split()) - len(ev.PASSKEY_TASK.split())      # filler words before the key line
    n_filler = n_before + len(after.split()) - len(ev.PASSKEY_QUESTION.split())
    assert n_filler > 0
    assert abs(n_before / n_filler - depth) <= 0.5 / n_filler + 1e-9


def test_passkey_prompt_too_short(ckpt):
    with pytest.raises(ValueError, match="too short"):
        ev.passkey_prompt(sources.load_tokenizer(ckpt), 20, 0.5, "12345")


def test_passkey_scoring():
    assert ev.passkey_correct(" 12345. Remember", "12345")
    assert ev.passkey_correct("12345", "12345")
    assert not ev.passkey_correct(" 1234", "12345")
    assert not ev.passkey_correct(" 123456", "12345")
    assert not ev.passkey_correct(" 54321 12345", "12345")
    assert not ev.passkey_correct(" the key", "12345")
    trials = [{"depth": 0.05, "correct": True}, {"depth": 0.1, "correct": False}, {"depth": 0.5, "correct": True},
              {"depth": 0.99, "correct": True}]
    s = ev.passkey_summary(trials)
    assert s["accuracy"] == 0.75 and s["correct"] == 3 and s["trials"] == 4
    assert s["depth_accuracy"] == {"0-20%": 0.5, "20-40%": None, "40-60%": 1.0, "60-80%": None, "80-100%": 1.0}


def test_passkey_evaluation_runs_with_the_kv_cache(ckpt):
    model = load(ckpt, dtype=torch.float32)
    tok = sources.load_tokenizer(ckpt)
    r = ev.evaluate_passkey(model, tok, 192, trials=3, seed=5, progress=False)
    assert r["trials"] == 3 and len(r["records"]) == 3
    assert all(192 - ev.PASSKEY_NEW_TOKENS - 4 <= t["prompt_tokens"] <= 192 - ev.PASSKEY_NEW_TOKENS
               for t in r["records"])
    assert all(len(t["key"]) == 5 for t in r["records"])
    assert r["accuracy"] == sum(ev.passkey_correct(t["answer"], t["key"]) for t in r["records"]) / 3
    # reproducible: the same seed gives the same keys, depths and answers
    again = ev.evaluate_passkey(model, tok, 192, trials=3, seed=5, progress=False)
    assert again["records"] == r["records"]


def test_longlora_passkey_prompt_text_on_fixed_seeds():
    """LongLoRA's test: int(3.75 * seq_len) filler characters cut at a random point, key randint(1, 50000) seeded
    with the trial's number (the same key at every length), five lines joined by newlines."""
    text, key, depth = eval_data.passkey_trial(8, 0, random.Random(0))       # 30 characters, cut after 27
    assert key == str(random.Random(0).randint(1, 50000)) == "25248" and depth == 27 / 30
    assert text == ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I "
                    "will quiz you about the important information there.\nThe grass is green. The sky\nThe pass key "
                    "is 25248. Remember it. 25248 is the pass key.\nThe\nWhat is the pass key? The pass key is")
    assert eval_data.passkey_trial(4000, 0, random.Random(7))[1] == key
    lines = eval_data.passkey_trial(1000, 5, random.Random(1))[0].split("\n")
    assert len(lines) == 5 and len(lines[1]) + len(lines[3]) == 3750
    assert eval_data.filler(45) == "The grass is green. The sky is blue. The sun i"[:45]


def test_longlora_passkey_scoring_is_an_exact_token_match(ckpt, monkeypatch):
    assert eval_data.passkey_correct([29871, 29896, 29906], [29871, 29896, 29906])
    assert not eval_data.passkey_correct([29871, 29896], [29871, 29896, 29906])          # EOS came early
    assert not eval_data.passkey_correct([29896, 29906, 29871], [29871, 29896, 29906])
    model, tok = load(ckpt, dtype=torch.float32), sources.load_tokenizer(ckpt)
    r = ev.evaluate_passkey(model, tok, 192, trials=4, seed=5, progress=False, protocol="longlora")
    assert [t["key"] for t in r["records"]] == [str(random.Random(j).randint(1, 50000)) for j in range(4)]
    assert r["accuracy"] == sum(t["correct"] for t in r["records"]) / 4 and r["mean_prompt_tokens"] > 100
    # a model that answers the key's own tokens is always right; one token off, always wrong
    asked = []

    def answer(model, tokenizer, prompt, n, temperature):
        key = tokenizer.decode(prompt).split("The pass key is ")[1].split(".")[0]
        ids = tokenizer.encode(key, bos=False)
        asked.append(n == len(ids) and temperature == 0.0)
        return ids if len(asked) % 2 else ids[:-1] + [(ids[-1] + 1) % 512]
    monkeypatch.setattr(gen, "generate", answer)
    r = ev.evaluate_passkey(model, tok, 192, trials=4, seed=5, progress=False, protocol="longlora")
    assert [t["correct"] for t in r["records"]] == [True, False, True, False] and all(asked)


# --------------------------------------------------------------------------- command line

def run_cli(capsys, *argv):
    code = cli.run(ev.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_smoke_pg19_mini(ckpt, tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "--model", str(ckpt), "--data-path", str(PG19_MINI),
         "--split", "validation", "--cache-dir", str(tmp_path / "cache"), "--seq-len", "32", "64",
         "--max-tokens", "400", "--dtype", "fp32", "--protocol", "sliding", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["model"] == str(ckpt) and report["adapter"] is None
    assert [r["seq_len"] for r in report["results"]] == [32, 64]
    for r in report["results"]:
        assert {"dataset", "split", "seq_len", "stride", "protocol", "ppl", "nll", "tokens", "windows"} <= set(r)
        assert r["split"] == "validation" and r["protocol"] == "sliding" and r["tokens"] == 399
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    assert "| seq_len | perplexity | tokens | windows | seconds |" in proc.stdout
    assert not list(tmp_path.glob("results.json.tmp-*"))


def test_cli_dataset_from_data_dir_and_passkey(ckpt, tmp_path, capsys, monkeypatch):
    shutil.copytree(PG19_MINI / "validation", tmp_path / "data" / "pg19" / "validation")
    monkeypatch.setenv("LONGQLORA_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    # --data-dir's default is read when the parser is built, so the environment variable counts
    code, stdout, err = run_cli(capsys, "--model", ckpt, "--dataset", "pg19", "--seq-len", "64", "--max-tokens", "300",
                                "--dtype", "fp32", "--out", out, "--no-progress")
    assert code == 0, err
    r = json.loads(out.read_text())["results"][0]
    assert (r["dataset"], r["split"], r["protocol"], r["stride"], r["windows"]) == ("pg19", "validation", "disjoint",
                                                                                   64, 3)
    code, stdout, err = run_cli(capsys, "--model", ckpt, "--task", "passkey", "--seq-len", "192", "--trials", "2",
                                "--dtype", "fp32", "--out", out, "--no-progress")
    assert code == 0, err
    r = json.loads(out.read_text())["results"][0]
    assert r["task"] == "passkey" and r["trials"] == 2 and 0 <= r["accuracy"] <= 1 and len(r["depth_accuracy"]) == 5
    assert "| seq_len | accuracy |" in stdout


def test_cli_missing_data(ckpt, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", ckpt, "--data-dir", tmp_path, "--seq-len", "64", "--no-progress")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: no pg19 validation data found")
    assert "python -m infra.download pg19" in err and str(tmp_path / "pg19" / "validation") in err


def test_cli_bin_with_ids_beyond_the_vocabulary(ckpt, tmp_path, capsys):
    ids = np.arange(1000, dtype=np.uint16) % 512
    ids[700] = 600
    ids.tofile(tmp_path / "bad.bin")
    code, _, err = run_cli(capsys, "--model", ckpt, "--data-path", tmp_path / "bad.bin", "--seq-len", "64",
                           "--dtype", "fp32", "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert "bad.bin" in err and "600" in err and "vocabulary of 512" in err


def test_cli_adapter_for_another_model(ckpt, tmp_path, capsys):
    from infra import hf
    import lora
    from infra.adapter import save_adapter

    other = make_hf_checkpoint(tmp_path / "other", intermediate_size=96)
    model = hf.load_model(other, dtype=torch.float32)
    lora.add_lora(model, r=4, alpha=8)
    save_adapter(model, tmp_path / "adapter")
    (np.arange(1000, dtype=np.uint16) % 512).tofile(tmp_path / "ok.bin")
    capsys.readouterr()                                   # drop the checkpoint writer's progress bar
    code, _, err = run_cli(capsys, "--model", ckpt, "--adapter", tmp_path / "adapter", "--data-path",
                           tmp_path / "ok.bin", "--seq-len", "64", "--dtype", "fp32", "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert "different model" in err


def test_cli_impossible_length_fails_before_evaluating(ckpt, tmp_path, capsys):
    (np.arange(300, dtype=np.uint16) % 512).tofile(tmp_path / "short.bin")
    code, out, err = run_cli(capsys, "--model", ckpt, "--data-path", tmp_path / "short.bin", "--seq-len", "32", "256",
                             "--dtype", "fp32", "--no-progress")
    assert code == 2 and "seq_len 256" in err and out == ""


def test_cli_non_finite_loss_is_an_error(ckpt, tmp_path, capsys):
    """Overflowing weights (LoRA weights of 1e18) make the loss nan: an error naming the model, the adapter and
    the window, exit 2, instead of a `nan` perplexity."""
    from infra import hf
    import lora
    from infra.adapter import save_adapter

    model = hf.load_model(ckpt, dtype=torch.float32)
    lora.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.fill_(1e18)
    save_adapter(model, tmp_path / "adapter")
    (np.arange(1000, dtype=np.uint16) % 512).tofile(tmp_path / "ok.bin")
    capsys.readouterr()
    code, out, err = run_cli(capsys, "--model", ckpt, "--adapter", tmp_path / "adapter", "--data-path",
                             tmp_path / "ok.bin", "--seq-len", "64", "--dtype", "fp32", "--rope-factor", "1",
                             "--no-progress")
    assert code == 2 and err.count("\n") == 1, err
    assert str(ckpt) in err and str(tmp_path / "adapter") in err and "tokens[0:64]" in err and "|" not in out


def test_non_finite_norm_weights_are_an_error(ckpt, tokens):
    model = load(ckpt)
    with torch.no_grad():
        model.norm.weight.fill_(1e30)
    with pytest.raises(ValueError, match=r"tokens\[0:64\].*not finite"):
        ev.evaluate_perplexity(model, tokens, 64, progress=False)

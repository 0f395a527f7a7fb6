"""bench/mini_paper.py --smoke: every stage of the miniature experiment on a tiny model and a tiny corpus.

Checks the report's shape, that every variant is evaluated on the same target tokens at every context
length, that the variants really differ (adapters loaded, S²-Attn used at inference), that the base is
cached, and that the pretrained base is a real HF checkpoint: transformers loads it and computes our logits.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, smoke_on_one_thread

sys.path.insert(0, str(ROOT / "bench"))
import mini_paper  # noqa: E402

VARIANTS = ["base", "pi", "control", "longqlora", "longqlora_s2_eval", "lora_full_attn", "nopi_lora", "full_ft",
            "longqlora_r8", "longqlora_r32"]


def run_smoke(*argv):
    return smoke_on_one_thread(mini_paper.main, *argv)


@pytest.fixture(scope="module")
def smoke(tiny_pg19, tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    report = run_smoke("--data-dir", str(tiny_pg19), "--cache-dir", str(out / "cache"),
                       "--results-dir", str(out / "results"))
    return report, out


def test_report_has_every_variant_at_every_context(smoke):
    report, out = smoke
    on_disk = json.loads((out / "results" / "mini_paper.json").read_text())
    assert on_disk["results"] == report["results"]
    assert (out / "results" / "mini_paper.png").stat().st_size > 1000
    ctxs = list(mini_paper.CONFIGS["smoke"]["eval"]["ctx"])
    assert [(r["variant"], r["eval_ctx"]) for r in report["results"]] == [(v, c) for v in VARIANTS for c in ctxs]
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in report["results"])
    assert report["seconds"] > 0 and {"tokenizer", "pretrain", "eval"} <= set(report["timings"])
    # the sliding protocol scores the same targets at every context length
    assert {r["tokens"] for r in report["results"]} == {report["config"]["eval_tokens"] - 1}


def test_variants_use_their_own_settings(smoke):
    report, _ = smoke
    ppl = {(r["variant"], r["eval_ctx"]): r["ppl"] for r in report["results"]}
    factor = mini_paper.CONFIGS["smoke"]["long_ctx"] // mini_paper.CONFIGS["smoke"]["short_ctx"]
    rope = {r["variant"]: r["rope_factor"] for r in report["results"]}
    assert rope["pi"] == rope["longqlora"] == rope["full_ft"] == factor
    assert rope["base"] == rope["control"] == rope["nopi_lora"] == 1
    L = mini_paper.CONFIGS["smoke"]["long_ctx"]
    values = [ppl[(v, L)] for v in VARIANTS]
    assert len(set(values)) == len(values), values       # every variant is a different model or attention
    train = report["config"]["variants"]
    assert train["longqlora_s2_eval"]["train"] is None   # evaluates longqlora's adapter, no run of its own
    assert train["control"]["train"]["flags"][train["control"]["train"]["flags"].index("--ctx") + 1] == "32"


def test_base_is_cached_and_loads_in_transformers(smoke, tiny_pg19):
    report, out = smoke
    from transformers import LlamaForCausalLM

    from infra import hf

    base_dir = out / "cache" / report["config"]["base_dir"]
    ours = hf.load_model(base_dir, dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)
    assert (base_dir / "tokenizer.model").is_file()

    again = run_smoke("--data-dir", str(tiny_pg19), "--cache-dir", str(out / "cache"),
                      "--results-dir", str(out / "again"), "--variants", "base")
    assert again["config"]["pretrain"]["last_loss"] == report["config"]["pretrain"]["last_loss"]
    assert again["timings"]["pretrain"] < 5       # read from the cache, not retrained
    assert [(r["eval_ctx"], r["ppl"]) for r in again["results"]] == \
        [(r["eval_ctx"], r["ppl"]) for r in report["results"] if r["variant"] == "base"]

"""train.py: the training loop (loss falls, token-weighted accumulation, checkpointing == no checkpointing,
bit-exact resume, fp16 loss scaling, 2-process gloo == 1 process), the offline demo, SFT, full fine-tuning,
the dry-run memory prediction and the one-line errors on bad input."""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from infra import hf
from infra import memory
import train
from conftest import PG19_MINI, ROOT, make_hf_checkpoint
from model import ModelArgs
from rope import pi_factor

TIMING_KEYS = ("tokens_per_s", "peak_mem_bytes", "time")   # wall-clock, never reproducible
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny LLaMA (trained context 128) + tokenizer, and a token cache shared by the module's runs. Weights
    drawn with std 1/sqrt(dim) rather than 0.02, so that the frozen lm_head can express a peaked distribution
    and a few LoRA steps visibly lower the loss."""
    root = tmp_path_factory.mktemp("train")
    book = sorted((PG19_MINI / "validation").glob("*.txt"))[0]
    (root / "small.txt").write_text(book.read_text(encoding="utf-8")[500:1500])
    return {"model": make_hf_checkpoint(root / "tiny", initializer_range=0.125), "cache": root / "cache",
            "root": root, "small": root / "small.txt"}


def common(tiny, out, *extra):
    """Flags of a fast fp32 run on the PG19-mini validation books (a repeated flag: the last one wins)."""
    return ["--model", str(tiny["model"]), "--data", str(PG19_MINI), "--split", "validation",
            "--cache-dir", str(tiny["cache"]), "--out", str(out), "--dtype", "fp32", "--ctx", "128",
            "--log-every", "100", *map(str, extra)]


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def exact(row):
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def adapter(out):
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- the loop

def test_loss_falls_and_outputs(tiny, tmp_path):
    out = tmp_path / "run"
    # 1000 characters of a book: 4 packed sequences of 128 tokens, seen again and again
    summary = train.main(common(tiny, out, "--data", tiny["small"], "--max-steps", 8, "--lr", "1e-2", "--warmup", 0,
                                "--save-every", 4))
    r = rows(out)
    assert [x["step"] for x in r] == list(range(1, 9))
    assert summary["first_loss"] == r[0]["loss"] and summary["last_loss"] == r[-1]["loss"]
    assert sum(x["loss"] for x in r[-3:]) / 3 < r[0]["loss"] - 0.5, [x["loss"] for x in r]
    for x in r:
        assert set(x) >= {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_bytes", "skipped"}
        assert x["tokens"] == 128 and x["skipped"] == 0 and x["peak_mem_bytes"] > 0 and x["lr"] == 1e-2
    cfg = json.loads((out / "train_config.json").read_text())
    # PI: ceil(128 / 128) would be 1; ctx 128 on a model trained for 128 uses no interpolation.
    assert cfg["pi_factor"] == 1.0 and cfg["rope_scaling"] is None and cfg["lora_r"] == 64
    peft_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 64 and peft_cfg["lora_alpha"] == 16
    assert len(adapter(out)) == 2 * 7 * 2            # A and B of 7 linears x 2 layers
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint-4", "checkpoint-8", "loss.png",
                                                     "metrics.jsonl", "summary.json", "train_config.json"]


def build(tiny, *flags):
    return train.build_model(train.parse_args(["--model", str(tiny["model"]), *map(str, flags)]), torch.float32)


def test_pi_factor_and_model(tiny):
    assert pi_factor(8192, 4096) == 2 and pi_factor(12288, 4096) == 3 and pi_factor(100, 4096) == 1
    torch.manual_seed(0)
    model, trainable, factor = build(tiny, "--ctx", 300)
    assert factor == 3 and model.args.rope_scaling == {"rope_type": "linear", "factor": 3.0}
    assert model.training and model.gradient_checkpointing and model.attention == "s2"
    assert build(tiny, "--ctx", 300, "--rope-factor", 1)[2] == 1
    assert type(model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    assert all(p.dtype == torch.float32 for p in trainable) and len(trainable) == 28
    assert sum(p.requires_grad for p in model.parameters()) == len(trainable)


def lora_model_with_nonzero_b(tiny, seed=0, dropout=0.05):
    torch.manual_seed(seed)
    model, trainable, _ = build(tiny, "--ctx", 64, "--lora-dropout", dropout)
    with torch.no_grad():                 # B = 0 at init would give A no gradient at all
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.05)
    return model, trainable


def test_gradient_checkpointing_same_gradients(tiny):
    model, trainable = lora_model_with_nonzero_b(tiny)
    tokens = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": tokens, "labels": tokens, "padding_mask": None}
    grads, losses = [], []
    for checkpointing in (True, False):
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(123)            # the same dropout masks (checkpoint() replays the RNG in recompute)
        model.loss_chunk = 16
        loss = model.loss(batch["input_ids"], batch["labels"])
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in trainable])
        for p in trainable:
            p.grad = None
    assert losses[0] == losses[1]
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_loss_in_training_equals_plain_loss(tiny):
    """The training loss (chunked lm_head + CE, summed) is the plain mean cross-entropy times the token count."""
    model, trainable = lora_model_with_nonzero_b(tiny, dropout=0.0)
    model.gradient_checkpointing = False
    tokens = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(2))
    labels = tokens.clone()
    labels[0, :10] = -100
    batch = {"input_ids": tokens, "labels": labels, "padding_mask": None}
    model.loss_chunk = 7
    summed = model.loss(tokens, labels)
    logits = model(tokens)                # S²-Attn, as in training
    plain = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum")
    assert train.loss_tokens(batch) == 63 - 9
    torch.testing.assert_close(summed, plain, rtol=1e-5, atol=1e-5)


def test_accumulation_is_token_weighted(tiny):
    """Two micro-batches with different numbers of loss tokens == one batch holding both (same gradient;
    SGD with lr 1 turns the parameter change into exactly minus the gradient)."""
    tokens = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(3))
    labels = tokens.clone()
    labels[0, :40] = -100                 # 8 loss tokens in sequence 0, 47 in sequence 1 (SFT-like)
    split = [{"input_ids": tokens[i:i + 1], "labels": labels[i:i + 1], "padding_mask": None} for i in (0, 1)]
    joint = [{"input_ids": tokens, "labels": labels, "padding_mask": None}]
    results = []
    for micro_batches in (split, joint):
        model, trainable = lora_model_with_nonzero_b(tiny, dropout=0.0)
        before = [p.detach().clone() for p in trainable]
        opt = torch.optim.SGD(trainable, lr=1.0)
        r = train.train_step(model, micro_batches, opt, torch.amp.GradScaler("cpu", enabled=False), max_grad_norm=0)
        results.append((r, [b - p.detach() for b, p in zip(before, trainable)]))
    (r1, g1), (r2, g2) = results
    assert r1["tokens"] == r2["tokens"] == 96
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_micro_batch_weighting_is_longqlora_s_mean_of_means(tiny):
    """--loss-weighting micro-batch: each micro-batch's mean over its own tokens, averaged over the step (HF
    Trainer's accumulation in LongQLoRA's SFT), against tokens: one mean over every token of the step."""
    tokens = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(3))
    labels = tokens.clone()
    labels[0, :40] = -100                 # 8 loss tokens in sequence 0, 47 in sequence 1
    split = [{"input_ids": tokens[i:i + 1], "labels": labels[i:i + 1], "padding_mask": None} for i in (0, 1)]
    assert [train.loss_tokens(b) for b in split] == [8, 47]
    model, trainable = lora_model_with_nonzero_b(tiny, dropout=0.0)
    with torch.no_grad():
        per_batch = [model.loss(b["input_ids"], b["labels"], reduction="mean").item() for b in split]
    results = {}
    for weighting in ("tokens", "micro-batch"):
        model, trainable = lora_model_with_nonzero_b(tiny, dropout=0.0)
        opt = torch.optim.SGD(trainable, lr=1.0)
        before = [p.detach().clone() for p in trainable]
        r = train.train_step(model, split, opt, torch.amp.GradScaler("cpu", enabled=False), 0, weighting)
        results[weighting] = (r["loss"], [b - p.detach() for b, p in zip(before, trainable)])
    assert results["micro-batch"][0] == pytest.approx(sum(per_batch) / 2, rel=1e-6)
    assert results["tokens"][0] == pytest.approx((8 * per_batch[0] + 47 * per_batch[1]) / 55, rel=1e-6)
    # the gradient is the mean of the two micro-batches' mean-loss gradients
    grads = []
    for b in split:
        model, trainable = lora_model_with_nonzero_b(tiny, dropout=0.0)
        model.loss(b["input_ids"], b["labels"], reduction="mean").backward()
        grads.append([p.grad for p in trainable])
    for got, g0, g1 in zip(results["micro-batch"][1], *grads):
        torch.testing.assert_close(got, (g0 + g1) / 2, rtol=1e-5, atol=1e-7)


def test_presets_and_the_roll_shift(tiny):
    sft = train.parse_args(["--preset", "vicuna-13b-sft-8k", "--model", str(tiny["model"]), "--data", "x.jsonl"])
    assert (sft.template, sft.loss_weighting, sft.lr, sft.sft, sft.s2_shift) == ("longqlora", "micro-batch", 1e-4,
                                                                               True, "segment")
    exact = train.parse_args(["--preset", "llama2-7b-8k", "--model", str(tiny["model"]), "--s2-shift", "roll"])
    assert (exact.ctx, exact.grad_accum, exact.layout, exact.s2_shift) == (8192, 16, "truncate", "roll")
    help_text = " ".join(train.build_parser().format_help().split())
    assert "LongQLoRA trained with: it wraps around" in help_text and "(default: segment)" in help_text


def test_resume_reproduces_uninterrupted_run_bit_for_bit(tiny, tmp_path):
    flags = ["--lr", "1e-3", "--warmup", 3, "--save-every", 2, "--keep-checkpoints", 0]
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(common(tiny, full, "--max-steps", 4, *flags))
    train.main(common(tiny, part, "--max-steps", 2, *flags))
    # What a kill during step 3 leaves behind: a metrics row past the checkpoint, a half-written checkpoint.
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    (part / ".checkpoint-4.tmp-999-x").mkdir()
    (part / ".checkpoint-4.tmp-999-x" / "trainer_state.pt").write_bytes(b"garbage")
    summary = train.main(common(tiny, part, "--max-steps", 4, *flags, "--resume"))
    assert summary["steps_run"] == 2
    assert [exact(r) for r in rows(part)] == [exact(r) for r in rows(full)]
    a, b = adapter(full), adapter(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = torch.load(full / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert set(state) >= {"optimizer", "scheduler", "scaler", "sampler", "rng", "step"}
    assert state["sampler"]["position"] == 4 and state["step"] == 4


def test_resume_refuses_a_different_recipe(tiny, tmp_path):
    out = tmp_path / "run"
    train.main(common(tiny, out, "--max-steps", 1, "--save-every", 1))
    before = tree_digest(out)
    with pytest.raises(ValueError, match="different recipe.*lr"):
        train.main(common(tiny, out, "--max-steps", 2, "--lr", "1e-3", "--resume"))
    assert tree_digest(out) == before


# --------------------------------------------------------------------------- fp16 loss scaling

def test_overflow_step_is_skipped_in_train_step(tiny):
    model, trainable = lora_model_with_nonzero_b(tiny, dropout=0.0)
    opt = train.make_optimizer(trainable, 1e-3, 0.0, torch.device("cpu"))
    before = [p.detach().clone() for p in trainable]
    tokens = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(4))
    batch = [{"input_ids": tokens, "labels": tokens, "padding_mask": None}]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    hook = trainable[0].register_hook(lambda g: g * float("inf"))      # what an fp16 overflow leaves
    r = train.train_step(model, batch, opt, scaler)
    hook.remove()
    assert r["skipped"] and r["grad_norm"] is None and math.isfinite(r["loss"]) and r["finite"]
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainable))
    assert all(p.grad is None for p in trainable)
    r = train.train_step(model, batch, opt, torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert not r["skipped"] and r["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))


def test_fp16_run_records_loss_scale(tiny, tmp_path):
    out = tmp_path / "fp16"
    train.main(common(tiny, out, "--max-steps", 2, "--save-every", 0, "--dtype", "fp16", "--ctx", 64))
    r = rows(out)
    assert len(r) == 2 and all("loss_scale" in x and math.isfinite(x["loss"]) for x in r)
    assert json.loads((out / "train_config.json").read_text())["compute_dtype"] == "float16"


def test_fp16_with_trained_embeddings_and_norms_is_refused_before_out_is_written(tiny, tmp_path):
    """GradScaler unscales fp32 gradients only: LoRA+'s fp16 embeddings and norms used to fail at step 1."""
    out = tmp_path / "fp16-embed"
    with pytest.raises(ValueError, match="--train-embed-norm with fp16 compute.*use --dtype bf16 or fp32"):
        train.main(common(tiny, out, "--max-steps", 1, "--dtype", "fp16", "--ctx", 64, "--train-embed-norm"))
    assert not out.exists()


# --------------------------------------------------------------------------- data parallel

def test_two_process_gloo_equals_one_process_with_double_accumulation(tiny, tmp_path):
    flags = ["--max-steps", 3, "--lr", "1e-3", "--warmup", 1, "--batch-size", 2, "--lora-dropout", 0,
             "--save-every", 0]
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(common(tiny, tmp_path / "warm", "--max-steps", 1))       # tokenize once, outside the race
    train.main(common(tiny, one, *flags, "--grad-accum", 2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *common(tiny, two, *flags, "--grad-accum", 1)]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((two / "train_config.json").read_text())["world_size"] == 2
    r1, r2 = rows(one), rows(two)
    assert [x["tokens"] for x in r1] == [x["tokens"] for x in r2] == [512] * 3
    for x, y in zip(r1, r2):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    a, b = adapter(one), adapter(two)
    for k in a:
        # AdamW's first steps are ~lr * sign(grad): a grad near 0 turns summation-order noise into up to
        # ~1% of lr; anything systematic (a wrong weighting) would be off by O(lr) everywhere.
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- other modes

def test_sft_run_on_tiny_jsonl(tiny, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"input": f"What is {i} plus one?", "output": f"It is {i + 1}."}) + "\n"
                            for i in range(6)))
    out = tmp_path / "sft"
    summary = train.main([str(x) for x in ["--model", tiny["model"], "--data", data, "--sft", "--ctx", 128,
                                           "--dtype", "fp32", "--out", out, "--batch-size", 2, "--lr", "1e-2",
                                           "--warmup", 0, "--save-every", 0, "--log-every", 100]])
    r = rows(out)
    assert len(r) == 3 == summary["steps"]               # one epoch: 6 conversations / batch 2
    assert r[-1]["loss"] < r[0]["loss"]
    assert json.loads((out / "train_config.json").read_text())["sft"] is True


def test_full_finetune_saves_dense_model(tiny, tmp_path):
    out = tmp_path / "full"
    train.main(common(tiny, out, "--max-steps", 2, "--full-finetune", "--lr", "1e-3", "--save-every", 1,
                      "--keep-checkpoints", 1, "--ctx", 256))
    assert (out / "model" / "config.json").is_file() and not (out / "adapter").exists()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["rope_scaling"]["factor"] == 2.0                    # PI written into the saved model
    trained = hf.load_model(out / "model", dtype=torch.float32)
    base = hf.load_model(tiny["model"], dtype=torch.float32)
    assert not torch.equal(trained.layers[0].mlp.up_proj.weight, base.layers[0].mlp.up_proj.weight)


# --------------------------------------------------------------------------- the offline default

def test_offline_demo_short(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, str(ROOT / "train.py"), "--ctx", "512", "--max-steps", "3", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "DEMO" in p.stdout and "first step" in p.stdout
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows(out) if "eval_loss" in r] == [3]      # the demo evaluates at its last step
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["demo"] is True and cfg["pi_factor"] == 4.0 and cfg["quant"] == "nf4" and cfg["attn"] == "s2"
    # running the demo again replaces its own previous output
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


# --------------------------------------------------------------------------- memory prediction

def test_dry_run_7b_12k_under_32gb(capsys):
    summary = train.main(["--preset", "llama2-7b-12k", "--dry-run"])
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-1]
    assert last == f"peak_bytes={summary['peak_bytes']}"
    assert summary["peak_bytes"] < 32e9
    # the persistent parts agree with REFERENCE §7's first-principles table (decimal GB)
    assert summary["nf4_weights"] / 1e9 == pytest.approx(3.34, abs=0.03)
    assert summary["embed_and_head"] / 1e9 == pytest.approx(0.52, abs=0.01)
    assert summary["lora_weights_grads_adam"] / 1e9 == pytest.approx(2.56, abs=0.01)
    # one checkpoint per layer (the last layer's output and the loss's tensors belong to the loss phase)
    assert summary["checkpointed_hidden_states"] / 1e9 == pytest.approx(3.22, abs=0.02)


def test_dry_run_counts_one_dropout_mask_per_projection_when_asked(capsys):
    """--lora-dropout-masks per-projection (and so --as-published) keeps a mask for each of q, k, v, gate, up."""
    flags = ["--preset", "llama2-7b-8k", "--dry-run", "--dtype", "bf16"]
    shared = train.main(flags)["peak_bytes"]
    per_projection = train.main([*flags, "--lora-dropout-masks", "per-projection"])["peak_bytes"]
    # 3 + 2 one-byte masks of (ctx x dim) instead of 1 + 1, kept for the recomputed layer: 3 x 8192 x 4096 bytes
    assert per_projection - shared == 3 * 8192 * 4096


def test_dry_run_names_the_compute_dtype(capsys):
    """Never "16-bit compute" for a run that computes in fp32 (--dtype fp32, or auto on a CPU)."""
    for dtype, said in [("fp32", "fp32 compute"), ("bf16", "bf16 compute"), ("auto", "a CPU run computes in fp32")]:
        train.main(["--preset", "llama2-7b-8k", "--dry-run", "--dtype", dtype])
        assert said in capsys.readouterr().out


def test_predicted_memory_grows_linearly_with_ctx():
    args = ModelArgs(**memory.ARCHS["llama2-7b"])
    # linear once per-token terms set the widest moment (at 4k one dequantised weight still decides it)
    peak = [memory.predict_peak_memory(args, ctx)["peak_bytes"] for ctx in (8192, 12288, 16384, 20480)]
    steps = [b - a for a, b in zip(peak, peak[1:])]
    assert steps[0] > 0 and steps[0] == steps[1] == steps[2]
    assert memory.predict_peak_memory(args, 4096)["peak_bytes"] > peak[0] - steps[0]
    assert memory.predict_peak_memory(args, 8192, batch_size=2)["peak_bytes"] == \
        memory.predict_peak_memory(args, 16384)["peak_bytes"]
    # full fine-tuning of the dense 7B: 16-bit weights + 16-bit grads + fp32 moments = 12 bytes per parameter
    full = memory.predict_peak_memory(args, 8192, quant="none", full_finetune=True)
    assert full["lora_params"] == 0 and full["trainable_grads_and_adam"] / 6.74e9 == pytest.approx(10, rel=0.01)
    assert full["peak_bytes"] > 6.7e9 * 12


def test_dry_run_reads_only_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, max_position_embeddings=4096)))
    p = train.main(["--model", str(tmp_path), "--ctx", "8192", "--dry-run"])
    assert capsys.readouterr().out.strip().endswith(f"peak_bytes={p['peak_bytes']}")
    assert p == train.main(["--preset", "vicuna-13b-sft-8k", "--dry-run", "--grad-accum", "1"])


# --------------------------------------------------------------------------- bad input

def run_cli(args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def existing_out(tiny):
    """A finished run that every bad invocation points --out at; it must never change."""
    out = tiny["root"] / "existing"
    train.main(common(tiny, out, "--max-steps", 1, "--save-every", 1))
    return out


def bad_cases(tiny, tmp):
    bad_jsonl = tmp / "bad.jsonl"
    bad_jsonl.write_text('{"input": "a", "output": "b"}\n{"input": oops}\n')
    short = tmp / "short.txt"
    short.write_text("A few words only.")
    m = tiny["model"]
    return {
        "ctx < 2": (["--model", m, "--ctx", 1], "--ctx must be in [2, inf), got 1"),
        "group < 1": (["--model", m, "--ctx", 3], "S²-Attn groups of 0 tokens"),
        "ratio": (["--model", m, "--group-size-ratio", 0], "--group-size-ratio"),
        "missing model": (["--model", tmp / "nope", "--ctx", 64], "config.json"),
        "missing data": (["--model", m, "--data", tmp / "nope.txt", "--ctx", 64], "nope.txt"),
        "malformed sft": (["--model", m, "--sft", "--data", bad_jsonl, "--ctx", 64], "bad.jsonl:2"),
        "ctx > data": (["--model", m, "--data", short, "--ctx", 4096, "--cache-dir", tmp / "c"],
                       f"{short}: 11 tokens, fewer than --ctx 4096"),
        "bad flag": (["--model", m, "--attn", "sparse"], "--attn"),
        "existing run": (["--model", m, "--data", "synthetic", "--ctx", 64], "already holds a training run"),
    }


def test_bad_inputs_one_line_exit_2_out_untouched(tiny, existing_out, tmp_path):
    before = tree_digest(existing_out)
    for name, (args, message) in bad_cases(tiny, tmp_path).items():
        p = run_cli([*args, "--out", existing_out, "--dtype", "fp32"])
        assert p.returncode == 2, (name, p.stderr[-2000:])
        lines = p.stderr.strip().splitlines()       # (a tokenizer progress bar may come before it)
        errors = [line for line in lines if "error" in line.lower()]
        assert errors == [lines[-1]] and lines[-1].startswith("error: ") and message in lines[-1], (name, p.stderr)
        assert "Traceback" not in p.stderr
        assert tree_digest(existing_out) == before, name
    # a fresh --out is not created by a failing run
    p = run_cli(["--model", tmp_path / "nope", "--out", tmp_path / "fresh"])
    assert p.returncode == 2 and not (tmp_path / "fresh").exists()


# --------------------------------------------------------------------------- memory savings

def test_as_published_switches_the_five_deviations_back(tiny):
    pub = train.parse_args(["--preset", "llama2-7b-8k", "--model", str(tiny["model"]), "--as-published"])
    assert (pub.ctx, pub.grad_accum, pub.layout, pub.lr) == (8192, 16, "truncate", 2e-4)     # the preset stays
    assert (pub.s2_shift, pub.loss_weighting, pub.lora_dropout_masks) == ("roll-published", "micro-batch",
                                                                          "per-projection")
    assert pub.dtype == ("fp16" if torch.cuda.is_available() else "fp32")
    ours = train.parse_args(["--preset", "llama2-7b-8k", "--model", str(tiny["model"])])
    assert (ours.s2_shift, ours.loss_weighting, ours.lora_dropout_masks, ours.as_published) == (
        "segment", "tokens", "shared", False)
    mixed = train.parse_args(["--model", str(tiny["model"]), "--as-published", "--s2-shift", "segment"])
    assert (mixed.s2_shift, mixed.loss_weighting) == ("segment", "micro-batch")     # an explicit flag wins
    model = train.build_model(train.parse_args(["--model", str(tiny["model"]), "--ctx", "64", "--as-published"]))[0]
    attn = model.layers[0].self_attn
    assert model.s2_shift == "roll-published" and attn.q_proj.input is not attn.k_proj.input
    help_text = " ".join(train.build_parser().format_help().split())
    assert "HF's warmup (first update at LR 0)" in help_text


@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_warmup_schedules_ours_and_hfs(warmup):
    """Ours: (s + 1) / warmup; HF's constant-with-warmup (--as-published): s / warmup, the first update at LR 0."""
    from transformers import get_constant_schedule_with_warmup

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        sched, out = make(opt), []
        for _ in range(6):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out
    hf_lrs = lrs(lambda o: get_constant_schedule_with_warmup(o, warmup))
    assert lrs(lambda o: train.constant_with_warmup(o, warmup, hf=True)) == hf_lrs
    assert hf_lrs[:5] == [2.0 * min(1, s / warmup) if warmup else 2.0 for s in range(5)]
    assert lrs(lambda o: train.constant_with_warmup(o, warmup)) == [2.0 * min(1, (s + 1) / warmup) if warmup
                                                                    else 2.0 for s in range(6)]


def test_as_published_run_on_padded_sequences(tiny, tmp_path):
    """A short --as-published run (truncated documents, padded to ctx): HF's warmup in the log, a finite loss."""
    out = tmp_path / "pub"
    train.main(common(tiny, out, "--as-published", "--data", tiny["small"], "--layout", "truncate", "--ctx", 1024,
                      "--max-steps", 2, "--warmup", 2, "--lr", "1e-3", "--save-every", 0))
    r = rows(out)
    assert [x["lr"] for x in r] == [0.0, 5e-4] and all(math.isfinite(x["loss"]) for x in r)
    assert r[0]["tokens"] < 1024            # the one document is shorter than ctx: padded
    config = json.loads((out / "train_config.json").read_text())
    assert config["as_published"] and config["s2_shift"] == "roll-published"


def step_grads(tiny, *flags, dropout=0.0, share_inputs=True, seed=0):
    """Loss and LoRA gradients of one micro-batch with the given memory options."""
    torch.manual_seed(seed)
    args = train.parse_args(["--model", str(tiny["model"]), "--ctx", "64", "--lora-dropout", str(dropout),
                             *map(str, flags)])
    if not share_inputs:
        import lora
        model = hf.load_model(args.model, dtype=torch.float32, quantize="nf4")
        model.set_attention("s2")
        model.gradient_checkpointing = True
        trainable = lora.add_lora(model, r=64, alpha=16, dropout=dropout)
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.input = lora.SharedInput(readers=1)       # one dropout mask per layer, as PEFT draws them
        model.set_memory_savings(args.mlp_chunk, args.offload_activations)
        model.train()
    else:
        model, trainable, _ = train.build_model(args, torch.float32)
        model.set_memory_savings(args.mlp_chunk, args.offload_activations)   # offload on CPU too: the same path
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(seed + 1)
    loss = model.loss(ids, ids)
    loss.backward()
    return loss.item(), [p.grad for p in trainable]


def test_shared_lora_inputs_and_offload_are_bit_identical(tiny):
    """Where the math is unchanged the bits are too: one dropped-out input for q/k/v and gate/up (dropout 0)
    against PEFT's one per layer, and checkpoints kept in a host copy against kept in place."""
    loss, grads = step_grads(tiny)
    for other in (step_grads(tiny, share_inputs=False), step_grads(tiny, "--offload-activations")):
        assert other[0] == loss and all(torch.equal(a, b) for a, b in zip(other[1], grads))


def test_tiled_mlp_equals_untiled(tiny):
    """Tiles change only the order in which the LoRA gradients are summed over tokens (without dropout: tiles
    draw their masks tile by tile, a different sample)."""
    loss, grads = step_grads(tiny)
    tiled_loss, tiled = step_grads(tiny, "--mlp-chunk", 16)
    assert tiled_loss == loss
    for a, b in zip(tiled, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_node_saves_two_tensors_with_autograds_bits(dtype):
    """model._SwiGLU: silu(g) * u, forward and both gradients bit-identical to autograd's, saving g and u only."""
    from model import _SwiGLU

    torch.manual_seed(0)
    g0, u0 = (torch.randn(4, 7, 33, dtype=dtype) for _ in range(2))
    dy = torch.randn(4, 7, 33, dtype=dtype)
    results = []
    for fn in (lambda g, u: _SwiGLU.apply(g, u), lambda g, u: F.silu(g) * u):
        g, u = g0.clone().requires_grad_(True), u0.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(g, u)
        y.backward(dy)
        results.append((y.detach(), g.grad, u.grad, len(saved)))
    (y, gg, gu, n_saved), (ry, rgg, rgu, _) = results
    assert torch.equal(y, ry) and torch.equal(gg, rgg) and torch.equal(gu, rgu)
    assert n_saved == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rmsnorm_saves_only_its_input_and_matches_autograd(dtype):
    """The same values as HF's fp32-statistics RMSNorm, and the gradients autograd gets from that formula."""
    from model import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = norm(x)
    assert {id(t) for t in saved} == {id(x), id(norm.weight)}          # no fp32 copy of x
    x2, w2 = x.detach().clone().requires_grad_(True), norm.weight.detach().clone().requires_grad_(True)
    x32 = x2.float()
    ref = w2 * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(y, ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)   # bf16: 1 ulp
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(norm.weight.grad, w2.grad, **tol)


def test_dry_run_models_the_savings_and_the_budget(capsys):
    plain = train.main(["--preset", "llama2-7b-12k", "--dry-run"])
    tiled = train.main(["--preset", "llama2-7b-12k", "--dry-run", "--mlp-chunk", "1024"])
    assert tiled["layer_recompute"] < plain["layer_recompute"] and tiled["peak_bytes"] <= 12e9
    long = train.main(["--preset", "llama2-7b-12k", "--dry-run", "--ctx", "65536", "--mlp-chunk", "1024",
                       "--offload-activations", "--budget", "32GB"])
    assert long["checkpointed_hidden_states"] == 0 and long["host_checkpoints"] == 32 * 65536 * 4096 * 2
    assert long["peak_bytes"] <= 30e9
    out = capsys.readouterr().out
    assert f"largest ctx that fits 32.0 GB with these settings: {long['largest_ctx']} tokens" in out
    args = ModelArgs(**memory.ARCHS["llama2-7b"])
    options = dict(mlp_chunk=1024, offload=True)
    n = long["largest_ctx"]
    assert memory.predict_peak_memory(args, n, **options)["peak_bytes"] <= 32e9 < \
        memory.predict_peak_memory(args, n + 256, **options)["peak_bytes"]
    sft = train.main(["--preset", "vicuna-13b-sft-8k", "--dry-run", "--mlp-chunk", "1024"])
    assert sft["peak_bytes"] <= 24e9
    assert memory.parse_bytes("24GiB") == 24 * 2**30 and memory.parse_bytes("900MB") == 900e6
    with pytest.raises(ValueError, match="--budget 'lots'"):
        memory.parse_bytes("lots")


@pytest.mark.parametrize("cores,load,expected", [(64, 0.2, 4), (2, 0.5, 2), (2, 5.3, 1)])
def test_the_demo_uses_at_most_four_idle_cores_and_says_what_it_costs(tmp_path, monkeypatch, capsys, cores, load,
                                                                      expected):
    """Threads waiting for busy cores made `python train.py --ctx 8192` take 18 minutes on 2 busy cores."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    before = torch.get_num_threads()
    try:
        train.main(["--ctx", "64", "--max-steps", "2", "--out", str(tmp_path / "demo")])
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert f"2 steps of 64 tokens on {expected} CPU thread(s)" in out
    assert " min for the demo's remaining 1 step(s)" in out

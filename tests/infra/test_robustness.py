"""Bad numbers, bad files and interrupted runs: one clear error (or the documented behaviour) and nothing on disk
lost. Each case of the hardening issue has a test here; the download cases are in test_download.py."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from infra import cli
from infra import hf
from infra import run
import train
from conftest import PG19_MINI, ROOT, make_hf_checkpoint
from test_train import ENV, common, rows, tree_digest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    book = sorted((PG19_MINI / "validation").glob("*.txt"))[0]
    (root / "small.txt").write_text(book.read_text(encoding="utf-8")[500:1500])
    return {"model": make_hf_checkpoint(root / "tiny", initializer_range=0.125), "cache": root / "cache",
            "root": root, "small": root / "small.txt"}


def run_train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def one_error_line(p, *fragments):
    """Exit status 2, no traceback, and exactly one `error:` line, the last one, containing every fragment."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert [x for x in lines if "error" in x.lower()] == [lines[-1]] and lines[-1].startswith("error: "), p.stderr
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])
    return lines[-1]


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def copy_model(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- non-finite numbers

@pytest.mark.parametrize("flag,value", [("--lora-alpha", "nan"), ("--lr", "inf"), ("--max-grad-norm", "nan"),
                                        ("--rope-factor", "inf"), ("--lr", "-1"), ("--weight-decay", "nan"),
                                        ("--lora-dropout", "1"), ("--group-size-ratio", "nan"),
                                        ("--rope-factor", "1e308"), ("--rope-factor", "20000")])
def test_non_finite_or_out_of_range_flags(tiny, tmp_path, flag, value):
    p = run_train("--model", tiny["model"], "--out", tmp_path / "out", flag, value)
    one_error_line(p, flag, "must be")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes,fragment", [
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite positive number"),
    ({"rope_theta": -5}, "rope_theta must be a finite positive number"),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, "factor must be a finite positive number"),
    ({"rope_scaling": {"type": "linear", "factor": float("inf")}}, "factor must be a finite positive number"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ({"num_attention_heads": True}, "num_attention_heads must be a positive integer"),
    ({"rope_parameters": "linear"}, "rope_parameters must be a JSON object"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
])
def test_bad_config_fields_name_the_file_and_field(tiny, tmp_path, changes, fragment):
    model = copy_model(tiny["model"], tmp_path / "m")
    edit_config(model, **changes)
    with pytest.raises(ValueError) as e:
        hf.read_config(model)
    assert str(e.value).startswith(str(model / "config.json")) and fragment in str(e.value)
    p = run_train("--model", model, "--out", tmp_path / "out", "--ctx", 64)
    one_error_line(p, "config.json", fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes,fragment", [
    ({"num_hidden_layers": 1_000_000}, "num_hidden_layers=1000000, but the checkpoint holds weights for 2 layers"),
    ({"hidden_size": 1 << 30, "num_attention_heads": 1 << 20}, "does not match the weights: tensor"),
    ({"vocab_size": 10**12}, "does not match the weights: tensor"),
])
def test_absurd_config_shapes_are_refused_before_the_model_is_built(tiny, tmp_path, changes, fragment):
    """Checked against the safetensors headers: building a million-layer model first would take hours."""
    model = copy_model(tiny["model"], tmp_path / "m")
    edit_config(model, **changes)
    p = subprocess.run([sys.executable, "-c", f"from infra import hf; hf.load_model({str(model)!r})"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert f"ValueError: {model / 'config.json'}: " in p.stderr and fragment in p.stderr, p.stderr[-2000:]


def test_nan_or_overflowing_base_weights_are_reported_at_load(tiny, tmp_path):
    model = copy_model(tiny["model"], tmp_path / "nan")
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    for quantize in (None, "nf4"):
        with pytest.raises(ValueError, match=f"{shard.name}: tensor {name} holds NaN or inf"):
            hf.load_model(model, dtype=torch.float32, quantize=quantize)
    tensors[name].view(-1)[3] = 1e6                      # finite in fp32, inf in fp16
    save_file(tensors, shard, metadata={"format": "pt"})
    hf.load_model(model, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"tensor {name} holds values up to 1e\\+06, beyond torch.float16"):
        hf.load_model(model, dtype=torch.float16)


@pytest.mark.parametrize("stat", ["absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset"])
def test_nan_in_prequantized_statistics_is_reported_at_load(tiny, tmp_path, stat):
    """A `*-bnb-4bit` folder: a NaN in a block scale, a code book or the offset would spread to whole blocks."""
    pytest.importorskip("bitsandbytes")
    import quant
    sys.path.insert(0, str(ROOT / "bench"))
    from benchlib import state_to_bnb

    model = copy_model(tiny["model"], tmp_path / "bnb")
    shard = sorted(model.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(k for k in sorted(tensors) if k.endswith("q_proj.weight"))
    tensors[name], state = quant.quantize_nf4(tensors[name], double_quant=stat != "absmax")
    if stat == "nested_offset":
        state.offset = float("inf")
    serialised = {f"{name}.{k}": v.clone() for k, v in state_to_bnb(state).as_dict(packed=True).items()}
    if stat != "nested_offset":
        serialised[f"{name}.{stat}"].view(-1)[0] = float("nan")
    save_file({**tensors, **serialised}, shard, metadata={"format": "pt"})
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(serialised, shard.name))
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    fragment = "nested_offset is inf" if stat == "nested_offset" else f"{name}.{stat} holds NaN or inf"
    for quantize in (None, "nf4"):
        with pytest.raises(ValueError, match=f"{shard.name}: .*{fragment}"):
            hf.load_model(model, dtype=torch.float32, quantize=quantize)


def test_diverging_run_stops_before_applying_nan_and_keeps_the_last_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    # Adam moves every weight by ~lr per step: with lr 1e30 the second forward overflows fp32.
    p = run_train(*common(tiny, out, "--data", tiny["small"], "--max-steps", 6, "--lr", "1e30", "--warmup", 0,
                          "--save-every", 1))
    message = one_error_line(p, "step 2:", "not finite", "stopped before applying it", "checkpoint-1")
    assert "--lr" in message
    assert [x["step"] for x in rows(out)] == [1]
    assert sorted(x.name for x in out.iterdir()) == ["checkpoint-1", "metrics.jsonl", "train_config.json"]
    a = load_file(out / "checkpoint-1" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in a.values())


def test_nan_in_a_checkpoint_is_refused_on_resume(tiny, tmp_path):
    out = tmp_path / "run"
    train.main(common(tiny, out, "--data", tiny["small"], "--max-steps", 2, "--save-every", 1))
    f = out / "checkpoint-2" / "adapter" / "adapter_model.safetensors"
    t = load_file(f)
    key = sorted(t)[0]
    t[key][0, 0] = float("nan")
    save_file(t, f)
    before = tree_digest(out)
    p = run_train(*common(tiny, out, "--data", tiny["small"], "--max-steps", 4, "--save-every", 1, "--resume"))
    one_error_line(p, "checkpoint-2", "adapter_model.safetensors", key, "NaN")
    assert tree_digest(out) == before


def test_fp16_overflow_on_every_step_is_an_error_not_an_untrained_adapter(tiny, tmp_path):
    """Norm weights of 300 make the MLP's intermediate overflow fp16 (max 65504) in every forward."""
    model = copy_model(tiny["model"], tmp_path / "hot")
    for shard in model.glob("model-*.safetensors"):
        t = load_file(shard)
        t = {k: (torch.full_like(v, 300.0) if k.endswith("post_attention_layernorm.weight") else v)
             for k, v in t.items()}
        save_file(t, shard, metadata={"format": "pt"})
    out = tmp_path / "fp16"
    p = run_train("--model", model, "--data", tiny["small"], "--cache-dir", tiny["cache"], "--out", out, "--ctx", 64,
                  "--dtype", "fp16", "--max-steps", 3, "--save-every", 0, "--log-every", 100)
    one_error_line(p, "fp16 loss scaling skipped 3 steps in a row", "nothing saved", "--dtype bf16")
    assert not (out / "adapter").exists()
    assert all(x["skipped"] == 1 for x in rows(out))
    assert run.MAX_SKIPPED == 50        # a long run stops after this many in a row


def test_a_model_without_data_is_refused_not_trained_on_the_synthetic_corpus(tiny, tmp_path):
    p = run_train("--model", tiny["model"], "--out", tmp_path / "out", "--ctx", 64, "--max-steps", 1)
    one_error_line(p, "--model without --data", "--data synthetic")
    assert not (tmp_path / "out").exists()
    train.main(["--model", str(tiny["model"]), "--data", "synthetic", "--out", str(tmp_path / "syn"), "--ctx", "64",
                "--max-steps", "1", "--dtype", "fp32"])
    assert json.loads((tmp_path / "syn" / "train_config.json").read_text())["data"] == "synthetic"


# --------------------------------------------------------------------------- resume never destroys a run

def test_resume_without_checkpoint_refuses_a_finished_run(tiny, tmp_path):
    out = tmp_path / "run"
    train.main(common(tiny, out, "--data", tiny["small"], "--max-steps", 4, "--save-every", 0))
    before = tree_digest(out)
    p = run_train(*common(tiny, out, "--data", tiny["small"], "--resume", "--max-steps", 2))
    one_error_line(p, "no checkpoint to resume from", "--overwrite")
    assert tree_digest(out) == before and len(rows(out)) == 4


def test_resume_of_a_finished_run_says_it_is_complete_and_writes_nothing(tiny, tmp_path):
    out = tmp_path / "run"
    train.main(common(tiny, out, "--data", tiny["small"], "--max-steps", 2, "--save-every", 2))
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    p = run_train(*common(tiny, out, "--data", tiny["small"], "--max-steps", 2, "--save-every", 2, "--resume"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "the run is already complete" in p.stdout and "tok/s" not in p.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == written


def test_resume_with_max_steps_below_the_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    train.main(common(tiny, out, "--data", tiny["small"], "--max-steps", 4, "--save-every", 2))
    before = tree_digest(out)
    p = run_train(*common(tiny, out, "--data", tiny["small"], "--resume", "--max-steps", 2, "--save-every", 2))
    one_error_line(p, "checkpoint-4", "step 4, beyond --max-steps 2")
    assert tree_digest(out) == before


def test_resume_refuses_a_different_base_under_the_same_path(tiny, tmp_path):
    model = copy_model(tiny["model"], tmp_path / "base")
    out = tmp_path / "run"
    train.main(common(tiny, out, "--model", model, "--data", tiny["small"], "--max-steps", 2, "--save-every", 1))
    make_hf_checkpoint(tmp_path / "other", seed=5, initializer_range=0.125)
    for f in model.glob("model*"):
        f.unlink()
    for f in (tmp_path / "other").glob("model*"):
        os.replace(f, model / f.name)
    before = tree_digest(out)
    p = run_train(*common(tiny, out, "--model", model, "--data", tiny["small"], "--max-steps", 4,
                          "--save-every", 1, "--resume"))
    one_error_line(p, "cannot resume with a different recipe", "base_fingerprint", "weights changed")
    assert tree_digest(out) == before


def test_torn_metrics_line_is_tolerated_on_resume(tiny, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    flags = ["--data", tiny["small"], "--save-every", 2, "--lr", "1e-3"]
    train.main(common(tiny, full, *flags, "--max-steps", 4))
    train.main(common(tiny, part, *flags, "--max-steps", 2))
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')              # what a crash in the middle of a write leaves
    with pytest.warns(UserWarning, match="metrics.jsonl:3: ignoring a torn last line"):
        train.main(common(tiny, part, *flags, "--max-steps", 4, "--resume"))
    timing = ("tokens_per_s", "peak_mem_bytes", "time")
    strip = lambda r: {k: v for k, v in r.items() if k not in timing}  # noqa: E731
    assert [strip(r) for r in rows(part)] == [strip(r) for r in rows(full)]
    (part / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: malformed metrics row"):
        train.main(common(tiny, part, *flags, "--max-steps", 6, "--resume"))


def test_sigint_saves_a_checkpoint_and_exits_130(tiny, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, common(tiny, out, "--data", tiny["small"],
                                                                    "--max-steps", 100000, "--save-every", 0,
                                                                    "--log-every", 1))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not rows_or_empty(out):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    step = rows(out)[-1]["step"]
    assert f"stopped at step {step}; checkpoint {out / f'checkpoint-{step}'}; continue with --resume" in stdout
    assert (out / f"checkpoint-{step}" / "trainer_state.pt").is_file() and not (out / "adapter").exists()
    summary = train.main(common(tiny, out, "--data", tiny["small"], "--max-steps", step + 1, "--save-every", 0,
                                "--resume"))
    assert summary["steps_run"] == 1 and (out / "adapter").is_dir()


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tiny, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, common(tiny, out, "--data", tiny["small"],
                                                                    "--max-steps", 100000, "--save-every", 0))]
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not rows_or_empty(out):
            time.sleep(0.2)
        p = run_train(*common(tiny, out, "--data", tiny["small"], "--max-steps", 2, "--resume"))
        one_error_line(p, str(out), "another run is writing to this folder")
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)


def test_a_failing_demo_or_seed_deletes_nothing(tmp_path):
    """Every check passes before the previous demo's output is replaced; a bad seed fails at parse time."""
    out = tmp_path / "demo"
    train.main(["--ctx", "64", "--max-steps", "1", "--out", str(out)])
    before = tree_digest(out)
    one_error_line(run_train("--ctx", 3, "--group-size-ratio", 1, "--max-steps", 1, "--out", out), "distance")
    assert tree_digest(out) == before
    for seed in (-1, 2**70):
        one_error_line(run_train("--seed", seed, "--out", out), "--seed must be in [0, ")
        assert tree_digest(out) == before


def test_resume_removes_the_temporaries_a_kill_left(tiny, tmp_path):
    out = tmp_path / "run"
    train.main(common(tiny, out, "--data", tiny["small"], "--max-steps", 2, "--save-every", 2))
    (out / ".checkpoint-4.tmp-999-x").mkdir()
    (out / ".checkpoint-4.tmp-999-x" / "trainer_state.pt").write_bytes(b"half")
    (out / ".metrics.jsonl.tmp-999").write_text("half")
    train.main(common(tiny, out, "--data", tiny["small"], "--max-steps", 3, "--save-every", 2, "--resume"))
    assert not list(out.glob(".*"))


def test_log_lines_are_written_above_the_progress_bar(tiny, tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(run.tqdm, "write", lambda s, *a, **k: written.append(s))
    train.main(common(tiny, tmp_path / "run", "--data", tiny["small"], "--max-steps", 2, "--log-every", 1,
                      "--save-every", 0))
    assert [line.split(" loss")[0] for line in written if line.startswith("step ")] == ["step 1/2", "step 2/2"]


def test_atomic_writes_honour_the_umask(tmp_path):
    from infra import atomic

    previous = os.umask(0o022)
    try:
        folder = atomic.write_dir(tmp_path / "folder", lambda tmp: (tmp / "f.txt").write_text("x"))
        file = atomic.write_text(tmp_path / "file.txt", "x")
    finally:
        os.umask(previous)
    modes = [p.stat().st_mode & 0o777 for p in (folder, folder / "f.txt", file)]
    assert modes == [0o755, 0o644, 0o644]


def rows_or_empty(out):
    try:
        return rows(out)
    except (OSError, ValueError):
        return []


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError(
    "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"), OSError(27, "File too large")])
def test_disk_full_while_checkpointing_is_one_error_and_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch,
                                                                                     capsys, error):
    out = tmp_path / "run"
    train.main(common(tiny, out, "--data", tiny["small"], "--max-steps", 2, "--save-every", 2))
    good = tree_digest(out / "checkpoint-2")
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("trainer_state.pt"):
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    code = cli.run(train.main, common(tiny, out, "--data", tiny["small"], "--max-steps", 4, "--save-every", 2,
                                      "--resume"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {out / 'checkpoint-4'}: checkpoint not saved") and "--resume" in err[-1]
    assert tree_digest(out / "checkpoint-2") == good
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == ["checkpoint-2"]


# --------------------------------------------------------------------------- malformed checkpoints

def write_raw_safetensors(path, header, data: bytes):
    blob = (header if isinstance(header, str) else json.dumps(header)).encode()    # str: keys given twice
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize("header,data,fragment", [
    ({"model.norm.weight": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, 8, "F99"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "-2"),
    ({"model.norm.weight": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, 8, '"2"'),
    ({"model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "model.norm.weight"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "offset"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "covered"),
    ({"model.norm.weight": "not an entry"}, 8, "not an entry"),
    (["a", "list"], 0, "sequence"),
    # what a hand-written reader let through: two tensors on the same bytes, and a name given twice
    ({"model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "lm_head.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "offset"),
    ('{"model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"lm_head.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, '
     '"model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', 16, "offset"),
], ids=["dtype", "negative-dim", "shape-string", "reversed-offsets", "size-mismatch", "past-the-end",
        "entry-string", "header-list", "overlapping-offsets", "name-given-twice"])
def test_malformed_safetensors_headers(tmp_path, header, data, fragment):
    f = tmp_path / "model.safetensors"
    write_raw_safetensors(f, header, b"\0" * data)
    with pytest.raises(ValueError) as e:
        hf.read_tensor_file(f)
    assert str(e.value).startswith(f"{f}: cannot read safetensors header, truncated or corrupt?")
    assert fragment in str(e.value)


def test_integer_dtype_in_a_base_weight_is_refused(tiny, tmp_path):
    """F32 -> I32 in a header keeps every size right: only the weight's dtype tells the header is damaged."""
    model = copy_model(tiny["model"], tmp_path / "int")
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[name]["dtype"] = "I32"
    write_raw_safetensors(shard, header, raw[8 + n:])
    with pytest.raises(ValueError, match=f"{shard.name}: tensor {name} has dtype torch.int32, expected a floating"):
        hf.load_model(model, dtype=torch.float32)


def test_bin_checkpoint_that_pickles_objects_is_refused_in_one_line(tiny, tmp_path):
    """torch's own refusal is four lines advising weights_only=False, which would run the file's code."""
    import argparse
    model = copy_model(tiny["model"], tmp_path / "bin")
    state = {}
    for f in model.glob("model*.safetensors*"):
        state.update(load_file(f) if f.suffix == ".safetensors" else {})
        f.unlink()
    torch.save({**state, "args": argparse.Namespace(lr=1)}, model / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        hf.load_model(model)
    assert str(e.value).startswith(f"{model / 'pytorch_model.bin'}: refused") and "argparse.Namespace" in str(e.value)
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)
    p = run_train("--model", model, "--data", "synthetic", "--out", tmp_path / "out", "--ctx", 64)
    assert "weights_only` set to `False`" not in p.stderr
    one_error_line(p, "pytorch_model.bin: refused", "argparse.Namespace")


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_index_naming_a_shard_outside_the_folder_is_refused(tiny, tmp_path, shard):
    model = copy_model(tiny["model"], tmp_path / "m")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = shard
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"refusing shard {shard!r} for model.norm.weight: shards must lie inside"):
        hf.load_model(model)


# --------------------------------------------------------------------------- eval.py and generate.py limits

def run_script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_eval_device_cuda_without_cuda(tiny):
    p = run_script("eval.py", "--model", tiny["model"], "--device", "cuda", "--data-path", tiny["small"],
                   "--seq-len", 64, "--no-progress")
    one_error_line(p, "--device cuda: CUDA is not available")


def test_passkey_length_is_bounded_before_building_the_prompt(tiny):
    t0 = time.perf_counter()
    p = run_script("eval.py", "--model", tiny["model"], "--task", "passkey", "--seq-len", 3000000, "--no-progress")
    one_error_line(p, "--seq-len 3000000", "usable context of 128 tokens")
    assert time.perf_counter() - t0 < 120


def test_generate_is_bounded_by_the_usable_context(tiny):
    """--max-new-tokens 1e8 neither allocates a cache for 1e8 positions nor runs past the model's 128 tokens."""
    from infra import sources
    import generate as gen

    model, _ = gen.load_model(tiny["model"], dtype=torch.float32)
    tok = sources.load_tokenizer(tiny["model"])
    prompt = tok.encode("To be or not to be", bos=True)
    out = gen.generate(model, None, prompt, 100_000_000, limit=gen.max_length(model))
    assert len(prompt) + len(out) == 128
    p = run_script("generate.py", "--model", tiny["model"], "--prompt", "To be", "--max-new-tokens", 100000000,
                   "--temperature", 0, "--dtype", "fp32")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usable context 128 tokens" in p.stderr
    with pytest.raises(ValueError, match="the prompt has 200 tokens; the model's usable context is 128"):
        gen.generate(model, None, [5] * 200, 10, limit=128)


# --------------------------------------------------------------------------- usability

@pytest.mark.parametrize("script", ["train.py", "eval.py", "generate.py"])
def test_help_answers_before_torch_is_imported(script):
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('TORCH LOADED' if 'torch' in sys.modules else 'NO TORCH')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip().endswith("NO TORCH"), p.stdout[-500:] + p.stderr[-500:]
    assert "--threads" in p.stdout


@pytest.mark.parametrize("script", ["eval.py", "generate.py", "infra/merge.py"])
def test_an_absurd_rope_factor_is_refused_at_parse_time(tiny, tmp_path, script):
    where = ["--model", tiny["model"]]
    if script == "infra/merge.py":      # run as python -m infra.merge, as README says
        where = ["--base", tiny["model"], "--adapter", tmp_path, "--out", tmp_path / "m"]
    for factor in ("1e308", "20000", "0.5"):
        argv = [sys.executable, "-m", "infra.merge"] if script == "infra/merge.py" else [sys.executable, ROOT / script]
        p = subprocess.run([*map(str, argv), *map(str, where), "--rope-factor", factor], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
        one_error_line(p, "--rope-factor", f"must be in [1, 10000], got {float(factor)!r}")


@pytest.mark.parametrize("script", ["eval.py", "generate.py"])
def test_eval_and_generate_help_show_defaults_and_cpu_dtype(script):
    p = run_script(script, "--help")
    text = " ".join(p.stdout.split())
    assert "fp32 on CPU" in text and "(default: auto)" in text and "(default: none)" in text


def test_eval_prints_the_rope_factor_and_where_the_json_went(tiny, tmp_path):
    out = tmp_path / "r.json"
    p = run_script("eval.py", "--model", tiny["model"], "--data-path", tiny["small"], "--cache-dir", tiny["cache"],
                   "--seq-len", 64, "--no-progress", "--out", out)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "RoPE factor 1 at every length (from the checkpoint's config.json)" in p.stdout
    assert f"results: {out}" in p.stdout
    report = json.loads(out.read_text())
    assert report["rope_factor"] == 1 and report["results"][0]["rope_factor"] == 1
    assert report["dtype"] == "float32"        # auto on CPU


def test_warmup_longer_than_the_run_warns(tiny, tmp_path):
    p = run_train(*common(tiny, tmp_path / "run", "--data", tiny["small"], "--max-steps", 2, "--warmup", 5,
                          "--save-every", 0))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "warning: --warmup 5 is longer than the run (2 steps)" in p.stdout


def test_threads_flag_sets_torch_threads(tiny, tmp_path):
    before = torch.get_num_threads()
    try:
        train.main(common(tiny, tmp_path / "run", "--data", tiny["small"], "--max-steps", 1, "--threads", 1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--threads must be a positive integer"):
        train.main(common(tiny, tmp_path / "other", "--threads", 0))


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_resume_checks_the_recipe_against_the_checkpoint_s_own_record(tiny, tmp_path, damage):
    """Without (or with a damaged) train_config.json in --out, --resume --lr 5e-2 is still refused: each checkpoint
    keeps the recipe it was trained with; a resume with the same recipe rewrites the file from it."""
    out = tmp_path / "run"
    flags = common(tiny, out, "--data", tiny["small"], "--save-every", 1)
    train.main([*flags, "--max-steps", "1"])
    config = out / "train_config.json"
    config.unlink() if damage == "delete" else config.write_text('{"lr": 0.05, "ctx"')
    with pytest.raises(ValueError, match=r"checkpoint-1/train_config.json: cannot resume with a different recipe \(lr"):
        train.main([*flags, "--max-steps", "2", "--lr", "5e-2", "--resume"])
    train.main([*flags, "--max-steps", "2", "--resume"])
    assert json.loads(config.read_text())["lr"] == 2e-4
    (out / "checkpoint-2" / "train_config.json").write_text("{")
    with pytest.raises(ValueError, match="checkpoint-2/train_config.json: missing or unreadable"):
        train.main([*flags, "--max-steps", "3", "--resume"])


def test_a_symlinked_adapter_or_checkpoint_in_out_is_replaced_as_a_link(tiny, tmp_path):
    """The link is replaced (or removed), never followed: what it points to stays, and no hidden .old folder."""
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    flags = common(tiny, out, "--data", tiny["small"], "--save-every", "1", "--keep-checkpoints", "1")
    train.main([*flags, "--max-steps", "1"])
    elsewhere.mkdir()
    for name in ("adapter", "checkpoint-1"):
        os.replace(out / name, elsewhere / name)
        (out / name).symlink_to(elsewhere / name, target_is_directory=True)
    kept = tree_digest(elsewhere)
    train.main([*flags, "--max-steps", "2", "--resume"])       # replaces adapter/, prunes checkpoint-1
    assert (out / "adapter").is_dir() and not (out / "adapter").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint-2", "loss.png", "metrics.jsonl",
                                                     "summary.json", "train_config.json"]
    assert tree_digest(elsewhere) == kept
    (out / "adapter").rename(elsewhere / "adapter2")
    (out / "adapter").symlink_to(elsewhere / "adapter2", target_is_directory=True)
    train.main([*flags, "--max-steps", "1", "--overwrite"])
    assert not (out / "adapter").is_symlink() and (elsewhere / "adapter2" / "adapter_config.json").is_file()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 85899345920 bytes."),
                                   MemoryError()])
def test_out_of_memory_in_a_step_says_what_it_needed_and_how_to_check(tiny, tmp_path, monkeypatch, capsys, error):
    def too_big(*a, **k):
        raise error
    monkeypatch.setattr(train, "train_step", too_big)
    capsys.readouterr()
    code = cli.run(train.main, common(tiny, tmp_path / "run", "--data", tiny["small"], "--max-steps", "2",
                                      "--batch-size", "3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and [x for x in err if "error" in x.lower()] == [err[-1]], err
    assert err[-1].startswith("error: step 1: out of CPU memory") and "--dry-run --budget" in err[-1]
    expected = train.main(common(tiny, tmp_path / "dry", "--batch-size", "3", "--dry-run"))["peak_bytes"]
    assert f"--ctx 128 x --batch-size 3 is predicted to need {expected / 1e9:.1f} GB" in err[-1]


def test_out_of_memory_while_tokenizing_names_the_document_and_its_size(tmp_path, monkeypatch):
    """A document too large to tokenize (the hardening pass used a 1.5 GB JSONL line) is one error naming it and
    saying how to split it, not a MemoryError traceback; nothing is left in the cache."""
    from conftest import sentencepiece_model
    from infra import sources
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model())
    tok = sources.Tokenizer(tmp_path / "tokenizer.model")
    data = tmp_path / "big.jsonl"
    data.write_text('{"text": "short"}\n{"text": "' + "word " * 2000 + '"}\n')

    def no_memory(texts, *a, **k):
        raise MemoryError
    monkeypatch.setattr(tok, "encode_batch", no_memory)
    with pytest.raises(ValueError, match=r"big.jsonl:2: out of memory tokenizing a document of 10,000 characters.*"
                                         r"split it"):
        sources.tokenize_source(data, tok, cache_dir=tmp_path / "cache", progress=False)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))

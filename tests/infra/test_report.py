"""infra/report.py and what a run reports: --eval-every (held-out loss at --ctx, full attention), the loss curve
PNG, TensorBoard scalars, timestamps and summary.json in the run folder, `python -m infra.report`."""
import json
import math
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import eval as ev
import generate
import train
from conftest import PG19_MINI, ROOT, make_hf_checkpoint
from infra import report

ENV_THREADS = ["--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 6-step run with --eval-every 3 and --tensorboard on 1000 characters of one book, held out on another."""
    root = tmp_path_factory.mktemp("report")
    books = sorted((PG19_MINI / "validation").glob("*.txt"))
    (root / "train.txt").write_text(books[0].read_text(encoding="utf-8")[500:1500])
    (root / "held.txt").write_text(books[1].read_text(encoding="utf-8")[500:2500])
    model = make_hf_checkpoint(root / "tiny", initializer_range=0.125)
    out = root / "run"
    summary = train.main(["--model", str(model), "--data", str(root / "train.txt"), "--eval-data",
                          str(root / "held.txt"), "--eval-every", "3", "--eval-sequences", "3", "--tensorboard",
                          "--cache-dir", str(root / "cache"), "--out", str(out), "--dtype", "fp32", "--ctx", "128",
                          "--max-steps", "6", "--lr", "1e-2", "--warmup", "0", "--save-every", "0", *ENV_THREADS])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"root": root, "model": model, "out": out, "summary": summary, "rows": rows}


def read_png(path):
    """(width, height, RGB rows) of an 8-bit RGB PNG with filter 0 on every row, as png_bytes writes it."""
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = {}, 8
    while i < len(blob):
        n, kind = struct.unpack(">I4s", blob[i:i + 8])
        body = blob[i + 8:i + 8 + n]
        assert struct.unpack(">I", blob[i + 8 + n:i + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        i += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[r * (3 * w + 1):(r + 1) * (3 * w + 1)] for r in range(h)]
    assert all(row[0] == 0 for row in rows)
    return w, h, [row[1:] for row in rows]


def count_color(rows, rgb) -> int:
    pixels = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, 3)
    return int((pixels == np.array(rgb, dtype=np.uint8)).all(1).sum())


def test_eval_rows_every_n_steps_and_at_the_end(run):
    evals = [r for r in run["rows"] if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert math.isclose(r["eval_ppl"], math.exp(r["eval_loss"]), rel_tol=1e-12) and r["eval_tokens"] == 3 * 127
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] + 1.0
    steps = [r for r in run["rows"] if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and all("T" in r["time"] for r in steps)


def test_held_out_loss_is_eval_py_nll_with_full_attention_and_restores_the_model(run):
    """The number --eval-every logs is eval.py's mean token nll of the same held-out sequences (full attention),
    and the model comes back in training mode with S²-Attn."""
    model, _ = generate.load_model(run["model"], run["out"] / "adapter", "nf4", dtype=torch.float32)  # as trained
    model.set_attention("s2", 0.25, "segment")
    model.train()
    args = train.parse_args(["--model", str(run["model"]), "--data", str(run["root"] / "train.txt"),
                             "--eval-data", str(run["root"] / "held.txt"), "--eval-every", "1", "--ctx", "128",
                             "--cache-dir", str(run["root"] / "cache"), "--out", str(run["root"] / "x")])
    held_out = report.held_out_dataset(args, model.args, train.build_dataset)
    ours = report.held_out_loss(model, held_out, 3, 2, pad_id=0)
    assert model.training and model.attention == "s2"
    model.eval().set_attention("full")
    ids = torch.stack([held_out[i]["input_ids"] for i in range(3)])
    reference = float(ev.token_nll(model, ids).double().mean())
    assert abs(ours["eval_loss"] - reference) < 1e-6 and ours["eval_tokens"] == 3 * 127
    last = [r for r in run["rows"] if "eval_loss" in r][-1]
    assert abs(last["eval_loss"] - reference) < 1e-5           # what the run logged for its final adapter


def test_loss_png_draws_the_training_curve_and_the_eval_points(run):
    w, h, rows = read_png(run["out"] / "loss.png")
    assert (w, h) == (report.W, report.H)
    assert count_color(rows, report.TRAIN) > 50 and count_color(rows, report.EVAL) >= 2 * 49
    # on demand from a metrics file, without eval rows: no eval squares
    steps_only = run["root"] / "steps.jsonl"
    steps_only.write_text("".join(json.dumps(r) + "\n" for r in run["rows"] if "loss" in r))
    p = subprocess.run([sys.executable, "-m", "infra.report", str(steps_only), "--out", str(run["root"] / "s.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    _, _, rows = read_png(run["root"] / "s.png")
    assert count_color(rows, report.TRAIN) > 50 and count_color(rows, report.EVAL) == 0


def test_summary_json_and_tensorboard_scalars(run):
    summary = json.loads((run["out"] / "summary.json").read_text())
    assert summary["steps_run"] == 6 and summary["started"] <= summary["finished"]
    assert summary["eval_loss"] == [r for r in run["rows"] if "eval_loss" in r][-1]["eval_loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run["out"] / "tensorboard"))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(math.isclose(v, r["loss"], rel_tol=1e-6) for (_, v), r in zip(losses, [r for r in run["rows"]
                                                                                         if "loss" in r]))
    assert [e.step for e in acc.Scalars("eval_ppl")] == [3, 6]


def test_eval_every_without_held_out_data_fails_before_out_is_touched(run, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="--eval-every needs held-out data"):
        train.main(["--model", str(run["model"]), "--data", str(run["root"] / "train.txt"), "--eval-every", "2",
                    "--cache-dir", str(run["root"] / "cache"), "--out", str(out), "--ctx", "128", *ENV_THREADS])
    assert not out.exists()


def test_a_metrics_file_with_a_bad_line_is_one_error(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    p = subprocess.run([sys.executable, "-m", "infra.report", str(bad)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "metrics.jsonl:2" in p.stderr and not (tmp_path / "loss.png").exists()


def test_tensorboard_without_its_package_fails_before_out_is_touched(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # what a missing package looks like
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train.main(["--model", str(run["model"]), "--data", str(run["root"] / "train.txt"), "--tensorboard",
                    "--cache-dir", str(run["root"] / "cache"), "--out", str(out), "--ctx", "128", *ENV_THREADS])
    assert not out.exists()

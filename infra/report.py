"""What a run reports besides its log: the held-out loss (--eval-every), the loss curve as a PNG, TensorBoard.

held_out_loss: the mean next-token loss (and ppl = exp of it) of held-out sequences at the training length, with
full attention, as the adapter will be used (S²-Attn is only a training-time approximation).
The PNG is drawn here with numpy and written with zlib (no plotting library at run time): the training loss per
step as a line, the held-out loss as squares. TensorBoard is torch.utils.tensorboard, which needs the optional
`tensorboard` package (--tensorboard). On demand, for any run:
    python -m infra.report runs/x/metrics.jsonl [--out runs/x/loss.png]
"""
import argparse
import math
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

from infra import atomic, cli

# Loaded on first use: `python -m infra.report` draws a curve without waiting seconds for torch.
torch, data, checkpoint, sources = map(cli.LazyModule, ("torch", "data", "infra.checkpoint", "infra.sources"))

W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 400, 64, 16, 16, 40
TRAIN, EVAL, INK, GRID = (31, 119, 180), (214, 39, 40), (40, 40, 40), (225, 225, 225)
FONT = {   # 3x5 glyphs, rows top to bottom separated by '/', '#' = ink
    "0": "###/# #/# #/# #/###", "1": " # /## / # / # /###", "2": "###/  #/###/#  /###", "3": "###/  #/###/  #/###",
    "4": "# #/# #/###/  #/  #", "5": "###/#  /###/  #/###", "6": "###/#  /###/# #/###", "7": "###/  #/ # / # / # ",
    "8": "###/# #/###/# #/###", "9": "###/# #/###/  #/###", ".": "   /   /   /   / # ", "-": "   /   /###/   /   ",
    "e": "   /###/###/#  / ##", "a": "   /## /  #/###/###", "i": " # /   / # / # / # ", "l": "## / # / # / # /###",
    "n": "   /## /# #/# #/# #", "p": "   /###/# #/###/#  ", "r": "   /# #/## /#  /#  ", "s": "   / ##/#  /  #/## ",
    "t": " # /###/ # / # / ##", "o": "   /###/# #/# #/###", "v": "   /# #/# #/# #/ # ",
}
FONT = {c: np.array([[ch == "#" for ch in row] for row in g.split("/")]) for c, g in FONT.items()}


def curves(rows: list[dict]) -> dict[str, tuple[list, list]]:
    """Training loss and held-out loss against the step, from metrics rows."""
    out = {"train": ([], []), "eval": ([], [])}
    for row in rows:
        for name, key in (("train", "loss"), ("eval", "eval_loss")):
            if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]) and "step" in row:
                out[name][0].append(row["step"])
                out[name][1].append(row[key])
    return out


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / n or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def text(img: np.ndarray, s: str, x: int, y: int, scale: int = 2) -> None:
    for c in s:
        if c in FONT:
            glyph = np.kron(FONT[c], np.ones((scale, scale), bool))
            h, w = glyph.shape
            img[y:y + h, x:x + w][glyph[:img.shape[0] - y, :img.shape[1] - x]] = INK
        x += 4 * scale


def line(img: np.ndarray, x0, y0, x1, y1, color, width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs, ys = np.linspace(x0, x1, n).round().astype(int), np.linspace(y0, y1, n).round().astype(int)
    for d in range(width):
        img[np.clip(ys + d, 0, H - 1), np.clip(xs, 0, W - 1)] = color


def render(series: dict[str, tuple[list, list]]) -> np.ndarray:
    """An HxWx3 uint8 picture of the curves on shared axes (y from 0 when the losses allow)."""
    img = np.full((H, W, 3), 255, np.uint8)
    xs = [x for sx, _ in series.values() for x in sx]
    ys = [y for _, sy in series.values() for y in sy]
    if not xs:
        raise ValueError("no finite losses to plot")
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
    y_lo, y_hi = min(0.0, min(ys)), max(ys) * 1.05 or 1.0
    px = lambda x: LEFT + (x - x_lo) / (x_hi - x_lo) * (W - LEFT - RIGHT)           # noqa: E731
    py = lambda y: H - BOTTOM - (y - y_lo) / (y_hi - y_lo) * (H - TOP - BOTTOM)    # noqa: E731
    for y in ticks(y_lo, y_hi):
        line(img, LEFT, py(y), W - RIGHT, py(y), GRID, 1)
        text(img, f"{y:g}", 4, int(py(y)) - 5)
    for x in ticks(x_lo, x_hi, 6):
        text(img, f"{x:g}", int(px(x)) - 8, H - BOTTOM + 8)
    line(img, LEFT, TOP, LEFT, H - BOTTOM, INK, 1)
    line(img, LEFT, H - BOTTOM, W - RIGHT, H - BOTTOM, INK, 1)
    sx, sy = series.get("train", ([], []))
    for i in range(1, len(sx)):
        line(img, px(sx[i - 1]), py(sy[i - 1]), px(sx[i]), py(sy[i]), TRAIN)
    for x, y in zip(*series.get("eval", ([], []))):
        img[int(py(y)) - 3:int(py(y)) + 4, int(px(x)) - 3:int(px(x)) + 4] = EVAL
    for k, (name, color) in enumerate((("train", TRAIN), ("eval", EVAL))):
        if series.get(name, ([], []))[0]:
            img[TOP + 4 + 16 * k:TOP + 12 + 16 * k, W - 110:W - 96] = color
            text(img, name, W - 90, TOP + 3 + 16 * k)
    text(img, "step", W - RIGHT - 40, H - 14)
    text(img, "loss", LEFT + 6, TOP)
    return img


def png_bytes(img: np.ndarray) -> bytes:
    """PNG encoding of an RGB uint8 array: signature, IHDR, one zlib IDAT (filter 0 per row), IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w, _ = img.shape
    raw = b"".join(b"\0" + img[r].tobytes() for r in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot_metrics(metrics_file, out_png) -> Path:
    """metrics.jsonl -> loss curve PNG (written atomically)."""
    return atomic.write_text(out_png, png_bytes(render(curves(checkpoint.read_metrics(Path(metrics_file))))))


def held_out_dataset(args, model_args, build_dataset):
    """What --eval-every evaluates: --eval-data read like --data, else the validation split of a PG19-layout
    --data, else (the demo) synthetic sequences drawn with another seed than the training ones."""
    source = args.eval_data or (args.data if args.data == "synthetic" or sources.is_pg19_layout(Path(args.data))
                                else None)
    if source is None:
        raise ValueError("--eval-every needs held-out data: --eval-data PATH (a PG19-layout --data uses its "
                         "validation split)")
    split = "validation" if source != "synthetic" and sources.is_pg19_layout(Path(source)) else None
    held_out = argparse.Namespace(**{**vars(args), "data": source, "split": split, "seed": args.seed + 1})
    return build_dataset(held_out, model_args)[0]


def held_out_loss(model, dataset, n_sequences: int, batch_size: int, pad_id: int) -> dict:
    """{eval_loss, eval_ppl, eval_tokens} over the first n_sequences of `dataset`, full attention, no dropout;
    the model's training mode and attention are restored afterwards."""
    mode, was_training = (model.attention, model.group_size_ratio, model.s2_shift), model.training
    model.eval().set_attention("full")
    total, tokens = 0.0, 0
    n = min(n_sequences, len(dataset))
    try:
        with torch.no_grad():
            for s in range(0, n, batch_size):
                batch = data.collate([dataset[i] for i in range(s, min(s + batch_size, n))], pad_id)
                ids, labels, mask = (None if t is None else t.to(model.lm_head.weight.device) for t in batch.values())
                total += float(model.loss(ids, labels, padding_mask=mask, reduction="sum"))
                tokens += int((labels[:, 1:] != data.IGNORE_INDEX).sum())
    finally:
        model.train(was_training).set_attention(*mode)
    loss = total / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": tokens}


def summary_writer():
    """torch's SummaryWriter class, which needs the optional `tensorboard` package: a clear error when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def log_scalars(writer, row: dict) -> None:
    """Every numeric field of a metrics row (loss, lr, grad_norm, tok_s, eval_loss, eval_ppl) at its step."""
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, row["step"])


def main(argv=None) -> None:
    p = cli.one_line_errors(argparse.ArgumentParser(prog="python -m infra.report", description=__doc__.split("\n")[0]))
    p.add_argument("metrics", help="a run's metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG to write (default: loss.png beside the metrics)")
    args = p.parse_args(argv)
    print(f"wrote {plot_metrics(args.metrics, args.out or Path(args.metrics).with_name('loss.png'))}")


if __name__ == "__main__":
    sys.exit(cli.run(main))

"""A training run on disk: what --out holds, how checkpoints are written, and the rules of --resume.

    out/train_config.json   everything the run resolved: flags, PI factor, the base model's fingerprint
    out/metrics.jsonl       one JSON row per optimizer step, appended and flushed as the run goes
    out/checkpoint-<step>/  adapter/ (model/ for full fine-tuning) + trainer_state.pt (optimizer, scheduler,
                            loss scaler, data position, every RNG) + train_config.json (the run's, as above);
                            written under a hidden name and renamed, so checkpoint-<step> is always complete
                            (--fsdp: + sharded/, every rank's shards of the LoRA weights and AdamW states)
    out/adapter/            the final adapter (PEFT format + longqlora.json), or model/; written last

Rules that keep a run from being lost:
  - without --resume, an --out holding a run is refused (--overwrite replaces it; the demo replaces its own);
  - --resume continues from the newest complete checkpoint and reproduces an uninterrupted run bit for bit;
    it refuses a different recipe or base model (same path, other weights: the fingerprint) than the
    checkpoint's own train_config.json records, a --max-steps below the checkpoint's step, and an --out that
    holds a finished or started run but no checkpoint (it would restart at step 0 and overwrite it);
  - metrics rows after the checkpoint (an interrupted attempt) are dropped on resume; a torn last line (what
    a crash leaves) is ignored with a warning, any other malformed line is an error naming file and line.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from infra import atomic
from infra import hf
from infra.adapter import load_adapter, save_adapter

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.pt"
CONFIG = "train_config.json"
RESUMABLE = ("optimizer", "scheduler", "scaler", "sampler")      # trainer_state.pt keeps their state_dict()s
RUN_FILES = ("metrics.jsonl", CONFIG, "adapter", "model")


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `out`, oldest first (temporary folders are hidden and never match)."""
    found = []
    if out.is_dir():
        for d in out.iterdir():
            m = CHECKPOINT.match(d.name)
            if m and (d / TRAINER_STATE).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def has_run(out: Path) -> bool:
    """Does `out` hold (part of) a run of train.py?"""
    return out.is_dir() and (any((out / n).exists() for n in RUN_FILES) or any(out.glob("checkpoint-*")))


def remove_run(out: Path) -> None:
    """The files and folders of a run in `out` (a symbolic link among them: the link, not what it points to)."""
    for p in [*(out / name for name in (*RUN_FILES, "demo-base")), *out.glob("checkpoint-*")]:
        atomic.remove(p)


def lock(out: Path) -> int:
    """An exclusive lock on the run folder `out` (made if missing), held until the returned descriptor is closed:
    a second run into the same --out is refused instead of interleaving its writes with the first one's."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"{out}: another run is writing to this folder; wait for it to end, or use another --out") \
            from None
    return fd


def remove_temporaries(out: Path) -> None:
    """The hidden temporary files and folders of atomic writes (atomic.py) that a kill left in `out`."""
    for p in [*out.glob(".*.tmp-*"), *out.glob(".*.old-*")]:
        atomic.remove(p)


def resume_point(out: Path, resume: bool, overwrite: bool, max_steps: int | None, demo: bool = False):
    """(step, folder) of the checkpoint to resume from, or None for a fresh start; every refusal is here."""
    if not resume:
        if has_run(out) and not overwrite and not (demo and (saved_config(out / CONFIG) or {}).get("demo") is True):
            raise ValueError(f"{out} already holds a training run; pass --resume to continue it, "
                             "--overwrite to replace it, or another --out")
        return None
    found = checkpoints(out)
    if not found:
        if (out / "adapter").exists() or (out / "model").exists() or read_metrics(out / "metrics.jsonl"):
            raise ValueError(f"{out}: --resume, but this run has no checkpoint to resume from (saved with "
                             "--save-every 0?); restarting would overwrite it. Use --overwrite to start again, "
                             "or another --out")
        return None
    step, folder = found[-1]
    if max_steps is not None and max_steps < step:
        raise ValueError(f"{folder}: the newest checkpoint is at step {step}, beyond --max-steps {max_steps}; "
                         f"pass --max-steps {step} or more to continue this run")
    return step, folder


def saved_config(path: Path) -> dict | None:
    """The dict of a train_config.json; None when it is missing or unreadable."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def check_same_recipe(ckpt: Path, config: dict, recipe: list[str]) -> None:
    """A resumed run must be the run that wrote checkpoint `ckpt`: the same `recipe` keys (the flags of the recipe,
    the base model's fingerprint, the world size) as the train_config.json saved in it (or, in a checkpoint
    written before checkpoints kept one, the run's). A record that cannot be read is an error, never a pass."""
    path = ckpt / CONFIG if (ckpt / CONFIG).exists() else ckpt.parent / CONFIG
    saved = saved_config(path)
    if saved is None:
        raise ValueError(f"{path}: missing or unreadable, so the recipe of --resume (--lr, ...) cannot be checked "
                         "against the checkpoint's; restore the file, or start again with --overwrite")
    changed = [k for k in recipe if k in saved and saved[k] != config.get(k)]
    if changed:
        what = ", ".join(f"{k}: {saved[k]!r} -> {config.get(k)!r}" for k in changed)
        hints = {"base_fingerprint": " (the base model's weights changed)",
                 "world_size": " (a run resumes on as many ranks as it began with: data order and RNGs are per rank)"}
        hint = "".join(hints[k] for k in changed if k in hints)
        raise ValueError(f"{path}: cannot resume with a different recipe ({what}){hint}")


# --------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    """Every random generator the run touches (LoRA dropout; the data order is seeded separately)."""
    kind, keys, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), *rest)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(out: Path, step: int, write_weights, trainer_state: dict, config: dict, keep: int) -> Path:
    """checkpoint-<step>/: write_weights(folder) puts the adapter or model there, then the run's train_config.json
    (what --resume checks its recipe against) and trainer_state.pt. Only the newest `keep` stay (0: all)."""
    def write(tmp: Path):
        write_weights(tmp)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        torch.save(trainer_state, tmp / TRAINER_STATE)

    try:
        final = atomic.write_dir(out / f"checkpoint-{step}", write)
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError (inline_container.cc)
        raise OSError(f"{out / f'checkpoint-{step}'}: checkpoint not saved ({e}); nothing of it was kept and the "
                      "checkpoints before it are intact. Free disk space in --out (or raise the file-size limit, "
                      "ulimit -f) and continue with --resume") from None
    for _, old in checkpoints(out)[:-keep] if keep else ():
        atomic.remove(old)
    return final


def trainer_state(step: int, optimizer, scheduler, scaler, sampler, world: int) -> dict:
    """Everything besides the weights that a resumed run needs to continue exactly (collective: every rank)."""
    rngs = [rng_state()]
    if world > 1:                  # every rank's dropout RNG, so that a resumed run is exact on all of them
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, rng_state())
    parts = zip(RESUMABLE, (optimizer, scheduler, scaler, sampler))      # optimizer None: --fsdp shards it
    return {"step": step, **{name: part.state_dict() for name, part in parts if part is not None}, "rng": rngs}


def save_weights(model, folder: Path, full_finetune: bool, base_model, training: dict, tensors=None) -> None:
    """The trained weights into `folder`: adapter/ (PEFT format + longqlora.json), or model/ (full fine-tuning).
    tensors: the adapter's, when not the model's own (--fsdp: gathered from the ranks)."""
    if full_finetune:
        hf.save_model(model, folder / "model", copy_from=base_model)
    else:
        save_adapter(model, folder / "adapter", base_model_name_or_path=base_model, training=training, tensors=tensors)


def restore(ckpt: Path, model, full_finetune: bool, optimizer, scheduler, scaler, sampler, rank: int) -> None:
    """Put the run back as it was when `ckpt` was written: weights, optimizer, schedule, scaler, data, RNGs.
    optimizer None (--fsdp): the LoRA weights and the optimizer are restored from the shards (fsdp.load_sharded)."""
    try:
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)   # no pickled code
    except Exception as e:          # zip / pickle errors of a damaged file come in many types
        raise ValueError(f"{ckpt / TRAINER_STATE}: cannot read, damaged? ({e}); delete {ckpt} to resume from "
                         "the checkpoint before it") from None
    if full_finetune:
        hf.load_state(model, ckpt / "model")
    elif optimizer is not None:
        load_adapter(model, ckpt / "adapter")
    for name, part in zip(RESUMABLE, (optimizer, scheduler, scaler, sampler)):
        if part is not None:
            part.load_state_dict(state[name])
    set_rng_state(state["rng"][rank])


# --------------------------------------------------------------------------- metrics.jsonl

def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line is dropped with a warning, other bad lines are errors."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row with a step")
        except ValueError as e:
            if n == len(lines):
                warnings.warn(f"{path}:{n}: ignoring a torn last line (interrupted write)", stacklevel=2)
                break
            raise ValueError(f"{path}:{n}: malformed metrics row ({e})") from None
        rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps <= step: what the checkpoint at `step` had seen."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

Everything is first written under a hidden temporary name in the same folder (the same file system, so
`os.replace` is one atomic rename) and renamed into place only when complete. A crash, Ctrl-C or a full disk
leaves the previous version untouched and removes the temporary; a full disk is reported as one error
naming the file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_text(path, text) -> Path:
    """Replace `path` with `text` (str, or bytes) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(text if isinstance(text, bytes) else text.encode())      # str as UTF-8, whatever the locale
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove(path: Path) -> None:
    """Delete a file, a folder, or a symbolic link itself (never what it points to); nothing if missing."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_json(path, obj, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_dir(out_dir, write) -> Path:
    """Call write(tmp) on a fresh hidden folder beside `out_dir`, then put it in place of `out_dir`. An existing
    `out_dir` is replaced only once the new one is complete; a failed write leaves it untouched. A symbolic link
    `out_dir` is replaced by the folder, and what it pointed to is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    mask = os.umask(0)                   # reading the umask means setting it
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)             # mkdtemp makes it 0700; a folder made by mkdir honours the umask
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    try:
        write(tmp)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        remove(old)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError) or isinstance(e, FileNotFoundError) or not e.strerror:
            raise
        raise OSError(f"{out_dir}: cannot write ({e.strerror})") from None
    return out_dir

"""Command-line plumbing shared by every script: the project's rule for bad input, and small flag checks.

The rule: bad input gets one line `error: <file or flag>: <problem>` on stderr and exit status 2, before
anything on disk is changed; Ctrl-C exits with 130 and no traceback. Scripts raise ValueError (bad values),
FileNotFoundError or OSError (files, network, disk full) with the message already naming the culprit, and
`run` turns them into that line. This module imports no torch, so `--help` and flag errors answer at once.
"""
from __future__ import annotations

import argparse
import math
import sys


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse's usage errors as one `error: ...` line and exit status 2 (argparse prints the whole usage)."""
    def error(message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    parser.error = error
    return parser


def run(main, argv=None) -> int:
    """Call main(argv); the exit status: 0, 2 after one `error:` line, or 130 after Ctrl-C."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def check_range(name: str, value, low=None, high=None, *, open_low: bool = False, open_high: bool = False):
    """`value` as given when it is a finite number inside the bounds (None = unbounded), else ValueError
    naming `name` (a flag such as --lr, or `config.json: rms_norm_eps`). Bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        lo = "(-inf" if low is None else ("(" if open_low else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if open_high else "]")
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value!r}")
    return value


def set_threads(n: int | None) -> None:
    """torch's intra-op threads (None: torch's default, all cores). Two runs sharing a machine each with all
    cores can be many times slower than each with half of them."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--threads must be a positive integer, got {n!r}")
    import torch  # here, not at the top: the rest of this module is needed before torch has loaded
    torch.set_num_threads(n)

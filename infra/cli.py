"""Command-line and process plumbing shared by every script: the rule for bad input, flag checks, devices.

The rule: bad input gets one line `error: <file or flag>: <problem>` on stderr and exit status 2, before
anything on disk is changed; Ctrl-C exits with 130 and no traceback. Scripts raise ValueError (bad values),
FileNotFoundError or OSError (files, network, disk full) with the message already naming the culprit, and
`run` turns them into that line. This module imports no torch, so `--help` and flag errors answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse's usage errors as one `error: ...` line and exit status 2 (argparse prints the whole usage)."""
    def error(message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    parser.error = error
    return parser


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Every optional flag's help ends with its default ("none" when unset), except where the help already says
    what the default is."""

    def _get_help_string(self, action):
        if action.required or (action.default is None and "default" in (action.help or "")):
            return action.help
        if action.default is None and action.option_strings:
            return f"{action.help} (default: none)"
        return super()._get_help_string(action)


def table_parser(flags, **kwargs) -> argparse.ArgumentParser:
    """The flags of a table [(name, default, range, help)], each default None (resolve fills them in): a switch
    for a False default, else the default's type (or the type given as the default: none unless given), the
    choices of a tuple range, and "(default: x)" after the help, as eval.py and generate.py show it."""
    p = one_line_errors(argparse.ArgumentParser(**kwargs))
    for name, default, values, text in flags:
        flag, unset = "--" + name.replace("_", "-"), isinstance(default, type)
        if default is False:
            p.add_argument(flag, action="store_true", default=None, help=text)
        else:
            p.add_argument(flag, type=default if unset else type(default), choices=values if isinstance(values, tuple)
                           else None, help=text if unset else f"{text} (default: {default})")
    return p


def resolve(args, flags, *overrides: dict) -> None:
    """Every flag of the table left unset takes its value from the first of `overrides` that has it, else the
    table's default; then each value is checked against its interval."""
    for name, default, values, _ in flags:
        if getattr(args, name) is None:
            setattr(args, name, next((o[name] for o in overrides if name in o),
                                     None if isinstance(default, type) else default))
        if isinstance(values, str) and getattr(args, name) is not None:        # an interval: "[1, inf)", "(0, 1]"
            low, high = (None if b.strip() in ("-inf", "inf") else float(b) if "." in b else int(b)
                         for b in values[1:-1].split(","))
            check_range("--" + name.replace("_", "-"), getattr(args, name), low, high, open_low=values[0] == "(",
                        open_high=values[-1] == ")")


# PI divides every position by the factor: past 10^4 x a trained context of thousands of tokens no sequence fits
# in any memory, so a larger factor is a typo (and 1e308 overflows the RoPE angles). train.py checks it too.
MAX_ROPE_FACTOR = 10_000


def rope_factor(text: str) -> float:
    """--rope-factor of eval.py and generate.py: 1 (plain RoPE) to MAX_ROPE_FACTOR."""
    try:
        return check_range("--rope-factor", float(text), 1, MAX_ROPE_FACTOR)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--rope-factor ")) from None   # argparse names it


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    """The flags eval.py and generate.py share: which model, its adapter and RoPE factor, how it computes."""
    p.add_argument("--model", required=True, help="HF LLaMA directory (config.json, weights, tokenizer.model)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory (ours, PEFT's or LongLoRA's)")
    p.add_argument("--rope-factor", type=rope_factor, default=None,
                   help="linear PI factor at every length (1 = plain RoPE); default: the adapter's training factor "
                        "(longqlora.json), else the checkpoint's config; an adapter with neither needs it")
    p.add_argument("--quant", choices=("none", "nf4"), default="none", help="nf4: the base as QLoRA trains it")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: fp32 on CPU, bf16 on GPUs that have it, fp16 on older ones")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto: cuda when available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (none: all cores)")


def parse_or_exit(parse, argv=None):
    """parse(argv), with a bad value turned into one `error:` line and exit status 2 (as argparse's own)."""
    try:
        return parse(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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
    finally:        # torchrun: leave the process group (infra/run.py's init_distributed joined it)
        if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
            sys.modules["torch.distributed"].destroy_process_group()
    return 0


def check_range(name: str, value, low=None, high=None, *, open_low: bool = False, open_high: bool = False):
    """`value` as given when it is a finite number inside the bounds (None = unbounded), else ValueError
    naming `name` (a flag such as --lr, or `config.json: rms_norm_eps`). Bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        show = lambda b: f"{b:g}" if isinstance(b, float) else str(b)     # noqa: E731  (ints exactly)
        lo = "(-inf" if low is None else ("(" if open_low else "[") + show(low)
        hi = "inf)" if high is None else show(high) + (")" if open_high else "]")
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value!r}")
    return value


def check_train_args(args) -> None:
    """train.py's impossible settings fail here, before anything is read or written (resolve checked the ranges)."""
    if args.attn == "s2" and int(args.ctx * args.group_size_ratio) < 1:
        raise ValueError(f"--ctx {args.ctx} x --group-size-ratio {args.group_size_ratio} gives S²-Attn groups of "
                         f"{int(args.ctx * args.group_size_ratio)} tokens; a group needs at least 1")
    if args.full_finetune and (args.quant == "nf4" or args.dtype == "fp16" or args.fsdp):
        raise ValueError("--full-finetune trains the dense weights: it needs --quant none, bf16 or fp32, no --fsdp")
    if args.sft and args.data in (None, "synthetic") and not args.dry_run:
        raise ValueError("--sft needs --data pointing to a JSONL of conversations")
    for flag, value in (("--data", args.data), ("--eval-data", args.eval_data or "synthetic")):
        if args.demo and value != "synthetic":
            raise ValueError(f"{flag} {value}: text data needs the tokenizer of a --model (the demo uses synthetic)")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other")
    if (args.budget is not None or args.world_size is not None) and not args.dry_run:
        raise ValueError("--budget and --world-size go with --dry-run")


class LazyModule:
    """Module `name`, imported on the first attribute access: a script names torch and its own modules at the
    top and still answers --help and bad flags before torch has loaded (seconds)."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.name), attr)


# The functions below import torch inside: the rest of this module is needed before torch has loaded.

def set_threads(n: int | None) -> None:
    """torch's intra-op threads (None: torch's default, all cores). Two runs sharing a machine each with all
    cores can be many times slower than each with half of them."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--threads must be a positive integer, got {n!r}")
    import torch
    torch.set_num_threads(n)


def compute_dtype(name: str, device):
    """torch dtype of --dtype; "auto": fp32 on CPU (bf16 is slow where the CPU has no native bf16, and fp32 is
    exact), bf16 on GPUs from Ampere (compute capability 8) on, fp16 on older ones such as the V100."""
    import torch
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def device(name: str):
    """torch.device of --device ("auto": cuda when available, else cpu), refused when the machine lacks it."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (no GPU, or a CPU-only torch build)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return dev

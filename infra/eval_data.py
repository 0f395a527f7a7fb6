"""eval.py's plumbing: where the evaluation text is (a named dataset in a data folder, downloaded on request, or
any source), the results as a markdown table, and the published evaluation protocols, as LongLoRA's and
LongQLoRA's scripts run them (eval.py --protocol longlora / longqlora; issue 18). Our own protocols, the
defaults, are described in eval.py; train.py's --as-published holds the training side.

Perplexity (eval.py's window loop, with each script's defaults):
  longqlora  LongQLoRA's evaluate.py: windows of seq_len starting every 8192 tokens whatever seq_len is (at
             seq_len < 8192 most of the text is skipped), last start dropped; the base in NF4 with fp16 compute;
             LongLoRA's tokenized `pg19-<split>.bin` read in preference to text.
  longlora   LongLoRA's eval.py: windows every 256 tokens, last start dropped; the base dense in fp16; the
             `.bin` files too.
  On CPU fp16 is not a native compute type: fp32 is used instead, and said so.

Passkey retrieval (eval.py --task passkey --protocol longlora), LongLoRA's passkey test:
  * the filler sentences repeated and cut by CHARACTERS: n = FILLER_CHARS_PER_TOKEN * seq_len characters of
    filler split at a random point p in [0, n] into the text before the key line (the first p characters) and
    the text after it (the first n - p characters), so the prompt is only roughly seq_len tokens long;
  * the key an integer drawn with randint(1, 50000) from a generator seeded with the trial's number j, so trial
    j has the same key at every length;
  * the prompt: task sentence, filler, key line, filler, question, joined by newlines, with BOS;
  * scoring: the key is tokenized on its own (no BOS); exactly that many tokens are generated greedily, and a
    trial is correct only when they equal the key's tokens;
  * 10 trials per length; LongLoRA steps the length by 1k tokens (--seq-len 1000 2000 3000 ...).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from infra import download, sources

EVAL_DEFAULTS = {   # per protocol: what a flag left unset becomes (our protocols: cli.add_inference_flags')
    "longqlora": dict(stride=8192, quant="nf4", dtype="fp16"),
    "longlora": dict(stride=256, quant="none", dtype="fp16"),
}
# The passkey prompt's wording (LongLoRA's, which eval.py's own passkey protocol shares).
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_TRIALS = 10
PASSKEY_KEYS = (1, 50000)                           # randint's bounds, both included
FILLER_CHARS_PER_TOKEN = 3.75                       # LongLoRA's rough ratio of filler characters to tokens


def apply_eval_defaults(args, cuda: bool) -> None:
    """Fill eval.py's flags left None (--stride, --quant, --dtype, --trials) with the published protocol's
    defaults, or our own; says so when the published fp16 is replaced by fp32 (no CUDA)."""
    defaults = dict(stride=None, quant="none", dtype="auto", trials=20)
    if args.protocol in EVAL_DEFAULTS and (args.task == "perplexity" or args.protocol == "longlora"):
        defaults.update(EVAL_DEFAULTS[args.protocol], trials=PASSKEY_TRIALS)
    if args.dtype is None and defaults["dtype"] == "fp16" and not cuda:
        defaults["dtype"] = "fp32"
        print(f"note: --protocol {args.protocol}: the published script computes in fp16; without CUDA this uses "
              "fp32 (pass --dtype fp16 or bf16 to force one)", flush=True)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def filler(n_chars: int) -> str:
    """The first n_chars characters of the filler sentences repeated (LongLoRA's 'garbage')."""
    block = " ".join(FILLER)
    return (" ".join([block] * (n_chars // (len(block) + 1) + 1)))[:n_chars]


def passkey_trial(seq_len: int, trial: int, depth_rng: random.Random) -> tuple[str, str, float]:
    """(prompt text, key, depth) of trial j at seq_len: the filler cut by characters at a random point."""
    n = int(FILLER_CHARS_PER_TOKEN * seq_len)
    before = depth_rng.randint(0, n)
    key = str(random.Random(trial).randint(*PASSKEY_KEYS))
    text = "\n".join([PASSKEY_TASK, filler(before), PASSKEY_LINE.format(key=key), filler(n - before),
                      PASSKEY_QUESTION])
    return text, key, before / n if n else 0.0


def passkey_correct(answer_ids: list[int], key_ids: list[int]) -> bool:
    """Exact match of the generated tokens with the key's own tokens (no 'first number' leniency)."""
    return list(answer_ids) == list(key_ids)


def find_dataset(dataset: str, split: str, data_dir, prefer_bin: bool = False) -> tuple[Path, str | None]:
    """(path, split for the reader) of a named dataset, or FileNotFoundError naming every place looked at and how
    to get the data. pg19 prefers the text layout (`pg19/<split>/*.txt`), tokenized with the evaluated model's own
    tokenizer, to LongLoRA's `pg19-<split>.bin` (LLaMA's); proof-pile prefers LongLoRA's `proof-pile-<split>.bin`
    (the paper's sample of 128 long test documents) to the split's jsonl(.gz) files. prefer_bin (the published
    protocols): files, so the `.bin` token files, before text folders."""
    d = Path(data_dir)
    # (path, reader split, folder that must hold text files; None for a file)
    if dataset == "pg19":
        candidates = [(d / "pg19", split, d / "pg19" / split), (d, split, d / split),
                      (d / f"pg19-{split}.bin", None, None), (d / "pg19" / f"pg19-{split}.bin", None, None)]
        how = (f"get it with `python -m infra.download pg19 --split {split} --out {d / 'pg19'}` "
               f"(or add --download), or pass --data-path")
    else:       # proof-pile (eval.py's --dataset choices)
        pp = d / "proof-pile"
        candidates = [(d / f"proof-pile-{split}.bin", None, None), (pp / f"proof-pile-{split}.bin", None, None),
                      (pp / split, None, pp / split), (pp / f"{split}.jsonl.gz", None, None),
                      (pp / f"{split}.jsonl", None, None), (d / f"proof-pile-{split}.jsonl.gz", None, None)]
        how = ("get LongLoRA's pre-tokenized proof-pile-test.bin (linked from the LongLoRA README) or the Proof-pile "
               "jsonl.gz test files into that folder, or pass --data-path")
    if prefer_bin:
        candidates.sort(key=lambda c: c[2] is not None)
    for path, reader_split, folder in candidates:    # a file, or a folder with text files somewhere inside
        if path.is_file() if folder is None else any(
                f.is_file() and f.name.endswith(sources.TEXT_SUFFIXES) for f in folder.rglob("*")):
            return path, reader_split
    looked = ", ".join(str(path) if folder is None else f"{folder}/" for path, _, folder in candidates)
    raise FileNotFoundError(f"no {dataset} {split} data found; looked for {looked}; {how}")


def eval_source(args) -> tuple[Path, str | None, str, str | None]:
    """(path, reader split, dataset name, split name) of eval.py's flags: --data-path, else --dataset looked up in
    --data-dir (default $LONGQLORA_DATA or data), PG19 downloaded there first when missing and --download is given."""
    if args.data_path is not None:
        path = Path(args.data_path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: --data-path not found")
        split = (args.split or "validation") if sources.is_pg19_layout(path) else None
        return path, split, str(path), split
    split = args.split or ("validation" if args.dataset == "pg19" else "test")
    prefer_bin = args.protocol in ("longqlora", "longlora")     # as their scripts read LongLoRA's token files
    data_dir = Path(args.data_dir or os.environ.get("LONGQLORA_DATA", "data"))
    try:
        return (*find_dataset(args.dataset, split, data_dir, prefer_bin), args.dataset, split)
    except FileNotFoundError:
        if not args.download:
            raise
    download.download_pg19(split, data_dir / "pg19", progress=not args.no_progress)
    return (*find_dataset(args.dataset, split, data_dir, prefer_bin), args.dataset, split)


def results_table(task: str, results: list[dict]) -> str:
    """eval.py's results (perplexity or passkey) as a markdown table."""
    if task == "perplexity":
        header = ["seq_len", "perplexity", "tokens", "windows", "seconds"]
        rows = [[r["seq_len"], r["ppl"], r["tokens"], r["windows"], f"{r['seconds']:.1f}"] for r in results]
    else:
        buckets = list(results[0]["depth_accuracy"]) if results else []
        header = ["seq_len", "accuracy", *[f"depth {b}" for b in buckets], "trials", "seconds"]
        rows = [[r["seq_len"], r["accuracy"], *r["depth_accuracy"].values(), r["trials"], f"{r['seconds']:.1f}"]
                for r in results]

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])

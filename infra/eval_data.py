"""eval.py's plumbing: where the evaluation text is (a named dataset in a data folder, downloaded on request, or
any source), and the results as a markdown table."""
from __future__ import annotations

import os
from pathlib import Path

from infra import download
from infra import sources


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
    elif dataset == "proof-pile":
        pp = d / "proof-pile"
        candidates = [(d / f"proof-pile-{split}.bin", None, None), (pp / f"proof-pile-{split}.bin", None, None),
                      (pp / split, None, pp / split), (pp / f"{split}.jsonl.gz", None, None),
                      (pp / f"{split}.jsonl", None, None), (d / f"proof-pile-{split}.jsonl.gz", None, None)]
        how = ("get LongLoRA's pre-tokenized proof-pile-test.bin (linked from the LongLoRA README) or the Proof-pile "
               "jsonl.gz test files into that folder, or pass --data-path")
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose pg19 or proof-pile, or pass --data-path")
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

"""Merge a LoRA adapter into its 16-bit base model and write a dense HF checkpoint:

    python -m infra.merge --base DIR --adapter ADAPTER --out MERGED [--rope-factor F]

Every targeted weight becomes W' = W + (alpha / r) B A (lora.merged_weight), LoRA+ embeddings and norms replace
the base's, and config.json gets the RoPE scaling the adapter was trained with, so the merged folder loads in
transformers or our scripts without the adapter. An NF4-trained adapter is merged into the original 16-bit
weights of the base checkpoint, never into the 4-bit copy.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from infra import cli

# Loaded on first use: `python -m infra.merge --help` answers before torch has loaded.
torch, adapter, hf, lora, rope_scaling = map(cli.LazyModule, ("torch", "infra.adapter", "infra.hf", "lora",
                                                               "infra.rope_scaling"))


def check_out(out_dir, inputs, overwrite: bool) -> None:
    """Refuse an --out whose replacement would destroy something: an input folder or one holding an input, and
    the current folder or one holding it, always; a training run or any other non-empty folder unless overwrite."""
    out = Path(out_dir).resolve()
    folders = [*((Path(d).resolve(), f"the input {d}") for d in inputs), (Path.cwd().resolve(), "the current folder")]
    for folder, what in folders:
        if out == folder or out in folder.parents:
            raise ValueError(f"--out {out_dir}: is {what} or holds it; the merged model needs a folder of its own")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        run = " (it holds a training run: train_config.json)" if (out / "train_config.json").exists() else ""
        raise ValueError(f"--out {out_dir}: exists and is not empty{run}; pass --overwrite to replace it")


def merge_and_export(base_dir, adapter_dir, out_dir, rope_factor: float | None = None,
                     max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> tuple[Path, dict | None, str]:
    """Merge an adapter into the 16-bit weights of `base_dir` and write a full HF checkpoint to `out_dir` (one that
    check_out allows), a tensor at a time (peak memory: one shard plus one tensor). Returns (out_dir, the RoPE
    scaling written into its config.json, which is eval.py's (rope_scaling.inference_scaling), where it came from)."""
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    check_out(out_dir, (base_dir, adapter_dir), overwrite)
    config, lora_weights, extra, training = adapter.read_adapter(adapter_dir)
    base_config = hf.load_config(base_dir)
    if base_config.get("quantization_config"):
        raise ValueError(f"{base_dir / 'config.json'}: the base is quantised; merging needs the original 16-bit "
                         "weights")
    base_args = hf.read_config(base_dir)
    scaling, source = rope_scaling.inference_scaling(rope_factor, base_args.rope_scaling, adapter_dir, training)
    base_args.rope_scaling = scaling
    out_config = {**base_config, **hf.config_json(base_args)}
    out_config.pop("rope_parameters", None)   # transformers 5 form; we write the portable top-level one
    # eval.py and generate.py read the tokenizer from the model folder; some tools save it with the adapter
    tokenizer_dir = next((d for d in (base_dir, adapter_dir) if (d / "tokenizer.model").is_file()), None)
    if tokenizer_dir is None:
        raise FileNotFoundError(f"{base_dir / 'tokenizer.model'}: not found (nor in {adapter_dir}); eval.py and "
                                "generate.py need it beside the merged weights: copy it from the original model")
    files = hf.checkpoint_files(base_dir)
    pairs = lora.lora_pairs(lora_weights)
    replaced = {hf.hf_key(k): v for k, v in extra.items()}
    for key in [*pairs, *replaced]:
        if key not in files:
            raise ValueError(f"{adapter_dir}: adapter has weights for {key}, which {base_dir} lacks")
    scale = config["lora_alpha"] / config["r"]

    def tensors():
        for name, t, file in hf.read_tensors(files):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{file}: {name} holds NaN or inf values (a damaged base checkpoint?)")
            if name in replaced:
                if replaced[name].shape != t.shape:
                    raise ValueError(f"{adapter_dir}: {name} has shape {tuple(replaced[name].shape)}, "
                                     f"{file} has {tuple(t.shape)}")
                t = replaced[name].to(t.dtype)
            if name in pairs:
                try:
                    t = lora.merged_weight(t, *pairs[name], scale)
                except ValueError as e:
                    raise ValueError(f"{adapter_dir / adapter.ADAPTER_WEIGHTS}: {name}: {e} (an adapter for a "
                                     "different model?)") from None
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{adapter_dir / adapter.ADAPTER_WEIGHTS}: the LoRA update of {name} overflows "
                                     f"{t.dtype} (LoRA weights of a diverged run?)")
            yield name, t

    out = hf.save_checkpoint(tensors(), out_config, out_dir, max_shard_bytes, copy_from=tokenizer_dir)
    return out, scaling, source


def main(argv=None) -> None:
    p = cli.one_line_errors(argparse.ArgumentParser(
        prog="python -m infra.merge", formatter_class=cli.DefaultsHelp,
        description="Merge a LoRA adapter into its 16-bit base and write a dense HF checkpoint."))
    p.add_argument("--base", required=True, help="HF LLaMA folder the adapter was trained on (16-bit weights)")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter folder")
    p.add_argument("--out", required=True,
                   help="output folder, new or empty (never an input folder or the current folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically)")
    p.add_argument("--rope-factor", type=cli.rope_factor, default=None,
                   help="linear PI factor written into config.json (default: the adapter's longqlora.json, "
                        "else the base config's)")
    args = p.parse_args(argv)
    out, scaling, source = merge_and_export(args.base, args.adapter, args.out, args.rope_factor,
                                            overwrite=args.overwrite)
    print(f"wrote {out}: {args.adapter} merged into {args.base}; rope_scaling {rope_scaling.hf_rope_scaling(scaling)} "
          f"(RoPE factor {rope_scaling.describe_scaling(scaling)}, from {source})")


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

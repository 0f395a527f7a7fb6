"""Peak host memory of hf.load_model against the checkpoint's size on disk.

Writes a synthetic LLaMA-shaped checkpoint (random bf16 weights, sharded safetensors, written tensor by
tensor so the writer itself never holds the model), then loads it in a fresh process per mode and reports
that process's peak RSS above its RSS right after `import torch`:

    python bench/load_rss.py                     # ~1.3 GB checkpoint, dense bf16 and NF4 loads
    python bench/load_rss.py --layers 24         # ~3 GB

Baselines: the checkpoint's size on disk and the loaded model's size. No data: random weights. No committed
JSON (README: printed figures).

A loader that reads the whole state dict and then copies it into the module peaks at ~2x the checkpoint;
ours should peak near 1x for a dense load and near the NF4 size plus one tensor for quantize="nf4".
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import benchlib


def write_checkpoint(path: Path, layers: int, dim: int, inter: int, vocab: int, shard_bytes: int = 500_000_000):
    import torch
    from safetensors.torch import save_file

    cfg = dict(model_type="llama", vocab_size=vocab, hidden_size=dim, intermediate_size=inter,
               num_hidden_layers=layers, num_attention_heads=dim // 128, num_key_value_heads=dim // 128,
               max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="bfloat16")
    shapes = {"model.embed_tokens.weight": (vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (dim, dim)
        shapes[p + "mlp.gate_proj.weight"] = (inter, dim)
        shapes[p + "mlp.up_proj.weight"] = (inter, dim)
        shapes[p + "mlp.down_proj.weight"] = (dim, inter)
        shapes[p + "input_layernorm.weight"] = (dim,)
        shapes[p + "post_attention_layernorm.weight"] = (dim,)
    shapes["model.norm.weight"] = (dim,)
    shapes["lm_head.weight"] = (vocab, dim)
    path.mkdir(parents=True, exist_ok=True)
    shard, size, names, weight_map = {}, 0, [], {}
    g = torch.Generator().manual_seed(0)

    def flush():
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})

    for key, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if shard and size + t.numel() * 2 > shard_bytes:
            flush()
            shard, size = {}, 0
        shard[key] = t
        size += t.numel() * 2
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def child(path: str, quantize: str):
    import torch

    from infra import hf

    base = benchlib.peak_rss_bytes()
    model = hf.load_model(path, dtype=torch.bfloat16, quantize=None if quantize == "none" else quantize)
    peak = benchlib.peak_rss_bytes()
    resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print(json.dumps({"peak_above_import": peak - base, "model_bytes": resident}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--modes", nargs="+", default=["none", "nf4"])
    ap.add_argument("--out", help="write the figures and the machine (CPU model, native bf16) as JSON here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        disk = write_checkpoint(ckpt, a.layers, a.dim, a.intermediate, a.vocab)
        print(f"checkpoint: {disk / 1e9:.2f} GB on disk ({a.layers} layers, dim {a.dim})")
        results = []
        for mode in a.modes:
            r, _ = benchlib.run_child([sys.executable, __file__, "--child", str(ckpt), mode])
            print(f"quantize={mode:5s} model in memory {r['model_bytes'] / 1e9:.2f} GB, peak RSS above import "
                  f"{r['peak_above_import'] / 1e9:.2f} GB = {r['peak_above_import'] / disk:.2f}x disk, "
                  f"{r['peak_above_import'] / r['model_bytes']:.2f}x the loaded model")
            results.append({"quantize": mode, "disk_bytes": disk, **r})
    if a.out:
        benchlib.write_json(a.out, {"machine": benchlib.machine(), "config": {k: getattr(a, k) for k in (
            "layers", "dim", "intermediate", "vocab")}, "results": results})
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

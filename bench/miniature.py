"""The LongQLoRA experiment in miniature, the parts mini_paper.py and long_context.py share: a LLaMA-style
tokenizer, a 5.3M-parameter LLaMA pretrained from scratch at 256 tokens, its extension runs through train.py,
and the extended models loaded for evaluation through eval.py's loader.

    tokenizer  sentencepiece BPE (byte fallback, split digits, unk 0 / bos 1 / eos 2, no pad), trained on the
               lines of the data's train split;
    pretrain   AdamW (betas 0.9 / 0.95, weight decay on matrices only), linear warmup then cosine decay to
               min_lr_ratio, gradient clipping, fp32, on packed short_ctx-token sequences; the loss is
               model.loss (the chunked cross-entropy train.py uses); saved as an HF folder transformers loads;
    extend     train.main(flags) in this process: every variant is a train.py command line;
    evaluate   generate.load_model with the variant's RoPE factor, quantization and attention at every length.

Tokenizer and base are cached under --cache-dir by everything that defines them (config_key), so a rerun
skips them. The data defaults to the sample shipped with the repository (infra/pg19-mini).
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import torch

import benchlib
from benchlib import log
import data                 # the project's modules: benchlib put the repository root on sys.path
import generate
import train
from infra import PG19_MINI, hf, sources
from model import ModelArgs, Transformer

SEED = 42
# The paper's fine-tuning LRs (LoRA 2e-4; LongLoRA/PI full fine-tuning 2e-5) are for LLaMA-2-7B, pretrained with
# a peak LR of 3e-4. The small model here was pretrained with 1e-3, so both are scaled by 1e-3 / 3e-4, fixed
# before any result was seen.
LR_SCALE = 1e-3 / 3e-4

# The model and its training, per mode: "full" is the committed experiments', "smoke" exercises every stage on
# a model small enough for a test. Sizes were set by a 40-minute budget on 2 CPU cores. Every extended variant
# gets `steps` optimizer steps of `sequences` x long_ctx tokens and the paper's LoRA recipe otherwise (train.py's
# defaults: alpha 16, dropout 0.05, clip 0.3, constant LR after warmup).
CONFIGS = {
    "full": dict(
        tokenizer=dict(vocab_size=4096),
        model=dict(dim=256, intermediate_size=688, n_layers=4, n_heads=4, norm_eps=1e-5, rope_theta=10000.0),
        short_ctx=256, long_ctx=1024,
        pretrain=dict(steps=600, batch_size=8, lr=1e-3, warmup=20, min_lr_ratio=0.1, weight_decay=0.1,
                      max_grad_norm=1.0),
        finetune=dict(steps=30, sequences=4, lr=2e-4 * LR_SCALE, full_ft_lr=2e-5 * LR_SCALE, warmup=3),
    ),
    "smoke": dict(
        tokenizer=dict(vocab_size=512, max_files=3),
        model=dict(dim=32, intermediate_size=64, n_layers=2, n_heads=2, norm_eps=1e-5, rope_theta=10000.0),
        short_ctx=32, long_ctx=128,
        pretrain=dict(steps=8, batch_size=4, lr=3e-3, warmup=2, min_lr_ratio=0.1, weight_decay=0.1,
                      max_grad_norm=1.0),
        finetune=dict(steps=2, sequences=2, lr=1e-3, full_ft_lr=1e-3, warmup=1),
    ),
}


def add_common_args(p, what: str) -> None:
    """The flags both experiments take; `what` names what --cache-dir holds."""
    p.add_argument("--data-dir", default=str(PG19_MINI), help="PG19-layout folder (train/, validation/) "
                                                              "[the sample shipped in infra/pg19-mini]")
    p.add_argument("--cache-dir", default=str(benchlib.CACHE), help=what)
    p.add_argument("--smoke", action="store_true", help="tiny configuration that runs every stage in seconds")
    p.add_argument("--variants", nargs="+", default=None, help="only these variants (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice, all cores); 1 is faster on a busy machine")


def setup(args) -> tuple[Path, Path]:
    """Threads set, the data folder checked: (data_dir, cache_dir)."""
    benchlib.set_threads(args.threads)
    data_dir = Path(args.data_dir)
    if not (data_dir / "train").is_dir() or not (data_dir / "validation").is_dir():
        raise FileNotFoundError(f"{data_dir}: expected a PG19-layout folder with train/ and validation/")
    return data_dir, Path(args.cache_dir)


def data_fingerprint(data_dir: Path, split: str) -> str:
    return sources.source_fingerprint(sources.source_files(data_dir, split), data_dir / split)


# --------------------------------------------------------------------------- 1. tokenizer

def train_tokenizer(data_dir: Path, vocab_size: int, out_dir: Path, max_files: int | None = None) -> Path:
    """A LLaMA-style sentencepiece model trained on the lines of the train split, written atomically as
    out_dir/tokenizer.model."""
    import sentencepiece as spm

    docs = list(sources.iter_documents(data_dir, split="train"))[:max_files]
    lines = [line for _, text in docs for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{data_dir}: the train split holds no text to train a tokenizer on")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=0.99995, num_threads=1, minloglevel=2)   # one thread: deterministic merges
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"tokenizer.model.tmp-{os.getpid()}"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_dir / "tokenizer.model")
    return out_dir


def cached_tokenizer(cfg: dict, data_dir: Path, cache_dir: Path, timings: dict) -> Path:
    t = time.perf_counter()
    tok_dir = cache_dir / f"tokenizer-{benchlib.config_key([cfg['tokenizer'], data_fingerprint(data_dir, 'train')])}"
    if (tok_dir / "tokenizer.model").is_file():
        log(f"tokenizer: cached {tok_dir}")
    else:
        train_tokenizer(data_dir, cfg["tokenizer"]["vocab_size"], tok_dir, cfg["tokenizer"].get("max_files"))
    timings["tokenizer"] = time.perf_counter() - t
    log(f"tokenizer: {timings['tokenizer']:.1f} s")
    return tok_dir


# --------------------------------------------------------------------------- 2. pretraining

def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier of step `step` (0-based): linear warmup, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def optimizer_step(model, loss, optimizer, schedule, max_grad_norm: float) -> float:
    """Backward, clip, step the optimizer and the LR schedule; the loss as a float."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def pretrain(cfg: dict, source: Path, tokenizer_dir: Path, out_dir: Path, cache_dir: Path) -> dict:
    """Pretrain the small LLaMA from scratch at short_ctx on packed documents of `source` (a PG19-layout folder's
    train split, or a token .bin that PackedDataset cuts at multiples of short_ctx); save it as an HF folder."""
    p = cfg["pretrain"]
    tokenizer = sources.Tokenizer(tokenizer_dir / "tokenizer.model")
    corpus = sources.tokenize_source(source, tokenizer, split="train", cache_dir=cache_dir / "tokens", progress=False)
    dataset = data.PackedDataset(corpus, cfg["short_ctx"], tokenizer.eos_id)
    sampler = data.ShuffledSampler(len(dataset), SEED)
    torch.manual_seed(SEED)
    args = ModelArgs(vocab_size=tokenizer.vocab_size, max_position_embeddings=cfg["short_ctx"],
                     bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **cfg["model"])
    model = Transformer(args).train()
    n_params = sum(t.numel() for t in model.parameters())
    matrices = [t for t in model.parameters() if t.dim() >= 2]
    vectors = [t for t in model.parameters() if t.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": p["weight_decay"]},
                                   {"params": vectors, "weight_decay": 0.0}], lr=p["lr"], betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, p["warmup"], p["steps"], p["min_lr_ratio"]))
    tokens_per_step = p["batch_size"] * cfg["short_ctx"]
    log(f"pretrain: {n_params / 1e6:.2f}M parameters, {len(dataset):,} packed sequences of {cfg['short_ctx']} "
        f"tokens ({corpus.n_tokens:,} train tokens); {p['steps']} steps x {tokens_per_step} tokens = "
        f"{p['steps'] * tokens_per_step / corpus.n_tokens:.2f} epochs")
    losses, t0 = [], time.perf_counter()
    for step in range(p["steps"]):
        batch = data.collate([dataset[next(sampler)] for _ in range(p["batch_size"])], tokenizer.pad_id)
        losses.append(optimizer_step(model, model.loss(batch["input_ids"], batch["labels"], reduction="mean"),
                                     optimizer, schedule, p["max_grad_norm"]))
        if (step + 1) % max(1, p["steps"] // 10) == 0 or step == 0:
            window = losses[-max(1, p["steps"] // 10):]
            log(f"  step {step + 1}/{p['steps']} loss {sum(window) / len(window):.3f} "
                f"({(step + 1) * tokens_per_step / (time.perf_counter() - t0):.0f} tok/s)")
    hf.save_model(model.eval(), out_dir, copy_from=tokenizer_dir)
    summary = {"params": n_params, "train_tokens": corpus.n_tokens, "steps": p["steps"],
               "tokens": p["steps"] * tokens_per_step, "first_loss": losses[0],
               "last_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": time.perf_counter() - t0}
    benchlib.write_json(out_dir / "pretrain.json", summary)     # written last: marks the cache entry complete
    return summary


def cached_base(cfg: dict, source: Path, tok_dir: Path, cache_dir: Path, timings: dict,
                key_extra=()) -> tuple[Path, dict]:
    """(base folder, pretraining summary): the cached base of this configuration, pretrained if missing."""
    t = time.perf_counter()
    key = benchlib.config_key([cfg["model"], cfg["short_ctx"], cfg["pretrain"], tok_dir.name, *key_extra])
    base_dir = cache_dir / f"base-{key}"
    if (base_dir / "pretrain.json").is_file():
        log(f"pretrain: cached {base_dir}")
        summary = json.loads((base_dir / "pretrain.json").read_text())
    else:
        summary = pretrain(cfg, source, tok_dir, base_dir, cache_dir)
    timings["pretrain"] = time.perf_counter() - t
    log(f"pretrain: {timings['pretrain']:.1f} s (loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f})")
    return base_dir, summary


# --------------------------------------------------------------------------- 3. extension, 4. evaluation

def finetune(name: str, argv: list[str], out_dir: Path, reuse: bool = False) -> tuple[dict, bool]:
    """(summary, cached): one train.py run in this process with these flags, its output in out_dir; with reuse,
    the summary of the finished run already there instead."""
    done = out_dir / "done.json"
    if reuse and done.is_file():
        return json.loads(done.read_text()), True
    argv = [*argv, "--out", str(out_dir), "--overwrite"]
    log(f"train {name}: python train.py {' '.join(argv)}")
    s = train.main(argv)
    summary = {k: s[k] for k in ("output", "first_loss", "last_loss", "tokens_per_s", "seconds", "steps")}
    benchlib.write_json(done, summary)
    return summary, False


def load_variant(base_dir: Path, output: Path | None, ev: dict):
    """A model for evaluation (fp32, eval mode): the base, with the LoRA adapter a training run saved in output
    (or the whole model a full fine-tuning saved there), RoPE factor ev["rope_factor"] at every length, and
    ev's attention ("full" unless given; S²-Attn: groups of 1/4 of the window, segment shift) in every forward."""
    whole = output is not None and (output / "config.json").is_file()
    model, _ = generate.load_model(output if whole else base_dir, None if whole else output, ev["quant"],
                                     torch.float32, rope_factor=ev["rope_factor"])
    model.set_attention(ev.get("attn", "full"))
    return model

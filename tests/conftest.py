"""Shared test fixtures: tiny random LLaMA checkpoints saved as real HF-format directories.

Every parity test builds its reference with HF transformers (test-only dependency), saves it with
`save_pretrained` (sharded safetensors + index) and a real sentencepiece `tokenizer.model`, and then
loads the directory with our own code.
"""
import glob
import io
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra import PG19_MINI  # noqa: E402  (the sample shipped in the repository: nothing outside it is read)

TOKENIZER_VOCAB = 512


def tiny_config(**overrides) -> dict:
    """A LLaMA-2-shaped config small enough for CPU tests (vocab matches the test tokenizer)."""
    cfg = dict(
        vocab_size=TOKENIZER_VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    return cfg


_SP_MODEL = None


def sentencepiece_model() -> bytes:
    """A BPE tokenizer with LLaMA's special ids (unk 0, bos 1, eos 2, byte fallback), trained once per session."""
    global _SP_MODEL
    if _SP_MODEL is None:
        import sentencepiece as spm

        files = sorted(glob.glob(str(PG19_MINI / "train" / "*.txt")))[:3]
        lines = [line for f in files for line in open(f, encoding="utf-8") if line.strip()]
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=TOKENIZER_VOCAB,
            model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=0.9995, minloglevel=2,
        )
        _SP_MODEL = buf.getvalue()
    return _SP_MODEL


def make_hf_checkpoint(path, seed=0, max_shard_size="200KB", dtype=torch.float32, **overrides) -> Path:
    """Save a random transformers LlamaForCausalLM (sharded safetensors) + tokenizer.model into `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**tiny_config(**overrides))
    model = LlamaForCausalLM(cfg).to(dtype)
    # HF initialises norms to 1; random norms make the parity test see the norm weights too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    (path / "tokenizer.model").write_bytes(sentencepiece_model())
    return path


def hf_model(path, dtype=torch.float32, **config_overrides):
    """Load `path` with HF transformers as the reference implementation."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype, **config_overrides)
    return model.eval()


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def tiny_ckpt(tmp_path):
    return make_hf_checkpoint(tmp_path / "tiny")


def smoke_on_one_thread(main, *argv):
    """A bench script's --smoke run in this process on one thread (a tiny model gains nothing from two, and loses
    a lot on a busy machine), leaving torch's thread count as it was."""
    threads = torch.get_num_threads()
    try:
        return main(["--smoke", "--threads", "1", *argv])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pg19(tmp_path_factory):
    """A PG19-layout folder with the first 20k characters of three train books and one validation book."""
    root = tmp_path_factory.mktemp("pg19-tiny")
    for split, names in (("train", sorted((PG19_MINI / "train").glob("*.txt"))[:3]),
                         ("validation", sorted((PG19_MINI / "validation").glob("*.txt"))[:1])):
        (root / split).mkdir()
        for f in names:
            (root / split / f.name).write_text(f.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return root

"""generate.py: KV-cache decoding against full recomputation and HF generate, sampling, streaming, chat, CLI."""
import io
import types

import pytest
import torch
from conftest import hf_model, make_hf_checkpoint

from infra import cli
import data
from infra import sources
import generate as gen


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # GQA so that the cache stores fewer kv heads than there are query heads.
    return make_hf_checkpoint(tmp_path_factory.mktemp("gen") / "tiny", num_key_value_heads=2,
                              max_position_embeddings=512)


def prompt(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=g).tolist()


def greedy_by_recomputation(model, ids, n):
    """The definition: at every step, run the whole sequence again and take the argmax of the last logits."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("factor", [None, 2.0], ids=["plain", "PI2"])
def test_kv_cache_greedy_equals_full_recomputation(ckpt, factor):
    model = gen.load_model(ckpt, dtype=torch.float32, rope_factor=factor)[0]
    p = prompt()
    ours = gen.generate(model, None, p, 40)          # tokenizer None: no EOS stop
    assert len(ours) == 40
    assert p + ours == greedy_by_recomputation(model, p, 40)


def test_greedy_equals_hf_generate(ckpt):
    model = gen.load_model(ckpt, dtype=torch.float32)[0]
    tok = sources.load_tokenizer(ckpt)
    p = prompt(seed=3)
    ours = gen.generate(model, tok, p, 30)
    ref = hf_model(ckpt).generate(torch.tensor([p]), max_new_tokens=30, do_sample=False)[0, len(p):].tolist()
    if tok.eos_id in ref:                             # HF keeps the EOS it stops at; we do not return it
        ref = ref[:ref.index(tok.eos_id)]
    assert ours == ref


def test_stops_at_eos(ckpt):
    model = gen.load_model(ckpt, dtype=torch.float32)[0]
    with torch.no_grad():
        model.norm.weight.zero_()                     # all logits 0: the argmax is token 0
    assert gen.generate(model, None, prompt(), 5) == [0] * 5
    assert gen.generate(model, types.SimpleNamespace(eos_id=0), prompt(), 5) == []


def test_next_token_greedy_and_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    assert gen.next_token(logits, temperature=0) == 1
    g = torch.Generator().manual_seed(0)
    draws = [gen.next_token(logits, temperature=1.0, top_p=0.7, generator=g) for _ in range(2000)]
    # the nucleus of mass 0.7 is {1 (0.5), 3 (0.3)}; renormalised 0.625 / 0.375
    assert set(draws) == {1, 3}
    assert abs(draws.count(1) / 2000 - 0.625) < 0.04
    draws = [gen.next_token(logits, temperature=1.0, top_p=1.0, generator=g) for _ in range(2000)]
    assert set(draws) == {0, 1, 2, 3}
    assert gen.next_token(logits, temperature=1.0, top_p=1e-6, generator=g) == 1


def test_sampling_is_reproducible_with_a_seed(ckpt):
    model = gen.load_model(ckpt, dtype=torch.float32)[0]
    a = gen.generate(model, None, prompt(), 20, temperature=1.0, top_p=0.9, seed=7)
    b = gen.generate(model, None, prompt(), 20, temperature=1.0, top_p=0.9, seed=7)
    c = gen.generate(model, None, prompt(), 20, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


def test_text_stream_concatenates_to_the_decoded_text(ckpt):
    tok = sources.load_tokenizer(ckpt)
    p = tok.encode("Once upon a time", bos=True)
    generated = tok.encode("there was a cafe named Zoë — 日本 — and it sold tea.", bos=False)
    stream = gen.TextStream(tok, p)
    pieces = [stream.push(t) for t in generated]
    assert "".join(pieces) == stream.text() == tok.decode(p[-1:] + generated)[len(tok.decode(p[-1:])):]
    assert stream.text().startswith(" there")                 # the leading space of the first word is kept
    assert not any("\ufffd" in piece for piece in pieces)     # byte-fallback characters come out whole
    assert any(piece == "" for piece in pieces)               # ... so some tokens print nothing yet


def test_chat_keeps_the_history(ckpt):
    model = gen.load_model(ckpt, dtype=torch.float32)[0]
    tok = sources.load_tokenizer(ckpt)
    args = types.SimpleNamespace(max_new_tokens=6, temperature=0.0, top_p=1.0, seed=None, template="vicuna")
    seen = []
    real = gen.generate

    def spy(model_, tok_, ids, *a, **k):
        seen.append(list(ids))
        return real(model_, tok_, ids, *a, **k)

    out = io.StringIO()
    try:
        gen.generate = spy
        lines = ["Hello there", "", "How are you?", "/reset", "Again", "/exit", "never read"]
        history = gen.chat_loop(model, tok, args, lines, out=out)
    finally:
        gen.generate = real
    assert [h[0] for h in history] == ["Again"]               # /reset dropped the first two turns
    assert len(seen) == 3 and out.getvalue().count("ASSISTANT: ") == 3
    # second prompt = first prompt + first answer + EOS + the new turn; the third starts afresh
    first_answer = tok.decode(real(model, tok, seen[0], 6)).strip()
    assert seen[1] == data.chat_prompt_ids(tok, [("Hello there", first_answer)], "How are you?")
    assert seen[1][:len(seen[0])] == seen[0]
    assert seen[2] == data.chat_prompt_ids(tok, [], "Again")


def test_cli_continuation_and_chat(ckpt, capsys, monkeypatch, tmp_path):
    code = cli.run(gen.main, ["--model", str(ckpt), "--prompt", "To be or not", "--max-new-tokens", "8", "--temperature", "0",
                     "--dtype", "fp32"])
    out, err = capsys.readouterr()
    assert code == 0, err
    model = gen.load_model(ckpt, dtype=torch.float32)[0]
    tok = sources.load_tokenizer(ckpt)
    p = tok.encode("To be or not", bos=True)
    expected = gen.generate(model, tok, p, 8)
    stream = gen.TextStream(tok, p)
    for t in expected:
        stream.push(t)
    assert out == stream.text() + "\n"

    (tmp_path / "p.txt").write_text("To be or not")
    assert cli.run(gen.main, ["--model", str(ckpt), "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens", "8",
                     "--temperature", "0", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out == out

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhow are you\n"))
    assert cli.run(gen.main, ["--model", str(ckpt), "--chat", "--max-new-tokens", "4", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.count("ASSISTANT: ") == 2


def test_cli_errors(ckpt, tmp_path, capsys):
    assert cli.run(gen.main, ["--model", str(ckpt), "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.txt" in err
    assert cli.run(gen.main, ["--model", str(ckpt), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
    assert cli.run(gen.main, ["--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "tokenizer.model" in capsys.readouterr().err


def test_chat_uses_the_template_the_adapter_was_trained_with(ckpt, tmp_path, monkeypatch, capsys):
    import lora
    from infra.adapter import save_adapter

    model, _ = gen.load_model(ckpt, dtype=torch.float32)
    lora.add_lora(model, r=4, alpha=8)
    save_adapter(model, tmp_path / "sft", training={"rope_scaling": None, "ctx": 128, "template": "longqlora"})
    seen = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda m, t, ids, *a, **k: seen.append(list(ids)) or real(m, t, ids, *a, **k))
    tok = sources.load_tokenizer(ckpt)
    for extra, template in (([], "longqlora"), (["--template", "vicuna"], "vicuna")):
        assert cli.run(gen.main, ["--model", str(ckpt), "--adapter", str(tmp_path / "sft"), "--chat", "--prompt",
                                  "Who is Hamlet?", "--max-new-tokens", "2", "--dtype", "fp32", *extra]) == 0
        assert seen[-1] == data.chat_prompt_ids(tok, [], "Who is Hamlet?", template)
    assert seen[0] != seen[1]


def test_keep_last_keeps_the_end_of_a_prompt_longer_than_the_context(ckpt, tmp_path, monkeypatch, capsys):
    book = "To be, or not to be, that is the question. " * 200
    (tmp_path / "book.txt").write_text(book)
    tok = sources.load_tokenizer(ckpt)
    ids = tok.encode(book, bos=True)
    assert len(ids) > 512                                       # the checkpoint's usable context
    base = ["--model", str(ckpt), "--prompt-file", str(tmp_path / "book.txt"), "--max-new-tokens", "4",
            "--temperature", "0", "--dtype", "fp32"]
    assert cli.run(gen.main, base) == 2
    err = capsys.readouterr().err
    assert f"the prompt has {len(ids)} tokens" in err and "--keep-last 507" in err
    seen, real = [], gen.generate
    monkeypatch.setattr(gen, "generate", lambda model, tok, prompt, *a, **k: seen.append(prompt) or real(
        model, tok, prompt, *a, **k))
    assert cli.run(gen.main, base + ["--keep-last", "100"]) == 0
    assert seen == [ids[:1] + ids[-100:]]
    assert cli.run(gen.main, base + ["--keep-last", "0"]) == 2
    assert cli.run(gen.main, base + ["--keep-last", "100", "--chat"]) == 2     # chat drops its oldest turns itself
    assert "--keep-last" in capsys.readouterr().err


def test_token_ids_outside_the_vocabulary_and_unsampleable_logits_are_clear_errors(tmp_path):
    import eval as ev
    small = gen.load_model(make_hf_checkpoint(tmp_path / "small", vocab_size=100), dtype=torch.float32)[0]
    tok = sources.load_tokenizer(tmp_path / "small")                # the tokenizer has more ids than the model
    with pytest.raises(ValueError, match="token id 300 of the prompt is outside the model's vocabulary of 100"):
        gen.generate(small, None, [1, 5, 300], 3)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        gen.generate(small, None, [1, 5], 3, temperature=0.7, top_p=0)     # never a silent greedy decode
    with pytest.raises(ValueError, match="outside the model's vocabulary of 100 ids"):
        ev.evaluate_passkey(small, tok, 200, trials=1, progress=False)
    args = types.SimpleNamespace(template="vicuna", max_new_tokens=2, temperature=0.0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        gen.chat_loop(small, tok, args, ["Who is Hamlet?"], io.StringIO())
    logits = torch.randn(50)
    with pytest.raises(ValueError, match="temperature too small"):
        gen.next_token(logits * 1e3, temperature=1e-310)
    with pytest.raises(ValueError, match="NaN in the model's weights"):
        gen.next_token(torch.full((50,), float("nan")), temperature=0.7)
    assert 0 <= gen.next_token(logits, temperature=1e-3) < 50       # a small temperature that works

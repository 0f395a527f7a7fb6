"""Inference: load a trained model (base + adapter + the RoPE factor it was trained with) and decode with a KV cache.

Decoding, one token at a time after one forward pass over the prompt (the "prefill"):

    h = model(prompt, cache)            # fills the KV cache with the prompt's keys/values
    repeat: p = softmax(W_head h_last / temperature), restricted to the top-p nucleus
            x = argmax p (temperature 0) or a sample of p;  h = model(x, cache)

Only the last position's logits are computed (an 8k prompt never makes an (8k x vocab) tensor). With the KV
cache, which grows as tokens arrive, a new token costs one position, and greedy decoding gives exactly the tokens
of recomputing the whole forward at every step. Generation stops at the usable context (max_position_embeddings
x PI factor); a longer prompt is refused, or cut to its last tokens with --keep-last.

Top-p (nucleus) sampling: sort the probabilities in decreasing order and keep the smallest prefix whose mass
reaches top_p (the most likely token is always kept), renormalise, sample.

RoPE scales as in training, at every length (infra/rope_scaling.py); chat uses the adapter's template or --template.

    python generate.py --model DIR --prompt "It was a dark and stormy night"
    python generate.py --model DIR --adapter ADAPTER --prompt-file book.txt --max-new-tokens 200
    python generate.py --model DIR --adapter ADAPTER --chat    # interactive; one line per turn, /reset, /exit
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from infra import cli

# torch and the modules that import it load on first use, not here: --help and bad flags answer at once.
torch, F, data, hf, sources, adapter_files, rope_scaling = map(cli.LazyModule, (
    "torch", "torch.nn.functional", "data", "infra.hf", "infra.sources", "infra.adapter", "infra.rope_scaling"))


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.one_line_errors(argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n")[0],
                                                    formatter_class=cli.DefaultsHelp))
    cli.add_inference_flags(p)
    p.add_argument("--prompt", default=None, help="text to continue (with --chat: one user message)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from a UTF-8 file (long prompts)")
    p.add_argument("--keep-last", type=int, default=None, help="keep BOS + the prompt's last N tokens (default: all)")
    p.add_argument("--chat", action="store_true", help="chat; user turns from stdin unless --prompt/--prompt-file")
    p.add_argument("--template", choices=("longqlora", "vicuna"), help="(default: the adapter's template, else vicuna)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="stops earlier at EOS or the usable context")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: keep the top tokens of this mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, a different sample each run)")
    args = p.parse_args(argv)
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    if args.prompt is None and args.prompt_file is None and not args.chat:
        raise ValueError("give --prompt, --prompt-file or --chat")
    if args.keep_last is not None and args.chat:
        raise ValueError("--keep-last cuts a plain prompt; --chat drops the oldest turns itself")
    cli.check_range("--max-new-tokens", args.max_new_tokens, 1)
    cli.check_range("--temperature", args.temperature, 0)
    cli.check_range("--top-p", args.top_p, 0, 1, open_low=True)
    if args.keep_last is not None:
        cli.check_range("--keep-last", args.keep_last, 1)
    return args


class KVCache:
    """Keys and values of every layer for incremental decoding. The storage doubles when full, so a long
    generation limit costs memory only for the tokens actually generated."""

    def __init__(self, args, batch_size: int, dtype=None, device="cpu", capacity: int = 256):
        shape, dtype = (args.n_layers, batch_size, args.n_kv_heads, capacity, args.head_dim), dtype or torch.float32
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0     # positions already stored; advanced by Transformer.hidden_states after all layers

    def update(self, layer: int, k, v):
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            more = max(end, 2 * self.k.shape[3]) - self.k.shape[3]
            self.k, self.v = F.pad(self.k, (0, 0, 0, more)), F.pad(self.v, (0, 0, 0, more))
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def load_model(model_dir, adapter=None, quant: str = "none", dtype=None, rope_factor=None, device="cpu"):
    """(model in eval mode, where its RoPE scaling came from): an HF LLaMA folder, optionally NF4 (QLoRA's frozen
    base), with a PEFT LoRA adapter unmerged on top (as in training), RoPE scaling by rope_scaling.inference_scaling."""
    model = hf.load_model(model_dir, dtype=dtype or torch.float32, device=device,
                          quantize=None if quant == "none" else quant)
    training = None
    if adapter is not None:
        adapter_files.load_adapter(model, adapter)
        training = model.lora_config["training"]
    model.args.rope_scaling, source = rope_scaling.inference_scaling(rope_factor, model.args.rope_scaling, adapter,
                                                                     training)
    return model.requires_grad_(False).eval(), source


def max_length(model) -> int:
    """The longest sequence (prompt + generated) the model was made for: PI and dynamic NTK stretch
    max_position_embeddings by their factor (HF keeps the original length in the config); llama3 and yarn configs
    state the extended one."""
    scaling, length = model.args.rope_scaling, model.args.max_position_embeddings
    stretched = scaling is not None and scaling["rope_type"] in ("linear", "dynamic")
    return int(length * scaling["factor"]) if stretched else length


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> int:
    """Pick the next token from 1-D logits: greedy when temperature <= 0, else nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not torch.isfinite(probs).all():     # NaN in the model, or logits / temperature overflowing
        raise ValueError(f"cannot sample: the logits / temperature {temperature:g} are not finite numbers "
                         f"(NaN in the model's weights, or a temperature too small: 0 means greedy)")
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token if the mass before it is still below top_p; the first token always stays.
        sorted_probs = sorted_probs * ((torch.cumsum(sorted_probs, 0) - sorted_probs) < top_p)
        return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model, tokenizer, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, on_token=None, limit: int | None = None) -> list[int]:
    """Up to max_new_tokens after prompt_ids, stopping at the tokenizer's EOS (not returned; never when tokenizer
    is None) or when prompt + output reach `limit` tokens. on_token(id) gets each new token at once (streaming)."""
    if not 0 < top_p <= 1:       # callers from Python too: top_p 0 would silently decode greedily
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if bad := [i for i in prompt_ids if not 0 <= i < model.args.vocab_size]:
        raise ValueError(f"token id {bad[0]} of the prompt is outside the model's vocabulary of "
                         f"{model.args.vocab_size} ids (a tokenizer of another model?)")
    if limit is not None and len(prompt_ids) >= limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's usable context is {limit} "
                         f"(--keep-last {max(1, limit - 1 - max_new_tokens)} keeps the end of a longer prompt)")
    steps = max_new_tokens if limit is None else min(max_new_tokens, limit - len(prompt_ids))
    device = model.embed_tokens.weight.device
    eos = None if tokenizer is None or tokenizer.eos_id < 0 else tokenizer.eos_id
    generator = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
    out = []
    with torch.inference_mode():
        cache = KVCache(model.args, 1, model.embed_tokens.weight.dtype, device, len(prompt_ids) + min(steps, 256))
        step_input = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        for _ in range(steps):
            hidden = model.hidden_states(step_input, cache=cache)
            token = next_token(model.lm_head(hidden[0, -1]).float().cpu(), temperature, top_p, generator)
            if token == eos:
                break
            out.append(token)
            if on_token is not None:
                on_token(token)
            step_input = torch.tensor([[token]], dtype=torch.long, device=device)
    return out


class TextStream:
    """Turns generated ids into text increments for printing as they arrive. Sentencepiece text is only well
    defined for a whole sequence (a word's leading space belongs to its first piece, a multi-byte character can
    span byte-fallback tokens), so every step decodes `anchor + generated` and emits what is new; the anchor (the
    prompt's last token) keeps the first word's leading space, and text ending in an incomplete character
    (U+FFFD) is held back until the next token completes it."""

    def __init__(self, tokenizer, prompt_ids):
        self.tokenizer, self.anchor = tokenizer, list(prompt_ids[-1:])
        self.skip = len(tokenizer.decode(self.anchor))
        self.ids, self.emitted = [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self.flush(hold_incomplete=True)

    def flush(self, hold_incomplete: bool = False) -> str:
        """The text not emitted yet; at the end, also an incomplete character the model never completed."""
        text = self.text()
        if hold_incomplete and text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def text(self) -> str:
        return self.tokenizer.decode(self.anchor + self.ids)[self.skip:]


def respond(model, tokenizer, prompt_ids, args, out) -> list[int]:
    """Generate an answer to prompt_ids, printing its text to `out` as it is produced."""
    stream = TextStream(tokenizer, prompt_ids)
    ids = generate(model, tokenizer, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                   on_token=lambda token: print(stream.push(token), end="", file=out, flush=True),
                   limit=max_length(model))
    print(stream.flush(), file=out, flush=True)
    return ids


def chat_loop(model, tokenizer, args, lines, out):
    """Multi-turn chat: each line of `lines` is a user turn, the answers go to `out`; /reset forgets the history,
    /exit ends. When the conversation outgrows the usable context, its oldest turns are dropped (with a note)."""
    history, limit = [], max_length(model)
    for line in lines:
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            history = []
            continue
        while len(prompt := data.chat_prompt_ids(tokenizer, history, message, args.template)) >= limit and history:
            history.pop(0)
            print(f"[the conversation outgrew {limit} tokens: oldest turn dropped]", file=sys.stderr)
        out.write("ASSISTANT: ")
        history.append((message, tokenizer.decode(respond(model, tokenizer, prompt, args, out)).strip()))
    return history


def main(argv=None) -> None:
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    cli.set_threads(args.threads)
    text = args.prompt
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: prompt file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    device = cli.device(args.device)
    tokenizer = sources.load_tokenizer(args.model)
    model, source = load_model(args.model, args.adapter, args.quant, cli.compute_dtype(args.dtype, device),
                               args.rope_factor, device)
    training = (getattr(model, "lora_config", None) or {}).get("training") or {}
    args.template = args.template or training.get("template") or "vicuna"
    print(f"[RoPE factor {rope_scaling.describe_scaling(model.args.rope_scaling)} from {source}; usable context "
          f"{max_length(model)} tokens]", file=sys.stderr)
    if text is None:
        with contextlib.suppress(EOFError):     # user turns are typed on stdin until EOF (Ctrl-D)
            chat_loop(model, tokenizer, args, iter(lambda: input("USER: " if sys.stdin.isatty() else ""), None),
                      sys.stdout)
    elif args.chat:
        respond(model, tokenizer, data.chat_prompt_ids(tokenizer, [], text, args.template), args, sys.stdout)
    else:
        ids = tokenizer.encode(text, bos=True)
        if args.keep_last is not None and len(ids) > 1 + args.keep_last:
            ids = ids[:1] + ids[-args.keep_last:]
        respond(model, tokenizer, ids, args, sys.stdout)


if __name__ == "__main__":
    sys.exit(cli.run(main, cli.parse_or_exit(parse_args)))

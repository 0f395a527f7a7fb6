"""Text generation with a KV cache: continuation of a (long) prompt, and Vicuna v1.1 chat.

Decoding, one token at a time after one forward pass over the prompt (the "prefill"):

    h = model(prompt, cache)            # fills the KV cache with the prompt's keys/values
    repeat: p = softmax(W_head h_last / temperature), restricted to the top-p nucleus
            x = argmax p (temperature 0) or a sample of p;  h = model(x, cache)

Only the last position's logits are computed (from the final hidden state), so an 8k-token prompt never
produces an (8k x vocab) logits tensor. The KV cache makes each new token cost one position instead of
re-reading the whole sequence; greedy decoding with it gives exactly the tokens that recomputing the full
forward at every step gives (tests/test_generate.py).

Top-p (nucleus) sampling: sort the probabilities in decreasing order and keep the smallest prefix whose mass
reaches top_p (the most likely token is always kept), renormalise, sample.

Chat uses the Vicuna v1.1 template of the SFT data (data.chat_prompt_ids): the whole history is re-encoded
every turn, so the RoPE scaling can follow the conversation's length.

    python generate.py --model DIR --prompt "It was a dark and stormy night"
    python generate.py --model DIR --adapter ADAPTER --prompt-file book.txt --max-new-tokens 200
    python generate.py --model DIR --chat                   # interactive; one line per turn, /reset, /exit
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from model import KVCache


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> int:
    """Pick the next token from 1-D logits: greedy when temperature <= 0, else nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token if the mass before it is still below top_p; the first token always stays.
        keep = (torch.cumsum(sorted_probs, 0) - sorted_probs) < top_p
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model, tokenizer, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, on_token=None) -> list[int]:
    """Generate up to max_new_tokens after prompt_ids with the KV cache; stops after the tokenizer's EOS
    (not returned). on_token(id) is called for every new token as soon as it exists (streaming).
    tokenizer may be None: then generation never stops early."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 1:
        return []
    device = model.embed_tokens.weight.device
    eos = None if tokenizer is None or tokenizer.eos_id < 0 else tokenizer.eos_id
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    cache = KVCache(model.args, 1, len(prompt_ids) + max_new_tokens, model.embed_tokens.weight.dtype, device)
    step_input = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = []
    for _ in range(max_new_tokens):
        hidden = model(step_input, cache=cache, return_hidden=True)
        logits = model.lm_head(hidden[0, -1]).float().cpu()
        token = next_token(logits, temperature, top_p, generator)
        if token == eos:
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
        step_input = torch.tensor([[token]], dtype=torch.long, device=device)
    return out


class TextStream:
    """Turns generated ids into text increments for printing as they arrive.

    Sentencepiece text is only well defined for a whole sequence (a word's leading space belongs to its first
    piece, a multi-byte character can span byte-fallback tokens), so every step decodes `anchor + generated`
    and emits what is new; the anchor (the prompt's last token) keeps the first word's leading space, and text
    ending in an incomplete character (U+FFFD) is held back until the next token completes it."""

    def __init__(self, tokenizer, prompt_ids):
        self.tokenizer = tokenizer
        self.anchor = list(prompt_ids[-1:])
        self.skip = len(tokenizer.decode(self.anchor))
        self.ids, self.emitted = [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.anchor + self.ids)[self.skip:]
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        """What is still held back (an incomplete character the model never completed)."""
        text = self.text()
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def text(self) -> str:
        return self.tokenizer.decode(self.anchor + self.ids)[self.skip:]


def respond(model, tokenizer, prompt_ids, args, scaling_for, out=None) -> list[int]:
    """Generate an answer to prompt_ids, printing its text to `out` (stdout) as it is produced."""
    out = sys.stdout if out is None else out
    model.args.rope_scaling = scaling_for(len(prompt_ids) + args.max_new_tokens)
    stream = TextStream(tokenizer, prompt_ids)

    def on_token(token_id):
        piece = stream.push(token_id)
        if piece:
            out.write(piece)
            out.flush()

    ids = generate(model, tokenizer, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                   on_token=on_token)
    out.write(stream.flush() + "\n")
    out.flush()
    return ids


def chat_loop(model, tokenizer, args, scaling_for, lines, out=None):
    """Multi-turn chat: each line of `lines` is a user turn; /reset forgets the history, /exit ends."""
    from data import chat_prompt_ids

    out = sys.stdout if out is None else out
    history = []
    for line in lines:
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            history = []
            continue
        prompt = chat_prompt_ids(tokenizer, history, message)
        out.write("ASSISTANT: ")
        answer = respond(model, tokenizer, prompt, args, scaling_for, out)
        history.append((message, tokenizer.decode(answer).strip()))
    return history


def stdin_lines(prompt: str):
    """Lines typed by the user (with a prompt on a terminal), until EOF."""
    while True:
        try:
            yield input(prompt if sys.stdin.isatty() else "")
        except EOFError:
            return


def main(argv=None) -> int:
    from data import chat_prompt_ids, load_tokenizer, one_line_errors
    from eval import DTYPES, load_model, rope_rule

    p = one_line_errors(argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n")[0]))
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None)
    p.add_argument("--rope-factor", type=float, default=None,
                   help="linear PI factor (1 = plain RoPE); default as in eval.py, with the prompt plus "
                        "--max-new-tokens as the length")
    p.add_argument("--quant", choices=("none", "nf4"), default="none")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt", default=None, help="text to continue (with --chat: one user message)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from a file (long prompts)")
    p.add_argument("--chat", action="store_true",
                   help="Vicuna v1.1 chat; without --prompt/--prompt-file, user turns are read from stdin")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    try:
        if args.prompt is not None and args.prompt_file is not None:
            raise ValueError("give --prompt or --prompt-file, not both")
        text = args.prompt
        if args.prompt_file is not None:
            path = Path(args.prompt_file)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: prompt file not found")
            text = path.read_text(encoding="utf-8")
        if text is None and not args.chat:
            raise ValueError("give --prompt, --prompt-file or --chat")
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
        if args.temperature < 0 or not math.isfinite(args.temperature):
            raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
        if not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, args.adapter, args.quant, DTYPES[args.dtype], device=args.device)
        scaling_for = rope_rule(model.args, args.rope_factor, args.adapter)
        if text is not None and args.chat:
            respond(model, tokenizer, chat_prompt_ids(tokenizer, [], text), args, scaling_for)
        elif text is not None:
            respond(model, tokenizer, tokenizer.encode(text, bos=True), args, scaling_for)
        else:
            chat_loop(model, tokenizer, args, scaling_for, stdin_lines("USER: "))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

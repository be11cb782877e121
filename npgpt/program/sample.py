"""Generate text from a trained checkpoint, printed as it is generated.

    python -m npgpt.sample --out-dir out --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 \\
        --top-k 50 --top-p 0.95 --seed 1
    python -m npgpt.sample --from-pretrained ~/gpt2 --prompt "Hello, I'm a language model,"   # GPT-2 (HF)

--temperature 0 is greedy decoding. Generation uses a KV cache (--no-cache recomputes the whole context per
token, for comparison); contexts longer than the model's max_seq_len slide. Each token is printed as soon as
it is drawn; Ctrl-C stops at once, keeping what was printed, and exits with 130.

Shapes: the prompt as ids (1, T), extended one token at a time.

Next to read: ``npgpt/program/viz.py`` and ``python -m npgpt.proof``, the windows onto the engine.
"""

import math
import os
import sys
import time

import numpy as np

from .. import backend
from .checkpoint import CheckpointError, load_checkpoint, restore_model
from .cli import out_dir_problem, run_command, silence_stdout
from .config import OneLineParser, parse_int
from ..generate import generate_tokens
from ..model import GPT
from .tokenizer import TokenizerError, tokenizer_from_dict
from .hf import load_pretrained


def build_parser():
    p = OneLineParser(description="Generate text from an npgpt checkpoint.")
    p.add_argument("--out-dir", default="out", help="directory holding the checkpoint (default: out)")
    p.add_argument("--checkpoint", default="best.npz",
                   help="file in --out-dir to load: best.npz (lowest validation loss) or ckpt.npz (latest)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=parse_int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; 0 is greedy decoding (default: 0.8)")
    p.add_argument("--top-k", type=parse_int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the smallest set of tokens whose probability reaches p (nucleus)")
    p.add_argument("--num-samples", type=parse_int, default=1, help="independent samples to print (default: 1)")
    p.add_argument("--seed", type=parse_int, default=1, help="seed of the sampling generator (default: 1)")
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument("--from-pretrained", metavar="DIR", default="",
                   help="sample from a Hugging Face GPT-2 directory (config.json, model.safetensors, vocab.json + "
                        "merges.txt or tokenizer.json) instead of --out-dir")
    return p


def check_args(args):
    """The flags' ranges and paths, before a checkpoint is read (ValueError names the flag)."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1 (leave it out for no top-k filter), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must not be negative, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
    if not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed must lie in [0, 2**63), got {args.seed}")
    if args.from_pretrained and os.path.isfile(args.from_pretrained):
        raise ValueError(f"--from-pretrained {args.from_pretrained} is a file, not a directory; it takes a Hugging "
                         "Face GPT-2 directory (config.json, model.safetensors and the tokenizer's files)")
    problem = None if args.from_pretrained else out_dir_problem(args.out_dir)
    if problem:
        raise ValueError(problem)


class TextStream:
    """Decode ids to text as they come, holding back a token that ends inside a UTF-8 character.

    A byte-level BPE token can end partway through a character (decoded alone it shows U+FFFD); such ids wait
    until the character completes, at most 4 tokens (a UTF-8 character is at most 4 bytes).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = []

    def push(self, token_id):
        self.pending.append(int(token_id))
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        return text

    def flush(self):
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def load_model(path):
    """(model, tokenizer) from a checkpoint, every part of it checked first (load_checkpoint)."""
    arrays, meta = load_checkpoint(path)
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    model = GPT(**meta["model_config"])
    if np.dtype(meta["config"]["dtype"]) != np.float32:
        model.to(np.dtype(meta["config"]["dtype"]))
    restore_model(model, arrays, path)
    return model, tokenizer


def main(argv=None):
    args = build_parser().parse_args(argv)
    generated = 0
    try:
        check_args(args)
        backend.set_device(args.device)
        path = args.checkpoint if os.path.dirname(args.checkpoint) else os.path.join(args.out_dir, args.checkpoint)
        if not os.path.exists(path) and args.checkpoint == "best.npz":
            path = os.path.join(args.out_dir, "ckpt.npz")     # a run stopped before its first evaluation
        model, tokenizer = load_pretrained(args.from_pretrained) if args.from_pretrained else load_model(path)
        try:
            prompt = tokenizer.encode(args.prompt)
        except TokenizerError as exc:
            raise ValueError(f"--prompt: {exc}; remove it from the prompt") from None
        if len(prompt) == 0:
            raise ValueError("the prompt is empty after tokenization; give --prompt some text")
        rng = np.random.default_rng(args.seed)
        for i in range(args.num_samples):
            if i:
                print("-" * 60)
            tokens = generate_tokens(model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                                     args.top_p, rng, use_cache=not args.no_cache)
            started = time.perf_counter()
            stream = TextStream(tokenizer)
            sys.stdout.write(tokenizer.decode(prompt))
            sys.stdout.flush()
            generated = 0
            for next_ids in tokens:
                sys.stdout.write(stream.push(next_ids[0]))
                sys.stdout.flush()
                generated += 1
            sys.stdout.write(stream.flush() + "\n")
            sys.stdout.flush()
            elapsed = time.perf_counter() - started
            print(f"[{generated} tokens in {elapsed:.2f}s, {generated / max(elapsed, 1e-9):.1f} tok/s]",
                  file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"interrupted after {generated} new tokens", file=sys.stderr)
        return 130
    except BrokenPipeError:                 # the reader of stdout went away (a pipe into head): stop quietly
        silence_stdout()
        return 0
    except (CheckpointError, TokenizerError, ValueError, backend.DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:                  # a checkpoint unreadable
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run_command(main)

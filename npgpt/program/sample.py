"""Generate text from a trained checkpoint.

    python -m npgpt.sample --out-dir out --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 \\
        --top-k 50 --top-p 0.95 --seed 1

--temperature 0 is greedy decoding. Generation uses a KV cache (--no-cache recomputes the whole context per
token, for comparison); contexts longer than the model's max_seq_len slide.

Shapes: the prompt as ids (1, T), extended one token at a time.

Next to read: ``npgpt/viz.py`` and ``python -m npgpt.gradcheck``, the windows onto the engine.
"""

import argparse
import os
import sys
import time

import numpy as np

from .. import backend
from .checkpoint import CheckpointError, load_checkpoint, restore_model
from ..generate import generate
from ..model import GPT
from .tokenizer import TokenizerError, tokenizer_from_dict


def build_parser():
    p = argparse.ArgumentParser(description="Generate text from an npgpt checkpoint.")
    p.add_argument("--out-dir", default="out", help="directory holding the checkpoint (default: out)")
    p.add_argument("--checkpoint", default="best.npz",
                   help="file in --out-dir to load: best.npz (lowest validation loss) or ckpt.npz (latest)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; 0 is greedy decoding (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the smallest set of tokens whose probability reaches p (nucleus)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to print (default: 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the sampling generator (default: 1)")
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.temperature < 0 or args.max_new_tokens < 0:
            raise ValueError("--temperature and --max-new-tokens must not be negative")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
        backend.set_device(args.device)
        path = args.checkpoint if os.path.dirname(args.checkpoint) else os.path.join(args.out_dir, args.checkpoint)
        if not os.path.exists(path) and args.checkpoint == "best.npz":
            path = os.path.join(args.out_dir, "ckpt.npz")     # a run stopped before its first evaluation
        arrays, meta = load_checkpoint(path)
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        model = GPT(**meta["model_config"])
        if np.dtype(meta["config"]["dtype"]) != np.float32:
            model.to(np.dtype(meta["config"]["dtype"]))
        restore_model(model, arrays, path)
        prompt = tokenizer.encode(args.prompt)
        if len(prompt) == 0:
            raise ValueError("the prompt is empty after tokenization; give --prompt some text")
        rng = np.random.default_rng(args.seed)
        for i in range(args.num_samples):
            started = time.perf_counter()
            out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, rng,
                           use_cache=not args.no_cache)
            elapsed = time.perf_counter() - started
            if i:
                print("-" * 60)
            print(tokenizer.decode(out[0]), flush=True)
            print(f"[{args.max_new_tokens} tokens in {elapsed:.2f}s, "
                  f"{args.max_new_tokens / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
        return 0
    except (CheckpointError, TokenizerError, ValueError, backend.DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

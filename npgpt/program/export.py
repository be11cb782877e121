"""Write a trained run as a Hugging Face GPT-2 directory, which transformers and tokenizers load.

    python -m npgpt.export --out-dir out --to out/hf              # best.npz -> out/hf
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('out/hf')"

Writes config.json and model.safetensors (npgpt/program/hf.py) and, for a BPE run, vocab.json, merges.txt and
tokenizer_config.json. The tutorial's GPT is GPT-2 with zero attention biases and exact GELU, so every run
exports; a char tokenizer has no GPT-2 form, so such a run writes the model alone and says so. A directory
that already holds files is refused unless --overwrite is given; each file is written whole or not at all.

Shapes: every parameter transposed to GPT-2's Conv1D layout, (in, out); W_q, W_k, W_v joined as c_attn (C, 3C).
"""

import os
import sys

from .checkpoint import CheckpointError
from .cli import os_error_fix, out_dir_problem, run_command, silence_stdout
from .config import OneLineParser
from .hf import PretrainedError, save_model
from .sample import load_model
from .tokenizer import TokenizerError


# A Hugging Face directory's tokenizer files; the export writes the first three for a BPE run, none otherwise
STALE_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json",
                         "special_tokens_map.json", "added_tokens.json")


def build_parser():
    p = OneLineParser(description="Write an npgpt run as a Hugging Face GPT-2 directory.")
    p.add_argument("--out-dir", default="out", help="the run's directory (default: out)")
    p.add_argument("--checkpoint", default="best.npz",
                   help="file in --out-dir: best.npz (lowest validation loss, the default) or ckpt.npz (latest)")
    p.add_argument("--to", required=True, metavar="DIR", help="the Hugging Face directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a directory that has some")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        problem = out_dir_problem(args.out_dir)
        if problem:
            raise CheckpointError(problem)
        path = args.checkpoint if os.path.dirname(args.checkpoint) else os.path.join(args.out_dir, args.checkpoint)
        if not os.path.exists(path) and args.checkpoint == "best.npz":
            path = os.path.join(args.out_dir, "ckpt.npz")     # a run stopped before its first evaluation
        if os.path.isdir(args.to) and os.listdir(args.to) and not args.overwrite:
            raise PretrainedError(f"--to {args.to} already holds files; choose an empty directory or pass "
                                  "--overwrite")
        if os.path.exists(args.to) and not os.path.isdir(args.to):
            raise PretrainedError(f"--to {args.to} is a file, not a directory; give a directory for the Hugging "
                                  "Face files")
        model, tokenizer = load_model(path)
        save_model(model, args.to)
        written = ["config.json", "model.safetensors"]
        if tokenizer.kind == "bpe":
            tokenizer.save_pretrained(args.to)
            written += ["vocab.json", "merges.txt", "tokenizer_config.json"]
        # --overwrite: an earlier export's tokenizer files would stand beside this model as if they were its own
        for name in STALE_TOKENIZER_FILES:
            if name not in written and os.path.isfile(os.path.join(args.to, name)):
                os.remove(os.path.join(args.to, name))
        print(f"wrote {', '.join(written)} to {args.to} ({model.num_parameters():,} parameters, "
              f"{model.token_embedding.weight.dtype}, from {path})")
        if tokenizer.kind != "bpe":
            print(f"note: the run's {tokenizer.kind} tokenizer has no Hugging Face GPT-2 form; only the model was "
                  "written (train with --tokenizer bpe for a complete directory)", file=sys.stderr)
        sys.stdout.flush()              # here, so that a closed stdout is met below rather than at exit
        return 0
    except BrokenPipeError:             # the reader of stdout went away: the directory is written, stop quietly
        silence_stdout()
        return 0
    except (CheckpointError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {exc.filename or args.to} ({exc.strerror or exc}); {os_error_fix(exc, '--to')}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    run_command(main)

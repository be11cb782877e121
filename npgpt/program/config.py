"""The training configuration: one dataclass, every field a command-line flag with its help text.

Precedence: the field defaults, then the chosen --preset, then the flags given on the command line.

Shapes: batch_size is B, seq_len is T, d_model is C, num_heads is H, vocab_size is V.

Next to read: ``npgpt/checkpoint.py``.
"""

import argparse
import os
from dataclasses import asdict, dataclass, field, fields


def _f(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    preset: str = _f("seed", "named starting point: 'seed' (the tutorial's GPT), 'shakespeare-char' (nanoGPT's "
                             "CPU baseline) or 'gpt2-small' (GPT-2 small's shape, for a GPU)")
    # data
    data: str = _f("", "UTF-8 text file to train on (default: the bundled Tiny Shakespeare)")
    tokenizer: str = _f("bpe", "'bpe' (byte-level BPE trained on the data) or 'char'", ("bpe", "char"))
    vocab_size: int = _f(10000, "BPE vocabulary size (the char tokenizer takes the corpus's characters)")
    # model (the tutorial's GPT)
    d_model: int = _f(256, "embedding width C")
    num_heads: int = _f(4, "attention heads H (must divide d_model)")
    num_layers: int = _f(4, "transformer blocks")
    d_ff: int = _f(1024, "feed-forward hidden width")
    max_seq_len: int = _f(512, "longest context the position embedding covers")
    dropout: float = _f(0.1, "dropout probability (embeddings, attention, residuals)")
    # batches
    seq_len: int = _f(128, "training context length T (at most max_seq_len)")
    batch_size: int = _f(8, "sequences per micro-batch B")
    grad_accum: int = _f(1, "micro-batches per optimizer step (same update as a k-times larger batch)")
    # optimisation
    max_iters: int = _f(300, "optimizer steps in total")
    lr: float = _f(1e-3, "peak learning rate, reached after warmup")
    min_lr: float = _f(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = _f(30, "steps of linear warmup from 0 to lr")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (matrices and embeddings only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
    # evaluation, logging, checkpoints
    eval_interval: int = _f(100, "steps between validation-loss estimates and checkpoints")
    eval_iters: int = _f(10, "batches per validation-loss estimate")
    log_interval: int = _f(10, "steps between log lines")
    out_dir: str = _f("out", "directory for checkpoints (ckpt.npz, best.npz) and metrics.jsonl")
    resume: bool = _f(False, "continue the run saved in --out-dir")
    sample_tokens: int = _f(200, "tokens to generate at the end of training (0: none)")
    sample_prompt: str = _f("\n", "prompt for the sample printed at the end")
    # machine
    device: str = _f("auto", "'cpu', 'gpu' (CuPy) or 'auto' (the GPU when one answers); NPGPT_DEVICE sets it too",
                     ("cpu", "gpu", "auto"))
    dtype: str = _f("float32", "'float32' or 'float64'", ("float32", "float64"))
    workers: int = _f(0, "CPU threads splitting each batch (data parallelism); 0: one per core, at most 4")
    cuda_graph: str = _f("on", "on the GPU, record the training step once as a CUDA graph and replay it "
                               "(npgpt/graph.py); 'off' launches every kernel from Python", ("on", "off"))
    seed: int = _f(1337, "seed for initialisation, batches and dropout")

    def model_kwargs(self, vocab_size):
        return dict(vocab_size=vocab_size, d_model=self.d_model, num_heads=self.num_heads,
                    num_layers=self.num_layers, d_ff=self.d_ff, max_seq_len=self.max_seq_len,
                    dropout=self.dropout)

    def to_dict(self):
        return asdict(self)


PRESETS = {
    # The tutorial's GPT on BPE tokens; sized to show learning within a few minutes on a laptop CPU.
    "seed": {},
    # nanoGPT's CPU baseline (reported validation loss about 1.88 after 2000 iterations).
    "shakespeare-char": dict(tokenizer="char", d_model=128, num_heads=4, num_layers=4, d_ff=512, max_seq_len=64,
                             dropout=0.0, seq_len=64, batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4,
                             warmup_iters=100, beta2=0.99, eval_interval=250, eval_iters=20),
    # GPT-2 small's shape (12 layers, 12 heads, d_model 768, context 1024) for a GPU; BPE on the corpus.
    "gpt2-small": dict(d_model=768, num_heads=12, num_layers=12, d_ff=3072, max_seq_len=1024, seq_len=1024,
                       batch_size=8, max_iters=2000, lr=6e-4, min_lr=6e-5, warmup_iters=100, eval_interval=200,
                       eval_iters=20),
}

# Fields that fix the model's shape: a resumed run must agree with its checkpoint on these.
ARCHITECTURE_FIELDS = ("tokenizer", "vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len")


def build_parser(description):
    parser = argparse.ArgumentParser(description=description)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif f.name == "preset":
            parser.add_argument(flag, choices=sorted(PRESETS), default=argparse.SUPPRESS,
                                help=help_text + " (default: seed)")
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) \
                else f.type
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=f.metadata["choices"],
                                metavar=None if f.metadata["choices"] else f.name.upper(),
                                help=f"{help_text} (default: {f.default!r})")
    return parser


def config_from_args(argv=None):
    """(config, names of the fields set explicitly on the command line)."""
    parser = build_parser("Train the tutorial's GPT (npgpt) on a text corpus.")
    given = vars(parser.parse_args(argv))
    preset = given.get("preset", "seed")
    values = dict(PRESETS[preset])
    if os.environ.get("NPGPT_DEVICE"):          # the environment's device, unless --device says otherwise
        values["device"] = os.environ["NPGPT_DEVICE"]
    values.update(given)
    values["preset"] = preset
    return TrainConfig(**values), set(given)

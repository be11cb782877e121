"""The training configuration: one dataclass, every field a command-line flag with its help text.

Precedence: the field defaults, then the chosen --preset, then the flags given on the command line.
Every value is checked (`config_problems`): its type, its range, and whether the run fits in memory
(`memory_estimate`, a lower bound counted from the shapes), whether it came from the command line or from a
checkpoint.

Shapes: batch_size is B, seq_len is T, d_model is C, num_heads is H, vocab_size is V.

Next to read: ``npgpt/program/checkpoint.py``.
"""

import argparse
import math
import os
import sys
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
    warmup_iters: int = _f(30, "steps of linear warmup up to lr")
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
    overwrite: bool = _f(False, "start over in an --out-dir that holds a run: its checkpoints and metrics.jsonl "
                                "are deleted once the new run has been set up")
    init_from: str = _f("", "Hugging Face GPT-2 directory to fine-tune (config.json, model.safetensors, vocab.json + "
                            "merges.txt or tokenizer.json): the model's shape and tokenizer come from it")
    sample_tokens: int = _f(200, "tokens to generate at the end of training (0: none)")
    sample_prompt: str = _f("\n", "prompt for the sample printed at the end")
    # machine
    device: str = _f("auto", "'cpu', 'gpu' (CuPy) or 'auto' (the GPU when one answers); NPGPT_DEVICE sets it too",
                     ("cpu", "gpu", "auto"))
    dtype: str = _f("float32", "'float32' or 'float64'", ("float32", "float64"))
    workers: int = _f(0, "CPU threads each op's work is split among (without the C kernels: data-parallel "
                         "shards of each batch); 0: one per core, at most 4")
    cuda_graph: str = _f("on", "on the GPU, record the training step once as a CUDA graph and replay it "
                               "(npgpt/fast/cuda/graph.py, with the CUDA fast paths on); 'off' launches every kernel from Python", ("on", "off"))
    seed: int = _f(1337, "seed for initialisation, batches and dropout")
    # several processes: mpiexec -n N python -m npgpt.train (npgpt/program/dist.py)
    dist_backend: str = _f("mpi", "under mpiexec, what sums the gradients: 'mpi' (CPU, or GPU buffers via the "
                                  "host) or 'nccl' (GPU buffers on the device; opt-in, see docs/distributed.md)",
                           ("mpi", "nccl"))
    dist_timeout: float = _f(600.0, "under mpiexec, seconds a rank waits for the others at a collective "
                                    "before it stops the run with an error")
    check_replicas: bool = _f(False, "under mpiexec, compare a checksum of the parameters, AdamW moments and "
                                     "data generator across ranks after every step (debugging)")
    inject_fault: str = _f("", "debugging: 'RANK:STEP[:KIND]' makes that rank fail during that step, KIND "
                               "raise (default), kill, hang or perturb, to see how the run stops")
    zero_stage: int = _f(0, "under mpiexec, 1: shard AdamW's moments across the ranks (ZeRO stage 1; each "
                            "keeps 1/N of them, same update); 0: every rank keeps them all")

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
# Fields of this launch, not of the run: a resumed run takes them from the command line, not the checkpoint.
DIST_FIELDS = ("dist_backend", "dist_timeout", "check_replicas", "inject_fault", "zero_stage")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block) and exit code 2."""

    def error(self, message):
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def parse_int(text):
    """An integer flag: '300', or a whole number written as a float ('1e9')."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}")
    return int(value)


def build_parser(description):
    parser = OneLineParser(description=description)
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
            kind = parse_int if kind is int else kind
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
        if values["device"] not in DEVICES and "device" not in given:
            raise ConfigError(f"NPGPT_DEVICE={values['device']!r} is not a device: set it to "
                              f"{', '.join(DEVICES)} (or unset it), or pass --device")
    values.update(given)
    values["preset"] = preset
    return TrainConfig(**values), set(given)


# ---------------------------------------------------------------------------------------------------------
# Checking a configuration: types, ranges, and memory

class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag and what it accepts."""


DEVICES = ("cpu", "gpu", "auto")
_AT_LEAST_1 = ("seq_len", "batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval",
               "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len", "vocab_size")
_AT_LEAST_0 = ("warmup_iters", "workers", "sample_tokens", "seed")
MAX_WORKERS = 256
MAX_SEED = 2 ** 63 - 2             # the seed and seed + 1 (validation batches) must fit NumPy's generators


def _flag(name):
    return "--" + name.replace("_", "-")


def _type_problem(f, value):
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    return None if ok else f"{_flag(f.name)} must be {kind.__name__}, got {value!r}"


def config_problems(config):
    """Every problem with a config, as one-line messages naming the flag (an empty list when it is sound)."""
    problems = [p for p in (_type_problem(f, getattr(config, f.name)) for f in fields(TrainConfig)) if p]
    if problems:
        return problems                 # ranges are only meaningful on values of the right type
    c = config
    for f in fields(TrainConfig):
        choices = f.metadata["choices"]
        if choices and getattr(c, f.name) not in choices:
            problems.append(f"{_flag(f.name)} must be one of {', '.join(choices)}, got {getattr(c, f.name)!r}")
    if c.preset not in PRESETS:
        problems.append(f"--preset must be one of {', '.join(sorted(PRESETS))}, got {c.preset!r}")
    for name in _AT_LEAST_1:
        if getattr(c, name) < 1:
            problems.append(f"{_flag(name)} must be at least 1, got {getattr(c, name)}")
    for name in _AT_LEAST_0:
        if getattr(c, name) < 0:
            problems.append(f"{_flag(name)} must not be negative, got {getattr(c, name)}")
    if c.workers > MAX_WORKERS:
        problems.append(f"--workers must be at most {MAX_WORKERS}, got {c.workers}")
    if c.seed > MAX_SEED:
        problems.append(f"--seed must be below 2**63 - 1, got {c.seed}")
    if c.tokenizer == "bpe" and c.vocab_size < 256:
        problems.append(f"--vocab-size must be at least 256 for the byte-level BPE, got {c.vocab_size}")
    finite = {name: float(getattr(c, name)) for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2",
                                                          "grad_clip", "dropout")}
    for name, value in finite.items():
        if not math.isfinite(value):
            problems.append(f"{_flag(name)} must be a finite number, got {value}")
    if problems:
        return problems
    if c.lr <= 0:
        problems.append(f"--lr must be positive, got {c.lr}")
    for name in ("min_lr", "weight_decay", "grad_clip"):
        if getattr(c, name) < 0:
            problems.append(f"{_flag(name)} must not be negative, got {getattr(c, name)}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(c, name) < 1.0:
            problems.append(f"{_flag(name)} must lie in [0, 1), got {getattr(c, name)} (AdamW's moment decay)")
    if not 0.0 <= c.dropout < 1.0:
        problems.append(f"--dropout must lie in [0, 1), got {c.dropout}")
    if c.d_model % c.num_heads:
        problems.append(f"--d-model {c.d_model} is not divisible by --num-heads {c.num_heads}; "
                        "choose num_heads among its divisors")
    if c.seq_len > c.max_seq_len:
        fix = (f"give a --seq-len of at most {c.max_seq_len} (a resumed run keeps its checkpoint's --max-seq-len)"
               if c.resume else "lower --seq-len or raise --max-seq-len")
        problems.append(f"--seq-len {c.seq_len} is above --max-seq-len {c.max_seq_len}; {fix}")
    if c.resume and c.overwrite:
        problems.append("--resume continues the run in --out-dir and --overwrite deletes it: give one of them")
    return problems


def parameter_shapes(vocab_size, d_model, num_heads, num_layers, d_ff, max_seq_len, attention_bias=False,
                     **options):
    """{name: shape} of every Parameter of npgpt.model.GPT, in its named_parameters() order.

    Written out from model.py (a test holds the two equal), so a checkpoint's arrays and a run's memory can be
    checked before a model is built. options (dropout, gelu_approximate, layer_norm_eps) change no shape.
    """
    C, V = d_model, vocab_size
    shapes = {"token_embedding.weight": (V, C), "position_embedding.weight": (max_seq_len, C)}
    for i in range(num_layers):
        block = {"attn_norm.weight": (C,), "attn_norm.bias": (C,)}
        for proj in ("W_q", "W_k", "W_v", "W_o"):
            block[f"attention.{proj}.weight"] = (C, C)
            if attention_bias:
                block[f"attention.{proj}.bias"] = (C,)
        block.update({"ffn_norm.weight": (C,), "ffn_norm.bias": (C,),
                      "ffn.linear1.weight": (d_ff, C), "ffn.linear1.bias": (d_ff,),
                      "ffn.linear2.weight": (C, d_ff), "ffn.linear2.bias": (C,)})
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})      # output_proj.weight is token_embedding's
    return shapes


def memory_estimate(config, vocab_size):
    """(bytes, parameter bytes, activation bytes, batch bytes): a lower bound on what one training step holds.

    Parameters, their gradients and AdamW's two moments: 4 P numbers. Activations kept for the backward pass
    of one micro-batch, at the least: per block the (B, T, C) inputs of six projections and norms and the two
    (B, T, d_ff) feed-forward activations; then the (B, T, V) logits and their gradient. The step's
    grad_accum micro-batches, drawn before it runs: (B, T + 1) token ids of 8 bytes each. Counting only what
    any implementation must keep makes this a floor: a run above the machine's memory cannot fit.
    Plain integers throughout, so a d_model of 10**9 gives a figure, not an overflow.
    """
    c = config
    itemsize = 8 if c.dtype == "float64" else 4
    shapes = parameter_shapes(vocab_size, c.d_model, c.num_heads, min(c.num_layers, 1), c.d_ff, c.max_seq_len)
    per_block = sum(math.prod(s) for name, s in shapes.items() if name.startswith("blocks.0."))
    num_params = sum(math.prod(s) for name, s in shapes.items() if not name.startswith("blocks.")) \
        + c.num_layers * per_block
    rows = c.batch_size * c.seq_len                                   # B * T positions
    activations = c.num_layers * rows * (6 * c.d_model + 2 * c.d_ff) + 2 * rows * vocab_size
    param_bytes = 4 * num_params * itemsize
    activation_bytes = activations * itemsize
    batch_bytes = c.grad_accum * c.batch_size * (c.seq_len + 1) * 8
    return param_bytes + activation_bytes + batch_bytes, param_bytes, activation_bytes, batch_bytes


def machine_memory(device="cpu"):
    """Bytes of memory a run may use: the GPU's when running there, else the machine's RAM (None: unknown)."""
    if device == "gpu":
        try:
            import cupy
            return int(cupy.cuda.Device().mem_info[1])
        except Exception:               # no CuPy or no GPU: the device error is reported elsewhere
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n):
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if n < 1000 or unit == "EB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def memory_problem(config, vocab_size, device="cpu", available=None, weights_only=False):
    """A one-line message when the run cannot fit in memory, else None.

    weights_only: only the weights themselves must fit (sampling, or reading a checkpoint).
    """
    total, param_bytes, activation_bytes, batch_bytes = memory_estimate(config, vocab_size)
    available = machine_memory(device) if available is None else available
    if weights_only:
        weight_bytes = param_bytes // 4
        if available is None or weight_bytes <= available:
            return None
        return (f"the model's {format_bytes(weight_bytes)} of weights are more than the "
                f"{format_bytes(available)} of memory here")
    if available is None or total <= available:
        return None
    batches = (f", {format_bytes(batch_bytes)} for the step's --grad-accum {config.grad_accum} micro-batches"
               if config.grad_accum > 1 else "")
    return (f"this configuration needs at least {format_bytes(total)} ({format_bytes(param_bytes)} for the "
            f"weights, gradients and AdamW moments, {format_bytes(activation_bytes)} of activations for "
            f"--batch-size {config.batch_size} x --seq-len {config.seq_len}{batches}), more than the "
            f"{format_bytes(available)} of memory here; lower --batch-size, --seq-len, --grad-accum, --d-model, "
            "--d-ff, --num-layers or --max-seq-len")

"""Pictures of a training run: loss curves, attention maps, gradient flow (pip install 'npgpt[plot]').

    python -m npgpt.plot --out-dir out                              # out/loss.png
    python -m npgpt.plot --out-dir out --compare out2 out3          # several runs, their config differences
    python -m npgpt.plot --out-dir out --attention --prompt "ROMEO:"   # out/attention.png
    python -m npgpt.plot --out-dir out --grads                      # out/grads.png
    python -m npgpt.plot --out-dir out --loss --grads --attention --format svg

loss.png: training and validation loss against step and against training time (the wall-clock time of the
steps, summed from metrics.jsonl's ms_per_step: evaluation and checkpoint saving are left out, so runs on
one machine compare fairly), the learning-rate schedule under the step panel and the throughput under the
time panel. It reads what metrics.jsonl holds, so it works while a run is going; a half-written last line
is skipped.

attention.png: for the checkpoint in --out-dir, the attention weights P = softmax(Q K^T / sqrt(D) + mask) of
every layer and head over the prompt's tokens (rows are queries, columns keys; the causal mask leaves the
triangle above the diagonal at zero, drawn grey). They are the probabilities that
``npgpt/functional.py``'s scaled_dot_product_attention computes inside its forward; here they are computed
again from the model's own layers (attention_weights), because the fused forward keeps them private.

grads.png: per layer (embeddings, blocks.0 ... blocks.N-1, ln_f) the gradient norm before clipping and the
update/weight ratio ||dW|| / ||W|| of each logged step (npgpt/program/grad_stats.py records them), against
step and across depth.

Shapes: the prompt (T,) ids; one layer's attention weights (H, T, T), rows summing to 1.

Next to read: ``npgpt/program/grad_stats.py``; ``npgpt/functional.py`` (scaled_dot_product_attention).
"""

import errno
import json
import math
import os
import sys

import numpy as np

from .. import backend
from ..engine import no_grad
from .. import functional as F
from ..model import GPT
from ..optim import cosine_lr
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta, restore_model
from .cli import out_dir_problem, run_command, silence_stdout
from .config import OneLineParser, parse_int
from .tokenizer import TokenizerError, tokenizer_from_dict


class PlotError(RuntimeError):
    """A run that cannot be drawn (missing, empty, no statistics) or no matplotlib; exit code 2."""


# ---------------------------------------------------------------------------------------------------------
# Reading a run: metrics.jsonl and the config in the checkpoint

def read_metrics(out_dir):
    """The records of out_dir/metrics.jsonl, in step order.

    A line that does not parse (the last one, while the run is writing it) is skipped. After a resume from an
    older checkpoint the steps start again lower: the later records replace the earlier ones from there on.
    """
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"no metrics.jsonl in {out_dir}: train there first with "
                        f"python -m npgpt.train --out-dir {out_dir}")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not _plottable(record):
                continue
            while records and records[-1]["step"] >= record["step"]:
                records.pop()
            records.append(record)
    if not records:
        raise PlotError(f"{path} holds no records yet (the first is written after --log-interval steps); "
                        "try again once the run has logged a step")
    return records


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plottable(record):
    """A record the pictures can draw: an integer step, a number for the loss, and a number (or none) for the
    validation loss and the learning rate. A line edited by hand into something else is skipped, as the
    trainer's --resume skips lines it cannot read."""
    return (isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
            and _number(record.get("loss"))
            and all(record.get(key) is None or _number(record[key]) for key in ("val_loss", "lr")))


def read_meta(out_dir):
    """The checkpoint's meta (config, model_config, ...) without loading its weights, or None if there is none.

    An .npz file is a zip archive: reading its 'meta' member leaves the parameter arrays unread.
    """
    for name in ("ckpt.npz", "best.npz"):
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            return read_checkpoint_meta(path)
        except CheckpointError:
            continue        # a checkpoint being replaced or corrupt: the other one, or no config
    return None


# Fields that do not change what a run learns or how fast: left out of the comparison's legend
_NOT_COMPARED = ("out_dir", "resume", "overwrite", "sample_tokens", "sample_prompt")


def config_differences(configs):
    """For each config (a dict, or None when unknown): 'name=value, ...' of the fields that differ among them.

    Only fields that every known config has are compared (a run saved before a field existed is not
    different for lacking it).
    """
    known = [c for c in configs if c is not None]
    names = sorted(set.intersection(*(set(c) for c in known)) - set(_NOT_COMPARED)) if known else []
    differing = [k for k in names if len({json.dumps(c.get(k)) for c in known}) > 1]
    labels = []
    for c in configs:
        if c is None:
            labels.append("config not saved yet")
        else:
            parts = [f"{k}={c.get(k)}" for k in differing]
            labels.append(", ".join(parts[:4]) + (", ..." if len(parts) > 4 else ""))
    return labels


# ---------------------------------------------------------------------------------------------------------
# The data that goes into each picture (NumPy only, so it can be checked without drawing)

def loss_curves(records):
    """{step, loss, lr, time_s, tokens_per_s} of every record, and {val_step, val_loss, val_time_s} of the
    evaluated ones, as arrays. time_s: the steps' summed wall-clock time (ms_per_step x steps in each window)."""
    step = np.array([r["step"] for r in records], dtype=np.int64)
    window = np.diff(step, prepend=0)
    ms = np.array([r.get("ms_per_step", 0.0) for r in records], dtype=np.float64)
    time_s = np.cumsum(ms * window) / 1000
    evaluated = np.array(["val_loss" in r for r in records], dtype=bool)
    return {"step": step,
            "loss": np.array([r["loss"] for r in records], dtype=np.float64),
            "lr": np.array([r.get("lr", np.nan) for r in records], dtype=np.float64),
            "time_s": time_s,
            "tokens_per_s": np.array([r.get("tokens_per_s", np.nan) for r in records], dtype=np.float64),
            "val_step": step[evaluated],
            "val_loss": np.array([r["val_loss"] for r in records if "val_loss" in r], dtype=np.float64),
            "val_time_s": time_s[evaluated]}


def grad_series(records):
    """(steps (N,), groups [G names], grad_norm (G, N), update_ratio (G, N)) from the records that hold them."""
    measured = [r for r in records
                if isinstance(r.get("grad_norm"), dict) and isinstance(r.get("update_ratio"), dict)]
    if not measured:
        return None
    groups = list(measured[-1]["grad_norm"])
    steps = np.array([r["step"] for r in measured], dtype=np.int64)
    grad_norm = np.array([[r["grad_norm"].get(g, np.nan) for r in measured] for g in groups], dtype=np.float64)
    update = np.array([[r["update_ratio"].get(g, np.nan) for r in measured] for g in groups], dtype=np.float64)
    return steps, groups, grad_norm, update


def load_model(out_dir, checkpoint="best.npz"):
    """(model on the CPU, tokenizer, meta) from a checkpoint in out_dir (best.npz falls back to ckpt.npz)."""
    path = checkpoint if os.path.dirname(checkpoint) else os.path.join(out_dir, checkpoint)
    if not os.path.exists(path) and checkpoint == "best.npz":
        path = os.path.join(out_dir, "ckpt.npz")         # a run stopped before its first evaluation
    arrays, meta = load_checkpoint(path)
    backend.set_device("cpu")
    model = GPT(**meta["model_config"])
    dtype = np.dtype(meta["config"]["dtype"])
    if dtype != np.float32:
        model.to(dtype)
    restore_model(model, arrays, path)
    model.eval()
    return model, tokenizer_from_dict(meta["tokenizer"]), meta


@no_grad()
def attention_weights(model, token_ids):
    """token_ids (T,) -> one (H, T, T) array per layer: row i is query i's distribution over keys 0..T-1.

    The same computation as the model's forward, with the probabilities kept: each block's attention input
    is attn_norm(x); P = softmax(Q K^T / sqrt(D) + mask) with the mask -inf above the diagonal (key j > query
    i); then the block's own forward carries x to the next block.
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)                  # (1, T)
    T = ids.shape[1]
    was_training = model.training
    model.eval()
    x = model.token_embedding(ids) + model.position_embedding.weight[:T]       # (1, T, C)
    blocked = np.triu(np.ones((T, T), dtype=bool), k=1)                         # (T, T): key after query
    weights = []
    for block in model.blocks:
        attn = block.attention
        H, D = attn.num_heads, attn.d_k
        h = block.attn_norm(x)                                                   # (1, T, C)
        q = attn.W_q(h).reshape(1, T, H, D).transpose(1, 2)                      # (1, H, T, D)
        k = attn.W_k(h).reshape(1, T, H, D).transpose(1, 2)                      # (1, H, T, D)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))                # (1, H, T, T)
        xp = backend.get_array_module(scores.data)
        mask = xp.asarray(np.where(blocked, -np.inf, 0.0).astype(scores.dtype))  # (T, T)
        probs = F.softmax(scores + mask, dim=-1)                                 # (1, H, T, T)
        weights.append(backend.to_numpy(probs.data[0]))
        x = block(x, None, True)
    model.train(was_training)
    return weights


def token_labels(tokenizer, ids):
    """Each token as text for an axis: a space as '␣', a newline as '\\n', '$' escaped from mathtext."""
    labels = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        text = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423").replace("$", r"\$")
        labels.append(text or "\u2205")
    return labels


# ---------------------------------------------------------------------------------------------------------
# Drawing (matplotlib is imported here only, with the Agg canvas: no display needed)

def _matplotlib():
    try:
        import matplotlib
        import matplotlib.lines
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("matplotlib is not installed; pip install 'npgpt[plot]'") from None
    return matplotlib, Figure, FigureCanvasAgg


def _time_unit(seconds):
    if seconds >= 3 * 3600:
        return 3600.0, "h"
    if seconds >= 180:
        return 60.0, "min"
    return 1.0, "s"


def loss_figure(runs):
    """runs: [(label, records, meta or None)] -> the Figure of loss.png."""
    matplotlib, Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 1.3))
    ax_step = fig.add_subplot(grid[0, 0])
    ax_time = fig.add_subplot(grid[0, 1], sharey=ax_step)
    ax_lr = fig.add_subplot(grid[1, 0], sharex=ax_step)
    ax_speed = fig.add_subplot(grid[1, 1], sharex=ax_time)
    curves = [loss_curves(records) for _, records, _ in runs]
    scale, unit = _time_unit(max(c["time_s"][-1] for c in curves))
    colors = matplotlib.colormaps["tab10"].colors
    for n, ((label, records, meta), c) in enumerate(zip(runs, curves)):
        color = colors[n % len(colors)]
        val_color = colors[1] if len(runs) == 1 else color      # one run: two colours; several: one per run
        prefix = f"{label}: " if len(runs) > 1 else ""
        for ax, x, vx in ((ax_step, c["step"], c["val_step"]),
                          (ax_time, c["time_s"] / scale, c["val_time_s"] / scale)):
            ax.plot(x, c["loss"], color=color, lw=1.6, label=f"{prefix}train loss")
            if len(vx):
                ax.plot(vx, c["val_loss"], color=val_color, lw=1.2, ls="--", marker="o", ms=4,
                        label=f"{prefix}validation loss")
        ax_lr.plot(c["step"], c["lr"], color=color, lw=1.6, label=f"{prefix}learning rate (logged)")
        config = (meta or {}).get("config")
        if config:                      # the whole schedule, including the steps still to come
            steps = np.arange(1, config["max_iters"] + 1)       # step s runs at the rate cosine_lr(s - 1)
            ax_lr.plot(steps, [cosine_lr(s - 1, config["lr"], config["min_lr"], config["warmup_iters"],
                                         config["max_iters"]) for s in steps],
                       color=color, lw=0.8, ls=":", label=f"{prefix}schedule to max_iters")
        ax_speed.plot(c["time_s"] / scale, c["tokens_per_s"] / 1000, color=color, lw=1.2,
                      label=f"{prefix}tokens/s")
    if len(runs) == 1 and runs[0][2]:
        vocab = runs[0][2]["model_config"]["vocab_size"]
        for ax in (ax_step, ax_time):
            ax.axhline(math.log(vocab), color="grey", lw=0.8, ls=":",
                       label=f"uniform guess: ln {vocab} = {math.log(vocab):.2f}")
    ax_step.set(title="loss against step", ylabel="cross-entropy loss (nats per token)")
    ax_time.set(title=f"loss against training time ({unit}; evaluation excluded)")
    ax_lr.set(xlabel="step", ylabel="learning rate")
    ax_speed.set(xlabel=f"training time ({unit})", ylabel="throughput (k tokens/s)")
    ax_speed.set_ylim(bottom=0)
    for ax in (ax_step, ax_time, ax_lr, ax_speed):
        ax.grid(alpha=0.3)
        if len(runs) == 1:
            ax.legend(fontsize=8, loc="best")
    if len(runs) > 1:
        # one legend under the panels: a colour per run, a line style per kind of curve
        Line2D = matplotlib.lines.Line2D
        handles = [Line2D([], [], color=colors[n % len(colors)], lw=2.5, label=label)
                   for n, (label, _, _) in enumerate(runs)]
        handles += [Line2D([], [], color="black", lw=1.6, label="train loss; logged learning rate"),
                    Line2D([], [], color="black", lw=1.2, ls="--", marker="o", ms=4, label="validation loss"),
                    Line2D([], [], color="black", lw=0.8, ls=":", label="learning-rate schedule to max_iters")]
        fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8)
        fig.suptitle(f"{len(runs)} runs compared", fontsize=11)
    else:
        label, records, meta = runs[0]
        title = f"{label}: step {records[-1]['step']}"
        if meta:
            title += f" of {meta['config']['max_iters']}"
        best = min((r["val_loss"] for r in records if "val_loss" in r), default=None)
        title += f", train loss {records[-1]['loss']:.3f}" + (f", best validation loss {best:.3f}" if best else "")
        fig.suptitle(title, fontsize=11)
    return fig


_ATTENTION = "softmax(QK^T / sqrt(d)) per layer and head; grey: masked (a query never sees later keys)"


def attention_figure(weights, labels, title=""):
    """weights: [layer] (H, T, T); labels: T token strings -> the Figure of attention.png."""
    matplotlib, Figure, FigureCanvasAgg = _matplotlib()
    layers, (H, T, _) = len(weights), weights[0].shape
    panel = min(max(2.2, 0.22 * T + 0.8), 6.0)
    fig = Figure(figsize=(panel * H + 1.2, panel * layers + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(layers, H, squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    blocked = np.triu(np.ones((T, T), dtype=bool), k=1)
    font = max(5, min(9, int(200 / T)))
    short = max(len(label) for label in labels) <= 2            # characters: upright key labels
    image = None
    for layer, per_head in enumerate(weights):
        for head in range(H):
            ax = axes[layer, head]
            image = ax.imshow(np.ma.masked_array(per_head[head], blocked), cmap=cmap, vmin=0.0, vmax=1.0,
                              interpolation="nearest")
            ax.set_xticks(range(T), labels, fontsize=font, rotation=0 if short else 90)
            ax.set_yticks(range(T), labels, fontsize=font)
            ax.tick_params(length=0)
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            if head == 0:
                ax.set_ylabel("query (row)", fontsize=8)
            if layer == layers - 1:
                ax.set_xlabel("key (column)", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (each row sums to 1)")
    fig.suptitle(title or f"attention weights {_ATTENTION}", fontsize=10)
    return fig


def grads_figure(series, label="", grad_clip=0.0):
    """series: grad_series(records) -> the Figure of grads.png (against step on top, across depth below).

    The groups partition the parameters, so the global norm that clipping sees is sqrt(sum of their squares).
    """
    matplotlib, Figure, FigureCanvasAgg = _matplotlib()
    steps, groups, grad_norm, update = series
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_norm, ax_ratio), (ax_norm_depth, ax_ratio_depth) = fig.subplots(2, 2)
    colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, len(groups)))
    for g, name in enumerate(groups):
        ax_norm.plot(steps, grad_norm[g], color=colors[g], lw=1.4, label=name)
        ax_ratio.plot(steps, update[g], color=colors[g], lw=1.4, label=name)
    total = np.sqrt(np.sum(grad_norm ** 2, axis=0))
    ax_norm.plot(steps, total, color="black", lw=1.0, ls="--", label="all layers (what clipping sees)")
    if grad_clip > 0:
        ax_norm.axhline(grad_clip, color="red", lw=0.8, ls=":", label=f"--grad-clip {grad_clip:g}")
    ax_ratio.axhline(1e-3, color="grey", lw=0.8, ls="--", label="1e-3 (a usual healthy rate)")
    picks = sorted({0, len(steps) // 3, 2 * len(steps) // 3, len(steps) - 1})
    shades = matplotlib.colormaps["plasma"](np.linspace(0.0, 0.8, len(picks)))
    depth = np.arange(len(groups))
    for shade, i in zip(shades, picks):
        ax_norm_depth.plot(depth, grad_norm[:, i], color=shade, marker="o", lw=1.4, label=f"step {steps[i]}")
        ax_ratio_depth.plot(depth, update[:, i], color=shade, marker="o", lw=1.4, label=f"step {steps[i]}")
    ax_norm.set(title="gradient norm per layer (before clipping)", xlabel="step", ylabel="||grad||", yscale="log")
    ax_ratio.set(title="update / weight ratio per layer", xlabel="step", ylabel="||dW|| / ||W|| per step",
                 yscale="log")
    ax_norm_depth.set(title="gradient flow: norm across depth (input -> output)", ylabel="||grad||", yscale="log")
    ax_ratio_depth.set(title="update / weight ratio across depth", ylabel="||dW|| / ||W||", yscale="log")
    for ax in (ax_norm_depth, ax_ratio_depth):
        ax.set_xticks(depth, groups, rotation=45 if len(groups) > 8 else 0, fontsize=8)
    for ax in (ax_norm, ax_ratio, ax_norm_depth, ax_ratio_depth):
        ax.grid(alpha=0.3, which="both")
    for ax in (ax_norm_depth, ax_ratio_depth):
        ax.legend(fontsize=8)
    # one legend for the two panels against step, beside them, so it covers no curve
    handles, names = ax_norm.get_legend_handles_labels()
    ratio_handles, ratio_names = ax_ratio.get_legend_handles_labels()
    fig.legend(handles + ratio_handles[-1:], names + ratio_names[-1:], loc="outside right upper", fontsize=8)
    fig.suptitle(f"{label}: gradient flow" if label else "gradient flow", fontsize=11)
    return fig


def save_figure(fig, path, fmt):
    """Write the picture to path through a temporary file, so a viewer never reads half of one.

    A directory that cannot hold it, or a picture too large for memory, is a PlotError naming the fix; a
    picture already at path stays as it was.
    """
    directory = os.path.dirname(path) or "."
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise PlotError(f"--plot-dir {directory} is a file, not a directory; give a directory for the pictures")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise PlotError(f"cannot create --plot-dir {directory} ({exc.strerror or exc}); choose a directory "
                        "you can write to") from None
    tmp = f"{path}.{os.getpid()}.tmp"          # one per process: two plot commands never share it
    try:
        fig.savefig(tmp, format=fmt, dpi=fig.dpi)
        os.replace(tmp, path)
    except MemoryError:
        width, height = (round(float(n) * fig.dpi) for n in fig.get_size_inches())
        raise PlotError(f"not enough memory to draw {os.path.basename(path)} ({width} x {height} pixels at "
                        f"--dpi {fig.dpi:g}); give a lower --dpi or --format svg") from None
    except OSError as exc:
        fix = "free some space" if exc.errno == errno.ENOSPC else "choose a --plot-dir you can write to"
        raise PlotError(f"cannot write {path} ({exc.strerror or exc}); {fix}") from None
    finally:
        if os.path.exists(tmp):                 # what a failed write left behind
            os.remove(tmp)
    return path


# ---------------------------------------------------------------------------------------------------------
# The command

# --dpi's range: below it the text is unreadable; a PNG's memory grows as dpi squared (loss.png at 1000: 360 MB)
MIN_DPI, MAX_DPI = 10, 1000


def build_parser():
    p = OneLineParser(description="Draw an npgpt training run: loss curves, attention maps, "
                                  "gradient flow (needs matplotlib: pip install 'npgpt[plot]').")
    p.add_argument("--out-dir", default="out",
                   help="the run's directory (metrics.jsonl, checkpoints) (default: out)")
    p.add_argument("--compare", nargs="+", default=[], metavar="OUT_DIR",
                   help="other runs to overlay on loss.png; their config differences go into the legend")
    p.add_argument("--loss", action="store_true", help="draw loss.png (the default when nothing else is asked)")
    p.add_argument("--attention", action="store_true", help="draw attention.png from the run's checkpoint")
    p.add_argument("--grads", action="store_true", help="draw grads.png from the recorded gradient statistics")
    p.add_argument("--prompt", default="ROMEO:", help="text whose attention is drawn (default: 'ROMEO:')")
    p.add_argument("--checkpoint", default="best.npz",
                   help="checkpoint for --attention: best.npz (lowest validation loss) or ckpt.npz (latest)")
    p.add_argument("--format", choices=("png", "svg"), default="png", help="picture format (default: png)")
    p.add_argument("--dpi", type=parse_int, default=100,
                   help=f"resolution of a PNG, {MIN_DPI} to {MAX_DPI} dots per inch (default: 100)")
    p.add_argument("--plot-dir", default=None, help="where the pictures go (default: --out-dir)")
    return p


def _shown(path):
    """A path as text a picture can hold: bytes of a name that are not UTF-8 (which Python keeps as lone
    surrogates) become U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _run_label(out_dir):
    return _shown(os.path.basename(os.path.normpath(out_dir)) or out_dir)


def run_labels(dirs, metas):
    """A legend label per run: its directory's name, and with several runs their config differences."""
    labels = [_run_label(d) for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [_shown(d) for d in dirs]
    if len(dirs) == 1:
        return labels
    differences = config_differences([m.get("config") if m else None for m in metas])
    return [f"{name} ({diff})" if diff else name for name, diff in zip(labels, differences)]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if not MIN_DPI <= args.dpi <= MAX_DPI:
            raise PlotError(f"--dpi must lie in [{MIN_DPI}, {MAX_DPI}] (100 suits a screen, 300 print), "
                            f"got {args.dpi}")
        problem = out_dir_problem(args.out_dir)
        if problem:
            raise PlotError(problem)
        _matplotlib()
        plot_dir = args.plot_dir or args.out_dir
        draw_loss = args.loss or not (args.attention or args.grads)
        written = []
        if draw_loss:
            dirs = [args.out_dir] + args.compare
            records = [read_metrics(d) for d in dirs]
            metas = [read_meta(d) for d in dirs]
            fig = loss_figure(list(zip(run_labels(dirs, metas), records, metas)))
            fig.set_dpi(args.dpi)
            written.append(save_figure(fig, os.path.join(plot_dir, f"loss.{args.format}"), args.format))
        if args.grads:
            series = grad_series(read_metrics(args.out_dir))
            if series is None:
                raise PlotError(f"{args.out_dir}/metrics.jsonl holds no gradient statistics; python -m "
                                "npgpt.train records them every --log-interval (not when the step is replayed "
                                "as a CUDA graph: --cuda-graph off)")
            config = (read_meta(args.out_dir) or {}).get("config", {})
            fig = grads_figure(series, _run_label(args.out_dir), config.get("grad_clip", 0.0))
            fig.set_dpi(args.dpi)
            written.append(save_figure(fig, os.path.join(plot_dir, f"grads.{args.format}"), args.format))
        if args.attention:
            model, tokenizer, meta = load_model(args.out_dir, args.checkpoint)
            try:
                ids = tokenizer.encode(args.prompt)
            except TokenizerError as exc:
                raise PlotError(f"--prompt: {exc}; remove it from the prompt") from None
            if len(ids) == 0:
                raise PlotError("the prompt is empty after tokenization; give --prompt some text")
            if len(ids) > model.max_seq_len:
                raise PlotError(f"the prompt is {len(ids)} tokens, more than the model's max_seq_len "
                                f"{model.max_seq_len}; give a shorter --prompt")
            weights = attention_weights(model, ids)
            title = f"{_run_label(args.out_dir)} at step {meta['step']}: attention weights {_ATTENTION}"
            fig = attention_figure(weights, token_labels(tokenizer, ids), title)
            fig.set_dpi(args.dpi)
            written.append(save_figure(fig, os.path.join(plot_dir, f"attention.{args.format}"), args.format))
        for path in written:
            print(f"wrote {path}")
        sys.stdout.flush()              # here, so that a closed stdout is met below rather than at exit
        return 0
    except BrokenPipeError:             # the reader of stdout went away: the pictures are written, stop quietly
        silence_stdout()
        return 0
    except (PlotError, CheckpointError, TokenizerError, backend.DeviceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run_command(main)

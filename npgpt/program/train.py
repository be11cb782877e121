"""Train the tutorial's GPT on a text corpus, on the CPU or a GPU, and print a sample at the end.

    python -m npgpt.train                                 # the tutorial's GPT on the bundled Shakespeare
    python -m npgpt.train --preset shakespeare-char       # nanoGPT's CPU baseline (val loss ~1.88)
    python -m npgpt.train --out-dir out --resume          # continue a run
    python -m npgpt.train --help                          # every flag
    mpiexec -n 2 python -m npgpt.train --grad-accum 1     # data parallel over 2 processes (docs/distributed.md)

Each step: grad_accum micro-batches of (batch_size, seq_len) tokens -> forward, cross-entropy, backward
(gradients add up, each loss scaled by 1/grad_accum) -> clip the global gradient norm -> AdamW with a
warmup + cosine learning rate. Every eval_interval steps: validation loss, then ``ckpt.npz`` (latest) and
``best.npz`` (lowest validation loss) in --out-dir. Log lines go to stdout and ``metrics.jsonl``.
Ctrl-C saves a checkpoint and exits; --resume continues bit for bit where it stopped (on the CPU).

Shapes: micro-batches of (B, T) ids; logits (B, T, V); the loss a scalar.

On the GPU the step is recorded once as a CUDA graph and replayed (``npgpt/fast/cuda/graph.py``; --cuda-graph off to
launch every kernel from Python).

Next to read: ``npgpt/program/sample.py``; for speed, ``npgpt/fast/cpu/threads.py`` (CPU),
``npgpt/fast/cuda/kernels.py`` and ``npgpt/fast/cuda/graph.py`` (GPU).
"""

import math
import os
import secrets
import shlex
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np

from .. import backend
from .. import functional as F
from .checkpoint import (CheckpointError, load_checkpoint, read_checkpoint_meta, restore_model, restore_optimizer,
                         save_checkpoint, state_problem)
from .config import (ARCHITECTURE_FIELDS, DIST_FIELDS, ConfigError, TrainConfig, config_from_args, config_problems,
                     memory_problem)
from .cli import os_error_fix, run_command, signal_handlers, silence_stdout
from .sample import TextStream
from .rundir import RunDirError, RunDirLock, clear_previous_run, metrics_line, previous_run, trim_metrics
from .data import DataError, get_batch, read_text, split_tokens
from .dist import DistError, launched_world, resumed_grad_accum
from ..generate import generate_tokens
from ..fast.cuda.graph import GraphStep
from ..model import GPT
from ..optim import AdamW, clip_grad_norm_, cosine_lr
from .. import fast
from ..fast.cpu.allocator import keep_freed_memory
from ..fast.cpu.threads import (can_control_blas, data_parallel_shards, default_workers, set_workers,
                                sharded_backward, split_rows, usable_cores)
from ..engine import no_grad
from .tokenizer import (TokenizerError, build_tokenizer, explain_token_count, load_pretrained_tokenizer,
                        tokenizer_from_dict)
from .hf import init_from_config, load_weights, run_model_kwargs
from .grad_stats import GradStats


class TrainingError(RuntimeError):
    """A problem that stops training; the message says what to do. Exit code 2."""


# ---------------------------------------------------------------------------------------------------------
# The pieces of a step

def lm_loss(model, inputs, targets):
    """Mean next-token cross-entropy: inputs, targets (B, T) -> scalar Tensor."""
    logits = model(inputs)                                           # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_step(model, optimizer, micro_batches, grad_clip, workers=1, grad_stats=None, world=None):
    """One optimizer step over micro-batches [(inputs, targets)]; returns the mean loss (a device array).

    Each micro-batch's loss is scaled by 1/k, so the summed gradients equal those of one k-times larger batch.
    With workers > 1 (CPU), each micro-batch is split into row shards run on parallel threads, each shard's
    loss weighted by its share of the rows (npgpt/fast/cpu/threads.py). grad_stats (a GradStats, on logged steps)
    measures each layer's gradient norm before clipping and its update/weight ratio over the step.
    Under mpiexec (world, npgpt/program/dist.py) the step's micro-batches are spread over the ranks: each loss
    is scaled by 1/(ranks * k) and the gradients and losses are summed across ranks before clipping.
    """
    optimizer.zero_grad()       # batches stay NumPy arrays: ids are checked on the host, then moved
    params = model.parameters()
    losses = []
    k = len(micro_batches) * (world.size if world is not None else 1)      # the step's micro-batches, all ranks
    for inputs, targets in micro_batches:
        if workers > 1 and len(inputs) > 1:
            rows = len(inputs)

            def shard_loss(shard):
                shard_inputs, shard_targets = shard
                weight = len(shard_inputs) / (rows * k)
                return lm_loss(model, shard_inputs, shard_targets) * weight
            losses += sharded_backward(params, split_rows((inputs, targets), workers), shard_loss)
        else:
            loss = lm_loss(model, inputs, targets)
            if k > 1:
                loss = loss * (1.0 / k)
            loss.backward()
            losses.append(loss.data)
    loss = sum(losses[1:], losses[0])
    if world is not None:
        loss = world.allreduce_gradients(params, loss)      # one flat buffer: every gradient and the loss
    if grad_stats is not None:
        grad_stats.gradients_ready()
    if grad_clip > 0:
        clip_grad_norm_(params, grad_clip)
    optimizer.step()
    if grad_stats is not None:
        grad_stats.step_done()
    return loss


@no_grad()
def estimate_loss(model, tokens, config, seed, world=None, stop=None):
    """Mean loss over eval_iters batches drawn from a fixed generator: the same batches at every evaluation.
    Under mpiexec each rank evaluates every world.size-th batch and the losses are summed across ranks.
    stop (one process only): asked before each batch; once it returns True the evaluation is abandoned and
    None returned, so that a Ctrl-C does not wait for a long one."""
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    losses = []
    for i in range(config.eval_iters):
        if stop is not None and world is None and stop():
            model.train(was_training)
            return None
        inputs, targets = get_batch(tokens, config.batch_size, config.seq_len, rng)
        if world is None or i % world.size == world.rank:
            losses.append(lm_loss(model, inputs, targets).data)
    model.train(was_training)
    if world is not None and world.size > 1:
        total = world.sum_over_ranks(float(sum(losses)) if losses else 0.0, "the validation loss")
        return total / config.eval_iters
    return float(sum(losses) / len(losses))


def make_optimizer(model, config):
    """AdamW with weight decay on matrices and embeddings only (not on biases and LayerNorm gains)."""
    params = model.parameters()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return AdamW([{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}],
                 lr=config.lr, betas=(config.beta1, config.beta2))


def format_duration(seconds):
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def format_rate(tokens_per_s):
    return f"{tokens_per_s / 1000:.1f}k" if tokens_per_s >= 1000 else f"{tokens_per_s:.0f}"


# ---------------------------------------------------------------------------------------------------------
# Setting up: data, tokenizer, model, optimizer, and the state of a resumed run

def check_config(config, vocab_size=None):
    """Types and ranges of every field (config.config_problems); with vocab_size, that the run fits in memory."""
    problems = config_problems(config)
    if not problems and vocab_size is not None:
        problems = [p for p in [memory_problem(config, vocab_size, backend.get_device())] if p]
    if problems:
        raise TrainingError(problems[0])


def loss_limit(vocab_size):
    """Ten times the loss of uniform guessing, ln V: a loss above it means the run has diverged."""
    return 10 * math.log(max(vocab_size, 2))


class Run:
    """Everything a training run holds, built from a config (fresh) or from a checkpoint (resumed)."""

    def __init__(self, config, given=(), world=None):
        self.config = config
        check_config(config)
        self.world = world          # under mpiexec: this rank among world.size (npgpt/program/dist.py)
        self.rank, self.world_size = (world.rank, world.size) if world is not None else (0, 1)
        if world is not None:
            world.configure(config)
        try:
            backend.set_device(config.device)
        except backend.DeviceError as exc:
            raise TrainingError(str(exc)) from None
        if backend.get_device() == "gpu" or not fast.enabled():
            self.workers = 1                # NPGPT_FAST=0: the textbook alone, on the calling thread
        else:
            keep_freed_memory()             # the program's one process-wide setting (fast/cpu/allocator.py)
            cores = world.threads_per_rank if world is not None else default_workers()
            self.workers = config.workers or (cores if can_control_blas() else 1)
            if config.workers > usable_cores() and self.rank == 0:
                print(f"note: --workers {config.workers} is more than the {usable_cores()} cores this process may "
                      f"run on; no more threads than cores run at once", flush=True)
        set_workers(self.workers)
        self.shards = data_parallel_shards(self.workers, config.dtype)
        self.ckpt_path = os.path.join(config.out_dir, "ckpt.npz")
        self.best_path = os.path.join(config.out_dir, "best.npz")
        self.metrics_path = os.path.join(config.out_dir, "metrics.jsonl")
        self.resumed_path = None        # the checkpoint a --resume started from: ckpt.npz, else best.npz
        earlier = previous_run(config.out_dir)
        if earlier == ["metrics.jsonl"] and not (config.resume or config.overwrite):
            raise TrainingError(f"--out-dir {config.out_dir} holds the log of a run that saved no checkpoint "
                                "(metrics.jsonl); start over with --overwrite (deletes it), or choose another "
                                "--out-dir")
        if earlier and not (config.resume or config.overwrite):
            raise TrainingError(f"--out-dir {config.out_dir} already holds a run ({', '.join(earlier)}); "
                                "continue it with --resume, start over with --overwrite (deletes it), or "
                                "choose another --out-dir")
        resumed = self._load_resume_state(given) if config.resume else None
        if config.init_from and resumed is None:      # GPT-2's shape and tokenizer, from its directory
            self.config = init_from_config(config, given)
        config = self.config
        self.dtype = np.dtype(config.dtype)           # after a resume: the checkpoint's dtype
        vocab_floor = {"bpe": 256}.get(config.tokenizer, 1)     # a lower bound before the tokenizer is built
        check_config(config, resumed["tokenizer"].vocab_size if resumed else vocab_floor)

        text = read_text(config.data or None)
        if resumed is not None:
            self.tokenizer = resumed["tokenizer"]
        else:
            self.tokenizer = (load_pretrained_tokenizer(config.init_from) if config.init_from else
                              build_tokenizer(config.tokenizer, text, config.vocab_size))
            check_config(config, self.tokenizer.vocab_size)
        if config.sample_tokens > 0 and config.sample_prompt:
            try:
                self.tokenizer.encode(config.sample_prompt)
            except TokenizerError as exc:
                raise TrainingError(f"--sample-prompt {config.sample_prompt!r}: {exc}; change --sample-prompt "
                                    "(or pass --sample-tokens 0)") from None
        try:
            ids = self.tokenizer.encode(text)
        except TokenizerError as exc:
            raise TrainingError(f"--data {config.data or 'the bundled corpus'}: {exc}; the checkpoint's "
                                "character vocabulary is fixed, so resume with the text it was trained on, or "
                                "start a new run in another --out-dir") from None
        try:
            self.train_tokens, self.val_tokens = split_tokens(ids, config.seq_len)
        except DataError as exc:                      # say why a long text gave so few tokens
            raise DataError(f"{exc}{explain_token_count(self.tokenizer, text, len(ids))}") from None
        if len(self.train_tokens) < config.seq_len + 1:
            shorter = " or a smaller --seq-len" if config.seq_len > 1 else ""
            raise DataError(f"corpus too short: {len(self.train_tokens)} training tokens, one sequence needs "
                            f"{config.seq_len + 1}; use a longer text{shorter}")

        backend.manual_seed(config.seed)
        self.model = GPT(**run_model_kwargs(config, self.tokenizer.vocab_size,
                                            resumed["meta"]["model_config"] if resumed is not None else None))
        if self.dtype != np.float32:
            self.model.to(self.dtype)
        if config.init_from and resumed is None:
            load_weights(self.model, config.init_from)
        self.optimizer = make_optimizer(self.model, config)
        self.data_rng = np.random.default_rng(config.seed)
        self.step, self.best_val = 0, math.inf
        # names the run in its checkpoints, so that a ckpt.npz copied in from another run is told from its own
        self.run_id = (resumed["meta"].get("run_id") if resumed is not None else None) or secrets.token_hex(8)
        self.saved_step = None          # the step of the last checkpoint written or resumed from
        self.loss_limit = loss_limit(self.tokenizer.vocab_size)
        if resumed is not None:
            self._restore(resumed)
            self.saved_step = self.step
        if config.overwrite and self.rank == 0:
            removed = clear_previous_run(config.out_dir)
            if removed:
                print(f"--overwrite: deleted the earlier run's {', '.join(removed)} in {config.out_dir}")
        self.graph_step = None      # on the GPU: the step recorded once as a CUDA graph, then replayed
        if backend.get_device() == "gpu" and self.config.cuda_graph == "on" and fast.cuda_enabled() \
                and world is None:      # under mpiexec the step's allreduce runs outside a graph
            self.graph_step = GraphStep(lambda batches: train_step(self.model, self.optimizer, batches,
                                                                   self.config.grad_clip),
                                        self.optimizer, self.tokenizer.vocab_size)
        if world is not None:       # the replicas start identical: rank 0's parameters and moments
            world.broadcast_parameters(self.model, self.optimizer)
            world.check_replicas(self.model, self.optimizer, self.data_rng, self.step)
            self.optimizer = world.shard_optimizer(self.optimizer)     # --zero-stage 1: 1/N of the moments

    def train_step(self, micro_batches, grad_stats=None):
        """One optimizer step on these micro-batches: replayed from the CUDA graph where there is one
        (a replayed step records no gradient statistics)."""
        if self.graph_step is not None:
            return self.graph_step(micro_batches)
        if self.world is None:
            return train_step(self.model, self.optimizer, micro_batches, self.config.grad_clip, self.shards,
                              grad_stats)
        with self.world.stepping(self.step + 1, self.config.seed):   # dropout masks fixed by (seed, rank, step)
            loss = train_step(self.model, self.optimizer, micro_batches, self.config.grad_clip, self.shards,
                              grad_stats, self.world)
        if self.config.check_replicas:
            self.world.check_replicas(self.model, self.optimizer, self.data_rng, self.step + 1)
        return loss

    def _resume_path(self):
        """ckpt.npz (the latest state); where it is missing (deleted, or a full disk stopped its save) best.npz,
        a whole checkpoint too, of the step with the lowest validation loss."""
        out_dir = self.config.out_dir
        if os.path.exists(self.ckpt_path):
            return self.ckpt_path
        if os.path.exists(self.best_path):
            if self.rank == 0:
                print(f"note: {out_dir} has no ckpt.npz; resuming from best.npz, the step with the lowest "
                      "validation loss", flush=True)
            return self.best_path
        earlier = previous_run(out_dir)
        if earlier:
            raise TrainingError(f"--resume: {out_dir} holds no checkpoint (only {', '.join(earlier)}: the run "
                                "stopped before its first save); start over with --overwrite, or choose another "
                                "--out-dir")
        return self.ckpt_path           # load_checkpoint's message: no checkpoint, train one first

    def _load_resume_state(self, given):
        self.resumed_path = self._resume_path()
        try:
            advice = ("delete it (--resume then continues from best.npz, where there is one), or use another "
                      "--out-dir") if self.resumed_path == self.ckpt_path else \
                "it was the run's last checkpoint: start over with --overwrite, or use another --out-dir"
            arrays, meta = load_checkpoint(self.resumed_path, advice=advice)
        except CheckpointError as exc:
            raise TrainingError(f"--resume: {exc}") from None
        saved = TrainConfig(**meta["config"])      # every field checked by load_checkpoint
        for name in ARCHITECTURE_FIELDS + ("dtype", "preset"):
            if name in given and getattr(self.config, name) != getattr(saved, name):
                raise TrainingError(f"--resume: the checkpoint in {self.config.out_dir} was trained with "
                                    f"--{name.replace('_', '-')} {getattr(saved, name)}, not "
                                    f"{getattr(self.config, name)}; drop the flag or use another --out-dir")
        if "init_from" in given and self.config.init_from != saved.init_from:
            origin = f"from {saved.init_from}" if saved.init_from else "from scratch"
            raise TrainingError(f"--resume: the run in {self.config.out_dir} was started {origin}, not from "
                                f"--init-from {self.config.init_from}; drop the flag, or start a new run in another "
                                "--out-dir")
        # the saved config, with the flags given now on top (e.g. a larger --max-iters)
        values = saved.to_dict()
        values.update({k: getattr(self.config, k) for k in given})
        values.update(resume=True, overwrite=False, device=self.config.device, out_dir=self.config.out_dir)
        values.update({name: getattr(self.config, name) for name in DIST_FIELDS})
        if "grad_accum" not in given:   # keep the global batch: world size x grad_accum micro-batches a step
            values["grad_accum"] = resumed_grad_accum(saved.grad_accum, meta.get("world_size", 1), self.world_size)
        self.config = TrainConfig(**values)
        if "max_iters" in given and meta["step"] >= self.config.max_iters:
            raise TrainingError(f"--resume: the run in {self.config.out_dir} is at step {meta['step']}, so "
                                f"--max-iters {self.config.max_iters} leaves nothing to train; give a --max-iters "
                                f"above {meta['step']}")
        self._check_best_is_of_this_run(meta)
        return {"arrays": arrays, "meta": meta, "tokenizer": tokenizer_from_dict(meta["tokenizer"])}

    def _check_best_is_of_this_run(self, meta):
        """best.npz is replaced by any validation loss below the resumed checkpoint's best_val: where it is of
        another run (a ckpt.npz copied in from elsewhere), that would lose it, so the run is refused. The run's
        id tells them apart; checkpoints written without one are compared by model and tokenizer."""
        if self.resumed_path == self.best_path or not os.path.exists(self.best_path):
            return
        try:
            best_meta = read_checkpoint_meta(self.best_path)
        except CheckpointError:
            return                      # unreadable: nothing of value to keep, the next best replaces it
        if best_meta.get("run_id") and meta.get("run_id"):
            other = best_meta["run_id"] != meta["run_id"]
        else:
            other = best_meta.get("model_config") != meta["model_config"] or \
                best_meta.get("tokenizer") != meta["tokenizer"]
        if other:
            raise TrainingError(f"--resume: {self.best_path} and {self.ckpt_path} are of two different runs "
                                "(a checkpoint copied in from another?); move one of them to its own --out-dir")

    def _restore(self, resumed):
        arrays, meta = resumed["arrays"], resumed["meta"]
        restore_model(self.model, arrays, self.resumed_path)
        restore_optimizer(self.optimizer, arrays, meta)
        self.step = meta["step"]
        self.best_val = meta.get("best_val", math.inf)
        saved_workers = meta.get("workers")
        if saved_workers is not None and saved_workers != self.workers:
            # the batch's shards (their dropout seeds, the order their gradients are summed in) follow the count
            print(f"note: {self.resumed_path} was trained with {saved_workers} worker thread(s), this run uses "
                  f"{self.workers}: training continues, but not bit for bit as it would have; pass --workers "
                  f"{saved_workers} for that", flush=True)
        backend.set_rng_state(self.data_rng, meta["rng"]["data"])
        backend.set_rng_state(backend.global_rng(), meta["rng"]["dropout"])

    def meta(self):
        return {"config": self.config.to_dict(), "model_config": self.model.config, "step": self.step,
                "run_id": self.run_id, "world_size": self.world_size, "workers": self.workers, "best_val": self.best_val,
                "tokenizer": self.tokenizer.to_dict(),
                "rng": {"data": backend.rng_state(self.data_rng),
                        "dropout": backend.rng_state(backend.global_rng())}}

    def good_checkpoint(self):
        """Which checkpoint to go back to and how, for the message of a run that diverged."""
        if self.saved_step is None:
            return (f"no checkpoint was saved in {self.config.out_dir}; lower --lr or --grad-clip and start again "
                    "with --overwrite")
        latest = self.ckpt_path if os.path.exists(self.ckpt_path) else self.resumed_path
        best = f", best.npz the lowest validation loss ({self.best_val:.4f})" if os.path.exists(self.best_path) \
            and latest != self.best_path else ""
        return f"the last good checkpoint is {latest} (step {self.saved_step}){best}; lower --lr or --grad-clip " \
            "and --resume"

    def save(self, *paths):
        """Save to each path (default ckpt.npz), once the weights and moments are checked to be sane."""
        optimizer = self.optimizer if self.world is None else self.world.optimizer_for_saving(self.optimizer)
        problem = state_problem(self.model, optimizer)
        if problem:
            raise TrainingError(f"at step {self.step} {problem}; stopped without saving, so "
                                f"{self.good_checkpoint()}")
        for path in paths or (self.ckpt_path,):
            if self.rank == 0:          # under mpiexec rank 0 writes; the replicas are identical
                save_checkpoint(path, self.model, optimizer, self.meta())
            if path == self.ckpt_path:
                self.saved_step = self.step

    def lr_at(self, step):
        c = self.config
        return cosine_lr(step, c.lr, c.min_lr, c.warmup_iters, c.max_iters)

    def next_micro_batches(self):
        """This rank's grad_accum micro-batches of the step. Every rank draws all world_size x grad_accum of them
        from the same generator and keeps its own consecutive share: those that one process with
        --grad-accum world_size x grad_accum would use in the same positions."""
        c, k = self.config, self.config.grad_accum
        batches = [get_batch(self.train_tokens, c.batch_size, c.seq_len, self.data_rng)
                   for _ in range(k * self.world_size)]
        return batches[self.rank * k:(self.rank + 1) * k]


# ---------------------------------------------------------------------------------------------------------
# The loop

class Stopped(KeyboardInterrupt):
    """Training stopped by a signal after saving; exit_code is 128 + the signal (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class _StopFlag:
    """SIGINT (Ctrl-C) or SIGTERM (kill, timeout, schedulers) sets a flag; the loop saves and exits at the end
    of the current step. A second signal aborts at once. A closed stdout (the reader of a pipe gone, as with
    `| head`) stops the run the same way, as SIGPIPE (exit code 141). What it says goes to stderr, beside
    the errors, so that it reaches the terminal while stdout goes to a file."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    CLOSED_STDOUT = getattr(signal, "SIGPIPE", signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._handlers = signal_handlers(self.SIGNALS, self._received)

    @property
    def requested(self):
        return self.signum is not None

    def stdout_closed(self):
        silence_stdout()            # the rest of the run's prints, and the interpreter's last flush, go nowhere
        if not self.requested:
            self.signum = self.CLOSED_STDOUT

    def _received(self, signum, frame):
        if self.requested:
            raise Stopped(signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(signal again to abort)", file=sys.stderr, flush=True)

    def __enter__(self):
        self._handlers.__enter__()      # off the main thread: no handler, signals behave as usual
        return self

    def __exit__(self, *exc):
        return self._handlers.__exit__(*exc)


def train(run, log=print):
    """Run the loop from run.step to max_iters. Returns the list of logged metric records."""
    c = run.config
    os.makedirs(c.out_dir, exist_ok=True)
    if run.step and run.rank == 0:      # records logged after the checkpoint's step were lost with that run
        trim_metrics(run.metrics_path, run.step)
    records = []
    tokens_per_step = c.batch_size * c.seq_len * c.grad_accum * run.world_size
    loss_sum, loss_count = None, 0
    window_start, window_steps = time.perf_counter(), 0
    step_times = []
    grad_stats = GradStats(run.model)
    metrics_path = run.metrics_path if run.rank == 0 else os.devnull      # under mpiexec rank 0 writes
    with _StopFlag() as stop, open(metrics_path, "a", encoding="utf-8") as metrics:
        def say(line):
            try:
                log(line)
            except BrokenPipeError:
                stop.stdout_closed()

        if run.world is not None:
            run.world.stop_flag = stop      # the ranks agree on stopping with every step's allreduce
        while run.step < c.max_iters:
            for group in run.optimizer.param_groups:
                group["lr"] = run.lr_at(run.step)
            grad_stats.clear()
            logged = (run.step + 1) % c.log_interval == 0 or run.step + 1 == c.max_iters
            loss = run.train_step(run.next_micro_batches(), grad_stats if logged else None)
            run.step += 1
            window_steps += 1
            loss_sum = loss if loss_sum is None else loss_sum + loss
            loss_count += 1
            stopping = stop.requested if run.world is None else run.world.stopping

            is_eval = run.step % c.eval_interval == 0 or run.step == c.max_iters
            if run.step % c.log_interval == 0 or is_eval or stopping:
                backend.synchronize()
                now = time.perf_counter()
                mean_loss = float(loss_sum) / loss_count            # the only value that leaves the device
                if not math.isfinite(mean_loss) or mean_loss > run.loss_limit:
                    raise TrainingError(
                        f"loss became {mean_loss:.4g} at step {run.step}; stopped without saving, so "
                        f"{run.good_checkpoint()}")
                ms = (now - window_start) * 1000 / window_steps
                step_times.append(ms)
                record = {"step": run.step, "loss": round(mean_loss, 5), "lr": run.lr_at(run.step - 1),
                          "ms_per_step": round(ms, 2), "tokens_per_s": round(tokens_per_step * 1000 / ms, 1)}
                if is_eval:
                    val_loss = estimate_loss(run.model, run.val_tokens, c, c.seed + 1, run.world,
                                             stop=lambda: stop.requested)
                    if val_loss is None:        # a signal during the evaluation: the step is saved without it
                        is_eval, stopping = False, True
                    elif not math.isfinite(val_loss) or val_loss > run.loss_limit:
                        raise TrainingError(
                            f"validation loss became {val_loss:.4g} at step {run.step}; stopped without saving, "
                            f"so {run.good_checkpoint()}")
                    else:
                        record["val_loss"] = round(val_loss, 5)
                eta = (c.max_iters - run.step) * np.median(step_times[-5:]) / 1000
                record["eta_s"] = round(eta, 1)
                line = f"step {run.step}/{c.max_iters} | loss {mean_loss:.3f}"
                if "val_loss" in record:
                    line += f" | val {record['val_loss']:.3f}"
                line += (f" | lr {record['lr']:.1e} | {ms:.0f} ms/step | "
                         f"{format_rate(record['tokens_per_s'])} tok/s | ETA {format_duration(eta)}")
                say(line)
                record.update(grad_stats.record())      # per-layer gradient norms and update ratios
                metrics.write(metrics_line(record))
                metrics.flush()
                records.append(record)
                if is_eval:
                    if record["val_loss"] < run.best_val:
                        run.best_val = record["val_loss"]
                        run.save(run.best_path, run.ckpt_path)
                    else:
                        run.save()
                loss_sum, loss_count = None, 0
                window_start, window_steps = time.perf_counter(), 0
            if stopping:
                if run.saved_step != run.step:
                    run.save()
                closed = "stdout was closed: " if stop.signum == stop.CLOSED_STDOUT else ""
                print(f"{closed}interrupted at step {run.step}: checkpoint saved to {run.ckpt_path}; "
                      f"continue with --out-dir {c.out_dir} --resume", file=sys.stderr)
                raise Stopped(stop.signum or signal.SIGINT)     # under mpiexec: perhaps another rank's signal
    return records


@contextmanager
def _sigterm_interrupts():
    """SIGTERM raises Stopped (a KeyboardInterrupt, exit code 143) within the block, as Ctrl-C raises
    KeyboardInterrupt: the sample after training stops the same way for both, its out dir's lock released."""
    def handler(signum, frame):
        raise Stopped(signum)
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:                  # not the main thread: signals behave as usual
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def print_sample(model, tokenizer, prompt, new_tokens, rng):
    """The prompt and new_tokens sampled after it (temperature 0.8, top-k 50), printed as they come."""
    text = TextStream(tokenizer)
    sys.stdout.write(tokenizer.decode(prompt))
    for next_ids in generate_tokens(model, prompt, new_tokens, temperature=0.8, top_k=50, rng=rng):
        sys.stdout.write(text.push(next_ids[0]))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    sys.stdout.flush()


def os_error_message(exc):
    """One line for an OSError met writing the run's files: what failed, and the fix for that kind of failure."""
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}; {os_error_fix(exc)}"


def main(argv=None):
    world = None
    try:
        world = launched_world()              # None unless started by mpiexec (npgpt/program/dist.py)
        config, given = config_from_args(argv)
        check_config(config)
        lock = RunDirLock(config.out_dir) if world is None or world.rank == 0 else nullcontext()
        with lock:                            # one run at a time in an out dir
            started = time.perf_counter()
            run = Run(config, given, world)
            c = run.config
            print(f"npgpt: {c.preset} preset on {backend.get_device()} ({c.dtype}), "
                  f"{run.model.num_parameters():,} parameters, {c.tokenizer} tokenizer with {run.tokenizer.vocab_size:,} tokens, "
                  f"{len(run.train_tokens):,} training / {len(run.val_tokens):,} validation tokens")
            if run.graph_step is not None:
                print("the training step is recorded as a CUDA graph and replayed (--cuda-graph off to launch "
                      "kernels one by one)")
            if world is not None:
                print(f"{world.describe()}; each step {c.grad_accum} micro-batch(es) on each of the {world.size} "
                      f"ranks, {run.workers} thread(s) each")
            if run.step:
                print(f"resuming from step {run.step} of {c.max_iters} ({run.resumed_path})")
            elif c.init_from:
                print(f"starting from the weights in {c.init_from} (--init-from)")
            train(run)
            print(f"done in {format_duration(time.perf_counter() - started)}: best validation loss "
                  f"{run.best_val:.4f}; checkpoints in {c.out_dir}/")
            print(f"plots: python -m npgpt.plot --out-dir {shlex.quote(c.out_dir)} --loss --grads --attention")
            if c.sample_tokens > 0 and run.rank == 0:
                prompt = run.tokenizer.encode(c.sample_prompt) if c.sample_prompt else np.zeros(1, np.int64)
                print("-" * 60)
                try:
                    with _sigterm_interrupts():
                        print_sample(run.model, run.tokenizer, prompt, c.sample_tokens,
                                     np.random.default_rng(c.seed))
                except KeyboardInterrupt as exc:    # the run is saved: only the sample stops
                    print(f"\nsample interrupted; the trained run is in {c.out_dir}/ (python -m npgpt.sample "
                          f"--out-dir {shlex.quote(c.out_dir)} for more)", file=sys.stderr)
                    return getattr(exc, "exit_code", 130)
                print("-" * 60)
            return 0
    except KeyboardInterrupt as exc:            # Stopped: 130 after SIGINT, 143 after SIGTERM, 141 closed stdout
        return getattr(exc, "exit_code", 130)
    except BrokenPipeError:                     # stdout closed outside the loop: before it, or once all is saved
        silence_stdout()
        return 141
    except (TrainingError, DataError, TokenizerError, CheckpointError, ConfigError, RunDirError,
            backend.DeviceError, DistError) as exc:
        if world is not None:                   # one message for all ranks, or one naming the failing rank
            return world.fail(exc, 2, expected=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:                      # a full disk or a read-only directory, outside a checkpoint save
        message = os_error_message(exc)
        if world is not None:
            return world.fail(message, 2, expected=True)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:                    # under mpiexec a failing rank must not leave the others waiting
        if world is None:
            raise
        return world.fail(exc, 1, expected=False)


if __name__ == "__main__":
    run_command(main)

"""Time to quality: npgpt and the PyTorch reference trained for the same wall-clock budget.

Both train the `shakespeare-char` preset on the bundled corpus with the same data order (the same seeded
batch generator), the same AdamW settings, learning-rate schedule and gradient clipping, each in its own
process with the same threads; PyTorch's model uses F.scaled_dot_product_attention. The two take turns:
each trains EVAL_EVERY steps, measures its validation loss over the same fixed validation batches (the clock
stops meanwhile), then waits while the other does the same, so that a noisy stretch of the machine falls on
both alike, as the speed suite's alternating steps do. Each records the training time at which its loss
first reached TARGET, and stops there, at the budget, or at the preset's last step.

    python -m benchmarks --suite quality --budget 240         (both, taking turns)
    python -m benchmarks.quality --impl npgpt --budget 120    (one side alone)
    python -m benchmarks.quality --impl npgpt --serve         (one side driven over stdin/stdout:
        {"op": "train", "steps": N, "budget": B} -> up to N more steps (fewer at the last step or once B
        seconds of training are spent), then the validation loss: {"steps": done so far, "seconds": training
        time so far, "val_loss": v, "seconds_to_target": ..., "done": whether it has reached the target, spent
        B or done the last step}; {"op": "quit"})
"""

import json
import math
import os
import sys
import time

import numpy as np

from benchmarks.suite import (argument_parser, positive_number, refuse_too_many_threads, refuse_unusable_device,
                              stop_signals_as_ctrl_c, usable_cores, whole_number)

TARGET = 1.88          # nanoGPT's reported validation loss for this preset
EVAL_EVERY = 100
# Before each turn the process sleeps this long, so that the threads of the side that trained last (PyTorch's
# OpenMP threads, npgpt's pool, OpenBLAS's) have stopped spinning; the clock does not run meanwhile
SETTLE_S = 0.2


def _setup(device):
    from npgpt.program.config import PRESETS, TrainConfig
    from npgpt.program.train import Run
    config = TrainConfig(**dict(PRESETS["shakespeare-char"], preset="shakespeare-char", device=device,
                                out_dir="unused", sample_tokens=0))
    return config, Run(config)


class Training:
    """One side's run: step(i) trains step i, evaluate() gives the validation loss; train(n) runs up to n more
    steps, timing each, then evaluates, and keeps count of steps, training seconds and the time to TARGET."""

    def __init__(self, step, evaluate, max_iters):
        self.step, self.evaluate, self.max_iters = step, evaluate, max_iters
        self.steps, self.seconds, self.val_loss, self.seconds_to_target = 0, 0.0, None, None

    def train(self, n, budget=math.inf):
        for _ in range(min(n, self.max_iters - self.steps)):
            if self.seconds >= budget:
                break
            start = time.perf_counter()
            self.step(self.steps)
            self.seconds += time.perf_counter() - start
            self.steps += 1
        self.val_loss = self.evaluate()
        if self.seconds_to_target is None and self.val_loss <= TARGET:
            self.seconds_to_target = self.seconds
        return self.result()

    def done(self, budget):
        return self.seconds_to_target is not None or self.seconds >= budget or self.steps >= self.max_iters

    def result(self):
        return {"steps": self.steps, "seconds": self.seconds, "val_loss": self.val_loss,
                "seconds_to_target": self.seconds_to_target, "target": TARGET,
                "finite": self.val_loss is not None and math.isfinite(self.val_loss)}


def npgpt_training(device):
    from npgpt import backend
    from npgpt.program.train import estimate_loss
    config, run = _setup(device)

    def step(i):
        for group in run.optimizer.param_groups:
            group["lr"] = run.lr_at(i)
        run.train_step(run.next_micro_batches())
        backend.synchronize()
    return Training(step, lambda: estimate_loss(run.model, run.val_tokens, config, config.seed + 1),
                    config.max_iters)


def torch_training(device, threads):
    import torch
    from benchmarks.reference import GPT
    from npgpt.program.data import get_batch
    torch.set_num_threads(threads)
    config, run = _setup("cpu")       # the same tokens, split and batch generator as npgpt's run
    dev = "cuda" if device == "gpu" else "cpu"
    torch.manual_seed(config.seed)
    model = GPT(**config.model_kwargs(run.tokenizer.vocab_size), attention="sdpa").to(dev)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=config.lr, betas=(config.beta1, config.beta2))
    F = torch.nn.functional

    def loss_of(inputs, targets):
        logits = model(torch.from_numpy(inputs).to(dev))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).to(dev).reshape(-1))

    def step(i):
        for group in opt.param_groups:
            group["lr"] = run.lr_at(i)
        opt.zero_grad()
        for inputs, targets in run.next_micro_batches():
            (loss_of(inputs, targets) / config.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    def evaluate():
        model.eval()
        rng = np.random.default_rng(config.seed + 1)
        losses = []
        with torch.no_grad():
            for _ in range(config.eval_iters):
                losses.append(loss_of(*get_batch(run.val_tokens, config.batch_size, config.seq_len, rng)).item())
        model.train()
        return sum(losses) / len(losses)
    return Training(step, evaluate, config.max_iters)


def serve(training, replies, budget=math.inf, stdin=sys.stdin):
    """Answer {"op": "train", "steps": N[, "budget": seconds]} commands on `replies` until {"op": "quit"} or
    the end of stdin."""
    for line in stdin:
        try:
            command = json.loads(line)
            op = command["op"]
            steps = int(command["steps"]) if op == "train" else 0
            if op not in ("train", "quit"):
                raise ValueError(op)
        except (ValueError, KeyError, TypeError, AttributeError):
            replies.write(json.dumps({"error": f"not a command: {line.strip()!r}; send {{\"op\": \"train\", "
                                               f"\"steps\": N}} or {{\"op\": \"quit\"}}"}) + "\n")
            replies.flush()
            continue
        if op == "quit":
            break
        time.sleep(command.get("settle_s", SETTLE_S))
        budget = command.get("budget", budget)
        try:
            result = dict(training.train(steps, budget), done=training.done(budget))
        except Exception as exc:    # told to the parent, which stops the suite with it in one line
            result = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(result) + "\n")
        replies.flush()


def positive_seconds(text):
    return positive_number(text, "number of seconds")


def main(argv=None):
    p = argument_parser(__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("npgpt", "torch"), required=True)
    p.add_argument("--budget", type=positive_seconds, default=120.0, help="wall-clock seconds of training")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=whole_number, default=usable_cores())
    p.add_argument("--serve", action="store_true", help="train when told to over stdin (the suite's way)")
    args = p.parse_args(argv)
    refuse_unusable_device(p, args.device)
    refuse_too_many_threads(p, args.threads, args.device)
    if args.serve:
        # the replies keep stdout to themselves: whatever else prints (a note from the training program) goes
        # to stderr, where it cannot be taken for a reply
        replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    if args.serve:
        try:
            training = npgpt_training(args.device) if args.impl == "npgpt" else \
                torch_training(args.device, args.threads)
        except Exception as exc:    # told to the parent, which stops the suite with it in one line
            replies.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
            replies.flush()
            return 1
        replies.write(json.dumps({"ready": args.impl}) + "\n")
        replies.flush()
        serve(training, replies, args.budget)
        return 0
    training = npgpt_training(args.device) if args.impl == "npgpt" else torch_training(args.device, args.threads)
    try:
        with stop_signals_as_ctrl_c() as stop:
            while not training.done(args.budget):
                training.train(EVAL_EVERY, args.budget)
            if training.val_loss is None:       # a budget spent before the first turn: the loss as it stands
                training.train(0)
    except KeyboardInterrupt:
        print(f"interrupted{stop.how} after {training.steps} steps: no result", file=sys.stderr)
        return 128 + stop.signum
    print(json.dumps(dict(training.result(), impl=args.impl)))
    return 0


if __name__ == "__main__":
    from npgpt.program.cli import run_command     # paths that are not UTF-8 printed as they are
    run_command(main)

"""Where a training step's time goes, op by op: forward, backward, and the optimizer.

    python -m benchmarks.profile                  # the tutorial GPT at (8, 128), dropout 0.1
    python -m benchmarks.profile --batch 16 --seq 256 --steps 5

Forward time of an op is the time from the previous op's result to this op's result (ops run one after
another, so the gaps tile the forward pass); backward time is measured around each op's backward closure.
"""

import argparse
import collections
import os
import time

import numpy as np


def profile(batch, seq, steps, dropout, threads, device="cpu", model_config=None):
    import npgpt
    from npgpt import engine
    from npgpt import backend
    from npgpt.program.train import train_step, make_optimizer
    from npgpt.program.config import TrainConfig

    forward = collections.defaultdict(float)
    backward = collections.defaultdict(float)
    counts = collections.Counter()
    clock = {"last": time.perf_counter(), "on": False}
    sync = backend.synchronize   # on the GPU, each op is timed to its completion

    def observe(op, backward_fn):
        """The engine's op observer: forward time since the previous op's result, and a timed backward."""
        sync()
        now = time.perf_counter()
        if clock["on"]:
            forward[op] += now - clock["last"]
            counts[op] += 1

        def timed_backward(grad):
            sync()
            start = time.perf_counter()
            out = backward_fn(grad)
            sync()
            backward[op] += time.perf_counter() - start
            return out
        clock["last"] = time.perf_counter()
        return timed_backward

    previous_observer = engine.set_op_observer(observe)
    from npgpt.fast.cpu.allocator import keep_freed_memory
    from npgpt.fast.cpu.threads import set_workers
    backend.set_device(device)
    if device == "cpu":
        keep_freed_memory()
    else:
        npgpt.fast.enable_cuda()
    workers = threads if device == "cpu" else 1
    set_workers(workers)
    backend.manual_seed(0)
    config = TrainConfig(dropout=dropout, grad_clip=0.0, weight_decay=0.01)
    model_config = model_config or dict(vocab_size=10000)
    model = npgpt.GPT(**model_config, dropout=dropout)
    vocab = model.vocab_size
    opt = make_optimizer(model, config)
    rng = np.random.default_rng(0)
    total = 0.0
    real_step = opt.step

    def timed_step():
        start = time.perf_counter()
        real_step()
        backend.synchronize()
        timed_step.seconds += time.perf_counter() - start
    timed_step.seconds = 0.0
    opt.step = timed_step
    for i in range(steps + 1):
        ids = rng.integers(0, vocab, (batch, seq + 1))
        if i == 1:   # the first step warms up; reset the tallies after it
            forward.clear(), backward.clear(), counts.clear()
            timed_step.seconds = 0.0
            clock["on"] = True
        start = time.perf_counter()
        clock["last"] = start
        train_step(model, opt, [(ids[:, :-1], ids[:, 1:])], 0.0, workers)
        backend.synchronize()
        if i >= 1:
            total += time.perf_counter() - start
    engine.set_op_observer(previous_observer)
    return forward, backward, counts, timed_step.seconds, total, steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--model", choices=("tutorial", "gpt2-small"), default="tutorial")
    args = p.parse_args(argv)
    from benchmarks.suite import GPT2_SMALL, TUTORIAL
    forward, backward, counts, optim_s, total, steps = profile(
        args.batch, args.seq, args.steps, args.dropout, args.threads, args.device,
        GPT2_SMALL if args.model == "gpt2-small" else TUTORIAL)
    ops = sorted(set(forward) | set(backward), key=lambda op: -(forward[op] + backward[op]))
    per = 1000.0 / steps
    print(f"{args.model} training step ({args.batch}, {args.seq}), dropout {args.dropout}, {args.device}: "
          f"{total * per:.1f} ms per step (mean of {steps}; ops timed one by one)\n")
    if args.device == "cpu" and args.threads > 1:
        print(f"(data-parallel: {args.threads} threads run the ops at once, so the per-op times below add up to more "
              "than the step; --threads 1 gives a breakdown that adds up)\n")
    print("| op | calls/step | forward ms | backward ms | total ms | share |")
    print("|---|---|---|---|---|---|")
    accounted = 0.0
    for op in ops:
        t = forward[op] + backward[op]
        accounted += t
        print(f"| {op} | {counts[op] // steps} | {forward[op] * per:.1f} | {backward[op] * per:.1f} | "
              f"{t * per:.1f} | {t / total * 100:.0f}% |")
    accounted += optim_s
    print(f"| AdamW step | 1 | | | {optim_s * per:.1f} | {optim_s / total * 100:.0f}% |")
    rest = total - accounted
    if rest > 0:
        print(f"| engine, zero_grad, glue | | | | {rest * per:.1f} | {rest / total * 100:.0f}% |")


if __name__ == "__main__":
    main()

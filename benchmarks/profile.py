"""Where a training step's time goes, op by op: forward, backward, the optimizer, and the engine itself.

    python -m benchmarks.profile                          # the tutorial GPT at (8, 128), the training program
    python -m benchmarks.profile --loop                   # the README's five-line loop instead
    python -m benchmarks.profile --model shakespeare-char --loop     # the small model at its (12, 64)
    python -m benchmarks.profile --batch 16 --seq 256 --steps 5

Forward time of an op is the time from the previous op's result to this op's result (ops run one after
another, so the gaps tile the forward pass: the Python between two ops counts to the second); backward time
is measured around each op's backward closure. The engine's own share of the backward pass, what is neither
an op's closure nor the optimizer (the graph's order, gradients summed where a tensor is used twice, leaves'
.grad), is the backward's wall time minus its ops' closures; it is printed in all and per op.
"""

import argparse
import collections
import os
import time

import numpy as np


def profile(batch, seq, steps, dropout, threads, device="cpu", model_config=None, loop=False):
    import npgpt
    from npgpt import backend, engine
    from npgpt import functional as F
    from npgpt.program.config import TrainConfig
    from npgpt.fast.cpu.threads import data_parallel_shards
    from npgpt.program.train import make_optimizer, train_step

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
    if device != "cpu":
        npgpt.fast.enable_cuda()
    elif not loop:
        keep_freed_memory()         # what the training program does; a user's loop leaves malloc alone
    workers = threads if device == "cpu" else 1
    set_workers(workers)
    shards = data_parallel_shards(workers)
    backend.manual_seed(0)
    config = TrainConfig(dropout=dropout, grad_clip=0.0, weight_decay=0.01)
    model_config = model_config or dict(vocab_size=10000)
    model = npgpt.GPT(**model_config, dropout=dropout)
    vocab = model.vocab_size
    opt = make_optimizer(model, config)
    rng = np.random.default_rng(0)
    total = 0.0
    timers = {"optimizer": 0.0, "backward": 0.0}
    real_step, real_backward = opt.step, npgpt.Tensor.backward

    def timed(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            if clock["on"]:
                timers[name] += time.perf_counter() - start
            return out
        return run
    opt.step = timed("optimizer", real_step)
    npgpt.Tensor.backward = timed("backward", real_backward)

    def five_line_loop(batches):
        (inputs, targets), = batches
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    try:
        for i in range(steps + 1):
            ids = rng.integers(0, vocab, (batch, seq + 1))
            if i == 1:   # the first step warms up; reset the tallies after it
                forward.clear(), backward.clear(), counts.clear()
                clock["on"] = True
            start = time.perf_counter()
            clock["last"] = start
            if loop:
                five_line_loop([(ids[:, :-1], ids[:, 1:])])
            else:
                train_step(model, opt, [(ids[:, :-1], ids[:, 1:])], 0.0, shards)
            backend.synchronize()
            if i >= 1:
                total += time.perf_counter() - start
    finally:
        engine.set_op_observer(previous_observer)
        npgpt.Tensor.backward = real_backward
    return forward, backward, counts, timers, total, steps


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=_positive, default=None, help="default 8 (tutorial), 12 (shakespeare-char)")
    p.add_argument("--seq", type=_positive, default=None, help="default 128 (tutorial), 64 (shakespeare-char)")
    p.add_argument("--steps", type=_positive, default=5)
    p.add_argument("--dropout", type=float, default=None, help="default 0.1 (tutorial), 0 (shakespeare-char)")
    p.add_argument("--threads", type=_positive, default=os.cpu_count())
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--model", choices=("tutorial", "shakespeare-char", "gpt2-small"), default="tutorial")
    p.add_argument("--loop", action="store_true",
                   help="time the README's five-line loop (the library alone) instead of the training program")
    args = p.parse_args(argv)
    from benchmarks.suite import GPT2_SMALL, SHAKESPEARE_CHAR, SHAKESPEARE_SHAPE, TUTORIAL
    small = args.model == "shakespeare-char"
    model = {"tutorial": TUTORIAL, "shakespeare-char": SHAKESPEARE_CHAR, "gpt2-small": GPT2_SMALL}[args.model]
    batch = args.batch or (SHAKESPEARE_SHAPE[0] if small else 8)
    seq = args.seq or (SHAKESPEARE_SHAPE[1] if small else 128)
    dropout = args.dropout if args.dropout is not None else (0.0 if small else 0.1)
    forward, backward, counts, timers, total, steps = profile(
        batch, seq, args.steps, dropout, args.threads, args.device, model, loop=args.loop)
    ops = sorted(set(forward) | set(backward), key=lambda op: -(forward[op] + backward[op]))
    per = 1000.0 / steps
    what = "five-line loop" if args.loop else "training program"
    print(f"{args.model} {what} step ({batch}, {seq}), dropout {dropout}, {args.device}, {args.threads} "
          f"threads: {total * per:.1f} ms per step (mean of {steps}; ops timed one by one)\n")
    from npgpt.fast.cpu.threads import data_parallel_shards
    data_parallel = args.device == "cpu" and not args.loop and data_parallel_shards(args.threads) > 1
    if data_parallel:
        print(f"(data-parallel: {args.threads} threads run the ops at once, so the per-op times below add up to more "
              "than the step; --threads 1 or --loop gives a breakdown that adds up)\n")
    print("| op | calls/step | forward ms | backward ms | total ms | share |")
    print("|---|---|---|---|---|---|")
    accounted = 0.0
    for op in ops:
        t = forward[op] + backward[op]
        accounted += t
        print(f"| {op} | {counts[op] // steps} | {forward[op] * per:.1f} | {backward[op] * per:.1f} | "
              f"{t * per:.1f} | {t / total * 100:.0f}% |")
    optim_s = timers["optimizer"]
    accounted += optim_s
    print(f"| AdamW step | 1 | | | {optim_s * per:.1f} | {optim_s / total * 100:.0f}% |")
    if not data_parallel:
        engine_s = max(0.0, timers["backward"] - sum(backward.values()))
        accounted += engine_s
        calls = sum(counts.values()) / steps
        print(f"| engine: backward bookkeeping | {calls:.0f} ops | | {engine_s * per:.1f} | {engine_s * per:.1f} | "
              f"{engine_s / total * 100:.0f}% ({engine_s * per / max(calls, 1) * 1000:.0f} us an op) |")
    rest = total - accounted
    if rest > 0:
        print(f"| zero_grad, data, glue | | | | {rest * per:.1f} | {rest / total * 100:.0f}% |")


if __name__ == "__main__":
    main()

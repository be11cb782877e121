"""Where a training step's time goes, op by op: forward, backward, the optimizer, and the engine itself.

    python -m benchmarks.profile                          # the tutorial GPT at (8, 128), the training program
    python -m benchmarks.profile --loop                   # the README's five-line loop instead
    python -m benchmarks.profile --model shakespeare-char --loop     # the small model at its (12, 64)
    python -m benchmarks.profile --forward                # an inference forward pass (no graph), op by op
    python -m benchmarks.profile --generate               # generation with a KV cache, a token at a time
    python -m benchmarks.profile --batch 16 --seq 256 --steps 5
    python -m benchmarks.profile --anchor-ms 303          # PyTorch's time for the same step, from the suite

Under the table, the products' floor: the FLOPs of the weights' products (linear's, or those of the layers
run as one op, npgpt/fast/cpu/layers.py; forward, and dx and dW in the backward), their time and speed
against this machine's float32 GEMM peak (2048^3, measured here), and the step's time if every other op cost
nothing. For generation (--generate: a "step" is one new token of greedy decoding after a prompt of --seq
positions, batch --batch), whose products of a few rows each read every weight once and are bound by
memory, the floor is the weights' bytes a token and the rate at which the token's kernel calls went through
them. With --anchor-ms (PyTorch's median for the same step, forward pass or token, from `python -m
benchmarks`), that floor and the step are also given as ratios to it, with what a target ratio leaves for
everything that is not a product (not for generation).

Forward time of an op is the time from the previous op's result to this op's result (ops run one after
another, so the gaps tile the forward pass: the Python between two ops counts to the second); backward time
is measured around each op's backward closure. The engine's own share of the backward pass, what is neither
an op's closure nor the optimizer (the graph's order, gradients summed where a tensor is used twice, leaves'
.grad), is the backward's wall time minus its ops' closures; it is printed in all and per op.

Where the C kernels run (the CPU), each kernel call is timed too (``native.set_call_observer``), so every
row also says how much of it was spent outside the kernels: the engine's and the op's Python, and NumPy calls
of their own (a gather, a small copy). That is the per-op cost of the engine and its glue, in microseconds a
call; a summary line under the table adds it up for the step.
"""

import collections
import sys
import time

import numpy as np

from benchmarks.suite import (argument_parser, positive_number, refuse_too_many_threads, refuse_unusable_device,
                              stop_signals_as_ctrl_c, usable_cores, whole_number)


def profile(batch, seq, steps, dropout, threads, device="cpu", model_config=None, loop=False, forward_only=False,
            generate_only=False):
    import npgpt
    from npgpt import backend, engine
    from npgpt import functional as F
    from npgpt.program.config import TrainConfig
    from npgpt.fast.cpu.native_ops import PRODUCT_KERNELS
    from npgpt.fast.cpu.threads import data_parallel_shards
    from npgpt.program.train import make_optimizer, train_step

    forward = collections.defaultdict(float)
    backward = collections.defaultdict(float)
    counts = collections.Counter()
    # the same times counting only what was spent inside the C kernels' calls; kernel_time["all"] is the
    # running total of every kernel call's time, kernel_time["products"] of the weights' products alone
    forward_kernels = collections.defaultdict(float)
    backward_kernels = collections.defaultdict(float)
    kernel_time = {"all": 0.0, "products": 0.0}
    clock = {"last": time.perf_counter(), "kernels": 0.0, "on": False}
    sync = backend.synchronize   # on the GPU, each op is timed to its completion

    def observe(op, backward_fn):
        """The engine's op observer: forward time since the previous op's result, and a timed backward."""
        sync()
        now = time.perf_counter()
        if clock["on"]:
            forward[op] += now - clock["last"]
            forward_kernels[op] += kernel_time["all"] - clock["kernels"]
            counts[op] += 1

        def timed_backward(grad):
            sync()
            start, kernels_before = time.perf_counter(), kernel_time["all"]
            out = backward_fn(grad)
            sync()
            backward[op] += time.perf_counter() - start
            backward_kernels[op] += kernel_time["all"] - kernels_before
            return out
        clock["last"], clock["kernels"] = time.perf_counter(), kernel_time["all"]
        return timed_backward

    def observe_kernel(name, seconds):
        """native's call observer: every kernel call's time, and the weights' products' apart."""
        kernel_time["all"] += seconds
        if name in PRODUCT_KERNELS:
            kernel_time["products"] += seconds

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
    total, kernels_at_start = 0.0, 0.0
    timers = {"optimizer": 0.0, "backward": 0.0}
    real_step, real_backward = opt.step, npgpt.Tensor.backward

    def timed(name, fn):
        def run(*args, **kwargs):
            start, kernels_before = time.perf_counter(), kernel_time["all"]
            out = fn(*args, **kwargs)
            sync()
            if clock["on"]:
                timers[name] += time.perf_counter() - start
                timers[name + " kernels"] += kernel_time["all"] - kernels_before
            return out
        return run
    timers.update({"optimizer kernels": 0.0, "backward kernels": 0.0})

    def five_line_loop(batches):
        (inputs, targets), = batches
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def inference(batches):
        (inputs, _), = batches
        with npgpt.no_grad():
            model(inputs)

    if forward_only:
        model.eval()
    if generate_only:
        from npgpt.generate import generate_tokens
        # the first step (the warm-up) runs the prompt and makes the first token; each later one, a token
        tokens = generate_tokens(model, rng.integers(0, vocab, (batch, seq)), steps + 1, temperature=0.0)
    from npgpt.fast.cpu import native
    previous_observer = engine.set_op_observer(observe)
    previous_kernel_observer = native.set_call_observer(observe_kernel) if device == "cpu" else None
    opt.step = timed("optimizer", real_step)
    npgpt.Tensor.backward = timed("backward", real_backward)
    try:
        for i in range(steps + 1):
            ids = rng.integers(0, vocab, (batch, seq + 1))
            if i == 1:   # the first step warms up; reset the tallies after it
                for tally in (forward, backward, counts, forward_kernels, backward_kernels):
                    tally.clear()
                kernel_time["products"] = 0.0
                kernels_at_start = kernel_time["all"]
                clock["on"] = True
            start = time.perf_counter()
            clock["last"], clock["kernels"] = start, kernel_time["all"]
            if generate_only:
                next(tokens)
            elif forward_only:
                inference([(ids[:, :-1], ids[:, 1:])])
            elif loop:
                five_line_loop([(ids[:, :-1], ids[:, 1:])])
            else:
                train_step(model, opt, [(ids[:, :-1], ids[:, 1:])], 0.0, shards)
            backend.synchronize()
            if i >= 1:
                total += time.perf_counter() - start
    finally:
        engine.set_op_observer(previous_observer)
        if device == "cpu":
            native.set_call_observer(previous_kernel_observer)
        npgpt.Tensor.backward = real_backward
    timers["products"] = kernel_time["products"]
    kernels = {"forward": forward_kernels, "backward": backward_kernels, "seen": kernel_time["all"] > 0,
               "all": kernel_time["all"] - kernels_at_start}        # every kernel call of the timed steps
    return forward, backward, counts, timers, total, steps, kernels


def product_flops(model, batch, seq, forward_only=False):
    """FLOPs of the weights' products (suite.linear_flops) in a forward pass, times 3 for a training step: the
    backward makes dx and dW, each a product of the forward's size."""
    from benchmarks.suite import linear_flops
    forward = linear_flops(model, batch, seq)
    return forward if forward_only else 3 * forward


def gemm_peak_gflops(threads, n=2048, repeats=5):
    """The best of a few n x n float32 products by NumPy's BLAS on `threads` threads: this machine's GEMM peak
    for the threads the profiled step had."""
    from npgpt.fast.cpu.threads import blas_threads
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    with blas_threads(threads):
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def floor_lines(step_ms, products_ms, flops, peak_gflops, anchor_ms=None, target=0.75, products_on="the BLAS"):
    """The products' floor in words: their speed (made on `products_on`), the step if nothing else cost
    anything, and, against an anchor (PyTorch's time for the same work), both as ratios and what `target`
    leaves for the rest."""
    speed = flops / (products_ms / 1e3) / 1e9
    lines = [f"Products (the weights', on {products_on}): {flops / 1e9:.2f} GFLOP in {products_ms:.1f} ms, "
             f"{speed:.0f} GFLOP/s, {speed / peak_gflops:.0%} of this machine's float32 GEMM peak "
             f"({peak_gflops:.0f} GFLOP/s at 2048^3); everything else: {step_ms - products_ms:.1f} ms of the "
             f"{step_ms:.1f} ms."]
    if anchor_ms:
        budget = target * anchor_ms
        lines.append(f"Against {anchor_ms:.1f} ms (--anchor-ms): this run {step_ms / anchor_ms:.2f}x; the "
                     f"products alone {products_ms / anchor_ms:.2f}x, and at the GEMM peak "
                     f"{flops / (peak_gflops * 1e9) * 1e3 / anchor_ms:.2f}x. {target:.2f}x is {budget:.1f} ms: "
                     + (f"{budget - products_ms:.1f} ms for everything but the products (now "
                        f"{step_ms - products_ms:.1f} ms)." if budget > products_ms else
                        "less than the products alone take."))
    return lines


def generation_floor_line(model, token_ms, kernels_ms, anchor_ms=None):
    """Generation's floor in words: the weights a token reads (every product of its one row reads its W once:
    Q, K, V, O and the feed-forward network's two in every layer, and the output projection), and how fast
    the token's kernel calls, and the whole token, went through them."""
    L, C, F, V = model["num_layers"], model["d_model"], model["d_ff"], model["vocab_size"]
    megabytes = (L * (4 * C * C + 2 * C * F) + C * V) * 4 / 1e6          # float32
    line = (f"Weights read a token (each product reads its W once): {megabytes:.1f} MB, in {kernels_ms:.2f} ms "
            f"of kernel calls ({megabytes / kernels_ms:.0f} GB/s) and {token_ms - kernels_ms:.2f} ms outside "
            f"them: {megabytes / token_ms:.0f} GB/s over the whole token.")
    if anchor_ms:
        line += (f" Against {anchor_ms:.2f} ms (--anchor-ms): this run {token_ms / anchor_ms:.2f}x, the kernel calls "
                 f"alone {kernels_ms / anchor_ms:.2f}x.")
    return line


def outside_lines(outside, total, per, op_calls, generating=False):
    """The step's time outside the kernels, summed: the ops' forward and backward, the engine, the optimizer."""
    whole = sum(outside.values())
    parts = [f"{outside['forward'] * per:.1f} ms in the forward ops"]
    if outside["backward"] or outside["engine"]:
        parts += [f"{outside['backward'] * per:.1f} in their backward closures",
                  f"{outside['engine'] * per:.1f} in the engine's backward bookkeeping"]
    if outside["optimizer"]:
        parts.append(f"{outside['optimizer'] * per:.1f} in the optimizer")
    if outside["rest"]:
        parts.append(f"{outside['rest'] * per:.1f} in " + ("sampling, the token's ids and the glue between them"
                                                             if generating else
                                                             "zero_grad, the data and the glue between them"))
    return [f"Outside the kernels (Python, the engine, NumPy calls of the ops' own): {whole * per:.1f} ms of the "
            f"{total * per:.1f} ms ({whole / total:.0%}), {whole * per / max(op_calls, 1) * 1000:.0f} us for each of "
            f"the {op_calls:.0f} op calls: " + ", ".join(parts) + "."]


def main(argv=None):
    p = argument_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=whole_number, default=None, help="default 8 (tutorial), 12 (shakespeare-char)")
    p.add_argument("--seq", type=whole_number, default=None, help="default 128 (tutorial), 64 (shakespeare-char)")
    p.add_argument("--steps", type=whole_number, default=None, help="default 5 (100 with --generate)")
    p.add_argument("--dropout", type=float, default=None, help="default 0.1 (tutorial), 0 (shakespeare-char)")
    p.add_argument("--threads", type=whole_number, default=usable_cores())
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--model", choices=("tutorial", "shakespeare-char", "gpt2-small"), default="tutorial")
    p.add_argument("--loop", action="store_true",
                   help="time the README's five-line loop (the library alone) instead of the training program")
    p.add_argument("--forward", action="store_true",
                   help="time an inference forward pass (eval mode, no graph) instead of a training step")
    p.add_argument("--generate", action="store_true",
                   help="time greedy generation with a KV cache, a token a step, after a prompt of --seq "
                        "positions (default 16; batch default 1; steps default 100, or as many as the "
                        "context holds)")
    p.add_argument("--anchor-ms", type=positive_number, default=None,
                   help="PyTorch's median for the same step (or forward pass) from `python -m benchmarks`: "
                        "the floor is then also given as a ratio to it")
    p.add_argument("--target", type=positive_number, default=0.75, help="the ratio to PyTorch to size the rest against")
    args = p.parse_args(argv)
    if args.forward and args.loop:
        p.error("--forward times the forward pass alone; leave out --loop")
    if args.generate and (args.forward or args.loop):
        p.error("--generate times generation alone; leave out --forward and --loop")
    refuse_unusable_device(p, args.device)
    refuse_too_many_threads(p, args.threads, args.device)
    from benchmarks.suite import GPT2_SMALL, SHAKESPEARE_CHAR, SHAKESPEARE_SHAPE, TUTORIAL
    small = args.model == "shakespeare-char"
    model = {"tutorial": TUTORIAL, "shakespeare-char": SHAKESPEARE_CHAR, "gpt2-small": GPT2_SMALL}[args.model]
    batch = args.batch or (1 if args.generate else SHAKESPEARE_SHAPE[0] if small else 8)
    seq = args.seq or (16 if args.generate else SHAKESPEARE_SHAPE[1] if small else 128)
    steps = args.steps or (max(1, min(100, model["max_seq_len"] - seq)) if args.generate else 5)
    dropout = args.dropout if args.dropout is not None else (0.0 if small else 0.1)
    if seq > model["max_seq_len"]:
        p.error(f"--seq {seq} is beyond the {args.model} model's context of {model['max_seq_len']}; give at most "
                f"{model['max_seq_len']}")
    if args.generate and seq + steps > model["max_seq_len"]:      # the prompt, then a position a token
        p.error(f"--seq {seq} and --steps {steps} make {seq + steps} positions, beyond the {args.model} "
                f"model's context of {model['max_seq_len']}; give fewer")
    if not 0.0 <= dropout < 1.0:
        p.error(f"--dropout {args.dropout}: give a probability from 0 up to (not including) 1")
    try:
        with stop_signals_as_ctrl_c() as stop:
            forward, backward, counts, timers, total, steps, kernels = profile(
                batch, seq, steps, dropout, args.threads, args.device, model, loop=args.loop,
                forward_only=args.forward, generate_only=args.generate)
    except KeyboardInterrupt:
        print(f"interrupted{stop.how}: nothing to report (the table is made once every step has run)",
              file=sys.stderr)
        return 128 + stop.signum
    ops = sorted(set(forward) | set(backward), key=lambda op: -(forward[op] + backward[op]))
    per = 1000.0 / steps
    inference_only = args.forward or args.generate
    what = ("generated token, after a prompt of" if args.generate else "forward pass" if args.forward else
            "five-line loop step" if args.loop else "training program step")
    print(f"{args.model} {what} ({batch}, {seq}), dropout {0.0 if inference_only else dropout}, {args.device}, "
          f"{args.threads} threads: {total * per:.2f} ms (mean of {steps}; ops timed one by one)\n")
    from npgpt.fast.cpu.threads import data_parallel_shards
    data_parallel = (args.device == "cpu" and not (args.loop or inference_only)
                     and data_parallel_shards(args.threads) > 1)
    if data_parallel:
        print(f"(data-parallel: {args.threads} threads run the ops at once, so the per-op times below add up to more "
              "than the step; --threads 1 or --loop gives a breakdown that adds up)\n")
    # outside the kernels: where each kernel call was timed (the CPU's C kernels ran), what an op's forward
    # gap or backward closure spent in Python and NumPy rather than in a kernel
    glue = kernels["seen"] and not data_parallel
    outside = {"forward": 0.0, "backward": 0.0, "engine": 0.0, "optimizer": 0.0, "rest": 0.0}

    def outside_cell(op):
        forward_s = forward[op] - kernels["forward"][op]
        backward_s = backward[op] - kernels["backward"][op]
        outside["forward"] += forward_s
        outside["backward"] += backward_s
        calls = max(counts[op], 1)
        return (f" {forward_s / calls * 1e6:.0f} / {backward_s / calls * 1e6:.0f} |" if backward[op] else
                f" {forward_s / calls * 1e6:.0f} |")

    print("| op | calls/step | forward ms | backward ms | total ms | share |"
          + ((" outside the kernels, us a call |" if inference_only else
              " outside the kernels, us a call (forward / backward) |") if glue else ""))
    print("|---|---|---|---|---|---|" + ("---|" if glue else ""))
    accounted = 0.0
    for op in ops:
        t = forward[op] + backward[op]
        accounted += t
        print(f"| {op} | {counts[op] // steps} | {forward[op] * per:.1f} | {backward[op] * per:.1f} | "
              f"{t * per:.1f} | {t / total * 100:.0f}% |" + (outside_cell(op) if glue else ""))
    optim_s = timers["optimizer"]
    accounted += optim_s
    if not inference_only:
        outside["optimizer"] = optim_s - timers["optimizer kernels"]
        print(f"| AdamW step | 1 | | | {optim_s * per:.1f} | {optim_s / total * 100:.0f}% |"
              + (f" {outside['optimizer'] * 1e6 / steps:.0f} |" if glue else ""))
    if not (data_parallel or inference_only):
        engine_s = max(0.0, timers["backward"] - sum(backward.values()))
        accounted += engine_s
        calls = sum(counts.values()) / steps
        # the engine's kernels: the sums of gradients that meet where a tensor is used twice
        outside["engine"] = engine_s - (timers["backward kernels"] - sum(kernels["backward"].values()))
        print(f"| engine: backward bookkeeping | {calls:.0f} ops | | {engine_s * per:.1f} | {engine_s * per:.1f} | "
              f"{engine_s / total * 100:.0f}% ({engine_s * per / max(calls, 1) * 1000:.0f} us an op) |"
              + (f" {outside['engine'] * per / max(calls, 1) * 1000:.0f} an op |" if glue else ""))
    rest = total - accounted
    if rest > 0:
        outside["rest"] = rest          # no kernel runs here: setting grads to None, slicing the batch
        label = "sampling, the token's ids and the glue" if args.generate else "zero_grad, data, glue"
        print(f"| {label} | | | | {rest * per:.1f} | {rest / total * 100:.0f}% |" + (" all |" if glue else ""))
    if glue:
        print()
        for line in outside_lines(outside, total, per, sum(counts.values()) / steps, args.generate):
            print(line)
    if args.generate and args.device == "cpu" and kernels["seen"]:
        print()
        print(generation_floor_line(model, total * per, kernels["all"] * per, args.anchor_ms))
    elif args.device == "cpu" and not data_parallel and timers["products"] > 0:
        print()
        products_ms = timers["products"] * per
        from npgpt.fast.cpu import native
        products_on = "npgpt's own product kernel" if native.status()["own_product"] else "the BLAS"
        for line in floor_lines(total * per, products_ms, product_flops(model, batch, seq, args.forward),
                                gemm_peak_gflops(args.threads), args.anchor_ms, args.target, products_on):
            print(line)
    return 0


if __name__ == "__main__":
    from npgpt.program.cli import run_command     # paths that are not UTF-8 printed as they are
    run_command(main)

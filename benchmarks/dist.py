"""Data parallelism on this machine: one process with 2 threads against 2 MPI ranks with 1 thread each.

    python -m benchmarks --suite dist               # the table (a few minutes on 2 cores)
    python -m benchmarks --suite dist --quick       # the smaller case, fewer steps
    python -m benchmarks --suite dist --device gpu  # NCCL's overhead at world size 1 (not run yet: no GPU here)

Both sides train the same global batch per step: one process with --grad-accum 2 and --workers 2 (BLAS at 2
threads outside the workers), against `mpiexec -n 2` with --grad-accum 1 and one thread per rank. Each
measurement is a fresh process (or pair) that warms up, then times --steps optimizer steps; the two sides
alternate (A B A B) and the median is reported. The allreduce's share is the time inside
World.allreduce_gradients (packing, summing, unpacking, and waiting for the slower rank) over the step time;
"alone" times the same Allreduce on idle ranks.

On a GPU (--device gpu): one process without MPI against `mpiexec -n 1 ... --dist-backend nccl`, both with
--cuda-graph off (a run under mpiexec is not recorded as a graph), so the difference is NCCL's allreduce of
the flat buffer at world size 1 and its packing.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.suite import ROOT, WorkerError, argument_parser, child_env, stop_signals_as_ctrl_c, whole_number

CASES = {
    # name: (flags, description)
    "shakespeare-char": (["--preset", "shakespeare-char"], "shakespeare-char preset (0.8M parameters, B 12, T 64)"),
    "tutorial-char": (["--tokenizer", "char", "--seq-len", "128", "--batch-size", "8"],
                      "the tutorial GPT's shape, char tokens (3.3M parameters, B 8, T 128)"),
}


def worker(case, steps, grad_accum, workers, device="cpu", dist_backend="mpi"):
    """Inside one process (or one rank): time `steps` optimizer steps; rank 0 prints one JSON line."""
    import numpy as np
    from npgpt.program.config import config_from_args
    from npgpt.program.dist import launched_world
    from npgpt.program.train import Run

    world = launched_world()
    with tempfile.TemporaryDirectory() as out_dir:
        config, given = config_from_args(CASES[case][0] + [
            "--device", device, "--dtype", "float32", "--grad-accum", str(grad_accum), "--workers", str(workers),
            "--dist-backend", dist_backend, "--cuda-graph", "off", "--sample-tokens", "0",
            "--out-dir", os.path.join(out_dir, "run")])
        run = Run(config, given, world)
        c = run.config

        def step():
            run.train_step(run.next_micro_batches())
            run.step += 1

        from npgpt import backend
        for _ in range(3):
            step()
        backend.synchronize()
        if world is not None:
            world.comm.Barrier()
        reduce_before = world.allreduce_seconds if world is not None else 0.0
        start = time.perf_counter()
        for _ in range(steps):
            step()
        backend.synchronize()
        elapsed = time.perf_counter() - start
        reduce_s = (world.allreduce_seconds - reduce_before) if world is not None else 0.0
        alone_ms = None
        if world is not None and device == "cpu":      # the same collective on idle ranks: communication alone
            flat = np.zeros(run.model.num_parameters() + 2, dtype=np.float32)
            times = []
            for _ in range(10):
                world.comm.Barrier()
                t = time.perf_counter()
                world._allreduce(flat, "the benchmark's allreduce")
                times.append(time.perf_counter() - t)
            alone_ms = 1000 * statistics.median(times)
    size = world.size if world is not None else 1
    tokens = c.batch_size * c.seq_len * c.grad_accum * size * steps
    result = {"ranks": size, "threads_per_rank": run.workers, "steps": steps,
              "parameters": run.model.num_parameters(), "ms_per_step": 1000 * elapsed / steps,
              "tokens_per_s": tokens / elapsed, "allreduce_ms": 1000 * reduce_s / steps,
              "allreduce_alone_ms": alone_ms}
    print(json.dumps(result), flush=True)


def _measure(case, steps, ranks, device="cpu", mpi=None):
    """One measurement: `ranks` processes under mpiexec (or one plain process when mpi is False)."""
    mpi = ranks > 1 if mpi is None else mpi
    threads = 2 // ranks if device == "cpu" else 1
    args = ["-m", "benchmarks.dist", "--worker", "--case", case, "--steps", str(steps), "--device", device,
            "--grad-accum", str(2 // ranks if device == "cpu" else 1), "--workers", str(threads),
            "--dist-backend", "nccl" if device == "gpu" else "mpi"]
    if not mpi:
        cmd = [sys.executable] + args
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", str(ranks), sys.executable] + args
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=child_env(threads), capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise WorkerError(f"{' '.join(cmd)} ran past 900 s") from None
    if out.returncode:
        last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        raise WorkerError(f"{' '.join(cmd)} failed: {last[-400:]}")
    last = (out.stdout.strip().splitlines() or [""])[-1]
    try:
        return json.loads(last)
    except ValueError:
        raise WorkerError(f"{' '.join(cmd)} printed {last[:200]!r}, not its figures") from None


def run_dist(quick=False, repeats=2, device="cpu", log=print):
    cases = ["shakespeare-char"] if quick else list(CASES)
    steps = 10 if quick else 30
    report = {"steps": steps, "repeats": repeats, "device": device, "cases": {}}
    # CPU: 1 process x 2 threads against 2 ranks x 1 thread; GPU: no MPI against NCCL at world size 1
    layouts = {"1": (1, False), "2": (2, True)} if device == "cpu" else {"plain": (1, False), "nccl": (1, True)}
    for case in cases:
        runs = {name: [] for name in layouts}
        for _ in range(repeats):
            for name, (ranks, mpi) in layouts.items():
                log(f"[dist] {case}: {name}, {steps} steps")
                runs[name].append(dict(_measure(case, steps, ranks, device, mpi), layout=name))
        report["cases"][case] = {name: _median(v) for name, v in runs.items()}
    return report


def _median(results):
    out = dict(results[0])
    for key in ("ms_per_step", "tokens_per_s", "allreduce_ms", "allreduce_alone_ms"):
        values = [r[key] for r in results if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def format_dist(report):
    if report.get("device") == "gpu":
        lines = [f"NCCL at world size 1 on the GPU, float32, --cuda-graph off on both sides, median of "
                 f"{report['repeats']} runs of {report['steps']} steps each.", "",
                 "| case | layout | tokens/s | ms/step | allreduce ms/step |", "|---|---|---|---|---|"]
        for case, by_layout in report["cases"].items():
            for name, r in by_layout.items():
                layout = "one process, no MPI" if name == "plain" else "mpiexec -n 1, --dist-backend nccl"
                reduce = f"{r['allreduce_ms']:.2f}" if name == "nccl" else "-"
                lines.append(f"| {CASES[case][1]} | {layout} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | "
                             f"{reduce} |")
        return "\n".join(lines)
    lines = [f"Data parallelism on this machine: the same global batch per step (2 micro-batches), float32, "
             f"median of {report['repeats']} runs of {report['steps']} steps each.", "",
             "| case | layout | tokens/s | ms/step | allreduce ms/step (share) | allreduce alone |",
             "|---|---|---|---|---|---|"]
    for case, by_ranks in report["cases"].items():
        for ranks, r in sorted(by_ranks.items()):
            layout = ("1 process, 2 threads" if r["ranks"] == 1 else
                      f"{r['ranks']} ranks x {r['threads_per_rank']} thread")
            if r["ranks"] == 1:
                share, alone = "-", "-"
            else:
                share = f"{r['allreduce_ms']:.2f} ({100 * r['allreduce_ms'] / r['ms_per_step']:.0f}%)"
                alone = f"{r['allreduce_alone_ms']:.2f} ms"
            lines.append(f"| {CASES[case][1]} | {layout} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | "
                         f"{share} | {alone} |")
    return "\n".join(lines)


def main(argv=None):
    p = argument_parser(__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help="internal: time steps in this process (or rank)")
    p.add_argument("--case", choices=sorted(CASES), default="shakespeare-char")
    p.add_argument("--steps", type=whole_number, default=30)
    p.add_argument("--grad-accum", type=whole_number, default=1)
    p.add_argument("--workers", type=whole_number, default=1)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dist-backend", choices=("mpi", "nccl"), default="mpi")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.case, args.steps, args.grad_accum, args.workers, args.device, args.dist_backend)
        return 0
    try:
        with stop_signals_as_ctrl_c() as stop:
            report = run_dist(quick=args.quick, device=args.device,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        print(f"interrupted{stop.how}: nothing to report (the table is made once every layout has run)",
              file=sys.stderr)
        return 128 + stop.signum
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_dist(report))
    return 0


if __name__ == "__main__":
    from npgpt.program.cli import run_command     # paths that are not UTF-8 printed as they are
    run_command(main)

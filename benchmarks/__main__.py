"""npgpt against PyTorch eager on this machine: training step, forward, generation, MFU, memory, quality.

    python -m benchmarks                    # the speed suite: three shapes of the tutorial GPT, CPU
    python -m benchmarks --quick            # the smallest shape, few repetitions (under a minute)
    python -m benchmarks --suite quality    # same wall-clock budget, shakespeare-char: validation losses
    python -m benchmarks --suite dist       # 1 process x 2 threads against mpiexec -n 2 (benchmarks/dist.py)
    python -m benchmarks --device gpu       # npgpt on CuPy against PyTorch on CUDA (adds GPT-2 small)
    python -m benchmarks --shapes 16x256    # only these (batch x length) shapes
    python -m benchmarks --json results.json
"""

import argparse
import json
import os
import subprocess
import sys

from benchmarks.load import LoadMeter, describe
from benchmarks.suite import ROOT, child_env, format_speed, machine_description, run_speed


def run_quality(budget, device, threads, log=print):
    env = child_env(threads)
    results = {}
    for impl in ("npgpt", "torch"):
        log(f"[quality] training {impl} for {budget:.0f} s")
        with LoadMeter() as load:     # the run is this process's child: its CPU time counts as the benchmark's
            out = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--impl", impl, "--budget",
                                  str(budget), "--device", device, "--threads", str(threads)],
                                 cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        results[impl] = dict(json.loads(out.stdout.strip().splitlines()[-1]), load=load.as_dict())
    return {"budget_s": budget, "preset": "shakespeare-char", "results": results}


def format_quality(q):
    r = q["results"]
    target = r["npgpt"].get("target", 1.88)
    lines = [f"Time to quality: shakespeare-char preset, up to {q['budget_s']:.0f} s of training each, same data "
             f"order and seed; the training time at which the validation loss (every 100 steps) first reached "
             f"{target} (nanoGPT reports ~1.88 after the full 2000 iterations).", "",
             "| implementation | steps done | training time | validation loss | time to reach the target |",
             "|---|---|---|---|---|"]
    for impl, name in (("npgpt", "npgpt"), ("torch", "PyTorch eager (SDPA)")):
        reached = r[impl].get("seconds_to_target")
        lines.append(f"| {name} | {r[impl]['steps']} | {r[impl]['seconds']:.1f} s | {r[impl]['val_loss']:.3f} | "
                     + (f"{reached:.1f} s |" if reached is not None else "not reached |"))
    if r["npgpt"].get("seconds_to_target") and r["torch"].get("seconds_to_target"):
        lines += ["", f"npgpt / PyTorch time to {target}: "
                      f"**{r['npgpt']['seconds_to_target'] / r['torch']['seconds_to_target']:.2f}x**"]
    loads = {f"{name}'s run": r[impl].get("load") for impl, name in (("npgpt", "npgpt"), ("torch", "PyTorch"))}
    lines += ["", describe(loads, consequence="the two runs, one after the other, did not have the machine alike; "
                                              "rerun on a quiet machine.")]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark npgpt against the PyTorch reference.")
    p.add_argument("--suite", choices=("speed", "quality", "dist", "all"), default="speed")
    p.add_argument("--quick", action="store_true", help="smallest case, few repetitions (a smoke test)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for each implementation")
    p.add_argument("--budget", type=float, default=120.0, help="seconds of training per side (quality suite)")
    p.add_argument("--shapes", metavar="BxT,...", help="training shapes of the tutorial GPT to time, e.g. "
                   "16x256,4x512 (default: 8x128,16x256,4x512)")
    p.add_argument("--no-gpt2-small", action="store_true", help="on the GPU, skip the GPT-2-small case")
    p.add_argument("--json", metavar="PATH", help="write every figure and the machine description here")
    args = p.parse_args(argv)
    shapes = None
    if args.shapes:
        try:
            shapes = [tuple(int(n) for n in item.split("x")) for item in args.shapes.split(",")]
        except ValueError:
            shapes = []
        if not shapes or not all(len(s) == 2 and min(s) > 0 for s in shapes):
            p.error(f"--shapes {args.shapes!r}: give batch x length pairs, e.g. 16x256,4x512")

    def log(message):
        print(message, file=sys.stderr, flush=True)

    report = {"machine": machine_description(args.threads)}
    if args.suite in ("speed", "all"):
        speed = run_speed(device=args.device, quick=args.quick, threads=args.threads, shapes=shapes,
                          gpt2_small=not args.no_gpt2_small, log=log)
        report["speed"] = speed
        print(format_speed(speed))
    if args.suite in ("quality", "all"):
        budget = min(args.budget, 10.0) if args.quick else args.budget
        quality = run_quality(budget, args.device, args.threads, log=log)
        report["quality"] = quality
        print()
        print(format_quality(quality))
    if args.suite == "dist":
        from benchmarks.dist import format_dist, run_dist
        report["dist"] = run_dist(quick=args.quick, device=args.device, log=log)
        print(format_dist(report["dist"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

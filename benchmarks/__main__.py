"""npgpt against PyTorch eager on this machine: training step, forward, generation, MFU, memory, quality.

    python -m benchmarks                    # the speed suite: three shapes of the tutorial GPT, CPU
    python -m benchmarks --quick            # the smallest shape, few repetitions (under a minute)
    python -m benchmarks --suite quality    # same wall-clock budget, shakespeare-char: validation losses
    python -m benchmarks --suite dist       # 1 process x 2 threads against mpiexec -n 2 (benchmarks/dist.py)
    python -m benchmarks --device gpu       # npgpt on CuPy against PyTorch on CUDA (adds GPT-2 small)
    python -m benchmarks --shapes 16x256    # only these (batch x length) shapes
    python -m benchmarks --json results.json
"""

import importlib.util
import json
import os
import sys

from benchmarks.load import LoadMeter, describe
from benchmarks.quality import positive_seconds
from benchmarks.suite import (TUTORIAL, WorkerError, argument_parser, child_env, end_children, format_speed,
                              machine_description, read_reply, refuse_too_many_threads, refuse_unusable_device,
                              run_speed, start_child, stop_signals_as_ctrl_c, usable_cores,
                              whole_number)


def run_quality(budget, device, threads, log=print, every=None):
    """Both sides of benchmarks/quality.py, each in its own process, taking turns of `every` steps (default
    quality.EVAL_EVERY) until each has reached the target, spent the budget or done the preset's steps.

    A Ctrl-C or a side's failure ends the run there, both sides ended at once: "interrupted" is then True, or
    "failed" the error, and each side's results are those of the last turn it finished."""
    from benchmarks import quality
    every = every or quality.EVAL_EVERY
    env = child_env(threads)
    sides, load, finished = {}, None, False
    results = {impl: {"steps": 0, "seconds": 0.0} for impl in ("npgpt", "torch")}
    outcome = {"interrupted": False, "failed": None}
    try:
        for impl in results:
            sides[impl] = proc = start_child(["-m", "benchmarks.quality", "--impl", impl, "--serve", "--device",
                                              device, "--threads", str(threads)], env)
            if read_reply(proc, f"the {impl} side of the quality suite", "setup") != {"ready": impl}:
                raise WorkerError(f"the {impl} side of the quality suite did not start as expected")
        log(f"[quality] npgpt and PyTorch take turns of {every} steps, up to {budget:.0f} s of training each")
        with LoadMeter([proc.pid for proc in sides.values()]) as load:
            running = list(sides)
            while running:
                for impl in list(running):
                    proc = sides[impl]
                    proc.stdin.write(json.dumps({"op": "train", "steps": every, "budget": budget}) + "\n")
                    proc.stdin.flush()
                    results[impl] = read_reply(proc, f"the {impl} side of the quality suite", "training")
                    if results[impl].pop("done"):    # reached, out of time, or at the preset's last step
                        running.remove(impl)
                log("[quality] " + ", ".join(f"{impl} step {r['steps']} val {r['val_loss']:.3f}"
                                              for impl, r in results.items()))
        finished = True
    except KeyboardInterrupt:
        outcome["interrupted"] = True
    except WorkerError as exc:
        outcome["failed"] = str(exc)
    finally:
        try:
            end_children(sides.values(), wait_s=10 if finished else 0)
        except KeyboardInterrupt:       # while waiting for the sides to quit: they are ended, the results kept
            outcome["interrupted"] = True
    return {"budget_s": budget, "preset": "shakespeare-char", "turn_steps": every,
            "load": load.as_dict() if load is not None else None, "results": results, **outcome}


def format_quality(q):
    r = q["results"]
    target = r["npgpt"].get("target", 1.88)
    lines = [f"Time to quality: shakespeare-char preset, up to {q['budget_s']:.0f} s of training each, same data "
             f"order and seed, the two taking turns of {q.get('turn_steps', 100)} steps; the training time at "
             f"which the validation loss (after each turn) first reached {target} (nanoGPT reports ~1.88 after "
             f"the full 2000 iterations).", "",
             "| implementation | steps done | training time | validation loss | time to reach the target |",
             "|---|---|---|---|---|"]
    for impl, name in (("npgpt", "npgpt"), ("torch", "PyTorch eager (SDPA)")):
        reached = r[impl].get("seconds_to_target")
        lines.append(f"| {name} | {r[impl]['steps']} | {r[impl]['seconds']:.1f} s | {r[impl]['val_loss']:.3f} | "
                     + (f"{reached:.1f} s |" if reached is not None else "not reached |"))
    if r["npgpt"].get("seconds_to_target") and r["torch"].get("seconds_to_target"):
        lines += ["", f"npgpt / PyTorch time to {target}: "
                      f"**{r['npgpt']['seconds_to_target'] / r['torch']['seconds_to_target']:.2f}x**"]
    if q.get("interrupted") or q.get("failed"):
        why = "Interrupted (Ctrl-C)" if q.get("interrupted") else "Stopped by a side's failure"
        lines += ["", f"{why}: each side's figures are those of the last turn it finished."]
    lines += ["", describe({"the two runs": q.get("load")},
                           consequence="the machine was busy while they ran; rerun on a quiet machine.")]
    return "\n".join(lines)


def main(argv=None):
    p = argument_parser("Benchmark npgpt against the PyTorch reference.")
    p.add_argument("--suite", choices=("speed", "quality", "dist", "all"), default="speed")
    p.add_argument("--quick", action="store_true", help="smallest case, few repetitions (a smoke test)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=whole_number, default=usable_cores(),
                   help="threads for each implementation (default: the cores this process may run on)")
    p.add_argument("--budget", type=positive_seconds, default=120.0,
                   help="seconds of training per side (quality suite)")
    p.add_argument("--shapes", metavar="BxT,...", help="training shapes of the tutorial GPT to time, e.g. "
                   f"16x256,4x512 (default: 8x128,16x256,4x512; T at most {TUTORIAL['max_seq_len']})")
    p.add_argument("--no-gpt2-small", action="store_true", help="on the GPU, skip the GPT-2-small case")
    p.add_argument("--json", metavar="PATH", help="write every figure and the machine description here")
    args = p.parse_args(argv)
    refuse_unusable_device(p, args.device)
    refuse_too_many_threads(p, args.threads, args.device)
    shapes = None
    if args.shapes:
        try:
            shapes = [tuple(int(n) for n in item.split("x")) for item in args.shapes.split(",")]
        except ValueError:
            shapes = []
        if not shapes or not all(len(s) == 2 and min(s) > 0 for s in shapes):
            p.error(f"--shapes {args.shapes!r}: give batch x length pairs, e.g. 16x256,4x512")
        longest = max(seq for _, seq in shapes)
        if longest > TUTORIAL["max_seq_len"]:
            p.error(f"--shapes {args.shapes!r}: a length of {longest} is beyond the tutorial GPT's context of "
                    f"{TUTORIAL['max_seq_len']}; give lengths up to {TUTORIAL['max_seq_len']}")
    if args.json:
        problem = output_problem(args.json)
        if problem:
            p.error(problem)
    if args.suite != "dist" and torch_missing():
        p.error("the benchmarks compare npgpt with PyTorch, which is not installed: pip install -e '.[torch]'")

    with stop_signals_as_ctrl_c() as stop:
        return run(args, shapes, stop)


def run(args, shapes, stop):
    """The suites main() was asked for; the exit code."""
    def log(message):
        print(message, file=sys.stderr, flush=True)

    report = {"machine": machine_description(args.threads)}
    stopped, failure, printed = None, None, False       # where a Ctrl-C stopped the run; a worker's failure
    try:
        if args.suite in ("speed", "all"):
            speed = report["speed"] = run_speed(device=args.device, quick=args.quick, threads=args.threads,
                                                shapes=shapes, gpt2_small=not args.no_gpt2_small, log=log)
            if speed["cases"]:
                print(format_speed(speed))
                printed = True
            if "interrupted" in speed:
                stopped = (f"the {speed['interrupted']} case of the speed suite" if speed["interrupted"]
                           else "the end of the speed suite")
            if speed.get("failed"):
                failed = speed["failed"]
                memory = "MemoryError" in failed["error"] and failed["tutorial_shape"]
                failure = failed["error"] + ("; choose smaller --shapes" if memory else "")
        if args.suite in ("quality", "all") and not (stopped or failure):
            budget = min(args.budget, 10.0) if args.quick else args.budget
            quality = report["quality"] = run_quality(budget, args.device, args.threads, log=log)
            if all("val_loss" in r for r in quality["results"].values()):
                print()
                print(format_quality(quality))
                printed = True
            stopped = "the quality suite" if quality["interrupted"] else None
            failure = quality["failed"]
        if args.suite == "dist":
            from benchmarks.dist import format_dist, run_dist
            report["dist"] = run_dist(quick=args.quick, device=args.device, log=log)
            print(format_dist(report["dist"]))
            printed = True
    except KeyboardInterrupt:
        stopped = "the suite"
    except WorkerError as exc:
        failure = str(exc)
    done = "the report above holds what finished before it" if printed else "nothing had finished"
    written = True
    if args.json:
        try:
            write_json(args.json, report)
        except OSError as exc:
            written = False
            print(f"error: cannot write {args.json} ({exc.strerror or exc})", file=sys.stderr)
        except KeyboardInterrupt:
            written, stopped = False, stopped or "the writing of --json (not written)"
    if failure:
        print(f"error: {failure}; {done}", file=sys.stderr)
        return 1
    if stopped:
        print(f"interrupted{stop.how} during {stopped}: {done}", file=sys.stderr)
        return 128 + stop.signum
    return 0 if written else 1


def torch_missing():
    return importlib.util.find_spec("torch") is None


def output_problem(path):
    """The one-line problem with --json PATH, found before anything runs by writing (and removing) a file
    beside it, so that no figure is lost at the end; or None."""
    if os.path.isdir(path) or path.endswith(os.sep):
        return (f"--json {path} names a directory; give a file name, e.g. "
                f"{os.path.join(path, 'bench.json')}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"--json {path}: there is no directory {directory}; create it or give another path"
    probe = f"{path}.{os.getpid()}.tmp"
    try:
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as exc:
        return f"--json {path}: cannot write there ({exc.strerror or exc}); give another path"
    return None


def write_json(path, report):
    """The report as JSON, written whole or not at all: a temporary file beside it, renamed into place."""
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


if __name__ == "__main__":
    from npgpt.program.cli import run_command     # paths that are not UTF-8 printed as they are
    run_command(main)

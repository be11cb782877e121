"""The benchmark suite: npgpt against the PyTorch reference, in separate processes, alternating, medians.

For each shape, one worker process per implementation is started (benchmarks/worker.py) and the parent
alternates their measurements A B C ... after a warm-up; before each timed measurement the worker runs
untimed for SETTLE_S, until the threads of the one before it have stopped spinning. Each figure is the median
of its repetitions and the ratio is of medians. Every worker gets the same number of threads.

The line-up: npgpt's training program (train_step with its data-parallel threads) and the README's five-line
loop (the library alone); PyTorch eager as a PyTorch user writes it today, with F.scaled_dot_product_attention
and a KV cache for generation (the anchor every ratio is against), the tutorial's own PyTorch code
(masked_fill attention, no cache), and, outside --quick, the SDPA model under torch.compile where it works.

Model FLOPs per training step (the formula behind MFU), for L layers, width C, feed-forward F, vocabulary V,
B sequences of T tokens:
    forward = 2 B T (L (4 C^2 + 2 C F) + C V)     every weight multiply-add: Q, K, V, O, FFN up/down, output
            + 4 L B T^2 C                         attention scores Q K^T and the weighted sum A V
    train   = 3 x forward                         the backward pass costs twice the forward
MFU = train FLOPs / step time / the machine's measured float32 GEMM peak (the best of NumPy's and PyTorch's).
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys

from benchmarks.load import LoadMeter, describe
from npgpt.program.cli import signal_handlers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIAL = dict(vocab_size=10000, d_model=256, num_heads=4, num_layers=4, d_ff=1024, max_seq_len=512)
GPT2_SMALL = dict(vocab_size=50304, d_model=768, num_heads=12, num_layers=12, d_ff=3072, max_seq_len=1024)
SHAPES = [(8, 128), (16, 256), (4, 512)]
# The shakespeare-char preset's model and batch (npgpt/program/config.py), the small model tinkerers train first
SHAKESPEARE_CHAR = dict(vocab_size=65, d_model=128, num_heads=4, num_layers=4, d_ff=512, max_seq_len=64)
SHAKESPEARE_SHAPE = (12, 64)
# (implementation, the name its figures go under, extra setup)
LINEUP = [("npgpt", "npgpt", {"variant": "program"}), ("npgpt", "npgpt_loop", {"variant": "loop"}),
          ("torch", "torch", {"variant": "sdpa"}), ("torch", "torch_tutorial", {"variant": "tutorial"})]
COMPILED = ("torch", "torch_compile", {"variant": "compile"})
LABELS = {"npgpt": "npgpt (training program)", "npgpt_loop": "npgpt (five-line loop)",
          "torch": "PyTorch eager (SDPA)", "torch_tutorial": "PyTorch eager (tutorial attention)",
          "torch_compile": "PyTorch torch.compile (SDPA)", "npgpt_eager": "npgpt without the CUDA graph"}
# Nominal dense peaks (TFLOP/s) of GPUs the suite knows, for MFU against the bf16 peak
GPU_BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def linear_flops(model, batch, seq):
    """FLOPs of one forward pass's products by weights: Q, K, V, O and the feed-forward network's two in every
    layer, and the output projection."""
    L, C, F, V = model["num_layers"], model["d_model"], model["d_ff"], model["vocab_size"]
    return 2 * batch * seq * (L * (4 * C * C + 2 * C * F) + C * V)


def train_flops(model, batch, seq):
    """A training step: the forward pass (the products by weights, and attention's Q K^T and A V), then twice
    as much for the backward."""
    L, C = model["num_layers"], model["d_model"]
    return 3 * (linear_flops(model, batch, seq) + 4 * L * batch * seq * seq * C)


def forward_flops(model, batch, seq):
    return train_flops(model, batch, seq) / 3


def argument_parser(description):
    """argparse for the benchmark commands: a bad flag is one line on stderr and exit 2, as npgpt's commands."""
    from npgpt.program.config import OneLineParser
    return OneLineParser(description=description)


def whole_number(text):
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text}")
    return value


def usable_cores():
    """The cores this process may run on: the default --threads of every benchmark command."""
    from npgpt.fast.cpu.threads import usable_cores as cores
    return cores()


def refuse_too_many_threads(parser, threads, device):
    """On the CPU, more threads than the cores this process may run on would time the scheduler handing the
    cores round, not the libraries: the parser's error, before any worker starts."""
    cores = usable_cores()
    if device == "cpu" and threads > cores:
        parser.error(f"--threads {threads}: this process may run on {cores} core{'s' * (cores > 1)}; give 1 to "
                     f"{cores} (more threads than cores would time the scheduler sharing them out, not the code)")


def positive_number(text, what="number"):
    """An argparse type: a float above 0 (what: how the error names it)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive {what}, got {text}")
    return value


def refuse_unusable_device(parser, device):
    """--device gpu where npgpt cannot use a GPU here (no CuPy, no GPU): the parser's error, naming why, and
    exit 2 before any worker starts."""
    if device == "gpu":
        from npgpt import backend
        reason = backend.gpu_unavailable_reason()
        if reason is not None:
            parser.error(f"--device gpu: {reason}")


class stop_signals_as_ctrl_c(signal_handlers):
    """``with stop_signals_as_ctrl_c() as stop:`` SIGTERM and SIGHUP (a scheduler, a closed terminal) raise
    KeyboardInterrupt, as Ctrl-C does, so that a run stops the same way whichever came (its workers ended, what
    finished kept); stop.signum is the signal (SIGINT by default), stop.name its name, stop.how " (SIGTERM)"
    for a message (nothing for Ctrl-C). The handlers that were there before are put back on leaving."""

    def __init__(self):
        super().__init__([getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)],
                         self._stop)
        self.signum = signal.SIGINT

    @property
    def name(self):
        return signal.Signals(self.signum).name

    @property
    def how(self):
        return "" if self.signum == signal.SIGINT else f" ({self.name})"

    def _stop(self, signum, frame):
        self.signum = signum
        raise KeyboardInterrupt


class WorkerError(RuntimeError):
    """A benchmark child process died or replied with an error; the message names it and what it was doing."""


def read_reply(proc, name, during):
    """The child's next line on stdout, a JSON reply; a WorkerError naming the child where it died instead or
    replied with an error."""
    line = proc.stdout.readline()
    if not line:
        raise WorkerError(f"{name} died during {during}")
    try:
        reply = json.loads(line)
    except ValueError:
        raise WorkerError(f"{name} answered {line.strip()[:200]!r} during {during}, not a reply") from None
    if not isinstance(reply, dict):
        raise WorkerError(f"{name} answered {line.strip()[:200]!r} during {during}, not a reply")
    if "error" in reply:
        raise WorkerError(f"{name} failed at {during}: {reply['error']}")
    return reply


def start_child(args, env):
    """A benchmark child process (`python args...`) talking JSON lines over its stdin and stdout. It runs in a
    session of its own, so that a Ctrl-C at the terminal reaches only the parent, which stops the run and
    ends its children: a child never dies of it halfway through a reply, with a traceback in the report."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)


def end_child(proc, wait_s=60.0):
    """Ask a child to quit and wait up to wait_s for it (0: end it at once); one still running is killed with
    its session (the processes it started: torch.compile's compiler runs)."""
    try:
        proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        proc.stdin.close()
    except (OSError, ValueError):        # gone already, or its stdin closed before
        pass
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()
    proc.stdout.close()


def end_children(procs, wait_s=60.0):
    """end_child for each; should a wait be interrupted, that child and the rest are ended at once."""
    procs = list(procs)
    for i, proc in enumerate(procs):
        try:
            end_child(proc, wait_s)
        except BaseException:
            for rest in procs[i:]:
                end_child(rest, 0)
            raise


class Worker:
    """A child process running benchmarks/worker.py for one implementation; one that fails to set up (or is
    interrupted doing so) is ended before the error goes on."""

    def __init__(self, impl, env, setup, label=None):
        self.impl, self.closed = label or impl, False        # the name its figures go under
        self.proc = start_child(["-m", "benchmarks.worker"], env)
        try:
            self.ask(dict(setup, op="setup", impl=impl))
        except BaseException:
            end_child(self.proc, wait_s=0)
            raise

    def ask(self, command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return read_reply(self.proc, f"the {self.impl} worker", command["op"])

    def close(self, wait_s=60.0):
        self.closed = True
        end_child(self.proc, wait_s)


def child_env(threads):
    """The workers' environment: the same thread count everywhere; OpenBLAS core-type overrides removed."""
    env = dict(os.environ)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(var, None)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# Before each timed measurement a worker runs untimed for this long, so that the worker measured before it
# has gone quiet (its BLAS/OpenMP threads spin for a while after its last step: worker.py's _settle)
SETTLE_S = 0.2


def alternate(workers, op, warmup, repeats, extra=None, key="ms"):
    """Warm up, then measure A B A B ..., each measurement after SETTLE_S of untimed runs; {impl: [values]}."""
    command = dict(extra or {}, op=op, settle_s=SETTLE_S)
    for _ in range(warmup):
        for w in workers:
            w.ask(command)
    values = {w.impl: [] for w in workers}
    for _ in range(repeats):
        for w in workers:
            values[w.impl].append(w.ask(command)[key])
    return values


def machine_description(threads):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_per_implementation": threads,
            "python": platform.python_version(), "platform": platform.platform(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE")}


def _start(lineup, env, setup, log, workers, fallible=("torch_compile",)):
    """Workers for the line-up, each appended to `workers` once it has started; one of `fallible` that cannot
    start (torch.compile without a working compiler, say) is left out: the reasons are returned, {label: why}.
    Any other's failure is the suite's (a WorkerError)."""
    missing = {}
    for impl, label, extra in lineup:
        try:
            workers.append(Worker(impl, env, dict(setup, **extra), label=label))
        except WorkerError as exc:
            if label not in fallible:
                raise
            missing[label] = str(exc)
            log(f"[{setup['batch']}x{setup['seq']}] {label} unavailable: {exc}")
    return missing


def _measure(workers, op, warmup, repeats, fallible=("torch_compile",), missing=None):
    """alternate(), leaving out a worker of `fallible` that fails (torch.compile at its first call, say)."""
    try:
        return alternate(workers, op, warmup, repeats)
    except WorkerError as exc:
        broken = [w for w in workers if w.impl in fallible and w.impl in str(exc)]
        if not broken:
            raise
        for w in broken:
            missing[w.impl] = str(exc)
            workers.remove(w)
            w.close(wait_s=10)
        return alternate(workers, op, warmup, repeats)


def run_speed(device="cpu", quick=False, threads=None, shapes=None, model=None, dropout=0.1, gpt2_small=True,
              log=print):
    """The speed suite: the tutorial GPT at each shape, then the shakespeare-char model's step; on the GPU it
    adds the GPT-2-small shape (12 x 768, context 1024) at (8, 1024).

    A Ctrl-C or a worker's failure ends the suite there, its workers ended at once, and the report holds the
    cases that finished before it: report["interrupted"] names the case it stopped in ("(B, T)", or None
    after the last), report["failed"] the case, whether it is one of the tutorial GPT's shapes, and the error.
    """
    threads = threads or usable_cores()
    model = model or TUTORIAL
    shapes = shapes or (SHAPES[:1] if quick else SHAPES)
    cases = [(model, batch, seq, dropout) for batch, seq in shapes]
    if device == "gpu" and not quick and gpt2_small:
        cases.append((GPT2_SMALL, 8, 1024, dropout))
    cases.append((SHAKESPEARE_CHAR, *SHAKESPEARE_SHAPE, 0.0))
    warmup, repeats = (1, 3) if quick else (2, 7)
    if device == "gpu":
        warmup = max(warmup, 2)     # npgpt's first step runs eagerly and its second records the CUDA graph
    env = child_env(threads)
    report = {"machine": machine_description(threads), "device": device, "model": model, "dropout": dropout,
              "warmup": warmup, "repeats": repeats, "cases": [], "unavailable": {}}
    lineup = LINEUP + ([] if quick else [COMPILED])
    try:
        for index, (case_model, batch, seq, case_dropout) in enumerate(cases):
            small = case_model is SHAKESPEARE_CHAR
            setup = dict(device=device, batch=batch, seq=seq, model=case_model, dropout=case_dropout, threads=threads)
            log(f"[{batch}x{seq}] starting workers")
            workers, eager = [], []
            try:
                report["unavailable"].update(_start(lineup, env, setup, log, workers))
                if device == "gpu":     # also npgpt launching every kernel from Python: what the CUDA graph is worth
                    eager.append(Worker("npgpt", env, dict(setup, cuda_graph=False), label="npgpt_eager"))
                # every worker of the case is alive from here to the end of its measurements
                with LoadMeter([w.proc.pid for w in workers + eager]) as load:
                    if index == 0:
                        report["versions"] = {w.impl: w.ask({"op": "info"}) for w in workers
                                              if w.impl in ("npgpt", "torch")}
                        n = 8192 if device == "gpu" else 2048
                        report["sgemm_n"] = n
                        report["sgemm_gflops"] = {w.impl: w.ask({"op": "sgemm", "n": n})["gflops"]
                                                  for w in workers if w.impl in ("npgpt", "torch")}
                    case = {"batch": batch, "seq": seq, "model": case_model, "dropout": case_dropout,
                            "name": {id(GPT2_SMALL): "GPT-2 small", id(SHAKESPEARE_CHAR): "shakespeare-char"}.get(
                                id(case_model), "tutorial")}
                    if not small:
                        forward_workers = [w for w in workers if w.impl != "npgpt_loop"]   # npgpt's same forward
                        fwd = _measure(forward_workers, "forward", warmup, repeats, missing=report["unavailable"])
                        case["forward_ms"] = {k: statistics.median(v) for k, v in fwd.items()}
                        case["forward_samples"] = fwd
                        log(f"[{batch}x{seq}] forward done")
                    trn_workers = [w for w in workers if not w.closed] + eager     # less one that failed
                    trn = _measure(trn_workers, "train", warmup, repeats * (3 if small else 1),
                                   missing=report["unavailable"])
                    case["train_mem"] = {w.impl: w.ask({"op": "memory"}) for w in workers
                                         if w.impl in ("npgpt", "torch")}
                    log(f"[{batch}x{seq}] train done")
                    case["train_ms"] = {k: statistics.median(v) for k, v in trn.items()}
                    case["train_samples"] = trn
                    if index == 0:
                        new_tokens = 50 if quick else 200
                        gen_workers = [w for w in workers if w.impl in ("npgpt", "torch", "torch_tutorial")
                                       and not w.closed]
                        gen = alternate(gen_workers, "generate", 1, 1 if quick else 3,
                                        extra={"prompt": 16, "new_tokens": new_tokens}, key="tokens_per_s")
                        report["generate"] = {"prompt": 16, "new_tokens": new_tokens,
                                              "tokens_per_s": {k: statistics.median(v) for k, v in gen.items()}}
                        log(f"[{batch}x{seq}] generation done")
                case["load"] = load.as_dict()
                report["cases"].append(case)
            except BaseException:
                end_children([w.proc for w in workers + eager], wait_s=0)
                raise
            end_children([w.proc for w in workers + eager if not w.closed])
    except (KeyboardInterrupt, WorkerError) as exc:
        stopped = len(report["cases"])          # the first case that did not finish
        where = "({}, {})".format(*cases[stopped][1:3]) if stopped < len(cases) else None
        if isinstance(exc, KeyboardInterrupt):
            report["interrupted"] = where
        else:
            report["failed"] = {"case": where, "tutorial_shape": stopped < len(cases) and cases[stopped][0] is model,
                                "error": str(exc)}
    if not report["cases"]:
        return report
    peak = max(report["sgemm_gflops"].values())
    report["sgemm_peak_gflops"] = peak
    gpu_name = report.get("versions", {}).get("torch", {}).get("gpu", "")
    bf16 = next((v for k, v in GPU_BF16_PEAK_TFLOPS.items() if k in gpu_name), None)
    report["bf16_peak_tflops"] = bf16
    for case in report["cases"]:
        flops = train_flops(case["model"], case["batch"], case["seq"])
        case["train_flops"] = flops
        case["mfu"] = {k: flops / (ms / 1000) / (peak * 1e9) for k, ms in case["train_ms"].items()}
        if bf16:
            case["mfu_bf16"] = {k: flops / (ms / 1000) / (bf16 * 1e12) for k, ms in case["train_ms"].items()}
        case["train_ratio"] = case["train_ms"]["npgpt"] / case["train_ms"]["torch"]
        case["train_ratios"] = {k: ms / case["train_ms"]["torch"] for k, ms in case["train_ms"].items()}
        case["train_round_ratios"] = round_ratios(case["train_samples"])
        if "forward_ms" in case:
            case["forward_ratio"] = case["forward_ms"]["npgpt"] / case["forward_ms"]["torch"]
            case["forward_round_ratios"] = round_ratios(case["forward_samples"])
    return report


def round_ratios(samples, anchor="torch"):
    """{impl: the median over rounds of its time / the anchor's time in the same round}.

    Each round measures every implementation once, one after the other, within a second or two. This host
    switches between a faster and a slower state for seconds at a time (the small model's PyTorch step: 35
    or 47 ms), so each side's own median may fall in either state; a round's two times mostly share one."""
    return {impl: statistics.median(a / b for a, b in zip(values, samples[anchor]))
            for impl, values in samples.items()}


def _round_ratio(case, what, impl):
    ratio = case.get(f"{what}_round_ratios", {}).get(impl)
    return "" if ratio is None else f"{ratio:.2f}x"


def _blas_line(versions):
    blas = versions.get("npgpt", {}).get("blas")
    if isinstance(blas, list) and blas:
        b = blas[0]
        return (f"{b.get('internal_api')} {b.get('version')}, kernel {b.get('architecture')}, "
                f"{b.get('num_threads')} threads")
    return str(blas)


def format_speed(report):
    m, v = report["machine"], report.get("versions", {})

    def label(c):
        return f"({c['batch']}, {c['seq']})" + (f" {c['name']}" if c.get("name", "tutorial") != "tutorial" else "")

    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; each implementation runs with "
             f"{m['threads_per_implementation']} threads, in its own process, alternating, medians of "
             f"{report['repeats']} after {report['warmup']} warm-up.",
             f"NumPy {v.get('npgpt', {}).get('numpy')} (BLAS: {_blas_line(v)}"
             + (f"; npgpt's float32 products on {v['npgpt']['products']}" if v.get("npgpt", {}).get("products")
                else "") + "), "
             f"PyTorch {v.get('torch', {}).get('torch')}, device {report['device']}"
             + (f" ({v['npgpt'].get('gpu')})" if v.get("npgpt", {}).get("gpu") else "") + ".",
             "OPENBLAS_CORETYPE={}, OPENBLAS_L2_SIZE={} in this shell; unset for the benchmark workers.".format(
                 m["OPENBLAS_CORETYPE"] or "(not set)", m["OPENBLAS_L2_SIZE"] or "(not set)"),
             f"float32 GEMM peak ({report['sgemm_n']}^3): npgpt's array library "
             f"{report['sgemm_gflops']['npgpt']:.0f} GFLOP/s, PyTorch {report['sgemm_gflops']['torch']:.0f} "
             f"GFLOP/s; MFU below is against {report['sgemm_peak_gflops']:.0f}"
             + (f" (and, in brackets, against the nominal bf16 peak of {report['bf16_peak_tflops']:.0f} TFLOP/s)"
                if report.get("bf16_peak_tflops") else "") + ".",
             describe({label(c): c.get("load") for c in report["cases"]}),
             "",
             f"Tutorial GPT (vocab {report['model']['vocab_size']}, d_model {report['model']['d_model']}, "
             f"{report['model']['num_heads']} heads, {report['model']['num_layers']} layers, d_ff "
             f"{report['model']['d_ff']})" + (", and GPT-2 small (vocab 50304, 12 x 768, d_ff 3072)"
                                             if any(c.get("name") == "GPT-2 small" for c in report["cases"]) else "")
             + f", float32, dropout {report['dropout']}"
             + ("; the shakespeare-char preset's model (vocab 65, 4 x 128, d_ff 512, dropout 0) at its batch "
                "(12, 64)" if any(c.get("name") == "shakespeare-char" for c in report["cases"]) else "") + ":",
             "",
             "Every ratio is a time against PyTorch eager with SDPA attention (the anchor), in the same run: "
             "the ratio of the medians, and the median of each round's ratio (its two times taken seconds "
             "apart).",
             "",
             "| case (B, T) | implementation | time | tokens/s | time / PyTorch SDPA | round by round | MFU |",
             "|---|---|---|---|---|---|---|"]

    def mfu(c, impl):
        text = f"{c['mfu'][impl] * 100:.0f}%"
        return text + (f" ({c['mfu_bf16'][impl] * 100:.1f}%)" if "mfu_bf16" in c else "")

    order = ["npgpt", "npgpt_loop", "npgpt_eager", "torch", "torch_tutorial", "torch_compile"]
    for c in report["cases"]:
        tokens = c["batch"] * c["seq"]
        for impl in [k for k in order if k in c["train_ms"]]:
            ms = c["train_ms"][impl]
            ratio = c["train_ratios"][impl]
            ratio_text = f"**{ratio:.2f}x**" if impl.startswith("npgpt") else f"{ratio:.2f}x"
            lines.append(f"| train step {label(c)} | {LABELS[impl]} | {ms:.1f} ms | {tokens / ms * 1000:,.0f} | "
                         f"{ratio_text} | {_round_ratio(c, 'train', impl)} | {mfu(c, impl)} |")
    for c in report["cases"]:
        if "forward_ms" not in c:
            continue
        tokens = c["batch"] * c["seq"]
        for impl in [k for k in order if k in c["forward_ms"]]:
            ms = c["forward_ms"][impl]
            name = "npgpt" if impl == "npgpt" else LABELS[impl]
            lines.append(f"| forward only {label(c)} | {name} | {ms:.1f} ms | {tokens / ms * 1000:,.0f} | "
                         f"{ms / c['forward_ms']['torch']:.2f}x | {_round_ratio(c, 'forward', impl)} | |")
    g = report.get("generate")
    if g:
        rates = g["tokens_per_s"]
        for impl, how in (("npgpt", "KV cache"), ("torch", "KV cache"), ("torch_tutorial", "recomputes context")):
            if impl in rates:
                name = "npgpt" if impl == "npgpt" else LABELS[impl]
                lines.append(f"| generate {g['new_tokens']} tokens (prompt {g['prompt']}) | {name}, {how} | "
                             f"{1000 / rates[impl]:.1f} ms/token | {rates[impl]:.0f} | "
                             f"{rates['torch'] / rates[impl]:.2f}x | | |")
    for impl, reason in report.get("unavailable", {}).items():
        lines.append(f"| (not measured) | {LABELS.get(impl, impl)} | {reason[:90]} | | | | |")
    for c in report["cases"]:
        for impl in ("npgpt", "torch"):
            m = c["train_mem"][impl]
            if "gpu_mb" in m:
                held = "CuPy pools" if impl == "npgpt" else "max reserved"
                lines.append(f"| GPU memory held, training {label(c)} | {LABELS[impl]} | {m['gpu_mb']:.0f} MB "
                             f"({held}) | | | | |")
            else:
                lines.append(f"| peak RSS, training {label(c)} | {LABELS[impl]} | {m['max_rss_mb']:.0f} MB "
                             f"(+{m['max_rss_mb'] - m['after_import_mb']:.0f} over import) | | | | |")
    graphs = []
    for c in report["cases"]:
        status = c["train_mem"]["npgpt"].get("status", {})
        if "cuda_graph_replays" in status:
            graphs.append(f"{label(c)}: " + (f"fell back to eager ({status['cuda_graph_fallback']})"
                                             if status["cuda_graph_fallback"] else
                                             f"{status['cuda_graph_replays']} replays"))
    if graphs:
        lines += ["", "npgpt's training step as a CUDA graph: " + "; ".join(graphs) + "."]
    tunings = []
    for c in report["cases"]:
        tuning = c["train_mem"]["npgpt"].get("status", {}).get("gemm_tuning")
        if tuning and tuning["disabled"]:
            tunings.append(f"{label(c)}: off ({tuning['disabled']})")
        elif tuning:
            tunings.append(f"{label(c)}: cuBLASLt beat cuBLAS's pick on {tuning['cublaslt_faster']} of "
                           f"{tuning['problems']} float32 GEMM problems ({tuning['cublas_ms']:.2f} -> "
                           f"{tuning['chosen_ms']:.2f} ms, one call of each)")
    if tunings:
        lines += ["", "GEMM algorithms timed once per problem (npgpt/fast/cuda/gemm_tuning.py): " + "; ".join(tunings) + "."]
    return "\n".join(lines)

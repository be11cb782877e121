"""The benchmark suite: npgpt against the PyTorch reference, in separate processes, alternating, medians.

For each shape, one worker process per implementation is started (benchmarks/worker.py) and the parent
alternates their measurements A B A B after a warm-up; each figure is the median of its repetitions and the
ratio is of medians. Both workers get the same number of threads.

Model FLOPs per training step (the formula behind MFU), for L layers, width C, feed-forward F, vocabulary V,
B sequences of T tokens:
    forward = 2 B T (L (4 C^2 + 2 C F) + C V)     every weight multiply-add: Q, K, V, O, FFN up/down, output
            + 4 L B T^2 C                         attention scores Q K^T and the weighted sum A V
    train   = 3 x forward                         the backward pass costs twice the forward
MFU = train FLOPs / step time / the machine's measured float32 GEMM peak (the best of NumPy's and PyTorch's).
"""

import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIAL = dict(vocab_size=10000, d_model=256, num_heads=4, num_layers=4, d_ff=1024, max_seq_len=512)
GPT2_SMALL = dict(vocab_size=50304, d_model=768, num_heads=12, num_layers=12, d_ff=3072, max_seq_len=1024)
SHAPES = [(8, 128), (16, 256), (4, 512)]
# Nominal dense peaks (TFLOP/s) of GPUs the suite knows, for MFU against the bf16 peak
GPU_BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def train_flops(model, batch, seq):
    L, C, F, V = model["num_layers"], model["d_model"], model["d_ff"], model["vocab_size"]
    forward = 2 * batch * seq * (L * (4 * C * C + 2 * C * F) + C * V) + 4 * L * batch * seq * seq * C
    return 3 * forward


def forward_flops(model, batch, seq):
    return train_flops(model, batch, seq) / 3


class Worker:
    """A child process running benchmarks/worker.py for one implementation."""

    def __init__(self, impl, env, setup, label=None):
        self.impl = label or impl        # the name its figures go under
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask(dict(setup, op="setup", impl=impl))

    def ask(self, command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.impl} worker died during {command['op']}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the {self.impl} worker failed at {command['op']}: {reply['error']}")
        return reply

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        self.proc.wait(timeout=60)


def child_env(threads):
    """The workers' environment: the same thread count everywhere; OpenBLAS core-type overrides removed."""
    env = dict(os.environ)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(var, None)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def alternate(workers, op, warmup, repeats, extra=None, key="ms"):
    """Warm up, then measure A B A B ...; {impl: [values]}."""
    command = dict(extra or {}, op=op)
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


def run_speed(device="cpu", quick=False, threads=None, shapes=None, model=None, dropout=0.1, gpt2_small=True,
              log=print):
    """The speed suite; on the GPU it adds the GPT-2-small shape (12 x 768, context 1024) at (8, 1024)."""
    threads = threads or os.cpu_count()
    model = model or TUTORIAL
    shapes = shapes or (SHAPES[:1] if quick else SHAPES)
    cases = [(model, batch, seq) for batch, seq in shapes]
    if device == "gpu" and not quick and gpt2_small:
        cases.append((GPT2_SMALL, 8, 1024))
    warmup, repeats = (1, 3) if quick else (2, 7)
    if device == "gpu":
        warmup = max(warmup, 2)     # npgpt's first step runs eagerly and its second records the CUDA graph
    env = child_env(threads)
    report = {"machine": machine_description(threads), "device": device, "model": model, "dropout": dropout,
              "warmup": warmup, "repeats": repeats, "cases": []}
    for index, (case_model, batch, seq) in enumerate(cases):
        setup = dict(device=device, batch=batch, seq=seq, model=case_model, dropout=dropout, threads=threads)
        log(f"[{batch}x{seq}] starting workers")
        workers = [Worker("npgpt", env, setup), Worker("torch", env, setup)]
        # on the GPU, also npgpt launching every kernel from Python: what the CUDA graph is worth
        eager = ([Worker("npgpt", env, dict(setup, cuda_graph=False), label="npgpt_eager")]
                 if device == "gpu" else [])
        try:
            if index == 0:
                report["versions"] = {w.impl: w.ask({"op": "info"}) for w in workers}
                n = 8192 if device == "gpu" else 2048
                report["sgemm_n"] = n
                report["sgemm_gflops"] = {w.impl: w.ask({"op": "sgemm", "n": n})["gflops"] for w in workers}
            case = {"batch": batch, "seq": seq, "model": case_model,
                    "name": "GPT-2 small" if case_model is GPT2_SMALL else "tutorial"}
            fwd = alternate(workers, "forward", warmup, repeats)
            case["forward_mem"] = {w.impl: w.ask({"op": "memory"}) for w in workers}
            log(f"[{batch}x{seq}] forward done")
            trn = alternate(workers + eager, "train", warmup, repeats)
            case["train_mem"] = {w.impl: w.ask({"op": "memory"}) for w in workers}
            log(f"[{batch}x{seq}] train done")
            case["forward_ms"] = {k: statistics.median(v) for k, v in fwd.items()}
            case["train_ms"] = {k: statistics.median(v) for k, v in trn.items()}
            case["forward_samples"], case["train_samples"] = fwd, trn
            if index == 0:
                new_tokens = 50 if quick else 200
                gen = alternate(workers, "generate", 1, 1 if quick else 3,
                                extra={"prompt": 16, "new_tokens": new_tokens}, key="tokens_per_s")
                report["generate"] = {"prompt": 16, "new_tokens": new_tokens,
                                      "tokens_per_s": {k: statistics.median(v) for k, v in gen.items()}}
                log(f"[{batch}x{seq}] generation done")
            report["cases"].append(case)
        finally:
            for w in workers + eager:
                w.close()
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
        case["forward_ratio"] = case["forward_ms"]["npgpt"] / case["forward_ms"]["torch"]
    return report


def _blas_line(versions):
    blas = versions.get("npgpt", {}).get("blas")
    if isinstance(blas, list) and blas:
        b = blas[0]
        return (f"{b.get('internal_api')} {b.get('version')}, kernel {b.get('architecture')}, "
                f"{b.get('num_threads')} threads")
    return str(blas)


def format_speed(report):
    m, v = report["machine"], report.get("versions", {})
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; each implementation runs with "
             f"{m['threads_per_implementation']} threads, in its own process, alternating, medians of "
             f"{report['repeats']} after {report['warmup']} warm-up.",
             f"NumPy {v.get('npgpt', {}).get('numpy')} (BLAS: {_blas_line(v)}), "
             f"PyTorch {v.get('torch', {}).get('torch')}, device {report['device']}"
             + (f" ({v['npgpt'].get('gpu')})" if v.get("npgpt", {}).get("gpu") else "") + ".",
             "OPENBLAS_CORETYPE={}, OPENBLAS_L2_SIZE={} in this shell; unset for the benchmark workers.".format(
                 m["OPENBLAS_CORETYPE"] or "(not set)", m["OPENBLAS_L2_SIZE"] or "(not set)"),
             f"float32 GEMM peak ({report['sgemm_n']}^3): npgpt's array library "
             f"{report['sgemm_gflops']['npgpt']:.0f} GFLOP/s, PyTorch {report['sgemm_gflops']['torch']:.0f} "
             f"GFLOP/s; MFU below is against {report['sgemm_peak_gflops']:.0f}"
             + (f" (and, in brackets, against the nominal bf16 peak of {report['bf16_peak_tflops']:.0f} TFLOP/s)"
                if report.get("bf16_peak_tflops") else "") + ".",
             "",
             f"Tutorial GPT (vocab {report['model']['vocab_size']}, d_model {report['model']['d_model']}, "
             f"{report['model']['num_heads']} heads, {report['model']['num_layers']} layers, d_ff "
             f"{report['model']['d_ff']})" + (", and GPT-2 small (vocab 50304, 12 x 768, d_ff 3072)"
                                             if any(c.get("name") == "GPT-2 small" for c in report["cases"]) else "")
             + f", float32, dropout {report['dropout']}:",
             "",
             "| case (B, T) | npgpt | PyTorch eager | npgpt / PyTorch time | MFU npgpt | MFU PyTorch |",
             "|---|---|---|---|---|---|"]
    def mfu(c, impl):
        text = f"{c['mfu'][impl] * 100:.0f}%"
        return text + (f" ({c['mfu_bf16'][impl] * 100:.1f}%)" if "mfu_bf16" in c else "")

    def label(c):
        return f"({c['batch']}, {c['seq']})" + (f" {c['name']}" if c.get("name", "tutorial") != "tutorial" else "")

    for c in report["cases"]:
        tokens = c["batch"] * c["seq"]
        n, t = c["train_ms"]["npgpt"], c["train_ms"]["torch"]
        lines.append(f"| train step {label(c)} | {n:.1f} ms ({tokens / n:.1f}k tok/s) | "
                     f"{t:.1f} ms ({tokens / t:.1f}k tok/s) | **{c['train_ratio']:.2f}x** | "
                     f"{mfu(c, 'npgpt')} | {mfu(c, 'torch')} |")
    for c in report["cases"]:
        if "npgpt_eager" in c["train_ms"]:
            tokens = c["batch"] * c["seq"]
            n, t = c["train_ms"]["npgpt_eager"], c["train_ms"]["torch"]
            lines.append(f"| train step {label(c)}, npgpt without the CUDA graph | {n:.1f} ms "
                         f"({tokens / n:.1f}k tok/s) | {t:.1f} ms | {n / t:.2f}x | {mfu(c, 'npgpt_eager')} | |")
    for c in report["cases"]:
        tokens = c["batch"] * c["seq"]
        n, t = c["forward_ms"]["npgpt"], c["forward_ms"]["torch"]
        lines.append(f"| forward only {label(c)} | {n:.1f} ms ({tokens / n:.1f}k tok/s) | "
                     f"{t:.1f} ms ({tokens / t:.1f}k tok/s) | {c['forward_ratio']:.2f}x | | |")
    g = report.get("generate")
    if g:
        n, t = g["tokens_per_s"]["npgpt"], g["tokens_per_s"]["torch"]
        lines.append(f"| generate {g['new_tokens']} tokens (prompt {g['prompt']}) | {n:.0f} tok/s (KV cache) | "
                     f"{t:.0f} tok/s (recomputes context) | {t / n:.2f}x | | |")
    for c in report["cases"]:
        n, t = c["train_mem"]["npgpt"], c["train_mem"]["torch"]
        if "gpu_mb" in n:
            lines.append(f"| GPU memory held, training {label(c)} | {n['gpu_mb']:.0f} MB (CuPy pools) | "
                         f"{t['gpu_mb']:.0f} MB (max reserved) | | | |")
            continue
        lines.append(f"| peak RSS, training {label(c)} | {n['max_rss_mb']:.0f} MB "
                     f"(+{n['max_rss_mb'] - n['after_import_mb']:.0f} over import) | {t['max_rss_mb']:.0f} MB "
                     f"(+{t['max_rss_mb'] - t['after_import_mb']:.0f} over import) | | | |")
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

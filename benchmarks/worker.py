"""A benchmark child process: one implementation (npgpt or torch), one shape, driven over stdin/stdout.

The parent (benchmarks/suite.py) starts one worker per implementation and alternates its commands between
them, so npgpt and PyTorch never share a process (their thread pools would slow each other) and machine
noise falls on both alike. Protocol: one JSON command per line on stdin, one JSON reply per line on stdout.

    {"op": "setup", "impl": "npgpt"|"torch", "device": "cpu"|"gpu", "batch": B, "seq": T, ...}
                          "keep_freed_memory": false leaves out glibc's setting of npgpt.fast.cpu.allocator,
                          which every worker gets by default (both sides alike)
                          npgpt: "variant": "program" (the training program's step: train_step, with its
                          data-parallel threads where the C kernels are not built) or "loop" (the README's
                          five-line loop, nothing else);
                          on the GPU "cuda_graph": false launches every kernel from Python.
                          torch: "variant": "sdpa" (F.scaled_dot_product_attention, a KV cache for
                          generation), "tutorial" (the tutorial's masked_fill attention, no cache) or
                          "compile" (the sdpa model under torch.compile)
    {"op": "train"}       one timed training step (zero_grad, forward, loss, backward, AdamW step) -> ms
    {"op": "forward"}     one timed inference forward pass (no graph) -> ms
    {"op": "generate", "prompt": 16, "new_tokens": 200}  -> tokens/s
                          each of these three with "settle_s": S runs untimed for S seconds first (_settle)
    {"op": "sgemm", "n": 2048}                           -> GFLOP/s of one n x n float32 matmul
    {"op": "info"}        versions, threads, BLAS; {"op": "memory"} peak RSS; {"op": "quit"}
"""

import json
import os
import resource
import sys
import time

import numpy as np


def _timed_ms(sync, fn):
    """Milliseconds of fn(), the device synchronised before and after (a no-op on the CPU)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1000


def _best_gemm_gflops(sync, a, n):
    """The best of six n x n float32 products, in GFLOP/s: this machine's GEMM peak, as the library sees it."""
    return max(2 * n ** 3 / _timed_ms(sync, lambda: a @ a) * 1e3 / 1e9 for _ in range(6))


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux reports KiB


def _gpu_mb(kind, impl):
    """Device memory the implementation's caching allocators hold (its high-water mark for PyTorch); for
    npgpt, CuPy's pool plus the CUDA graph's own pool (npgpt/fast/cuda/graph.py)."""
    if kind == "npgpt":
        from npgpt import backend
        held = backend.module_for("gpu").get_default_memory_pool().total_bytes()
        return (held + (impl.graph.pool_bytes() if impl.graph is not None else 0)) / 2**20
    import torch
    return torch.cuda.max_memory_reserved() / 2**20


class NpgptImpl:
    def __init__(self, cfg):
        import npgpt
        from npgpt import backend
        self.npgpt, self.backend = npgpt, backend
        from npgpt.fast.cpu.threads import can_control_blas, set_workers
        backend.set_device(cfg["device"])
        self.xp = backend.current()
        self.on_cpu = on_cpu = cfg["device"] == "cpu"
        if not on_cpu and cfg.get("cuda_fast", True):
            npgpt.fast.enable_cuda()        # off by default in the library (npgpt/fast/__init__.py)
        # the training program's own setting: data-parallel threads on the CPU (npgpt/fast/cpu/threads.py)
        self.variant = cfg.get("variant", "program")
        if self.variant == "loop":              # the library's own defaults, as a user's loop gets them
            from npgpt.fast.cpu.threads import workers
            self.workers = workers()
        else:
            self.workers = cfg["threads"] if on_cpu and can_control_blas() else 1
            set_workers(self.workers)
        backend.manual_seed(0)
        self.model = npgpt.GPT(**cfg["model"], dropout=cfg["dropout"])
        self.opt = npgpt.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.vocab = cfg["model"]["vocab_size"]
        self.rng = np.random.default_rng(0)
        self.batch, self.seq = cfg["batch"], cfg["seq"]
        # zero_grad, forward, cross-entropy, backward, AdamW step: the training loop's own step function,
        # on the GPU recorded once as a CUDA graph and replayed, as `python -m npgpt.train` does
        from npgpt.fast.cuda.graph import GraphStep
        from npgpt.fast.cpu.threads import data_parallel_shards
        from npgpt.program.train import train_step
        shards = data_parallel_shards(self.workers, self.model.token_embedding.weight.dtype)
        self.step = lambda batches: train_step(self.model, self.opt, batches, grad_clip=0.0, workers=shards)
        if self.variant == "loop":
            self.step = self._five_line_loop
        self.graph = None
        if not on_cpu and cfg.get("cuda_graph", True) and npgpt.fast.cuda_enabled():
            self.graph = GraphStep(self.step, self.opt, self.vocab)

    def _five_line_loop(self, batches):
        """The README's loop: the model, the loss, zero_grad, backward, step; no training-program machinery."""
        F = self.npgpt.functional
        (inputs, targets), = batches
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.data

    def _ids(self, batch, length):
        return self.rng.integers(0, self.vocab, (batch, length))     # NumPy: the model moves them

    def sync(self):
        self.backend.synchronize()

    def train(self):
        ids = self._ids(self.batch, self.seq + 1)
        self.model.train()
        step = self.graph or self.step
        return _timed_ms(self.sync, lambda: step([(ids[:, :-1], ids[:, 1:])]))

    def status(self):
        out = {"data_parallel_threads": self.workers}
        if self.graph is not None:
            out["cuda_graph_replays"] = self.graph.replays
            out["cuda_graph_fallback"] = self.graph.fallback_reason
        if not self.on_cpu:
            from npgpt.fast.cuda import gemm_tuning
            tuned = [v for v in gemm_tuning.choices().values() if v[1] is not None]
            out["gemm_tuning"] = {"problems": len(tuned), "cublaslt_faster": sum(v[0] != "cuBLAS" for v in tuned),
                                  "chosen_ms": sum(v[1] for v in tuned), "cublas_ms": sum(v[2] for v in tuned),
                                  "disabled": gemm_tuning.disabled_reason}
        return out

    def forward(self):
        ids = self._ids(self.batch, self.seq)
        self.model.eval()
        with self.npgpt.no_grad():
            return _timed_ms(self.sync, lambda: self.model(ids))

    def generate(self, prompt, new_tokens):
        from npgpt.generate import generate
        ids = self.rng.integers(0, self.vocab, (1, prompt))
        self.sync()
        start = time.perf_counter()
        generate(self.model, ids, new_tokens, temperature=0.0)
        self.sync()
        return new_tokens / (time.perf_counter() - start)

    def sgemm(self, n):
        a = self.xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
        return _best_gemm_gflops(self.sync, a, n)

    def info(self):
        out = {"numpy": np.__version__, "npgpt": self.npgpt.__version__, "device": self.backend.get_device(),
               "data_parallel_threads": self.workers}
        try:
            from threadpoolctl import threadpool_info
            pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
            out["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads",
                                                  "threading_layer")} for p in pools]
        except ImportError:
            out["blas"] = "threadpoolctl not installed"
        if self.on_cpu:
            from npgpt.fast.cpu import native
            out["products"] = "its own kernel (kernels.c)" if native.status()["own_product"] else "the BLAS"
        if self.backend.get_device() == "gpu":
            import cupy
            out["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
            out["cupy"] = cupy.__version__
        return out


class TorchImpl:
    def __init__(self, cfg):
        import torch
        from benchmarks.reference import GPT
        self.torch = torch
        torch.set_num_threads(cfg["threads"])
        self.device = "cuda" if cfg["device"] == "gpu" else "cpu"
        torch.manual_seed(0)
        self.variant = cfg.get("variant", "sdpa")
        attention = "tutorial" if self.variant == "tutorial" else "sdpa"
        self.model = GPT(**cfg["model"], dropout=cfg["dropout"], attention=attention).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.run_model = torch.compile(self.model) if self.variant == "compile" else self.model
        self.vocab = cfg["model"]["vocab_size"]
        self.gen = torch.Generator().manual_seed(0)
        self.batch, self.seq = cfg["batch"], cfg["seq"]

    def _ids(self, batch, length):
        return self.torch.randint(0, self.vocab, (batch, length), generator=self.gen).to(self.device)

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def train(self):
        F = self.torch.nn.functional
        ids = self._ids(self.batch, self.seq + 1)
        self.model.train()

        def step():
            self.opt.zero_grad()
            logits = self.run_model(ids[:, :-1])
            F.cross_entropy(logits.reshape(-1, self.vocab), ids[:, 1:].reshape(-1)).backward()
            self.opt.step()
        return _timed_ms(self.sync, step)

    def forward(self):
        ids = self._ids(self.batch, self.seq)
        self.model.eval()
        with self.torch.no_grad():
            return _timed_ms(self.sync, lambda: self.run_model(ids))

    def generate(self, prompt, new_tokens):
        torch = self.torch
        ids = self._ids(1, prompt)
        self.model.eval()
        self.sync()
        start = time.perf_counter()
        if self.variant != "tutorial":          # a KV cache: the prompt once, then one position a token
            from benchmarks.reference import generate_with_cache
            generate_with_cache(self.model, ids, new_tokens)
            self.sync()
            return new_tokens / (time.perf_counter() - start)
        # the tutorial's model has no cache: every token re-runs the whole (cropped) context
        with torch.no_grad():
            for _ in range(new_tokens):
                logits = self.model(ids[:, -self.model.position_embedding.num_embeddings:])
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        self.sync()
        return new_tokens / (time.perf_counter() - start)

    def sgemm(self, n):
        return _best_gemm_gflops(self.sync, self.torch.randn(n, n, device=self.device), n)

    def info(self):
        torch = self.torch
        out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        if self.device == "cuda":
            out["gpu"] = torch.cuda.get_device_name(0)
        return out


def _settle(run, seconds):
    """Untimed runs until `seconds` have passed (at least one if seconds > 0), before the timed one.

    The worker measured before this one leaves its threads spinning for a while (OpenBLAS's and OpenMP's
    threads busy-wait for more work before they sleep), and on a machine of few cores they take this worker's
    cores: its first step afterwards is slowed by an amount that depends on the other worker. Running on
    until they have gone to sleep measures each implementation on a machine of its own, and keeps the CPU as
    warm as in a training run (a pause instead would let it cool)."""
    if seconds <= 0:
        return
    start = time.perf_counter()
    run()
    while time.perf_counter() - start < seconds:
        run()


def main():
    # the replies keep stdout to themselves: whatever else prints (a library's note) goes to stderr, where it
    # cannot be taken for a reply
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    impl = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "setup":
                if cmd["impl"] == "npgpt":
                    import npgpt  # noqa: F401  (imports first, so the baseline below excludes the model)
                else:
                    import torch  # noqa: F401
                baseline = _rss_mb()
                kind, device = cmd["impl"], cmd["device"]
                if device == "cpu" and cmd.get("keep_freed_memory", True):
                    # the setting `python -m npgpt.train` opts into, applied to both sides alike (PyTorch
                    # gains from it; npgpt's fast paths reuse their own large arrays anyway)
                    from npgpt.fast.cpu.allocator import keep_freed_memory
                    keep_freed_memory()
                impl = (NpgptImpl if kind == "npgpt" else TorchImpl)(cmd)
                reply = {"ok": True}
            elif op in ("train", "forward"):
                measure = impl.train if op == "train" else impl.forward
                _settle(measure, cmd.get("settle_s", 0.0))
                reply = {"ms": measure()}
            elif op == "generate":
                _settle(lambda: impl.generate(cmd["prompt"], 4), cmd.get("settle_s", 0.0))
                reply = {"tokens_per_s": impl.generate(cmd["prompt"], cmd["new_tokens"])}
            elif op == "sgemm":
                reply = {"gflops": impl.sgemm(cmd["n"])}
            elif op == "info":
                reply = impl.info()
            elif op == "memory":
                reply = {"max_rss_mb": _rss_mb(), "after_import_mb": baseline}
                if kind == "npgpt":
                    reply["status"] = impl.status()
                if device == "gpu":
                    reply["gpu_mb"] = _gpu_mb(kind, impl)
            elif op == "quit":
                break
            else:
                reply = {"error": f"unknown op {op}"}
        except Exception as exc:   # reported to the parent, which stops with the message
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()

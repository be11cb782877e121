"""The benchmark suite: a smoke run that prints the table and writes the JSON (no timing assertions), the FLOPs
formula, and the meter of how busy the machine was."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from optional import need

from benchmarks import load
from benchmarks.suite import forward_flops, train_flops, usable_cores, TUTORIAL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quality_suite_takes_turns_and_stops_at_the_budget():
    need("torch", "torch")
    from benchmarks.__main__ import format_quality, run_quality
    logs = []
    q = run_quality(1.5, "cpu", 1, log=logs.append, every=5)
    rounds = [dict(re.findall(r"(npgpt|torch) step (\d+) val", line)) for line in logs if "npgpt step" in line]
    for impl in ("npgpt", "torch"):
        steps = [int(r[impl]) for r in rounds]
        last = steps.index(steps[-1])           # a side that is done shows its last figures from then on
        # one turn of 5 steps a round, each side, until the turn in which it spent its 1.5 s
        assert steps[:last] == [5 * (i + 1) for i in range(last)] and 0 < steps[last] - 5 * last <= 5
        r = q["results"][impl]
        assert r["steps"] == steps[-1] and r["finite"] and r["seconds_to_target"] is None
        assert r["seconds"] >= 1.5              # it stops once the budget is spent, not before
    text = format_quality(q)
    assert "taking turns of 5 steps" in text and "| npgpt |" in text and "not reached" in text


def test_quality_side_answers_bad_commands_and_trains_when_told():
    commands = ['{"op": "train"}', "nonsense", '{"op": "train", "steps": 2, "settle_s": 0}', '{"op": "quit"}']
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--impl", "npgpt", "--serve"], cwd=ROOT,
                          input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(line) for line in proc.stdout.splitlines()]      # stdout: the replies alone
    assert replies[0] == {"ready": "npgpt"}
    assert "not a command" in replies[1]["error"] and "not a command" in replies[2]["error"]
    assert replies[3]["steps"] == 2 and replies[3]["finite"] and replies[3]["done"] is False
    assert 3.5 < replies[3]["val_loss"] < 4.5              # about ln 65 after two steps of warm-up
    assert len(replies) == 4


def test_quality_budget_must_be_positive():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--suite", "quality", "--budget", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--budget: must be a positive number of seconds" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_round_ratios_pair_each_rounds_times():
    from benchmarks.suite import round_ratios
    # the host switches from a slow state to a fast one between rounds 2 and 3 for npgpt and 3 and 4 for
    # PyTorch: the medians (30 and 47 ms) fall in different states, 0.64x; the rounds' ratios do not
    samples = {"npgpt": [36.0, 36.0, 30.0, 30.0, 30.0], "torch": [47.0, 47.0, 47.0, 35.0, 35.0]}
    ratios = round_ratios(samples)
    assert ratios["torch"] == 1.0
    assert ratios["npgpt"] == pytest.approx(36 / 47)      # of 36/47, 36/47, 30/47, 30/35, 30/35


def test_flops_formula_counts_every_matmul():
    # by hand for one layer, C=2, F=3, V=5, B=1, T=4: weights 4*4 + 2*2*3 = 28 per layer, output 10
    model = dict(num_layers=1, d_model=2, d_ff=3, vocab_size=5)
    assert forward_flops(model, 1, 4) == 2 * 4 * (28 + 10) + 4 * 1 * 16 * 2
    # the tutorial model at (8, 128): 6 FLOPs per weight per token, plus attention; a 179 ms GEMM floor at 205 GF/s
    assert 36.5e9 < train_flops(TUTORIAL, 8, 128) < 37.0e9


def test_quick_suite_runs_and_writes_json(tmp_path):
    need("torch", "torch")      # the benchmark suite compares against PyTorch
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| train step (8, 128) |" in proc.stdout and "| generate" in proc.stdout
    assert "kernel" in proc.stdout          # the BLAS kernel NumPy ran is printed
    from npgpt.fast.cpu import native       # and what npgpt's products ran on
    products_on = "its own kernel (kernels.c)" if native.status()["own_product"] else "the BLAS"
    assert f"npgpt's float32 products on {products_on})" in proc.stdout
    assert "Load from outside the benchmark" in proc.stdout
    report = json.loads(out.read_text())
    case = report["speed"]["cases"][0]
    assert case["train_ms"]["npgpt"] > 0 and case["train_ms"]["torch"] > 0
    assert case["train_ratio"] == pytest.approx(case["train_ms"]["npgpt"] / case["train_ms"]["torch"])
    # the round-by-round ratio: each round's npgpt time over PyTorch's in the same round, then the median
    npgpt_times, torch_times = case["train_samples"]["npgpt"], case["train_samples"]["torch"]
    assert len(npgpt_times) == len(torch_times) == 3
    pairs = sorted(a / b for a, b in zip(npgpt_times, torch_times))
    assert case["train_round_ratios"]["npgpt"] == pytest.approx(pairs[1])
    assert "| round by round |" in proc.stdout and f"| {pairs[1]:.2f}x |" in proc.stdout
    assert report["speed"]["sgemm_peak_gflops"] > 0
    assert report["machine"]["cores"] >= 1
    if load.available():
        assert 0 <= case["load"]["other"] <= 1 and case["load"]["own_seconds"] > 0


def test_machine_ticks_reads_the_cpu_line_of_proc_stat():
    # user nice system idle iowait irq softirq steal guest guest_nice
    text = "cpu  100 5 20 1000 7 3 2 9 4 0\ncpu0 50 2 10 500 3 1 1 4 2 0\n"
    busy, steal, total = load.machine_ticks(text)
    assert (busy, steal, total) == (100 + 5 + 20 + 3 + 2, 9, 130 + 1000 + 7 + 9)    # guest is inside user
    assert load.machine_ticks("cpu 1 2 3 4\n") == (6, 0, 10)                     # an old kernel: 4 fields
    with pytest.raises(ValueError):
        load.machine_ticks("intr 1 2 3\n")


def test_process_ticks_count_from_the_last_bracket_and_include_children_waited_for():
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime
    # cstime priority ...
    text = "1234 (a) b (c) S 1 1234 1234 0 -1 4194304 100 0 0 0 42 17 300 8 20 0 1 0 5 6 7\n"
    assert load.process_ticks(text) == 42 + 17 + 300 + 8


@pytest.mark.skipif(not load.available(), reason="no /proc/stat: the load meter measures nothing here")
def test_a_workers_own_children_count_as_the_benchmarks_time():
    """A worker that runs a compiler, as torch.compile's first step does: its child's CPU time is the
    benchmark's own, not load from outside it."""
    runs_a_child = ("import subprocess, sys\n"
                    f"subprocess.run([sys.executable, '-c', {BURN.format(s=1.0)!r}], input='', text=True, "
                    "capture_output=True, check=True)\nprint('done', flush=True)\nsys.stdin.read()")
    worker = subprocess.Popen([sys.executable, "-c", runs_a_child], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        with load.LoadMeter([worker.pid]) as meter:
            assert worker.stdout.readline() == "done\n"
    finally:
        worker.stdin.close()
        worker.wait(timeout=30)
    assert meter.own_seconds >= 0.9


BURN = "import sys, time\nwhile time.process_time() < {s}: pass\nprint('done', flush=True)\nsys.stdin.read()"


@pytest.mark.skipif(not load.available(), reason="no /proc/stat: the load meter measures nothing here")
def test_a_process_outside_the_benchmark_counts_as_other_load():
    child = subprocess.Popen([sys.executable, "-c", BURN.format(s=1.0)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        with load.LoadMeter([child.pid]) as counted, load.LoadMeter() as not_counted:
            assert child.stdout.readline() == "done\n"       # it has spent 1 s of CPU, most of it in here
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    burned = counted.own_seconds - not_counted.own_seconds
    assert 0.5 < burned < 1.1
    assert not_counted.other > counted.other
    assert "BUSY" in load.describe({"the test": not_counted.as_dict()})


@pytest.mark.skipif(not load.available(), reason="no /proc/stat: the load meter measures nothing here")
def test_a_child_waited_for_counts_as_the_benchmarks_own_time():
    with load.LoadMeter() as meter:       # a child run and waited for inside the section
        subprocess.run([sys.executable, "-c", BURN.format(s=0.5)], input="", text=True, capture_output=True,
                       check=True)
    assert meter.own_seconds >= 0.5


def test_describe_flags_busy_sections_and_says_when_nothing_was_measured():
    quiet = {"other": 0.004, "steal": 0.0, "own_seconds": 10.0}
    busy = {"other": 0.3, "steal": 0.0, "own_seconds": 10.0}
    stolen = {"other": 0.0, "steal": 0.08, "own_seconds": 10.0}
    text = load.describe({"(8, 128)": quiet, "(16, 256)": busy, "(4, 512)": stolen})
    assert "(8, 128) 0.4%" in text and "(16, 256) 30.0%" in text and "steal 8.0%" in text
    assert "BUSY during (16, 256), (4, 512)" in text
    assert "BUSY" not in load.describe({"(8, 128)": quiet})
    assert "not measured" in load.describe({"(8, 128)": None})


def test_product_flops_counts_linears_three_times_a_training_step():
    from benchmarks.profile import product_flops
    # by hand, C=2, F=3, V=5, one layer, B=1, T=4: weights 4*4 + 2*2*3 = 28, output projection 10, 2 FLOPs each
    model = dict(num_layers=1, d_model=2, d_ff=3, vocab_size=5)
    assert product_flops(model, 1, 4, forward_only=True) == 2 * 4 * 38
    assert product_flops(model, 1, 4) == 3 * 2 * 4 * 38       # forward, dx and dW: three products of one size


def test_floor_lines_give_the_products_speed_and_what_a_target_leaves():
    from benchmarks.profile import floor_lines
    # 16 GFLOP in 80 ms is 200 GFLOP/s, 80% of a 250 GFLOP/s peak; 20 ms of a 100 ms step is the rest
    speed, against = floor_lines(100.0, 80.0, 16e9, 250.0, anchor_ms=120.0, target=0.75)
    assert "200 GFLOP/s, 80% of" in speed and "everything else: 20.0 ms of the 100.0 ms" in speed
    # 100/120 = 0.83x; 80/120 = 0.67x; at the peak 64 ms = 0.53x; 0.75 x 120 = 90 ms leaves 10 ms for the rest
    assert "this run 0.83x" in against and "products alone 0.67x" in against and "at the GEMM peak 0.53x" in against
    assert "0.75x is 90.0 ms: 10.0 ms for everything but the products (now 20.0 ms)" in against
    # a target below the products' own time says so
    _, short = floor_lines(100.0, 80.0, 16e9, 250.0, anchor_ms=100.0, target=0.75)
    assert "0.75x is 75.0 ms: less than the products alone take" in short
    assert len(floor_lines(100.0, 80.0, 16e9, 250.0)) == 1         # no anchor, no ratios
    assert speed.startswith("Products (the weights', on the BLAS): 16.00 GFLOP in 80.0 ms")
    own, = floor_lines(100.0, 80.0, 16e9, 250.0, products_on="npgpt's own product kernel")
    assert own.startswith("Products (the weights', on npgpt's own product kernel): 16.00 GFLOP")


@pytest.mark.parametrize("mode", [["--loop"], ["--forward"], []])
def test_profile_prints_the_ops_and_the_products_floor(mode):
    # the fast paths on, as the profile is meant to see them, also in a run of the tests with NPGPT_FAST=0
    env = dict(os.environ, NPGPT_FAST="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile", "--model", "shakespeare-char", "--steps", "2",
                           "--anchor-ms", "50"] + mode, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    from npgpt.fast.cpu import native
    if native.status()["built"]:    # each block's attention and feed-forward network one op; the output projection
        assert "| multi_head_attention | 4 |" in out and "| feed_forward | 4 |" in out and "| linear | 1 |" in out
    else:                           # op by op: per block Q, K, V, O and the feed-forward network's two
        assert "| linear | 25 |" in out and "| scaled_dot_product_attention | 4 |" in out
    assert ("AdamW step" in out) == (mode != ["--forward"])        # a forward pass has no optimizer step
    flops = 3 * 2 * 12 * 64 * (4 * (4 * 128 * 128 + 2 * 128 * 512) + 128 * 65) // (3 if mode == ["--forward"] else 1)
    # the products are timed where linear runs on the C kernels' pool (built wherever there is a C compiler)
    products_on = "npgpt's own product kernel" if native.status()["own_product"] else "the BLAS"
    assert (f"Products (the weights', on {products_on})" in out) == native.status()["built"]
    if native.status()["built"]:
        assert f"{flops / 1e9:.2f} GFLOP in" in out and "Against 50.0 ms (--anchor-ms)" in out
        products_ms = float(out.split("GFLOP in ")[1].split(" ms")[0])
        step_ms = float(out.split("everything else: ")[1].split("ms of the ")[1].split(" ms")[0])
        assert 0 < products_ms < step_ms
        # every product counted (the backward's pairs too): none faster than half again the GEMM peak
        assert float(out.split("GFLOP/s, ")[1].split("%")[0]) < 150
        # and each op's time outside the kernels, in microseconds a call, summed for the step under the table
        linear_row = next(line for line in out.splitlines() if line.startswith("| linear |"))
        outside_cell = linear_row.rstrip(" |").split("|")[-1].split("/")
        assert len(outside_cell) == (1 if mode == ["--forward"] else 2) and all(float(us) > 0 for us in outside_cell)
        outside_ms = float(out.split("NumPy calls of the ops' own): ")[1].split(" ms")[0])
        assert 0 < outside_ms < step_ms - products_ms


def test_generation_floor_line_gives_the_weights_bytes_and_their_rate():
    from benchmarks.profile import generation_floor_line
    big = dict(num_layers=4, d_model=256, d_ff=1024, vocab_size=10000)     # the tutorial GPT: 22.8 MB
    line = generation_floor_line(big, token_ms=2.0, kernels_ms=1.0, anchor_ms=2.5)
    # 4 (4 C^2 + 2 C F) + C V = 5,701,632 floats = 22.8 MB; 22.8 GB/s over 1 ms of kernels, 11 over the token
    assert "22.8 MB, in 1.00 ms of kernel calls (23 GB/s) and 1.00 ms outside them: 11 GB/s" in line
    assert "this run 0.80x, the kernel calls alone 0.40x" in line
    assert "Against" not in generation_floor_line(big, token_ms=2.0, kernels_ms=1.0)      # no anchor, no ratios


def test_profile_of_generation_prints_the_blocks_as_one_op_each_and_the_weights_rate():
    env = dict(os.environ, NPGPT_FAST="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile", "--model", "shakespeare-char", "--generate",
                           "--steps", "3", "--anchor-ms", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "generated token, after a prompt of (1, 16)" in out and "(mean of 3;" in out
    from npgpt.fast.cpu import native
    if native.status()["built"]:    # each of the 4 blocks one call; ln_f and the output projection
        assert "| transformer_block | 4 |" in out and "| linear | 1 |" in out and "| layer_norm | 1 |" in out
        # the small model: 4 (4 128^2 + 2 128 512) + 128 65 = 794,880 floats, 3.2 MB
        assert "Weights read a token (each product reads its W once): 3.2 MB" in out
        assert "Against 2.00 ms (--anchor-ms)" in out
    else:                           # op by op: per block Q, K, V, O and the feed-forward network's two
        assert "| linear | 25 |" in out
    assert "AdamW" not in out and "engine: backward" not in out


@pytest.mark.parametrize("flags, message", [(["--anchor-ms", "0"], "--anchor-ms: must be a positive number"),
                                            (["--generate", "--forward"], "leave out --forward and --loop"),
                                            (["--generate", "--seq", "500", "--steps", "13"],
                                             "make 513 positions, beyond the tutorial model's"),
                                            (["--generate", "--model", "shakespeare-char", "--seq", "16",
                                              "--steps", "49"], "make 65 positions, beyond"),
                                            (["--target", "-1"], "--target: must be a positive number"),
                                            (["--forward", "--loop"], "leave out --loop"),
                                            (["--steps", "x"], "--steps: must be a whole number of at least 1"),
                                            (["--batch", "0"], "--batch: must be a whole number of at least 1")])
def test_profile_refuses_bad_flags_with_exit_code_2(flags, message):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile"] + flags, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["benchmarks.profile", "--steps", "1"], ["benchmarks", "--quick"],
                                     ["benchmarks.quality", "--impl", "npgpt", "--budget", "1"]])
def test_a_gpu_that_cannot_be_used_is_refused_in_one_line_before_any_work(command):
    from npgpt import backend
    if backend.gpu_unavailable_reason() is None:
        pytest.skip("a GPU and CuPy are here: --device gpu runs")
    proc = subprocess.run([sys.executable, "-m"] + command + ["--device", "gpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: --device gpu: {backend.gpu_unavailable_reason()}; see --help"]


# ---- the front door: bad flags before any worker starts, a failing worker, Ctrl-C --------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--threads", "0"], "--threads: must be a whole number of at least 1, got 0"),
    (["--threads", "cores+1"], "give 1 to cores"),
    (["--shapes", "1x1024"], "a length of 1024 is beyond the tutorial GPT's context of 512"),
    (["--json", "no/such/dir/bench.json"], "there is no directory"),
    (["--json", "."], "--json . names a directory; give a file name"),
    (["--json", "not/yet/"], "--json not/yet/ names a directory; give a file name"),
    (["--bogus"], "unrecognized arguments: --bogus")])
def test_the_suite_refuses_bad_flags_in_one_line_before_any_worker_starts(flags, message):
    cores = usable_cores()
    flags = [flag.replace("cores+1", str(cores + 1)) for flag in flags]
    message = message.replace("cores", str(cores))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"] + flags, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize("command", [["benchmarks.profile"], ["benchmarks.quality", "--impl", "npgpt"]])
def test_the_other_benchmark_commands_refuse_more_threads_than_cores(command):
    cores = usable_cores()
    proc = subprocess.run([sys.executable, "-m"] + command + ["--threads", str(cores + 1)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert f"--threads {cores + 1}: this process may run on {cores} core" in proc.stderr


class FakeWorker:
    """suite.Worker without a process: canned replies at once; `trouble` makes one call of a case fail or be
    interrupted ({(batch, seq, what[, label]): exception}, what being "setup", an op, or "end": the wait for
    the worker to end). `ended` is the wait it was given (0: ended at once)."""
    trouble, made = {}, []

    def __init__(self, impl, env, setup, label=None):
        self.impl, self.case, self.closed, self.ended = label or impl, (setup["batch"], setup["seq"]), False, None
        self.proc = FakeProcess(self)
        self._maybe("setup")
        FakeWorker.made.append(self)            # started: the suite now owes it an end

    def _maybe(self, what):
        for key in (self.case + (what, self.impl), self.case + (what,)):
            exc = FakeWorker.trouble.pop(key, None)             # once: as a Ctrl-C comes once
            if exc is not None:
                raise exc

    def ask(self, command):
        if self.closed:
            raise ValueError("I/O operation on closed file.")    # as a real worker's closed stdin
        op = command["op"]
        self._maybe(op)
        return {"info": {}, "sgemm": {"gflops": 100.0}, "forward": {"ms": 10.0}, "train": {"ms": 20.0},
                "memory": {"max_rss_mb": 2.0, "after_import_mb": 1.0}, "generate": {"tokens_per_s": 50.0}}[op]

    def close(self, wait_s=60.0):
        self.closed = True
        self.proc.wait(wait_s)


class FakeProcess:
    """What suite.end_child needs of a worker's process; its pid is one no process has (for the load meter)."""

    def __init__(self, worker):
        self.worker, self.pid = worker, 2 ** 22 + 1
        self.stdin = self.stdout = self

    def write(self, text):
        pass

    def close(self):
        pass

    def wait(self, timeout=None):
        self.worker.ended = timeout
        self.worker._maybe("end")
        return 0

    def kill(self):
        pass


@pytest.fixture
def fake_workers(monkeypatch):
    import benchmarks.__main__ as front_door
    from benchmarks import suite
    monkeypatch.setattr(suite, "Worker", FakeWorker)
    monkeypatch.setattr(front_door, "torch_missing", lambda: False)      # no worker imports it here
    FakeWorker.trouble, FakeWorker.made = {}, []
    return FakeWorker


def run_front_door(args, capsys):
    import benchmarks.__main__ as front_door
    code = front_door.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_failing_worker_keeps_the_cases_before_it_and_names_itself_in_one_line(fake_workers, capsys, tmp_path):
    from benchmarks.suite import WorkerError
    fake_workers.trouble = {(16, 256, "train"): WorkerError("the npgpt worker failed at train: MemoryError: Unable "
                                                              "to allocate 74.5 GiB")}
    out = tmp_path / "bench.json"
    code, stdout, stderr = run_front_door(["--quick", "--shapes", "8x128,16x256", "--json", str(out)], capsys)
    assert code == 1
    assert "| train step (8, 128) | npgpt (training program) | 20.0 ms |" in stdout and "(16, 256)" not in stdout
    assert stderr.splitlines()[-1] == ("error: the npgpt worker failed at train: MemoryError: Unable to allocate "
                                       "74.5 GiB; choose smaller --shapes; the report above holds what finished "
                                       "before it")
    report = json.loads(out.read_text())
    assert [(c["batch"], c["seq"]) for c in report["speed"]["cases"]] == [(8, 128)]
    assert report["speed"]["failed"]["case"] == "(16, 256)"
    failing_case = [w for w in fake_workers.made if w.case == (16, 256)]
    assert failing_case and all(w.ended == 0 for w in failing_case)            # ended at once, not waited for
    assert all(w.ended == 60.0 for w in fake_workers.made if w.case == (8, 128))


def test_a_worker_out_of_memory_in_a_case_of_fixed_shape_is_not_told_to_change_shapes(fake_workers, capsys):
    from benchmarks.suite import WorkerError
    fake_workers.trouble = {(12, 64, "train"): WorkerError("the torch worker failed at train: MemoryError: x")}
    code, stdout, stderr = run_front_door(["--quick"], capsys)
    assert code == 1 and "--shapes" not in stderr and "MemoryError: x; the report above" in stderr


def test_a_torch_compile_that_fails_at_its_first_call_is_left_out_and_the_suite_goes_on(fake_workers, capsys):
    from benchmarks.suite import WorkerError
    fake_workers.trouble = {(8, 128, "forward", "torch_compile"): WorkerError(
        "the torch_compile worker failed at forward: BackendCompilerFailed: no C++ compiler")}
    code, stdout, stderr = run_front_door(["--shapes", "8x128"], capsys)
    assert code == 0, stderr
    assert "| train step (8, 128) | npgpt (training program) |" in stdout
    assert "| train step (8, 128) | PyTorch torch.compile (SDPA) |" not in stdout
    assert "BackendCompilerFailed: no C++ compiler" in stdout                  # the table says why it is missing
    compiled = [w for w in fake_workers.made if w.impl == "torch_compile"]
    assert compiled[0].ended == 10 and compiled[1].ended == 60.0     # the broken one, given 10 s; the next case's


@pytest.mark.parametrize("where, says", [
    ((12, 64, "setup"), "interrupted during the (12, 64) case of the speed suite"),
    ((8, 128, "generate"), "interrupted during the (8, 128) case of the speed suite"),
    ((12, 64, "end"), "interrupted during the end of the speed suite")])
def test_ctrl_c_anywhere_in_the_speed_suite_reports_what_finished(fake_workers, capsys, tmp_path, where, says):
    fake_workers.trouble = {where: KeyboardInterrupt()}
    out = tmp_path / "bench.json"
    code, stdout, stderr = run_front_door(["--quick", "--suite", "all", "--json", str(out)], capsys)
    assert code == 130 and "Traceback" not in stderr
    finished = [] if where[0] == 8 else ["(8, 128)"] + (["(12, 64)"] if where[2] == "end" else [])
    done = "the report above holds what finished before it" if finished else "nothing had finished"
    assert stderr.splitlines()[-1] == f"{says}: {done}"
    assert ("| train step (8, 128) |" in stdout) == bool(finished)
    assert "Time to quality" not in stdout                    # --suite all stops there: no quality suite
    report = json.loads(out.read_text())
    assert [f"({c['batch']}, {c['seq']})" for c in report["speed"]["cases"]] == finished
    assert "quality" not in report
    assert all(w.ended is not None for w in fake_workers.made)                # every worker started is ended
    if where[2] == "end":       # the wait for the first was interrupted: it and the rest are ended at once
        assert [w.ended for w in fake_workers.made if w.case == (12, 64)] == [0] * 4


def test_a_child_that_prints_something_else_than_a_reply_is_named_in_one_error():
    from benchmarks.suite import WorkerError, read_reply
    child = subprocess.Popen([sys.executable, "-c", "print('note: falling back to eager')"], stdout=subprocess.PIPE,
                             text=True)
    try:
        with pytest.raises(WorkerError, match="the npgpt worker answered 'note: falling back to eager' during "
                                              "train, not a reply"):
            read_reply(child, "the npgpt worker", "train")
    finally:
        child.wait(timeout=30)
        child.stdout.close()


def test_a_worker_interrupted_while_it_sets_up_is_ended(monkeypatch):
    from benchmarks import suite
    started = []

    def start(args, env):
        proc = real_start(args, env)
        started.append(proc)
        return proc

    def ctrl_c(proc, name, during):
        raise KeyboardInterrupt
    real_start = suite.start_child
    monkeypatch.setattr(suite, "start_child", start)
    monkeypatch.setattr(suite, "read_reply", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        suite.Worker("npgpt", suite.child_env(1), {"device": "cpu"})
    assert [proc.returncode for proc in started] == [-signal.SIGKILL]      # killed at once and waited for


def _children(pid):
    """The processes whose parent is `pid` (from /proc; none where there is no /proc)."""
    children = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()       # after the command's name, which may hold spaces
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:                                  # the field after the state: the parent
            children.append(int(entry))
    return children


def _end_with_its_workers(proc):
    """Kill a benchmark run that is still going, and its workers with it: each worker leads a session of its
    own, so killing the parent alone would leave them running."""
    if proc.poll() is not None:
        return
    for child in _children(proc.pid):
        try:
            os.killpg(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_reports_the_cases_that_finished_and_ends_every_worker(tmp_path, signum):
    """Ctrl-C at a terminal signals the parent's process group; the workers, each in a session of its own, do
    not get it (SIGTERM, as a scheduler sends it, goes to the parent alone). The suite stops in the second case
    (the shakespeare-char model's, of --quick), prints the first case's table and writes what it has to --json.
    communicate() returns only once every process holding the parent's stderr has ended: the parent and all
    its workers."""
    need("torch", "torch")
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as at a terminal
    try:
        err = b""
        while b"[12x64] starting workers" not in err:
            line = proc.stderr.readline()
            assert line, err.decode()
            err += line
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        out_text, rest = proc.communicate(timeout=300)
    finally:
        _end_with_its_workers(proc)
    err = (err + rest).decode()
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    how = "" if signum == signal.SIGINT else " (SIGTERM)"
    assert err.splitlines()[-1] == (f"interrupted{how} during the (12, 64) case of the speed suite: the report "
                                    "above holds what finished before it")
    assert "| train step (8, 128) | npgpt (training program) |" in out_text.decode()
    assert "(12, 64)" not in out_text.decode() and "shakespeare-char" not in out_text.decode()
    report = json.loads(out.read_text())
    assert report["speed"]["interrupted"] == "(12, 64)"
    assert [(c["batch"], c["seq"]) for c in report["speed"]["cases"]] == [(8, 128)]


def test_sigterm_and_sighup_stop_a_run_as_ctrl_c_and_their_handlers_are_put_back():
    from benchmarks.suite import stop_signals_as_ctrl_c
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in before:
        with pytest.raises(KeyboardInterrupt):
            with stop_signals_as_ctrl_c() as stop:
                os.kill(os.getpid(), sig)
                time.sleep(5)                               # the handler raises before this returns
        assert stop.signum == sig and stop.name == sig.name and stop.how == f" ({sig.name})"
        assert {s: signal.getsignal(s) for s in before} == before


def _catches(pid, signum):
    """Whether process `pid` has a handler for `signum` (the SigCgt mask of /proc/PID/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="waits for the handler through /proc/PID/status")
def test_sigterm_stops_the_profiler_in_one_line_with_exit_143():
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.profile", "--model", "shakespeare-char", "--steps",
                             "100000", "--threads", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not _catches(proc.pid, signal.SIGTERM):           # its handler is in place: the profile runs
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err == "interrupted (SIGTERM): nothing to report (the table is made once every step has run)\n"


@pytest.mark.parametrize("trouble", ["ctrl-c", "failure"])
def test_the_quality_suite_keeps_the_turns_that_finished_and_ends_both_sides(monkeypatch, trouble):
    """Ctrl-C (KeyboardInterrupt), or a side's failure, while the third turn's reply is awaited: the two turns
    that finished are the result, and both sides are ended."""
    need("torch", "torch")
    import benchmarks.__main__ as front_door
    from benchmarks.suite import WorkerError
    replies, started = {"count": 0}, []
    real_read_reply, real_start = front_door.read_reply, front_door.start_child

    def read_reply(proc, name, during):
        replies["count"] += 1
        if replies["count"] == 5:              # two setups, npgpt's turn, PyTorch's turn, then the trouble
            raise KeyboardInterrupt if trouble == "ctrl-c" else WorkerError("the npgpt side failed")
        return real_read_reply(proc, name, during)

    def start(args, env):
        started.append(real_start(args, env))
        return started[-1]
    monkeypatch.setattr(front_door, "read_reply", read_reply)
    monkeypatch.setattr(front_door, "start_child", start)
    q = front_door.run_quality(60.0, "cpu", 1, log=lambda message: None, every=3)
    assert (q["interrupted"], q["failed"]) == ((True, None) if trouble == "ctrl-c" else
                                               (False, "the npgpt side failed"))
    assert [q["results"][impl]["steps"] for impl in ("npgpt", "torch")] == [3, 3]
    assert all(3.5 < q["results"][impl]["val_loss"] < 4.5 for impl in ("npgpt", "torch"))
    assert "each side's figures are those of the last turn it finished." in front_door.format_quality(q)
    # ended at once (killed, exit -9), not asked to quit and waited for
    assert [proc.returncode for proc in started] == [-signal.SIGKILL] * 2

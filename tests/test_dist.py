"""Data parallelism over MPI: `mpiexec -n 2` runs against one process with the same global batch, resume across
world sizes, and how a run stops when a rank fails (npgpt/program/dist.py)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from npgpt.program import train as train_module
from npgpt.program.checkpoint import load_checkpoint
from npgpt.program.dist import DistError, launched_by_mpiexec, parse_fault, resumed_grad_accum
from optional import IN_CI, need

TINY = ["--tokenizer", "char", "--d-model", "16", "--num-heads", "2", "--num-layers", "1", "--d-ff", "32",
        "--max-seq-len", "16", "--seq-len", "16", "--batch-size", "4", "--device", "cpu", "--sample-tokens", "0"]
EXACT = ["--dropout", "0", "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "3"]
LAUNCHER_VARIABLES = ("PMI_", "OMPI_", "PMIX_", "MV2_", "HYDRA_", "MPI_LOCAL")


def plain_env(**extra):
    """This environment without any launcher's variables: a process that mpiexec did not start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARIABLES)}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def mpiexec():
    need("mpi4py", "mpi")
    path = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(path):
        message = f"no mpiexec next to {sys.executable}: pip install 'npgpt[mpi]'"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def launch(mpiexec, ranks, args, timeout=60):
    """mpiexec -n ranks python -m npgpt.train args -> CompletedProcess (text)."""
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "npgpt.train"] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=plain_env())


def one_process(args):
    assert train_module.main(args) == 0


def read_metrics(out_dir):
    import json
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_same_run(dir_a, dir_b, rtol):
    a, _ = load_checkpoint(os.path.join(dir_a, "ckpt.npz"))
    b, _ = load_checkpoint(os.path.join(dir_b, "ckpt.npz"))
    assert sorted(a) == sorted(b)
    for name in a:            # relative to each element, or to the array's scale where an element nearly cancels
        scale = float(np.abs(a[name]).max()) if a[name].dtype.kind == "f" else 0.0
        np.testing.assert_allclose(b[name], a[name], rtol=rtol, atol=rtol * scale, err_msg=name)
    losses_a = [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(dir_a)]
    losses_b = [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(dir_b)]
    assert [s for s, _, _ in losses_a] == [s for s, _, _ in losses_b]
    for (_, la, va), (_, lb, vb) in zip(losses_a, losses_b):
        assert lb == pytest.approx(la, rel=rtol, abs=1e-5)          # logged to 5 decimals
        assert (va is None) == (vb is None) and (va is None or vb == pytest.approx(va, rel=rtol, abs=1e-5))


# ---- no MPI ---------------------------------------------------------------------------------------------------

def test_only_a_launchers_variables_mean_mpiexec():
    assert not launched_by_mpiexec({"PATH": "/bin"})
    assert launched_by_mpiexec({"PMI_RANK": "0", "PMI_SIZE": "2"})               # MPICH (hydra)
    assert launched_by_mpiexec({"OMPI_COMM_WORLD_SIZE": "2"})                     # Open MPI


def test_plain_run_never_imports_mpi4py(corpus, tmp_path):
    code = ("import sys; from npgpt.program.train import main; "
            f"rc = main({TINY + ['--data', corpus, '--out-dir', str(tmp_path / 'o'), '--max-iters', '1']!r}); "
            "print('mpi4py' in sys.modules, rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=plain_env())
    assert proc.stdout.splitlines()[-1] == "False 0", proc.stderr


def test_under_mpiexec_without_mpi4py_is_one_line_and_exit_2(corpus, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "mpi4py.py").write_text("raise ImportError(\"No module named 'mpi4py'\")\n")
    env = plain_env(PMI_RANK="0", PMI_SIZE="2", PYTHONPATH=f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "npgpt.train"] + TINY + ["--data", corpus, "--out-dir",
                                                                        str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: started by mpiexec, but mpi4py is not installed (No module named 'mpi4py'); "
        "pip install 'npgpt[mpi]'"]


def test_resumed_grad_accum_keeps_the_global_batch():
    assert resumed_grad_accum(1, 2, 1) == 2          # 2 ranks x 1 -> one process x 2
    assert resumed_grad_accum(4, 1, 2) == 2          # one process x 4 -> 2 ranks x 2
    assert resumed_grad_accum(3, 2, 3) == 2
    with pytest.raises(DistError, match="cannot share"):
        resumed_grad_accum(3, 1, 2)
    assert parse_fault("1:3") == (1, 3, "raise") and parse_fault("0:2:kill") == (0, 2, "kill")
    for bad in ("1", "a:2", "1:0", "1:2:explode", "1:2:raise:x"):
        with pytest.raises(DistError, match="--inject-fault"):
            parse_fault(bad)


# ---- two ranks against one process --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,workers,ranks,zero,rtol", [
    ("float64", "1", 2, "0", 1e-9),
    ("float32", "2", 2, "0", 1e-5),
    ("float64", "1", 3, "1", 1e-9),      # ZeRO-1 over 3 ranks: blocks that cut parameters, the last one padded
])
def test_ranks_equal_one_process_with_as_many_micro_batches(mpiexec, corpus, tmp_path, dtype, workers, ranks, zero,
                                                            rtol):
    common = TINY + EXACT + ["--data", corpus, "--dtype", dtype, "--workers", workers, "--max-iters", "4"]
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    one_process(common + ["--out-dir", one, "--grad-accum", str(ranks)])
    proc = launch(mpiexec, ranks, common + ["--out-dir", many, "--grad-accum", "1", "--check-replicas",
                                            "--zero-stage", zero])
    assert proc.returncode == 0, proc.stderr
    assert f"data parallel over {ranks} ranks" in proc.stdout
    assert ("ZeRO-1: each rank keeps" in proc.stdout) == (zero == "1")
    assert proc.stdout.count("step 4/4") == 1                   # rank 0 alone prints
    assert_same_run(one, many, rtol)
    _, meta = load_checkpoint(os.path.join(many, "ckpt.npz"))
    assert meta["world_size"] == ranks and meta["config"]["grad_accum"] == 1


@pytest.mark.parametrize("zero", ["0", "1"])
def test_resume_across_world_sizes_continues_the_global_stream(mpiexec, corpus, tmp_path, zero):
    """8 steps of one process with --grad-accum 2 = 4 steps on 2 ranks + 4 in one process (and the reverse);
    with ZeRO-1 the 2-rank checkpoint holds the gathered moments, and a resume takes its block of them."""
    common = TINY + EXACT + ["--data", corpus, "--dtype", "float64", "--workers", "1", "--zero-stage", zero]
    straight, two_then_one, one_then_two = (str(tmp_path / n) for n in ("straight", "2-1", "1-2"))
    one_process(common + ["--out-dir", straight, "--grad-accum", "2", "--max-iters", "8"])

    proc = launch(mpiexec, 2, common + ["--out-dir", two_then_one, "--grad-accum", "1", "--max-iters", "4"])
    assert proc.returncode == 0, proc.stderr
    one_process(common + ["--out-dir", two_then_one, "--max-iters", "8", "--resume"])    # grad_accum 2 implied
    assert_same_run(straight, two_then_one, 1e-9)

    one_process(common + ["--out-dir", one_then_two, "--grad-accum", "2", "--max-iters", "4"])
    proc = launch(mpiexec, 2, common + ["--out-dir", one_then_two, "--max-iters", "8", "--resume"])
    assert proc.returncode == 0, proc.stderr
    assert "resuming from step 4" in proc.stdout
    assert_same_run(straight, one_then_two, 1e-9)
    _, meta = load_checkpoint(os.path.join(one_then_two, "ckpt.npz"))
    assert meta["world_size"] == 2 and meta["config"]["grad_accum"] == 1


def test_dropout_masks_are_fixed_per_rank_and_step():
    from types import SimpleNamespace
    from npgpt import backend
    from npgpt.program.dist import World

    def draws(rank, step, size=2, seed=1337):
        fake = SimpleNamespace(rank=rank, size=size, step=0)
        with World.stepping(fake, step, seed):
            return backend.global_rng().random(8)

    np.testing.assert_array_equal(draws(1, 3), draws(1, 3))                # fixed: the same again on a resume
    assert not np.array_equal(draws(0, 3), draws(1, 3))                    # each rank its own masks
    assert not np.array_equal(draws(1, 3), draws(1, 4))                    # and fresh ones every step
    assert not np.array_equal(draws(1, 3), draws(1, 3, seed=7))


def test_one_rank_under_mpiexec_is_a_plain_process(mpiexec, corpus, tmp_path):
    common = TINY + ["--data", corpus, "--dropout", "0.1", "--workers", "2", "--max-iters", "6",
                     "--eval-interval", "3", "--log-interval", "1", "--eval-iters", "2"]
    plain, one_rank = str(tmp_path / "plain"), str(tmp_path / "one-rank")
    one_process(common + ["--out-dir", plain])
    proc = launch(mpiexec, 1, common + ["--out-dir", one_rank])
    assert proc.returncode == 0, proc.stderr
    assert "data parallel over 1 rank," in proc.stdout
    assert_same_run(plain, one_rank, 1e-6)                       # dropout included: the same masks


def test_two_ranks_with_dropout_resume_bit_for_bit(mpiexec, corpus, tmp_path):
    common = TINY + ["--data", corpus, "--dropout", "0.1", "--workers", "1", "--log-interval", "1",
                     "--eval-interval", "3", "--eval-iters", "2"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    for args in (["--out-dir", straight, "--max-iters", "6"], ["--out-dir", split, "--max-iters", "3"],
                 ["--out-dir", split, "--max-iters", "6", "--resume"]):
        proc = launch(mpiexec, 2, common + args)
        assert proc.returncode == 0, proc.stderr
    assert_same_run(straight, split, 0.0)


# ---- faults -------------------------------------------------------------------------------------------------

# A raising rank aborts the job: mpiexec's own exit code then depends on how it ended the other rank
# (1, or 9 when it killed it), so only "not zero" is asserted there, with the one-line error below.
@pytest.mark.parametrize("fault,code", [("1:5", None), ("1:5:kill", None), ("1:5:hang", 2)])
def test_a_failing_rank_stops_the_whole_run_and_keeps_the_checkpoint(mpiexec, corpus, tmp_path, fault, code):
    out_dir = str(tmp_path / "run")
    args = TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "1000", "--eval-interval", "2",
                   "--log-interval", "1", "--inject-fault", fault, "--dist-timeout", "5"]
    proc = launch(mpiexec, 2, args, timeout=60)                 # no hang: the timeout would fail the test
    assert proc.returncode != 0
    if code is not None:
        assert proc.returncode == code
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    if fault == "1:5":
        assert errors == ["error: rank 1 of 2: injected fault at step 5 (--inject-fault 1:5)"]
    if fault == "1:5:hang":                                      # rank 0 waits --dist-timeout, then says so
        assert len(errors) == 1 and errors[0].startswith("error: rank 0 of 2: no answer from the other ranks for "
                                                         "5 s during the gradient allreduce of step 5")
    assert "Traceback" not in proc.stderr
    # A good checkpoint from before the fault: step 4's, or step 2's where the killed rank's end cut rank 0's
    # save of step 4 short (that save is atomic, so step 2's file stays whole).
    _, meta = load_checkpoint(os.path.join(out_dir, "ckpt.npz"))
    assert meta["step"] in ((2, 4) if fault.endswith("kill") else (4,))


def test_check_replicas_names_the_rank_that_drifted(mpiexec, corpus, tmp_path):
    args = TINY + ["--data", corpus, "--out-dir", str(tmp_path / "run"), "--max-iters", "6",
                   "--inject-fault", "1:2:perturb", "--check-replicas"]
    proc = launch(mpiexec, 2, args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1                                       # rank 0 speaks for both
    assert lines[0].startswith("error: replicas differ after step 2: rank 1's parameters are not rank 0's")


def test_a_bad_flag_under_mpiexec_is_one_line_and_exit_2(mpiexec, corpus, tmp_path):
    proc = launch(mpiexec, 2, TINY + ["--data", corpus, "--out-dir", str(tmp_path / "o"), "--d-model", "10",
                                      "--num-heads", "3"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --d-model 10 is not divisible by --num-heads 3; choose num_heads among its divisors"]


def test_ctrl_c_on_mpiexec_saves_once_on_rank_0(mpiexec, corpus, tmp_path):
    out_dir = str(tmp_path / "run")
    cmd = [mpiexec, "-n", "2", sys.executable, "-u", "-m", "npgpt.train"] + TINY + [
        "--data", corpus, "--out-dir", out_dir, "--max-iters", "100000", "--log-interval", "5",
        "--eval-interval", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=plain_env())
    try:
        line = proc.stdout.readline()
        while not line.startswith("step "):
            assert line, proc.stderr.read()
            line = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)                          # mpiexec passes it to every rank
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.count("checkpoint saved") == 1 and "Traceback" not in err and "checkpoint saved" not in out
    stopped_at = int(err.split("interrupted at step ")[1].split(":")[0])
    _, meta = load_checkpoint(os.path.join(out_dir, "ckpt.npz"))
    assert meta["step"] == stopped_at >= 5

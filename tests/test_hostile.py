"""A careless or hostile user: reused and shared out dirs, diverging runs, signals, tampered checkpoints, full
disks, impossible configurations and sampler settings. Each gets one line on stderr, exit code 2 (or the
signal's code), and loses nothing: the good checkpoints stay byte for byte (docs/hostile-inputs.md)."""

import builtins
import errno
import hashlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from npgpt import backend
from npgpt.generate import filter_logits, generate, generate_tokens
from npgpt.model import GPT
from npgpt.program import checkpoint as checkpoint_module
from npgpt.program import sample as sample_module
from npgpt.program import train as train_module
from npgpt.program.checkpoint import load_checkpoint, optimizer_order, state_problem
from npgpt.program.config import TrainConfig, memory_problem, parameter_shapes
from npgpt.program.rundir import metrics_line, trim_metrics

TINY = ["--tokenizer", "char", "--d-model", "16", "--num-heads", "2", "--num-layers", "1", "--d-ff", "32",
        "--max-seq-len", "16", "--seq-len", "16", "--batch-size", "4", "--device", "cpu", "--sample-tokens", "0",
        "--eval-iters", "2"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**values):
    """TINY with some flags' values changed: tiny(seq_len=1) for --seq-len 1."""
    args = list(TINY)
    for name, value in values.items():
        args[args.index("--" + name.replace("_", "-")) + 1] = str(value)
    return args


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A run stopped at step 4 (ckpt.npz and best.npz at step 4); tests copy it before changing anything."""
    out_dir = str(tmp_path_factory.mktemp("trained") / "run")
    assert train_module.main(TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "4",
                                     "--eval-interval", "4", "--log-interval", "1"]) == 0
    return out_dir


@pytest.fixture
def run_dir(trained, tmp_path):
    out_dir = str(tmp_path / "run")
    shutil.copytree(trained, out_dir)
    return out_dir


def run_main(args, capsys, main=train_module.main):
    try:
        code = main(args)
    except SystemExit as exc:          # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def fingerprints(out_dir):
    return {name: sha256(os.path.join(out_dir, name)) for name in ("ckpt.npz", "best.npz", "metrics.jsonl")}


def strict_records(out_dir):
    """metrics.jsonl as strict JSON: a bare NaN or Infinity fails."""
    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def rewrite_checkpoint(path, edit_meta=None, edit_arrays=None):
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(str(arrays.pop("meta")))
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def resume_args(corpus, out_dir, *extra):
    return TINY + ["--data", corpus, "--out-dir", out_dir, "--eval-interval", "4", "--max-iters", "8",
                   "--resume", *extra]


# ---- 1. a used out dir ---------------------------------------------------------------------------------------

def test_a_used_out_dir_is_refused_and_overwrite_starts_over_cleanly(corpus, run_dir, capsys):
    before = fingerprints(run_dir)
    fresh = TINY + ["--data", corpus, "--out-dir", run_dir, "--max-iters", "2", "--eval-interval", "2"]
    code, out, err = run_main(fresh, capsys)
    assert_one_line_error(code, err, "already holds a run", "--resume", "--overwrite")
    assert fingerprints(run_dir) == before
    # --overwrite with a run that cannot start deletes nothing
    code, _, err = run_main(fresh + ["--overwrite", "--data", os.path.join(run_dir, "missing.txt")], capsys)
    assert_one_line_error(code, err, "does not exist")
    assert fingerprints(run_dir) == before
    code, out, _ = run_main(fresh + ["--overwrite", "--log-interval", "1"], capsys)
    assert code == 0 and "--overwrite: deleted" in out
    assert [r["step"] for r in strict_records(run_dir)] == [1, 2]        # only the new run's records
    assert load_checkpoint(os.path.join(run_dir, "ckpt.npz"))[1]["step"] == 2
    code, _, err = run_main(fresh + ["--overwrite", "--resume"], capsys)
    assert_one_line_error(code, err, "give one of them")


def test_a_resume_whose_max_iters_leaves_nothing_to_train_is_refused(corpus, run_dir, capsys):
    before = fingerprints(run_dir)                          # the run is at step 4
    for max_iters in ("4", "2"):
        code, _, err = run_main(resume_args(corpus, run_dir, "--max-iters", max_iters), capsys)
        assert_one_line_error(code, err, "is at step 4", f"--max-iters {max_iters} leaves nothing to train",
                              "above 4")
        assert fingerprints(run_dir) == before
    code, out, _ = run_main(resume_args(corpus, run_dir, "--max-iters", "5"), capsys)
    assert code == 0 and "resuming from step 4 of 5" in out


# ---- 2. divergence is never saved ----------------------------------------------------------------------------

def test_a_diverging_run_saves_nothing_and_names_the_good_checkpoint(corpus, run_dir, capsys):
    before = fingerprints(run_dir)
    code, _, err = run_main(resume_args(corpus, run_dir, "--lr", "1e6", "--warmup-iters", "0", "--eval-interval",
                                        "1", "--log-interval", "1", "--grad-clip", "0"), capsys)
    assert_one_line_error(code, err, "stopped without saving", "ckpt.npz (step 4)")
    for name in ("ckpt.npz", "best.npz"):
        assert sha256(os.path.join(run_dir, name)) == before[name]
    strict_records(run_dir)


def test_a_nan_validation_loss_is_not_saved_nor_logged_as_bare_nan(corpus, run_dir, capsys, monkeypatch):
    before = fingerprints(run_dir)
    monkeypatch.setattr(train_module, "estimate_loss", lambda *args, **kwargs: float("nan"))
    code, _, err = run_main(resume_args(corpus, run_dir), capsys)
    assert_one_line_error(code, err, "validation loss became nan at step 8", "ckpt.npz (step 4)")
    assert sha256(os.path.join(run_dir, "ckpt.npz")) == before["ckpt.npz"]
    assert all("val_loss" not in r or np.isfinite(r["val_loss"]) for r in strict_records(run_dir))


def test_state_problem_finds_non_finite_and_exploded_weights():
    backend.manual_seed(0)
    model = GPT(10, d_model=8, num_heads=2, num_layers=1, d_ff=16, max_seq_len=4)
    assert state_problem(model) is None
    weight = dict(model.named_parameters())["blocks.0.ffn.linear1.weight"]
    weight.data[0, 0] = 3e15
    assert "blocks.0.ffn.linear1.weight reaches 3e+15" in state_problem(model)
    weight.data[0, 0] = np.nan
    assert "blocks.0.ffn.linear1.weight is not finite" in state_problem(model)


def test_a_run_that_diverges_before_its_first_save_says_to_start_over(corpus, tmp_path, capsys):
    out_dir = str(tmp_path / "run")
    code, _, err = run_main(TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "8", "--lr", "1e6",
                                    "--warmup-iters", "0", "--eval-interval", "1", "--log-interval", "1",
                                    "--grad-clip", "0"], capsys)
    assert_one_line_error(code, err, "no checkpoint was saved", "start again with --overwrite")
    assert "--resume" not in err
    code, _, err = run_main(resume_args(corpus, out_dir), capsys)       # --resume: nothing to resume from
    assert_one_line_error(code, err, "holds no checkpoint", "start over with --overwrite")
    code, out, _ = run_main(TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "4", "--eval-interval",
                                    "4", "--overwrite"], capsys)         # the advice works
    assert code == 0 and os.path.exists(os.path.join(out_dir, "ckpt.npz"))


# ---- 3. dtype from the checkpoint ----------------------------------------------------------------------------

def test_a_float64_run_resumes_as_float64_and_a_bogus_dtype_is_refused(corpus, tmp_path, capsys):
    out_dir = str(tmp_path / "run")
    assert run_main(TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "4", "--eval-interval", "4",
                            "--dtype", "float64"], capsys)[0] == 0
    code, out, _ = run_main(resume_args(corpus, out_dir), capsys)
    assert code == 0 and "(float64)" in out
    arrays, meta = load_checkpoint(os.path.join(out_dir, "ckpt.npz"))
    assert meta["step"] == 8 and meta["config"]["dtype"] == "float64"
    assert {a.dtype for name, a in arrays.items() if not name.endswith("step")} == {np.dtype(np.float64)}
    path = os.path.join(out_dir, "ckpt.npz")
    rewrite_checkpoint(path, lambda meta: meta["config"].update(dtype="bogus"))
    before = sha256(path)
    code, _, err = run_main(resume_args(corpus, out_dir, "--max-iters", "12"), capsys)
    assert_one_line_error(code, err, "--dtype must be one of float32, float64, got 'bogus'")
    assert sha256(path) == before


# ---- 4. one run per out dir ----------------------------------------------------------------------------------

def test_a_live_run_holds_its_out_dir(corpus, run_dir, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom npgpt.program.rundir import RunDirLock\n"
                               "lock = RunDirLock(sys.argv[1]).__enter__()\nprint('locked', flush=True)\n"
                               "time.sleep(60)", run_dir],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = fingerprints(run_dir)
        code, _, err = run_main(resume_args(corpus, run_dir), capsys)
        assert_one_line_error(code, err, "in use by another training run", f"pid {holder.pid}")
        assert fingerprints(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died without unlocking: its lock file is stale and the next run takes it over
    assert f"pid {holder.pid}" in open(os.path.join(run_dir, "lock")).read()
    code, out, _ = run_main(resume_args(corpus, run_dir), capsys)
    assert code == 0 and f"taking over the lock of a run that is no longer running (pid {holder.pid}" in out
    assert not os.path.exists(os.path.join(run_dir, "lock"))


def test_temporary_files_are_unique_per_writer_and_leftovers_are_removed(corpus, run_dir, capsys, monkeypatch):
    leftover = os.path.join(run_dir, "ckpt.npz.tmp-12345-abcd")     # from a writer killed by SIGKILL
    open(leftover, "wb").write(b"partial")
    names = []
    real_replace = os.replace

    def spy(src, dst):
        names.append(os.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", spy)
    assert run_main(resume_args(corpus, run_dir), capsys)[0] == 0
    assert not os.path.exists(leftover)
    assert len(names) >= 2 and len(set(names)) == len(names)
    assert all(n.startswith(f"ckpt.npz.tmp-{os.getpid()}-") or n.startswith(f"best.npz.tmp-{os.getpid()}-")
               for n in names)


# ---- 5. SIGTERM, and no step logged twice ----------------------------------------------------------------------

def test_sigterm_saves_once_and_exits_143(corpus, tmp_path):
    out_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-u", "-m", "npgpt.train"] + TINY + ["--data", corpus, "--out-dir", out_dir,
                                                                "--max-iters", "100000", "--log-interval", "5",
                                                                "--eval-interval", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        while not line.startswith("step "):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.count("checkpoint saved") == 1 and "Traceback" not in err          # on stderr, beside the errors
    step = load_checkpoint(os.path.join(out_dir, "ckpt.npz"))[1]["step"]
    assert step >= 5 and strict_records(out_dir)[-1]["step"] == step


def test_resume_drops_the_records_logged_after_the_checkpoint(corpus, run_dir, capsys):
    with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"step": 5, "loss": 4.0}\n{"step": 6, "loss": 4.0}\n{"step": 7, "lo')   # then killed
    assert run_main(resume_args(corpus, run_dir, "--log-interval", "1"), capsys)[0] == 0
    assert [r["step"] for r in strict_records(run_dir)] == list(range(1, 9))


def test_metrics_lines_are_strict_json():
    line = metrics_line({"step": 3, "loss": 2.5, "grad_norm": {"blocks.0": float("inf"), "ln_f": float("nan")}})
    assert json.loads(line) == {"step": 3, "loss": 2.5, "grad_norm": {"blocks.0": None, "ln_f": None}}


def test_trim_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\nNaN\n{"step": 3}\n{"step": 2', encoding="utf-8")
    assert trim_metrics(str(path), 2) == 3
    assert path.read_text(encoding="utf-8") == '{"step": 1}\n{"step": 2}\n'


# ---- 6. tampered and malformed checkpoints ----------------------------------------------------------------------

def _set(key, value):
    return lambda meta: meta["config"].update({key: value})


def _drop(key):
    return lambda meta: meta.pop(key)


def _both(key, value):
    def edit(meta):
        meta["config"][key] = value
        meta["model_config"][key] = value
    return edit


def _array(name, make):
    return lambda arrays: arrays.update({name: make(arrays[name])})


def _drop_array(name):
    return lambda arrays: arrays.pop(name)


TAMPERED = [
    ("no config", _drop("config"), None, "no 'config'"),
    ("no tokenizer", _drop("tokenizer"), None, "no 'tokenizer'"),
    ("no model_config", _drop("model_config"), None, "no 'model_config'"),
    ("extra config key", _set("colour", "blue"), None, "unknown field 'colour'"),
    ("d_model a string", _set("d_model", "abc"), None, "--d-model must be int, got 'abc'"),
    ("step a string", lambda meta: meta.update(step="ten"), None, "its step is 'ten'"),
    ("lr nan", _set("lr", float("nan")), None, "--lr must be a finite number"),
    ("string parameter", None, _array("param.ln_f.bias", lambda a: np.array(["x"] * a.size)),
     "param.ln_f.bias is (16,) <U1"),
    ("wrong-shape adam.v", None, _array("adam.v.0", lambda a: a[:, :3]), "adam.v.0 is (58, 3)"),
    ("missing adam.v", None, _drop_array("adam.v.0"), "AdamW moments for parameter 0 are missing"),
    ("unexpected array", None, lambda arrays: arrays.update(extra=np.zeros(3)), "extra"),
    ("nan weights", None, _array("param.ln_f.weight", lambda a: a * np.nan), "param.ln_f.weight holds nan"),
    ("d_model 10**9", _both("d_model", 10 ** 9), None, "the model's 16.0 EB of weights are more than the"),
]


@pytest.mark.parametrize("edit_meta,edit_arrays,message", [case[1:] for case in TAMPERED],
                         ids=[case[0] for case in TAMPERED])
def test_a_tampered_checkpoint_is_refused_before_anything_is_built(corpus, run_dir, capsys, edit_meta,
                                                                   edit_arrays, message):
    path = os.path.join(run_dir, "ckpt.npz")
    rewrite_checkpoint(path, edit_meta, edit_arrays)
    before = sha256(path)
    started = time.perf_counter()
    code, _, err = run_main(resume_args(corpus, run_dir), capsys)
    assert_one_line_error(code, err, "is unusable", message)
    assert sha256(path) == before
    code, _, err = run_main(["--out-dir", run_dir, "--checkpoint", "ckpt.npz"], capsys, sample_module.main)
    assert_one_line_error(code, err, message)
    assert time.perf_counter() - started < 30          # refused, not allocated (d_model 10**9 needs 300 GB)


def test_a_header_claiming_1e11_floats_is_refused_without_reading_it(corpus, run_dir, capsys):
    path = os.path.join(run_dir, "ckpt.npz")
    forged = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(forged, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "param.token_embedding.weight.npy":
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    header, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 11,)})
                data = header.getvalue() + b"\x00" * 64          # magic, header, then 64 bytes only
            dst.writestr(info.filename, data)
    open(path, "wb").write(forged.getvalue())
    code, _, err = run_main(resume_args(corpus, run_dir), capsys)
    assert_one_line_error(code, err, "header claims (100000000000,)")


def test_parameter_shapes_and_adam_order_match_the_model():
    for attention_bias in (False, True):
        kwargs = dict(vocab_size=11, d_model=8, num_heads=2, num_layers=2, d_ff=12, max_seq_len=5)
        try:
            model = GPT(**kwargs, attention_bias=attention_bias)
        except TypeError:                      # a GPT without the option
            assert not attention_bias
            continue
        shapes = parameter_shapes(**kwargs, attention_bias=attention_bias)
        assert list(shapes.items()) == [(n, p.shape) for n, p in model.named_parameters()]
        optimizer = train_module.make_optimizer(model, TrainConfig())
        assert [p.shape for _, p in optimizer._params()] == [shapes[n] for n in optimizer_order(shapes)]


def test_resume_without_ckpt_npz_continues_from_best_npz(corpus, run_dir, capsys):
    best = os.path.join(run_dir, "best.npz")
    before = sha256(best)
    os.remove(os.path.join(run_dir, "ckpt.npz"))       # deleted, or its save stopped by a full disk
    code, out, _ = run_main(resume_args(corpus, run_dir), capsys)
    assert code == 0, out
    assert "has no ckpt.npz; resuming from best.npz" in out and "resuming from step 4 of 8" in out
    arrays, meta = load_checkpoint(os.path.join(run_dir, "ckpt.npz"))
    assert meta["step"] == 8
    assert [r["step"] for r in strict_records(run_dir)] == [1, 2, 3, 4, 5, 6, 7, 8]     # none logged twice
    if sha256(best) == before:          # best.npz rewritten only by a lower validation loss than step 4's
        assert strict_records(run_dir)[-1]["val_loss"] >= strict_records(run_dir)[3]["val_loss"]


@pytest.mark.parametrize("flags, needles", [
    (["--preset", "shakespeare-char"], ["trained with --preset seed, not shakespeare-char", "drop the flag"]),
    (["--init-from", "somewhere"], ["was started from scratch, not from --init-from somewhere", "drop the flag"]),
])
def test_resume_refuses_flags_that_would_change_what_the_run_is(corpus, run_dir, capsys, flags, needles):
    before = fingerprints(run_dir)
    code, _, err = run_main(resume_args(corpus, run_dir, *flags), capsys)
    assert_one_line_error(code, err, *needles)
    assert fingerprints(run_dir) == before


@pytest.mark.parametrize("other_flags", [["--seed", "7"],                     # the same model, another run
                                         ["--d-model", "32"]])                 # another model
def test_another_runs_ckpt_npz_copied_in_does_not_replace_best_npz(corpus, run_dir, tmp_path, capsys, other_flags):
    other = str(tmp_path / "other")
    assert run_main(TINY + other_flags + ["--data", corpus, "--out-dir", other, "--max-iters", "2",
                                          "--eval-interval", "2"], capsys)[0] == 0
    shutil.copy(os.path.join(other, "ckpt.npz"), os.path.join(run_dir, "ckpt.npz"))
    before = fingerprints(run_dir)
    code, _, err = run_main(["--data", corpus, "--out-dir", run_dir, "--resume", "--max-iters", "8", "--device",
                             "cpu", "--sample-tokens", "0"], capsys)     # the config comes from ckpt.npz
    assert_one_line_error(code, err, "are of two different runs", "move one of them")
    assert fingerprints(run_dir) == before


def test_a_run_keeps_its_id_through_resumes(corpus, run_dir, capsys):
    first = load_checkpoint(os.path.join(run_dir, "ckpt.npz"))[1]["run_id"]
    assert run_main(resume_args(corpus, run_dir), capsys)[0] == 0
    for name in ("ckpt.npz", "best.npz"):
        assert load_checkpoint(os.path.join(run_dir, name))[1]["run_id"] == first


def test_a_run_file_replaced_by_a_directory_is_named_with_its_fix(corpus, run_dir, capsys):
    metrics = os.path.join(run_dir, "metrics.jsonl")
    os.remove(metrics)
    os.mkdir(metrics)
    code, _, err = run_main(resume_args(corpus, run_dir), capsys)
    assert_one_line_error(code, err, "Is a directory", "metrics.jsonl", "move it away")
    assert "free some space" not in err


def test_a_closed_stdout_saves_and_stops_like_a_signal(corpus, tmp_path):
    out_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "npgpt.train", *TINY, "--data", corpus, "--out-dir", out_dir,
                             "--max-iters", "100000", "--eval-interval", "100000", "--log-interval", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    first = proc.stdout.readline()                   # the banner: then the reader goes away, as head does
    proc.stdout.close()
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    err = err.decode()
    assert first.startswith(b"npgpt: ")
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "free some space" not in err
    assert "stdout was closed: interrupted at step" in err and "--resume" in err
    arrays, meta = load_checkpoint(os.path.join(out_dir, "ckpt.npz"))
    assert 1 <= meta["step"] < 100000


def test_an_out_dir_whose_name_is_not_utf8_is_printed_as_its_own_bytes(corpus, tmp_path):
    """Python's stdout refuses a path's undecodable bytes under a UTF-8 locale other than C.UTF-8 (here
    PYTHONIOENCODING says the same), and its stderr escapes them; the commands print them back as they were,
    as ls does, in their output and their errors."""
    out_dir = os.path.join(os.fsencode(tmp_path), b"run\xff")
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING="utf-8:strict")
    train = subprocess.run([sys.executable, "-m", "npgpt.train", *TINY, "--data", corpus, "--out-dir", out_dir,
                            "--max-iters", "2", "--eval-interval", "2"], cwd=ROOT, capture_output=True, env=env,
                           timeout=120)
    assert train.returncode == 0, train.stderr.decode(errors="replace")
    assert out_dir in train.stdout                  # e.g. the closing line's `npgpt.plot --out-dir ...`
    assert os.path.isfile(os.path.join(out_dir, b"ckpt.npz"))
    sample = subprocess.run([sys.executable, "-m", "npgpt.sample", "--out-dir", out_dir, "--max-new-tokens", "5"],
                            cwd=ROOT, capture_output=True, env=env, timeout=120)
    assert sample.returncode == 0, sample.stderr.decode(errors="replace")
    again = subprocess.run([sys.executable, "-m", "npgpt.train", *TINY, "--data", corpus, "--out-dir", out_dir],
                           cwd=ROOT, capture_output=True, env=env, timeout=120)
    assert again.returncode == 2 and b"--out-dir " + out_dir + b" already holds a run" in again.stderr
    assert b"Traceback" not in train.stderr + sample.stderr + again.stderr


# ---- 7. disk full and read-only directories ---------------------------------------------------------------------

def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(corpus, run_dir, capsys, monkeypatch):
    before = fingerprints(run_dir)

    def savez_then_disk_full(file, *args, **kwargs):
        file.write(b"\x00" * 4096)                       # part of the archive reaches the disk, then no more
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.np, "savez", savez_then_disk_full)
    code, _, err = run_main(resume_args(corpus, run_dir), capsys)
    assert_one_line_error(code, err, "No space left on device", "untouched")
    assert sorted(os.listdir(run_dir)) == ["best.npz", "ckpt.npz", "metrics.jsonl"]
    for name in ("ckpt.npz", "best.npz"):
        assert sha256(os.path.join(run_dir, name)) == before[name]


def test_a_save_without_write_permission_names_that_fix(corpus, run_dir, capsys, monkeypatch):
    before = fingerprints(run_dir)

    def savez_denied(file, *args, **kwargs):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(checkpoint_module.np, "savez", savez_denied)
    code, _, err = run_main(resume_args(corpus, run_dir), capsys)
    assert_one_line_error(code, err, "Permission denied", "choose a writable --out-dir", "untouched")
    assert "free some space" not in err
    for name in ("ckpt.npz", "best.npz"):
        assert sha256(os.path.join(run_dir, name)) == before[name]


def test_a_read_only_out_dir_is_one_line(corpus, run_dir, capsys, monkeypatch):
    before = fingerprints(run_dir)
    real_open = builtins.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(run_dir) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only_open)
    code, _, err = run_main(resume_args(corpus, run_dir), capsys)
    assert_one_line_error(code, err, "Read-only file system")
    monkeypatch.undo()
    assert fingerprints(run_dir) == before


# ---- 8, 9. the sampler -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    backend.manual_seed(0)
    model = GPT(20, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_seq_len=8, dropout=0.0)
    model.eval()
    return model


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=-1.0), "temperature must be a finite number"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_k=-3), "top_k must be an integer >= 1"),
    (dict(top_p=float("nan")), "top_p must lie in (0, 1]"),
])
def test_the_sampler_refuses_settings_that_cannot_sample(small_model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        generate(small_model, [1, 2], 3, rng=np.random.default_rng(0), **{"temperature": 1.0, **kwargs})
    with pytest.raises(ValueError):
        filter_logits(np.zeros((1, 5)), **{"temperature": 1.0, **kwargs})


def test_the_sampler_refuses_float16_and_nan_logits():
    backend.manual_seed(0)
    model = GPT(20, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_seq_len=8)
    for p in model.parameters():                # float16 arrays put in by hand (Module.to refuses them)
        p.data = p.data.astype(np.float16)
    with pytest.raises(ValueError, match="float16"):
        generate(model, [1, 2], 3)
    model = GPT(20, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_seq_len=8)
    model.ln_f.weight.data[:] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        generate(model, [1, 2], 3)


def test_tokens_stream_one_at_a_time_and_add_up_to_generate(small_model):
    stream = generate_tokens(small_model, [1, 2, 3], 12, 0.9, top_k=5, rng=np.random.default_rng(3))
    first = next(stream)
    assert first.shape == (1,) and 0 <= first[0] < 20
    streamed = [first[0]] + [ids[0] for ids in stream]
    whole = generate(small_model, [1, 2, 3], 12, 0.9, top_k=5, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(whole[0], [1, 2, 3] + streamed)
    assert small_model.training is False


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--top-k", "-3"], "--top-k must be at least 1"),
    (["--prompt", "Zebra\u2603"], "--prompt: character"),
])
def test_sample_cli_refuses_bad_settings(trained, capsys, flags, message):
    code, out, err = run_main(["--out-dir", trained] + flags, capsys, sample_module.main)
    assert_one_line_error(code, err, message)
    assert out == ""


def test_sample_cli_prints_what_generate_gives(trained, capsys):
    code, out, _ = run_main(["--out-dir", trained, "--prompt", "ROMEO:", "--max-new-tokens", "30",
                             "--temperature", "0"], capsys, sample_module.main)
    assert code == 0
    model, tokenizer = sample_module.load_model(os.path.join(trained, "best.npz"))
    ids = generate(model, tokenizer.encode("ROMEO:"), 30, temperature=0)
    assert out == tokenizer.decode(ids[0]) + "\n"


def _ctrl_c_as_at_a_terminal():
    """In the child before it starts: Ctrl-C's default action, which Python turns into KeyboardInterrupt. A job
    a shell started in the background (`cmd &`, as CI may run the tests) inherits SIGINT ignored, and Python
    keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_when(command, ready, signum, wait_s=0.0):
    """Run `python -u -m command...`; once its stdout so far makes ready(printed) true (within 60 s), wait
    wait_s, send signum, and return (exit code, everything it printed, its stderr)."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, preexec_fn=_ctrl_c_as_at_a_terminal)
    printed = b""
    try:
        deadline = time.monotonic() + 60
        while not ready(printed):
            assert time.monotonic() < deadline, printed
            if select.select([proc.stdout], [], [], 1)[0]:
                printed += os.read(proc.stdout.fileno(), 4096)
        time.sleep(wait_s)
        proc.send_signal(signum)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, printed + rest, err


def test_ctrl_c_stops_a_long_sample_and_keeps_its_text(trained):
    code, printed, err = signal_when(["npgpt.sample", "--out-dir", trained, "--prompt", "ROMEO:",
                                      "--max-new-tokens", "1000000"],
                                     lambda text: len(text) >= 40, signal.SIGINT)   # it streams as it samples
    assert code == 130
    text = printed.decode("utf-8")
    assert text.startswith("ROMEO:") and len(text) >= 40
    assert b"interrupted after" in err and b"Traceback" not in err


def test_ctrl_c_during_a_long_evaluation_saves_the_step_without_waiting_for_it(corpus, tmp_path):
    out_dir = str(tmp_path / "run")
    code, printed, err = signal_when(["npgpt.train", *tiny(eval_iters=10**8), "--data", corpus, "--out-dir",
                                      out_dir, "--max-iters", "4", "--eval-interval", "2", "--log-interval", "1"],
                                     lambda text: b"step 1/4" in text,     # step 2 is then evaluated, 10^8 batches
                                     signal.SIGINT, wait_s=1.0)            # (communicate's 60 s: far fewer)
    assert code == 130, err
    assert b"interrupted at step 2: checkpoint saved" in err and b"Traceback" not in err
    assert load_checkpoint(os.path.join(out_dir, "ckpt.npz"))[1]["step"] == 2
    assert "val_loss" not in strict_records(out_dir)[-1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_final_sample_keeps_the_run_and_says_so(corpus, tmp_path, signum):
    out_dir = str(tmp_path / "run")
    rule = b"-" * 60
    code, _, err = signal_when(["npgpt.train", *tiny(sample_tokens=1000000), "--data", corpus, "--out-dir",
                                out_dir, "--max-iters", "2", "--eval-interval", "2"],
                               lambda text: rule in text and len(text.split(rule)[-1]) >= 40,   # it streams
                               signum)
    assert code == 128 + signum
    assert b"sample interrupted; the trained run is in" in err and b"Traceback" not in err
    assert load_checkpoint(os.path.join(out_dir, "ckpt.npz"))[1]["step"] == 2
    assert sorted(os.listdir(out_dir)) == ["best.npz", "ckpt.npz", "metrics.jsonl"]      # the lock released


# ---- 10. configurations that cannot work ---------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--beta2", "1.0"], "--beta2 must lie in [0, 1), got 1.0"),
    (["--beta1", "-5"], "--beta1 must lie in [0, 1), got -5.0"),
    (["--warmup-iters", "-1"], "--warmup-iters must not be negative"),
    (["--grad-clip", "-1"], "--grad-clip must not be negative"),
    (["--workers", "-2"], "--workers must not be negative"),
    (["--weight-decay", "-0.1"], "--weight-decay must not be negative, got -0.1"),
    (["--seed", "-1"], "--seed must not be negative"),
    (["--max-seq-len", "1e9"], "needs at least 256.0 GB"),
    (["--d-model", "128", "--num-layers", "4", "--d-ff", "512", "--seq-len", "64", "--max-seq-len", "64",
      "--batch-size", "100000"], "activations for --batch-size 100000 x --seq-len 64"),
    (["--d-model", "1.5"], "invalid integer '1.5'"),
])
def test_impossible_configurations_are_one_line(corpus, tmp_path, capsys, flags, message):
    out_dir = str(tmp_path / "o")
    code, _, err = run_main(TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "2"] + flags, capsys)
    assert_one_line_error(code, err, message)
    assert not os.path.exists(out_dir)                  # nothing was created


def test_a_bogus_npgpt_device_is_one_line(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NPGPT_DEVICE", "bogus")
    args = [a for a in TINY if a not in ("--device", "cpu")]
    code, _, err = run_main(args + ["--data", corpus, "--out-dir", str(tmp_path / "o"), "--max-iters", "2"], capsys)
    assert_one_line_error(code, err, "NPGPT_DEVICE='bogus' is not a device")


def test_the_memory_estimate_counts_the_weights_adam_activations_and_batches():
    config = TrainConfig(d_model=8, num_heads=2, num_layers=1, d_ff=16, max_seq_len=4, seq_len=4, batch_size=2)
    # weights: 10*8 + 4*8 + (2*8 + 4*64 + 2*8 + 16*8 + 16 + 8*16 + 8) + 2*8 = 696; x4 (grads, m, v) x 4 bytes
    # activations: 1 layer x 8 rows x (6*8 + 2*16) + 2 x 8 rows x 10 logits = 800 numbers x 4 bytes
    # the micro-batch: 2 x (4 + 1) token ids x 8 bytes = 80 bytes
    assert memory_problem(config, 10, available=696 * 16 + 800 * 4 + 80) is None
    assert "needs at least 14.4 kB" in memory_problem(config, 10, available=696 * 16 + 800 * 4 + 80 - 1)
    # 10**9 micro-batches of 12 x 65 ids: 6.24 TB of token ids, refused before any is drawn
    many = TrainConfig(d_model=8, num_heads=2, num_layers=1, d_ff=16, max_seq_len=64, seq_len=64, batch_size=12,
                       grad_accum=10**9)
    problem = memory_problem(many, 10, available=10**12)
    assert "6.2 TB for the step's --grad-accum 1000000000 micro-batches" in problem and "--grad-accum" in \
        problem.split("; ")[-1]


# ---- 12. messages ------------------------------------------------------------------------------------------------

def test_a_bad_sample_prompt_is_refused_before_training(corpus, tmp_path, capsys):
    out_dir = str(tmp_path / "o")
    code, out, err = run_main(TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "50",
                                      "--sample-tokens", "10", "--sample-prompt", "Zebra\u2603"], capsys)
    assert_one_line_error(code, err, "--sample-prompt", "'Z' is not in this character vocabulary")
    assert "step " not in out and not os.path.exists(out_dir)


def test_new_characters_in_the_data_of_a_resumed_char_run(corpus, run_dir, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(open(corpus, encoding="utf-8").read() + "Zebra\u2603", encoding="utf-8")
    code, _, err = run_main(resume_args(str(other), run_dir), capsys)
    assert_one_line_error(code, err, f"--data {other}", "character vocabulary is fixed")
    assert "prompt" not in err


def test_streamed_text_waits_for_whole_utf8_characters():
    from npgpt.program.tokenizer import BPETokenizer
    text = "naïve café, 東京 — Ünïcödé! " * 4
    tokenizer = BPETokenizer.train(text, 270)
    ids = tokenizer.encode("東京 naïve — ünï")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in pieces)          # some tokens end inside a character
    stream = sample_module.TextStream(tokenizer)
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == "東京 naïve — ünï" and not any("\ufffd" in c for c in chunks)


def test_an_empty_data_file_is_named_before_anything_else(corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    code, _, err = run_main(TINY + ["--data", str(empty), "--out-dir", str(tmp_path / "o"), "--sample-tokens", "5"],
                            capsys)
    assert_one_line_error(code, err, f"data file {empty} is empty")
    assert "prompt" not in err and "too short" not in err


def test_a_file_given_as_out_dir_or_init_from_is_called_a_file(corpus, run_dir, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x", encoding="utf-8")
    code, _, err = run_main(TINY + ["--data", corpus, "--out-dir", str(a_file), "--max-iters", "2"], capsys)
    assert_one_line_error(code, err, f"--out-dir {a_file} is a file", "takes a directory")
    code, _, err = run_main(["--data", corpus, "--out-dir", str(tmp_path / "o"), "--init-from", str(a_file),
                             "--device", "cpu", "--max-iters", "2"], capsys)
    assert_one_line_error(code, err, f"{a_file}: is a file, not a directory")
    assert a_file.read_text(encoding="utf-8") == "x"


def test_resume_with_a_seq_len_above_the_checkpoints_max_names_the_limit(corpus, run_dir, capsys):
    before = fingerprints(run_dir)
    code, _, err = run_main(["--data", corpus, "--out-dir", run_dir, "--resume", "--max-iters", "8", "--device",
                             "cpu", "--seq-len", "17"], capsys)       # the run's --max-seq-len is 16
    assert_one_line_error(code, err, "--seq-len 17 is above --max-seq-len 16", "at most 16")
    assert "raise --max-seq-len" not in err
    assert fingerprints(run_dir) == before


def test_a_log_without_a_checkpoint_is_told_to_start_over_everywhere(corpus, tmp_path, capsys):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n', encoding="utf-8")
    code, _, err = run_main(TINY + ["--data", corpus, "--out-dir", str(out_dir), "--max-iters", "2"], capsys)
    assert_one_line_error(code, err, "saved no checkpoint", "start over with --overwrite")
    assert "--resume" not in err
    code, _, err = run_main(["--out-dir", str(out_dir)], capsys, main=sample_module.main)
    assert_one_line_error(code, err, "holds only the log of a run that saved none", "--overwrite")
    code, _, _ = run_main(TINY + ["--data", corpus, "--out-dir", str(out_dir), "--max-iters", "2",
                                  "--eval-interval", "2", "--overwrite"], capsys)        # the advice works
    assert code == 0


def test_a_corrupt_best_npz_that_is_the_last_checkpoint_is_not_advised_in_circles(corpus, run_dir, capsys):
    os.remove(os.path.join(run_dir, "ckpt.npz"))
    with open(os.path.join(run_dir, "best.npz"), "r+b") as f:
        f.truncate(1000)
    code, _, err = run_main(resume_args(corpus, run_dir), capsys)
    assert_one_line_error(code, err, "best.npz is corrupt or truncated", "start over with --overwrite")
    assert "continues from best.npz" not in err


def test_a_file_that_is_not_a_checkpoint_is_not_to_be_deleted(run_dir, capsys):
    code, _, err = run_main(["--out-dir", run_dir, "--checkpoint", "metrics.jsonl"], capsys, main=sample_module.main)
    assert_one_line_error(code, err, "metrics.jsonl is not a checkpoint", "give ckpt.npz or best.npz")
    assert "delete" not in err


def test_a_corpus_too_short_at_seq_len_1_is_not_told_to_shorten_it(tmp_path, capsys):
    ten = tmp_path / "ten.txt"
    ten.write_text("abcdefghij", encoding="utf-8")
    code, _, err = run_main(tiny(seq_len=1) + ["--data", str(ten), "--out-dir", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "corpus too short", "use a longer text")
    assert "smaller --seq-len" not in err


def test_a_directory_where_the_lock_file_goes_is_named(corpus, tmp_path, capsys):
    out_dir = tmp_path / "run"
    (out_dir / "lock").mkdir(parents=True)
    code, _, err = run_main(TINY + ["--data", corpus, "--out-dir", str(out_dir), "--max-iters", "2"], capsys)
    assert_one_line_error(code, err, f"{out_dir / 'lock'}", "move it away")

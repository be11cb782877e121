"""Training and sampling end to end on small configurations: accumulation, resume, checkpoints, bad input."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from npgpt import backend
from npgpt.program import train as train_module
from npgpt.program.checkpoint import load_checkpoint
from npgpt.generate import filter_logits, generate
from npgpt.model import GPT
from npgpt.fast.cpu.threads import set_workers
from npgpt.program.train import make_optimizer, train_step
from npgpt.program.config import TrainConfig

TINY = ["--tokenizer", "char", "--d-model", "16", "--num-heads", "2", "--num-layers", "1", "--d-ff", "32",
        "--max-seq-len", "16", "--seq-len", "16", "--batch-size", "4", "--device", "cpu", "--sample-tokens", "0"]


def run_main(args, capsys):
    code = train_module.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_a_short_run_learns_logs_and_saves(corpus, tmp_path, capsys):
    out_dir = str(tmp_path / "run")
    code, out, _ = run_main(TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "60", "--lr", "1e-2",
                                    "--eval-interval", "30", "--log-interval", "10", "--sample-tokens", "30"], capsys)
    assert code == 0
    lines = [l for l in out.splitlines() if l.startswith("step ")]
    assert len(lines) == 6
    assert "step 30/60 | loss " in lines[2] and "| val " in lines[2] and "ms/step" in lines[2] and "ETA" in lines[2]
    records = read_metrics(out_dir)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5        # it learns
    assert {"loss", "lr", "ms_per_step", "tokens_per_s", "eta_s"} <= set(records[0])
    assert os.path.exists(os.path.join(out_dir, "ckpt.npz")) and os.path.exists(os.path.join(out_dir, "best.npz"))
    _, meta = load_checkpoint(os.path.join(out_dir, "ckpt.npz"))
    assert meta["step"] == 60 and meta["tokenizer"]["kind"] == "char"
    assert out.rstrip().endswith("-" * 60)                       # the sample closes the output


def test_gradient_accumulation_equals_a_larger_batch():
    config = TrainConfig(dropout=0.0, weight_decay=0.1, grad_clip=1.0)
    rng = np.random.default_rng(0)
    big_inputs = rng.integers(0, 20, (6, 10))
    big_targets = rng.integers(0, 20, (6, 10))
    results = []
    for micro in ([(big_inputs, big_targets)],
                  [(big_inputs[i:i + 2], big_targets[i:i + 2]) for i in range(0, 6, 2)]):
        backend.manual_seed(0)
        model = GPT(20, d_model=16, num_heads=2, num_layers=2, d_ff=24, max_seq_len=10, dropout=0.0).to(np.float64)
        opt = make_optimizer(model, config)
        loss = train_step(model, opt, micro, config.grad_clip)
        results.append((float(loss), [backend.to_numpy(p.data).copy() for p in model.parameters()]))
    (loss_big, params_big), (loss_acc, params_acc) = results
    assert loss_acc == pytest.approx(loss_big, rel=1e-12)
    for a, b in zip(params_big, params_acc):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_resume_is_bit_identical(corpus, tmp_path, capsys):
    common = TINY + ["--data", corpus, "--dropout", "0.1", "--eval-interval", "4", "--log-interval", "1",
                     "--eval-iters", "2"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert run_main(common + ["--out-dir", straight, "--max-iters", "12"], capsys)[0] == 0
    assert run_main(common + ["--out-dir", split, "--max-iters", "4"], capsys)[0] == 0
    code, out, _ = run_main(common + ["--out-dir", split, "--max-iters", "12", "--resume"], capsys)
    assert code == 0 and "resuming from step 4" in out
    a, b = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    final_a, _ = load_checkpoint(os.path.join(straight, "ckpt.npz"))
    final_b, _ = load_checkpoint(os.path.join(split, "ckpt.npz"))
    for name in final_a:
        np.testing.assert_array_equal(final_a[name], final_b[name], err_msg=name)


def test_interrupted_save_leaves_the_good_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    out_dir = str(tmp_path / "run")
    assert run_main(TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "4", "--eval-interval", "4"],
                    capsys)[0] == 0
    path = os.path.join(out_dir, "ckpt.npz")
    before = open(path, "rb").read()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt   # the process dies while writing the new checkpoint

    monkeypatch.setattr(np, "savez", crash)
    code = train_module.main(TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "8",
                                     "--eval-interval", "4", "--resume"])
    assert code == 130
    assert open(path, "rb").read() == before
    assert load_checkpoint(path)[1]["step"] == 4


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    out_dir = str(tmp_path / "run")
    real_step = train_module.train_step
    calls = []

    def exploding_step(*args):
        calls.append(1)
        loss = real_step(*args)
        return loss * np.nan if len(calls) > 5 else loss

    monkeypatch.setattr(train_module, "train_step", exploding_step)
    code, _, err = run_main(TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "20",
                                    "--eval-interval", "4", "--log-interval", "2"], capsys)
    assert code == 2
    assert "loss became nan at step 6" in err and "Traceback" not in err
    assert load_checkpoint(os.path.join(out_dir, "ckpt.npz"))[1]["step"] == 4


BAD_INPUT = [
    (["--data", "/nonexistent/file.txt"], "does not exist"),
    (["--d-model", "10", "--num-heads", "3"], "not divisible by --num-heads"),
    (["--seq-len", "32"], "above --max-seq-len"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUT)
def test_bad_input_gives_one_line_and_exit_2(corpus, tmp_path, capsys, extra, message):
    args = TINY + ["--data", corpus, "--out-dir", str(tmp_path / "o")] + extra
    code, _, err = run_main(args, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_bad_files_and_checkpoints(corpus, tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 " * 100)
    code, _, err = run_main(TINY + ["--data", str(latin), "--out-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "not UTF-8" in err
    short = tmp_path / "short.txt"
    short.write_text("tiny text", encoding="utf-8")
    code, _, err = run_main(TINY + ["--data", str(short), "--out-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "corpus too short" in err

    out_dir = tmp_path / "run"
    assert run_main(TINY + ["--data", corpus, "--out-dir", str(out_dir), "--max-iters", "2",
                            "--eval-interval", "2"], capsys)[0] == 0
    code, _, err = run_main(TINY + ["--data", corpus, "--out-dir", str(out_dir), "--d-model", "32",
                                    "--resume"], capsys)
    assert code == 2 and "trained with --d-model 16, not 32" in err
    good = (out_dir / "ckpt.npz").read_bytes()
    (out_dir / "ckpt.npz").write_bytes(good[: len(good) // 2])          # truncated
    code, _, err = run_main(TINY + ["--data", corpus, "--out-dir", str(out_dir), "--resume"], capsys)
    assert code == 2 and "corrupt or truncated" in err
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 64] = b"\x00" * 64
    (out_dir / "ckpt.npz").write_bytes(bytes(corrupt))
    code, _, err = run_main(TINY + ["--data", corpus, "--out-dir", str(out_dir), "--resume"], capsys)
    assert code == 2 and "corrupt or truncated" in err
    code, _, err = run_main(TINY + ["--data", corpus, "--out-dir", str(tmp_path / "empty"), "--resume"], capsys)
    assert code == 2 and "no checkpoint" in err


def test_gpu_without_cupy_is_a_clear_error(corpus, tmp_path, capsys):
    try:
        backend.module_for("gpu")
        pytest.skip("a GPU is available here")
    except backend.DeviceError:
        pass
    code, _, err = run_main(TINY + ["--data", corpus, "--out-dir", str(tmp_path / "o"), "--device", "gpu"], capsys)
    assert code == 2 and "CuPy" in err and len(err.strip().splitlines()) == 1
    # the environment variable asks for the GPU just as clearly
    args = [a for a in TINY if a not in ("--device", "cpu")]
    proc = subprocess.run([sys.executable, "-m", "npgpt.train"] + args + ["--data", corpus, "--out-dir",
                                                                        str(tmp_path / "o")],
                          env=dict(os.environ, NPGPT_DEVICE="gpu"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "CuPy" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_saves_and_exits_cleanly(corpus, tmp_path):
    out_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-u", "-m", "npgpt.train"] + TINY + ["--data", corpus, "--out-dir", out_dir,
                                                                "--max-iters", "100000", "--log-interval", "5",
                                                                "--eval-interval", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        while not first.startswith("step "):
            first = proc.stdout.readline()
            assert first, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "checkpoint saved" in err and "Traceback" not in err
    _, meta = load_checkpoint(os.path.join(out_dir, "ckpt.npz"))
    assert meta["step"] >= 5


# ---- sampling ----------------------------------------------------------------------------------------------

def test_kv_cache_equals_full_recomputation():
    backend.manual_seed(0)
    model = GPT(30, d_model=16, num_heads=2, num_layers=2, d_ff=32, max_seq_len=12, dropout=0.1).to(np.float64)
    model.eval()
    ids = np.random.default_rng(0).integers(0, 30, (2, 9))
    cache = model.new_kv_cache(2)
    cached = [model(ids[:, :4], kv_cache=cache).numpy()]
    for t in range(4, 9):
        cached.append(model(ids[:, t:t + 1], kv_cache=cache).numpy())
    full = model(ids).numpy()
    np.testing.assert_allclose(np.concatenate(cached, axis=1), full, rtol=1e-12, atol=1e-14)
    # whole generations, sliding past max_seq_len, greedy and sampled, agree token for token
    for temperature in (0.0, 0.9):
        a = generate(model, ids[0, :3], 20, temperature, top_k=10, rng=np.random.default_rng(1))
        b = generate(model, ids[0, :3], 20, temperature, top_k=10, rng=np.random.default_rng(1), use_cache=False)
        np.testing.assert_array_equal(a, b)
        assert a.shape == (1, 23)


def test_top_k_and_top_p_filters():
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.1]]))
    np.testing.assert_allclose(filter_logits(logits, top_k=2), [[2 / 3, 1 / 3, 0, 0]])
    np.testing.assert_allclose(filter_logits(logits, top_p=0.7), [[2 / 3, 1 / 3, 0, 0]])
    np.testing.assert_allclose(filter_logits(logits, top_p=0.75), [[2 / 3, 1 / 3, 0, 0]])
    np.testing.assert_allclose(filter_logits(logits, top_p=0.76), [[0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]])
    np.testing.assert_allclose(filter_logits(logits, temperature=1.0), [[0.5, 0.25, 0.15, 0.1]])
    sharp = filter_logits(logits, temperature=0.5)
    assert sharp[0, 0] > 0.5


def test_sample_cli(corpus, tmp_path, capsys):
    out_dir = str(tmp_path / "run")
    assert run_main(TINY + ["--data", corpus, "--out-dir", out_dir, "--max-iters", "4", "--eval-interval", "4"],
                    capsys)[0] == 0
    from npgpt import sample
    args = ["--out-dir", out_dir, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1"]
    assert sample.main(args + ["--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("ROMEO:") and sample.main(args + ["--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy
    assert sample.main(args + ["--top-k", "5", "--top-p", "0.9", "--no-cache"]) == 0
    assert sample.main(["--out-dir", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_presets_and_flags():
    from npgpt.program.config import config_from_args
    config, given = config_from_args(["--preset", "gpt2-small", "--lr", "3e-4"])
    assert (config.d_model, config.num_heads, config.num_layers, config.max_seq_len) == (768, 12, 12, 1024)
    assert config.lr == 3e-4 and given == {"preset", "lr"}          # a flag beats the preset
    config, _ = config_from_args(["--preset", "shakespeare-char"])
    assert (config.tokenizer, config.d_model, config.seq_len, config.batch_size, config.max_iters) == \
        ("char", 128, 64, 12, 2000)
    config, _ = config_from_args([])
    assert (config.d_model, config.num_heads, config.num_layers, config.d_ff, config.vocab_size) == \
        (256, 4, 4, 1024, 10000)                                     # the tutorial's GPT by default


def test_data_parallel_step_equals_the_single_thread_step():
    """Shards on threads, gradients added in shard order: the same update as one thread, in float64."""
    rng = np.random.default_rng(5)
    inputs, targets = rng.integers(0, 20, (5, 9)), rng.integers(0, 20, (5, 9))   # 5 rows: uneven shards
    results = []
    for workers in (1, 2, 3):
        backend.manual_seed(0)
        model = GPT(20, d_model=16, num_heads=2, num_layers=2, d_ff=24, max_seq_len=9, dropout=0.0).to(np.float64)
        opt = make_optimizer(model, TrainConfig())
        previous = set_workers(workers)             # the threaded AdamW update shares the same count
        try:
            loss = train_step(model, opt, [(inputs, targets)], 1.0, workers)
        finally:
            set_workers(previous)
        results.append((float(loss), [backend.to_numpy(p.data).copy() for p in model.parameters()]))
    for loss, params in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-12)
        for a, b in zip(params, results[0][1]):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_graph_step_checks_each_batch_on_the_host():
    """The recorded GPU step reads ids from its own buffers, unchecked: GraphStep checks them first."""
    from npgpt.fast.cuda.graph import GraphStep
    step = GraphStep(lambda batches: pytest.fail("a bad batch must not reach the step"), None, vocab_size=10)
    good = np.array([[1, 2, 3]])
    with pytest.raises(IndexError, match=r"must lie in \[0, 10\), found 1\.\.12"):
        step([(np.array([[1, 12, 3]]), good)])
    with pytest.raises(IndexError, match=r"found -1\.\.3"):
        step([(good, np.array([[-1, 2, 3]]))])
    with pytest.raises(TypeError, match="integer token ids"):
        step([(good.astype(np.float32), good)])

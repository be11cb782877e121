"""A checkpoint records the worker-thread count it trained with; resuming with another count says so."""

import numpy as np

from npgpt.program import train as train_module
from npgpt.program.checkpoint import load_checkpoint

TINY = ["--tokenizer", "char", "--d-model", "16", "--num-heads", "2", "--num-layers", "1", "--d-ff", "32",
        "--max-seq-len", "16", "--seq-len", "16", "--batch-size", "4", "--device", "cpu", "--sample-tokens", "0",
        "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1"]


def test_resuming_with_another_worker_count_says_so(tmp_path, capsys, corpus, fast_paths_on):
    out = str(tmp_path / "out")
    base = TINY + ["--data", corpus, "--out-dir", out]
    assert train_module.main(base + ["--max-iters", "2", "--workers", "2"]) == 0
    _, meta = load_checkpoint(f"{out}/ckpt.npz")
    assert meta["workers"] == 2
    capsys.readouterr()
    assert train_module.main(base + ["--max-iters", "4", "--workers", "1", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "trained with 2 worker thread(s), this run uses 1" in printed and "--workers 2" in printed
    assert train_module.main(base + ["--max-iters", "6", "--workers", "1", "--resume"]) == 0
    assert "worker thread(s)" not in capsys.readouterr().out          # the same count: nothing to say
    assert np.isfinite(load_checkpoint(f"{out}/ckpt.npz")[1]["best_val"])


def test_more_workers_than_cores_says_so_and_trains(tmp_path, capsys, corpus, fast_paths_on):
    from npgpt.fast.cpu.threads import usable_cores
    many = str(usable_cores() + 3)
    args = TINY + ["--data", corpus, "--out-dir", str(tmp_path / "out"), "--max-iters", "2", "--workers", many]
    assert train_module.main(args) == 0
    assert f"--workers {many} is more than the {usable_cores()} cores" in capsys.readouterr().out

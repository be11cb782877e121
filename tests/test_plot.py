"""python -m npgpt.plot on a tiny run made here: the pictures are valid files, and what goes into them equals
metrics.jsonl, the checkpoint's weights (attention) and the .grad arrays of the logged steps (gradient flow)."""

import json
import math
import os
import shutil
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import npgpt
from npgpt import backend
from npgpt.program import train as train_module
from npgpt.program.config import config_from_args
from optional import need

matplotlib = need("matplotlib", "plot")
from npgpt.program import plot  # noqa: E402  (after the check, so a missing matplotlib reads as a skip)

TINY = ["--tokenizer", "char", "--d-model", "16", "--num-heads", "2", "--num-layers", "2", "--d-ff", "32",
        "--max-seq-len", "16", "--seq-len", "16", "--batch-size", "4", "--device", "cpu", "--sample-tokens", "0",
        "--workers", "1"]
LOGGED_STEPS = [5, 10, 15, 20]
GRAD_CLIP = 0.05                     # small, so clipping acts on every step: recorded norms must be pre-clip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def expected_group(name):
    """The layer a parameter belongs to, written out independently of grad_stats.parameter_group."""
    if name in ("token_embedding.weight", "position_embedding.weight"):
        return "embeddings"
    if name.startswith("blocks.0."):
        return "blocks.0"
    if name.startswith("blocks.1."):
        return "blocks.1"
    assert name.startswith("ln_f."), name
    return "ln_f"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 20-step run; every .grad array (at clipping time) and every weight before each step captured."""
    root = tmp_path_factory.mktemp("plot")
    corpus = root / "corpus.txt"
    corpus.write_text(open(npgpt.program.data.bundled_corpus_path(), encoding="utf-8").read()[:20000],
                      encoding="utf-8")
    out_dir = str(root / "tiny")
    config, given = config_from_args(TINY + ["--data", str(corpus), "--out-dir", out_dir, "--max-iters", "20",
                                             "--log-interval", "5", "--eval-interval", "10", "--lr", "1e-2",
                                             "--grad-clip", str(GRAD_CLIP)])
    run = train_module.Run(config, given)
    captured = []                    # per step: ({id: grad copy}, {id: weight copy}) as clipping sees them
    original_clip = train_module.clip_grad_norm_

    def capturing_clip(params, max_norm):
        captured.append(({id(p): backend.to_numpy(p.grad).copy() for p in params},
                         {id(p): backend.to_numpy(p.data).copy() for p in params}))
        return original_clip(params, max_norm)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "clip_grad_norm_", capturing_clip)
        train_module.train(run, log=lambda line: None)
    names = {id(p): name for name, p in run.model.named_parameters()}
    final = {id(p): backend.to_numpy(p.data).copy() for p in run.model.parameters()}
    return {"out_dir": out_dir, "root": root, "corpus": str(corpus), "captured": captured, "names": names,
            "final": final}


def read_jsonl(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def norm(arrays):
    return math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays))


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------------
# Gradient flow: what training records

def test_recorded_gradient_norms_are_the_grad_arrays_before_clipping(tiny_run):
    records = {r["step"]: r for r in read_jsonl(tiny_run["out_dir"])}
    assert sorted(records) == LOGGED_STEPS
    captured, names = tiny_run["captured"], tiny_run["names"]
    assert len(captured) == 20
    for step in LOGGED_STEPS:
        grads, before = captured[step - 1]
        after = captured[step][1] if step < 20 else tiny_run["final"]
        groups = {}
        for pid, name in names.items():
            groups.setdefault(expected_group(name), []).append(pid)
        record = records[step]
        assert list(record["grad_norm"]) == ["embeddings", "blocks.0", "blocks.1", "ln_f"]
        for group, pids in groups.items():
            expected_norm = norm([grads[p] for p in pids])
            assert record["grad_norm"][group] == pytest.approx(expected_norm, rel=1e-5), (step, group)
            expected_ratio = norm([after[p] - before[p] for p in pids]) / norm([before[p] for p in pids])
            assert record["update_ratio"][group] == pytest.approx(expected_ratio, rel=1e-4), (step, group)
        total = math.sqrt(sum(v ** 2 for v in record["grad_norm"].values()))
        assert total > 2 * GRAD_CLIP            # clipping scaled these gradients: the record is from before it


def test_grads_picture_draws_the_recorded_norms(tiny_run, capsys):
    records = read_jsonl(tiny_run["out_dir"])
    fig = plot.grads_figure(plot.grad_series(plot.read_metrics(tiny_run["out_dir"])), "tiny", GRAD_CLIP)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    for group in ("embeddings", "blocks.0", "blocks.1", "ln_f"):
        np.testing.assert_array_equal(lines[group].get_xdata(), LOGGED_STEPS)
        np.testing.assert_array_equal(lines[group].get_ydata(), [r["grad_norm"][group] for r in records])
    ratio_lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    np.testing.assert_array_equal(ratio_lines["blocks.1"].get_ydata(),
                                  [r["update_ratio"]["blocks.1"] for r in records])
    assert plot.main(["--out-dir", tiny_run["out_dir"], "--grads"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {os.path.join(tiny_run['out_dir'], 'grads.png')}"
    assert_png(os.path.join(tiny_run["out_dir"], "grads.png"))


# ---------------------------------------------------------------------------------------------------------
# Loss curves

def test_loss_picture_plots_the_logged_values(tiny_run, tmp_path):
    records = read_jsonl(tiny_run["out_dir"])
    fig = plot.loss_figure([("tiny", plot.read_metrics(tiny_run["out_dir"]), plot.read_meta(tiny_run["out_dir"]))])
    ax_step, ax_time, ax_lr, ax_speed = fig.axes
    step_lines = {line.get_label(): line for line in ax_step.get_lines()}
    np.testing.assert_array_equal(step_lines["train loss"].get_xdata(), LOGGED_STEPS)
    np.testing.assert_array_equal(step_lines["train loss"].get_ydata(), [r["loss"] for r in records])
    np.testing.assert_array_equal(step_lines["validation loss"].get_xdata(), [10, 20])
    np.testing.assert_array_equal(step_lines["validation loss"].get_ydata(),
                                  [r["val_loss"] for r in records if r["step"] in (10, 20)])
    # time: the steps' wall-clock time, ms_per_step times the 5 steps of each log window, summed
    seconds = np.cumsum([r["ms_per_step"] * 5 / 1000 for r in records])
    time_line = {line.get_label(): line for line in ax_time.get_lines()}["train loss"]
    np.testing.assert_allclose(time_line.get_xdata(), seconds, rtol=1e-12)
    np.testing.assert_array_equal(time_line.get_ydata(), [r["loss"] for r in records])
    lr_lines = {line.get_label(): line for line in ax_lr.get_lines()}
    np.testing.assert_array_equal(lr_lines["learning rate (logged)"].get_ydata(), [r["lr"] for r in records])
    schedule = lr_lines["schedule to max_iters"].get_ydata()
    # warmup (30 steps) is longer than this run: the rate climbs linearly, 1e-2 * s / 30 at step s
    np.testing.assert_allclose(schedule, 1e-2 * np.arange(1, 21) / 30, rtol=1e-12)
    np.testing.assert_allclose(schedule[np.array(LOGGED_STEPS) - 1], [r["lr"] for r in records], rtol=1e-12)
    uniform = {line.get_label(): line for line in ax_step.get_lines()}
    assert any(label.startswith("uniform guess: ln ") for label in uniform)

    for fmt in ("png", "svg"):
        assert plot.main(["--out-dir", tiny_run["out_dir"], "--format", fmt, "--plot-dir", str(tmp_path)]) == 0
    assert_png(tmp_path / "loss.png")
    assert ET.parse(tmp_path / "loss.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_a_run_in_progress_half_written_line_and_resumed_steps(tiny_run, tmp_path, capsys):
    out_dir = tmp_path / "running"
    out_dir.mkdir()
    records = read_jsonl(tiny_run["out_dir"])
    lines = [json.dumps(r) for r in records[:3]]
    # a crash after step 15, a resume from the step-10 checkpoint that logged step 15 again, then a line
    # that is still being written
    again = dict(records[2], loss=1.25)
    (out_dir / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(again)]) + '\n{"step": 20, "lo',
                                           encoding="utf-8")
    read = plot.read_metrics(str(out_dir))
    assert [r["step"] for r in read] == [5, 10, 15]
    assert [r["loss"] for r in read] == [records[0]["loss"], records[1]["loss"], 1.25]
    assert plot.read_meta(str(out_dir)) is None           # no checkpoint yet: drawn without the config
    assert plot.main(["--out-dir", str(out_dir)]) == 0
    assert_png(out_dir / "loss.png")


def test_lines_edited_into_something_unplottable_are_skipped(tiny_run, tmp_path):
    out_dir = tmp_path / "edited"
    out_dir.mkdir()
    records = read_jsonl(tiny_run["out_dir"])
    edited = ['{"step": "x", "loss": 1}', '{"step": 1, "loss": "abc"}', '{"step": 2, "loss": 1, "val_loss": "z"}',
              '{"step": true, "loss": 1}', '[1, 2]']
    (out_dir / "metrics.jsonl").write_text("\n".join(edited + [json.dumps(r) for r in records[:2]]) + "\n",
                                           encoding="utf-8")
    assert [r["step"] for r in plot.read_metrics(str(out_dir))] == [5, 10]
    assert plot.main(["--out-dir", str(out_dir)]) == 0
    assert_png(out_dir / "loss.png")


def test_a_run_directory_whose_name_is_not_utf8_is_drawn(tiny_run, tmp_path):
    out_dir = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff\xfe")      # a name in another encoding
    shutil.copytree(tiny_run["out_dir"], out_dir)
    assert plot.main(["--out-dir", out_dir, "--loss", "--attention"]) == 0
    assert_png(os.path.join(out_dir, "loss.png"))
    assert_png(os.path.join(out_dir, "attention.png"))


def test_compare_overlays_runs_with_their_config_differences(tiny_run, tmp_path):
    other = str(tmp_path / "other")
    config, given = config_from_args(TINY + ["--data", tiny_run["corpus"], "--out-dir", other, "--max-iters", "10",
                                             "--log-interval", "5", "--eval-interval", "10", "--lr", "3e-3"])
    train_module.train(train_module.Run(config, given), log=lambda line: None)
    dirs = [tiny_run["out_dir"], other]
    metas = [plot.read_meta(d) for d in dirs]
    labels = plot.run_labels(dirs, metas)
    assert labels[0].startswith("tiny (") and labels[1].startswith("other (")
    assert "lr=0.01" in labels[0] and "lr=0.003" in labels[1] and "max_iters=20" in labels[0]
    assert "grad_clip=0.05" in labels[0] and "out_dir" not in labels[0]
    assert plot.config_differences([{"lr": 1.0, "seed": 1}, None, {"lr": 2.0, "seed": 1, "new_field": 3}]) == \
        ["lr=1.0", "config not saved yet", "lr=2.0"]
    fig = plot.loss_figure(list(zip(labels, [plot.read_metrics(d) for d in dirs], metas)))
    train_lines = [line for line in fig.axes[0].get_lines() if line.get_label().endswith("train loss")]
    assert [line.get_label() for line in train_lines] == [f"{labels[0]}: train loss", f"{labels[1]}: train loss"]
    np.testing.assert_array_equal(train_lines[1].get_ydata(), [r["loss"] for r in read_jsonl(other)])
    assert train_lines[0].get_color() != train_lines[1].get_color()
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend[:2] == labels and "validation loss" in legend
    assert plot.main(["--out-dir", dirs[0], "--compare", other, "--plot-dir", str(tmp_path)]) == 0
    assert_png(tmp_path / "loss.png")


# ---------------------------------------------------------------------------------------------------------
# Attention maps

def test_attention_weights_are_the_models_own_and_numpy_agrees(tiny_run):
    model, tokenizer, meta = plot.load_model(tiny_run["out_dir"])
    ids = tokenizer.encode("ROMEO:\nBut")
    T = len(ids)
    weights = plot.attention_weights(model, ids)
    assert len(weights) == 2 and all(w.shape == (2, T, T) for w in weights)
    for w in weights:
        np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=0, atol=1e-6)
        assert np.all(w[:, np.triu_indices(T, k=1)[0], np.triu_indices(T, k=1)[1]] == 0.0)
        assert np.all(w[:, np.tril_indices(T)[0], np.tril_indices(T)[1]] > 0.0)

    # layer 0 from the checkpoint's arrays with NumPy alone
    with np.load(os.path.join(tiny_run["out_dir"], "best.npz")) as archive:
        a = {k[len("param."):]: archive[k].astype(np.float64) for k in archive.files if k.startswith("param.")}
    x = a["token_embedding.weight"][ids] + a["position_embedding.weight"][:T]            # (T, C)
    h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    h = h * a["blocks.0.attn_norm.weight"] + a["blocks.0.attn_norm.bias"]
    q = (h @ a["blocks.0.attention.W_q.weight"].T).reshape(T, 2, 8).transpose(1, 0, 2)   # (H, T, D)
    k = (h @ a["blocks.0.attention.W_k.weight"].T).reshape(T, 2, 8).transpose(1, 0, 2)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(8)
    scores[:, np.triu(np.ones((T, T), dtype=bool), k=1)] = -np.inf
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights[0], expected, rtol=1e-4, atol=1e-6)

    # every layer: these weights times V, through W_o, give what MultiHeadAttention returns
    x = model.token_embedding(ids.reshape(1, T)) + model.position_embedding.weight[:T]
    for block, w in zip(model.blocks, weights):
        attn = block.attention
        h = block.attn_norm(x)
        v = backend.to_numpy(attn.W_v(h).data).reshape(T, 2, 8).transpose(1, 0, 2)      # (H, T, D)
        context = (w @ v).transpose(1, 0, 2).reshape(1, T, 16)                           # heads side by side
        ours = backend.to_numpy(attn.W_o(context).data)
        theirs = backend.to_numpy(attn(h, None, True).data)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        x = block(x, None, True)


def test_attention_picture_shows_every_layer_and_head_with_tokens(tiny_run, tmp_path, capsys):
    model, tokenizer, meta = plot.load_model(tiny_run["out_dir"])
    ids = tokenizer.encode("ROMEO:\nO ")
    labels = plot.token_labels(tokenizer, ids)
    assert labels == ["R", "O", "M", "E", "O", ":", "\\n", "O", "\u2423"]
    weights = plot.attention_weights(model, ids)
    fig = plot.attention_figure(weights, labels)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 4                                  # 2 layers x 2 heads
    for n, ax in enumerate(panels):
        shown = ax.get_images()[0].get_array()
        layer, head = divmod(n, 2)
        assert ax.get_title() == f"layer {layer}, head {head}"
        blocked = np.triu(np.ones((9, 9), dtype=bool), k=1)
        np.testing.assert_array_equal(np.ma.getmaskarray(shown), blocked)      # the causal triangle, grey
        np.testing.assert_array_equal(shown.data[~blocked], weights[layer][head][~blocked])
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
        assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert plot.main(["--out-dir", tiny_run["out_dir"], "--attention", "--prompt", "ROMEO:",
                      "--plot-dir", str(tmp_path), "--format", "svg"]) == 0
    assert ET.parse(tmp_path / "attention.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert plot.main(["--out-dir", tiny_run["out_dir"], "--attention", "--plot-dir", str(tmp_path)]) == 0
    assert_png(tmp_path / "attention.png")
    assert not os.path.exists(tmp_path / "loss.png")         # --attention alone draws only attention


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2

def test_missing_empty_and_unusable_runs_are_one_line_errors(tiny_run, tmp_path, capsys):
    assert plot.main(["--out-dir", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl in" in one_line_error(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("", encoding="utf-8")
    assert plot.main(["--out-dir", str(empty)]) == 2
    assert "holds no records yet" in one_line_error(capsys)
    assert plot.main(["--out-dir", str(empty), "--attention"]) == 2
    assert "no checkpoint at" in one_line_error(capsys)
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 4.0}) + "\n", encoding="utf-8")
    assert plot.main(["--out-dir", str(empty), "--grads"]) == 2
    assert "no gradient statistics" in one_line_error(capsys)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run["out_dir"], copy)
    assert plot.main(["--out-dir", str(copy), "--attention", "--prompt", "ROMEO: \u00e9"]) == 2
    assert "not in this character vocabulary" in one_line_error(capsys)
    assert plot.main(["--out-dir", str(copy), "--attention", "--prompt", "ROMEO, ROMEO, wherefore"]) == 2
    assert "max_seq_len 16" in one_line_error(capsys)


def test_without_matplotlib_the_error_names_the_extra(tiny_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # `import matplotlib` now raises ImportError
    assert plot.main(["--out-dir", tiny_run["out_dir"]]) == 2
    assert "pip install 'npgpt[plot]'" in one_line_error(capsys)


def test_training_prints_the_command_that_draws_the_plots(tiny_run, tmp_path, capsys):
    out_dir = str(tmp_path / "printed")
    code = train_module.main(TINY + ["--data", tiny_run["corpus"], "--out-dir", out_dir, "--max-iters", "2",
                                     "--log-interval", "1", "--eval-interval", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"plots: python -m npgpt.plot --out-dir {out_dir} --loss --grads --attention\n" in printed

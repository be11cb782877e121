"""The commands' front doors met by a careless user: python -m npgpt.plot, export, viz, proof, sample and model.

A bad flag or path is one line on stderr naming the problem and the fix, exit code 2, and nothing written; a
reader that closes stdout (`| head -1`) ends the command quietly with exit code 0, its work kept. Each command
runs as a user runs it, in its own process (docs/hostile-inputs.md)."""

import os
import subprocess
import sys

import pytest

from optional import need
from test_hostile import ROOT, assert_one_line_error, run_main, trained  # noqa: F401  (trained: a fixture)

ENV = dict(os.environ, PYTHONPATH=ROOT)


def run_command(module, *args):
    """(exit code, stdout, stderr) of python -m module args, run from the repository's root."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def assert_refused(module, args, *needles):
    code, out, err = run_command(module, *args)
    assert_one_line_error(code, err, *needles)
    return out


# ---- flags argparse refuses: one line, not the usage block ------------------------------------------------

@pytest.mark.parametrize("module,args,message", [
    ("npgpt.plot", ["--dpi", "abc"], "argument --dpi: invalid integer 'abc'"),
    ("npgpt.plot", ["--format", "jpg"], "argument --format: invalid choice: 'jpg'"),
    ("npgpt.export", [], "the following arguments are required: --to"),
    ("npgpt.export", ["--to", "nowhere", "--bogus"], "unrecognized arguments: --bogus"),
    ("npgpt.viz", ["--example", "bogus"], "argument --example: invalid choice: 'bogus'"),
    ("npgpt.proof", ["--bogus"], "unrecognized arguments: --bogus"),
    ("npgpt.model", ["--bogus"], "unrecognized arguments: --bogus"),
])
def test_a_bad_flag_is_one_line_and_runs_nothing(module, args, message):
    out = assert_refused(module, args, message, "--help")
    assert out == ""


@pytest.mark.parametrize("module,says,would_print", [
    ("npgpt.proof", "central finite differences", "| op |"),
    ("npgpt.model", "parameter count", "Total"),
])
def test_help_describes_the_tool_and_runs_nothing(module, says, would_print):
    code, out, err = run_command(module, "--help")
    assert code == 0, err
    assert out.startswith("usage: ") and says in " ".join(out.split())
    assert would_print not in out


# ---- plot's numbers and directories ---------------------------------------------------------------------

@pytest.mark.parametrize("dpi", ["100000", "5"])
def test_plot_refuses_a_dpi_out_of_range_before_drawing(trained, tmp_path, dpi):
    assert_refused("npgpt.plot", ["--out-dir", trained, "--plot-dir", str(tmp_path), "--dpi", dpi],
                   "--dpi must lie in [10, 1000]", f"got {dpi}")
    assert os.listdir(tmp_path) == []


def test_running_out_of_memory_while_drawing_is_one_line_and_keeps_the_old_picture(trained, tmp_path, capsys,
                                                                                  monkeypatch):
    need("matplotlib", "plot")
    from matplotlib.figure import Figure
    from npgpt.program import plot
    args = ["--out-dir", trained, "--plot-dir", str(tmp_path)]
    assert run_main(args, capsys, plot.main)[0] == 0
    picture = (tmp_path / "loss.png").read_bytes()

    def half_written_then_out_of_memory(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(picture[:100])
        raise MemoryError("std::bad_alloc")
    monkeypatch.setattr(Figure, "savefig", half_written_then_out_of_memory)
    code, _, err = run_main(args + ["--dpi", "1000"], capsys, plot.main)
    assert_one_line_error(code, err, "not enough memory to draw loss.png", "--dpi 1000", "give a lower --dpi")
    assert os.listdir(tmp_path) == ["loss.png"]                  # no temporary file left behind
    assert (tmp_path / "loss.png").read_bytes() == picture


def test_plot_names_what_is_wrong_with_the_plot_dir(trained, tmp_path):
    a_file = tmp_path / "my.txt"
    a_file.write_text("kept\n", encoding="utf-8")
    assert_refused("npgpt.plot", ["--out-dir", trained, "--plot-dir", str(a_file)],
                   f"--plot-dir {a_file} is a file, not a directory", "give a directory")
    assert_refused("npgpt.plot", ["--out-dir", trained, "--plot-dir", str(a_file / "pictures")],
                   f"cannot create --plot-dir {a_file / 'pictures'}", "choose a directory you can write to")
    assert a_file.read_text(encoding="utf-8") == "kept\n"
    assert os.listdir(tmp_path) == ["my.txt"]


def test_plot_says_to_remove_a_character_the_vocabulary_lacks(trained):
    need("matplotlib", "plot")
    assert_refused("npgpt.plot", ["--out-dir", trained, "--attention", "--prompt", "ROMEO: \u00e9"],
                   "character '\u00e9' is not in this character vocabulary", "remove it from the prompt")


# ---- a file where a directory belongs ---------------------------------------------------------------------

@pytest.mark.parametrize("module,extra", [("npgpt.sample", []), ("npgpt.export", ["--to", "hf"]),
                                          ("npgpt.plot", [])])
def test_a_checkpoint_given_as_out_dir_names_the_run_directory(trained, tmp_path, module, extra):
    extra = [str(tmp_path / e) if e == "hf" else e for e in extra]
    checkpoint = os.path.join(trained, "ckpt.npz")
    assert_refused(module, ["--out-dir", checkpoint, *extra], f"--out-dir {checkpoint} is a file",
                   f"takes the run's directory (here: {trained})", "--checkpoint the file's name (ckpt.npz)")
    assert os.listdir(tmp_path) == []


def test_a_file_given_as_from_pretrained_says_it_takes_a_directory(tmp_path):
    a_file = tmp_path / "my.txt"
    a_file.write_text("kept\n", encoding="utf-8")
    assert_refused("npgpt.sample", ["--from-pretrained", str(a_file)],
                   f"--from-pretrained {a_file} is a file, not a directory", "Hugging Face GPT-2 directory")


# ---- a reader that goes away ------------------------------------------------------------------------------

def assert_stopped_quietly(code, err):
    assert code == 0, err
    for noise in ("Traceback", "Exception ignored", "Broken pipe", "error"):
        assert noise not in err, err


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("module", ["npgpt.proof", "npgpt.viz", "npgpt.export", "npgpt.plot", "npgpt.model"])
def test_a_stdout_closed_before_the_first_line_ends_the_command_quietly(trained, tmp_path, module, buffered):
    """The read end is closed before the command starts, so its first write to stdout, whenever it comes (a
    print when unbuffered, the last flush when buffered), meets the closed pipe."""
    args = {"npgpt.proof": [], "npgpt.viz": ["--dot"], "npgpt.model": [],
            "npgpt.export": ["--out-dir", trained, "--to", str(tmp_path / "hf")],
            "npgpt.plot": ["--out-dir", trained, "--plot-dir", str(tmp_path)]}[module]
    if module == "npgpt.plot":
        need("matplotlib", "plot")
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert_stopped_quietly(proc.returncode, proc.stderr)
    if module == "npgpt.export":                                  # the work is done before the reader is needed
        assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
    if module == "npgpt.plot":
        assert os.listdir(tmp_path) == ["loss.png"]


def test_a_sample_piped_into_head_stops_quietly(trained):
    proc = subprocess.Popen([sys.executable, "-m", "npgpt.sample", "--out-dir", trained, "--prompt", "ROMEO:",
                             "--max-new-tokens", "1000000"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.read(10)                              # as head -c 10 does, then the reader goes
        proc.stdout.close()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert first.startswith(b"ROMEO:")
    assert_stopped_quietly(proc.returncode, err.decode())
    assert err == b""


def test_export_overwrite_leaves_no_earlier_tokenizer_beside_a_char_model(trained, tmp_path, capsys):
    from npgpt.program import export
    to = tmp_path / "hf"
    to.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json", "README.md"):
        (to / name).write_text("{}", encoding="utf-8")          # an earlier export, and the user's own notes
    code, _, err = run_main(["--out-dir", trained, "--to", str(to), "--overwrite"], capsys, main=export.main)
    assert code == 0, err
    assert sorted(os.listdir(to)) == ["README.md", "config.json", "model.safetensors"]


def test_export_to_a_file_or_below_one_names_the_fix(trained, tmp_path, capsys):
    from npgpt.program import export
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x", encoding="utf-8")
    code, _, err = run_main(["--out-dir", trained, "--to", str(a_file)], capsys, main=export.main)
    assert_one_line_error(code, err, "is a file, not a directory", "give a directory")
    code, _, err = run_main(["--out-dir", trained, "--to", str(a_file / "hf")], capsys, main=export.main)
    assert_one_line_error(code, err, "Not a directory", "choose another --to")
    assert a_file.read_text(encoding="utf-8") == "x"

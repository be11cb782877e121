"""Library behaviour at its edges: gradcheck on strided inputs, grad modes, thread pools, dispatch of mixed
dtypes, out-of-range axes, float16, integer tensors, empty batches, and what importing npgpt leaves alone."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import npgpt
import npgpt.functional as F
from npgpt import engine
from npgpt.fast.cpu import threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, **env))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_npgpt_gradcheck_stays_the_function_whatever_is_imported():
    out = run_python("import npgpt.gradcheck, npgpt, npgpt.program.proof\n"
                     "import npgpt.gradcheck as g\n"
                     "print(callable(npgpt.gradcheck), callable(g), npgpt.gradcheck.__name__)")
    assert out.split() == ["True", "True", "gradcheck"]


def test_gradcheck_perturbs_a_transposed_input_where_it_lies():
    base = np.random.default_rng(0).standard_normal((4, 3))
    x = npgpt.Tensor(base.T, requires_grad=True)                 # (3, 4), not contiguous
    assert not x.data.flags.c_contiguous
    results = npgpt.gradcheck(lambda t: t * t * t, [x])
    assert results[0][1] < 1e-6

    def wrong_cube(t):        # a backward that is off by a factor of 2: the numeric side must see it
        out = engine._make(t.data ** 3, (t,), lambda grad: (grad * 6 * t.data ** 2,), "wrong_cube")
        return out
    with pytest.raises(npgpt.GradcheckError, match="analytic"):
        npgpt.gradcheck(wrong_cube, [npgpt.Tensor(base.T.copy(order="K"), requires_grad=True)])
    with pytest.raises(npgpt.GradcheckError, match="analytic"):
        npgpt.gradcheck(wrong_cube, [npgpt.Tensor(base.T, requires_grad=True)])
    np.testing.assert_array_equal(x.data, base.T)                # every probe put the element back


def test_no_grad_nested_and_shared():
    shared = npgpt.no_grad()
    x = npgpt.tensor([1.0], requires_grad=True)
    with shared:
        with shared:
            assert not (x * 2).requires_grad
        assert not npgpt.is_grad_enabled(), "leaving the inner block keeps the outer one's mode"
    assert npgpt.is_grad_enabled()

    inside, release, seen = threading.Event(), threading.Event(), {}

    def other_thread():
        with shared:
            inside.set()
            release.wait(10)
        seen["after"] = npgpt.is_grad_enabled()

    worker = threading.Thread(target=other_thread)
    worker.start()
    inside.wait(10)
    with shared:                 # entered on this thread while the other thread is inside it
        assert not npgpt.is_grad_enabled()
    assert npgpt.is_grad_enabled(), "another thread's block does not change this thread's mode"
    release.set()
    worker.join(10)
    assert seen["after"] is True


def test_a_replaced_thread_pool_is_shut_down(monkeypatch):
    monkeypatch.setattr(threads, "_pool", None)          # a fresh start; the suite's own pool comes back after
    small = threads._get_pool(2)
    assert threads._get_pool(2) is small
    larger = threads._get_pool(3)
    assert larger is not small and small._shutdown and not larger._shutdown
    assert threads._get_pool(2) is larger                 # a larger pool serves smaller requests
    larger.shutdown()


def test_operands_of_two_dtypes_go_to_the_reference(fast_paths_on):
    calls = []

    def fake_linear(*args, **kwargs):
        calls.append(args)
        return F.linear.reference(*args, **kwargs)

    engine.register_fast_path("linear", fake_linear, "cpu")
    try:
        x32, w32 = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
        assert F.linear(x32, w32).dtype == np.float32 and len(calls) == 1
        mixed = F.linear(x32, w32.astype(np.float64))
        assert len(calls) == 1, "a float32 input with a float64 weight never reaches a fast path"
        assert mixed.dtype == np.float64                         # the reference promotes, as NumPy does
    finally:
        engine._fast_paths["linear"] = [p for p in engine._fast_paths["linear"] if p[0] is not fake_linear]


@pytest.mark.parametrize("op", [lambda t: t.sum(axis=5), lambda t: t.mean(axis=2), lambda t: t.max(axis=-3),
                                lambda t: t.sum(axis=(0, 2)), lambda t: t.permute(0, 2),
                                lambda t: t.permute(0, 0), lambda t: t.permute(1, 2)])
def test_axes_out_of_range_are_refused_not_wrapped(op):
    t = npgpt.tensor(np.ones((3, 4)))
    with pytest.raises(ValueError, match="axis|axes"):
        op(t)
    assert t.sum(axis=-1).shape == (3,) and t.permute(-1, 0).shape == (4, 3)


def test_float16_is_refused_clearly():
    x = np.linspace(-6, 6, 13).astype(np.float16)
    with pytest.raises(TypeError, match="float16 is not supported.*float32"):
        F.gelu(x)
    with pytest.raises(TypeError, match="float16 is not supported"):
        F.layer_norm(x, 13)
    model = npgpt.GPT(vocab_size=5, d_model=4, num_heads=1, num_layers=1, d_ff=8, max_seq_len=4)
    with pytest.raises(TypeError, match="float32 or float64, not float16"):
        model.to(np.float16)
    assert model.token_embedding.weight.dtype == np.float32


def test_integer_tensors_cannot_require_gradients():
    with pytest.raises(TypeError, match="floating-point"):
        npgpt.Tensor(np.arange(3), requires_grad=True)
    with pytest.raises(TypeError, match="floating-point"):
        npgpt.tensor([1, 2], requires_grad=True)
    x = npgpt.tensor([1.5, 2.5], requires_grad=True)
    assert not x.astype(np.int64).requires_grad, "no gradient flows through an integer result"


def test_an_empty_batch_is_a_clear_error():
    model = npgpt.GPT(vocab_size=5, d_model=4, num_heads=1, num_layers=1, d_ff=8, max_seq_len=4)
    for shape in ((2, 0), (0, 3)):
        with pytest.raises(ValueError, match="at least one"):
            model(np.zeros(shape, dtype=np.int64))


FIVE_LINE_LOOP = """
import sys
calls = []
sys.addaudithook(lambda event, args: calls.append(args[1]) if event == "ctypes.dlsym" else None)
import numpy as np, npgpt
import npgpt.functional as F
model = npgpt.GPT(vocab_size=50, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_seq_len=16)
opt = npgpt.optim.AdamW(model.parameters(), lr=1e-3)
ids = np.random.default_rng(0).integers(0, 50, (4, 9))
for _ in range(2):
    loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 50), ids[:, 1:].reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
{extra}
print("mallopt" in calls)
"""


def test_import_and_a_five_line_loop_leave_the_allocator_alone():
    assert run_python(FIVE_LINE_LOOP.format(extra="")).strip() == "False"
    opted_in = "from npgpt.fast.cpu.allocator import keep_freed_memory\nkeep_freed_memory()"
    assert run_python(FIVE_LINE_LOOP.format(extra=opted_in)).strip() == "True"   # the hook does see it


def test_bare_pytest_collects_what_python_m_pytest_collects():
    bare = os.path.join(os.path.dirname(sys.executable), "pytest")
    if not os.path.exists(bare):
        pytest.skip(f"no pytest script beside {sys.executable}")
    files = ["tests/test_benchmarks.py", "tests/test_layers.py"]      # the first imports benchmarks/

    def collected(cmd):
        proc = subprocess.run(cmd + ["--collect-only", "-q"] + files, capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        return proc.returncode, [line for line in proc.stdout.splitlines() if "::" in line]

    module = collected([sys.executable, "-m", "pytest"])
    script = collected([bare])
    assert module[0] == 0 and module[1]
    assert script == module


@pytest.mark.parametrize("settings", [dict(lr=float("inf")), dict(lr=float("nan")), dict(lr=-1e-3),
                                      dict(eps=float("inf")), dict(weight_decay=float("nan")),
                                      dict(betas=(1.0, 0.99)), dict(betas=(0.9,))])
def test_adamw_refuses_settings_it_cannot_use(settings):
    param = engine.Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        npgpt.optim.AdamW([param], **settings)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_clip_grad_norm_at_zero_or_below_measures_and_leaves_the_gradients(max_norm, fast, monkeypatch):
    monkeypatch.setitem(engine._fast, "enabled", fast)         # the textbook's body, then the kernels'
    params = [engine.Tensor(np.zeros(4), requires_grad=True), engine.Tensor(np.zeros((2, 3)), requires_grad=True)]
    params[0].grad = np.array([3.0, 0.0, 0.0, 0.0])
    params[1].grad = np.full((2, 3), 2.0)
    before = [p.grad.copy() for p in params]
    norm = npgpt.optim.clip_grad_norm_(params, max_norm)
    assert float(norm) == pytest.approx(np.sqrt(9.0 + 6 * 4.0))         # sqrt(33)
    for p, grad in zip(params, before):
        np.testing.assert_array_equal(p.grad, grad)

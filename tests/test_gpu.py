"""CuPy end to end: the CUDA fast paths equal the CPU's ops, and NumPy and CuPy train the same model alike.

Skipped with the reason where CuPy or a GPU is missing (the rest of the suite runs every backend test on
CuPy too, through the `device` fixture). The CUDA fast paths are off by default (npgpt/fast/__init__.py);
this module turns them on.
"""


import numpy as np
import pytest

import npgpt
import npgpt.functional as F
from npgpt import backend
from npgpt.model import GPT
from npgpt.program.train import main as train_main, make_optimizer, train_step
from npgpt.program.config import TrainConfig
from npgpt.program.checkpoint import load_checkpoint
from npgpt.fast.cuda import ops as cuda_ops
from npgpt.fast.cuda.graph import GraphStep
from npgpt.optim import cosine_lr


pytestmark = pytest.mark.skipif(backend.gpu_unavailable_reason() is not None,
                                reason=f"no GPU backend: {backend.gpu_unavailable_reason()}")


@pytest.fixture(autouse=True, scope="module")
def cuda_fast_paths():
    npgpt.fast.enable_cuda()


@pytest.fixture
def cp():
    return backend.module_for("gpu")


def test_kernels_cast_gradients_of_another_dtype(cp):
    """A float32 GELU times a float64 tensor: the float64 gradient reaching the kernel is cast, and the result
    equals the CPU's."""
    rng = np.random.default_rng(2)
    x32, y64 = rng.standard_normal((3, 70)).astype(np.float32), rng.standard_normal((3, 70))
    grads = []
    for to_device in (lambda a: a, cp.asarray):
        x = npgpt.Tensor(to_device(x32.copy()), requires_grad=True)
        (F.gelu(x) * npgpt.Tensor(to_device(y64))).sum().backward()
        grads.append(backend.to_numpy(x.grad))
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def run_both(fn, arrays, cp, seed=0):
    """fn on NumPy float arrays (plain path) and on CuPy copies (fused path): outputs and input gradients."""
    results = []
    for to_device in (lambda a: a, cp.asarray):
        tensors = [npgpt.Tensor(to_device(a.copy()), requires_grad=True) for a in arrays]
        out = fn(*tensors)
        cot = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
        (out * npgpt.Tensor(to_device(cot))).sum().backward()
        results.append([backend.to_numpy(out.data)] + [backend.to_numpy(t.grad) for t in tensors])
    return results


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-11), (np.float32, 2e-5)])
def test_fused_kernels_equal_the_plain_ops(cp, dtype, tol):
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    target = rng.integers(0, 37, size=24)
    target[5] = -100
    cases = {
        "gelu": (lambda x: F.gelu(x), [3 * r(4, 6, 33)]),
        "residual fork (add kernel both ways)": (lambda x: x + F.gelu(x), [r(3, 1100)]),
        "layer_norm": (lambda x, w, b: F.layer_norm(x, 48, w, b), [r(3, 5, 48), r(48), r(48)]),
        "layer_norm no affine": (lambda x: F.layer_norm(x, 48), [r(3, 5, 48)]),
        "attention causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                             [r(2, 3, 9, 8), r(2, 3, 9, 8), r(2, 3, 9, 8)]),
        "attention full": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                           [r(2, 3, 9, 8), r(2, 3, 11, 8), r(2, 3, 11, 5)]),
        "cross_entropy": (lambda z: F.cross_entropy(z, target), [4 * r(24, 37)]),
        "cross_entropy sum": (lambda z: F.cross_entropy(z, target, reduction="sum"), [r(24, 37)]),
    }
    for name, (fn, arrays) in cases.items():
        plain, fused = run_both(fn, arrays, cp)
        for i, (a, b) in enumerate(zip(plain, fused)):
            scale = max(np.abs(a).max(), 1e-30)
            assert np.abs(a - b).max() <= tol * scale, f"{name}: output {i} differs by {np.abs(a - b).max() / scale:.2e}"


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_fused_adamw_equals_the_plain_update(cp, dtype, tol):
    rng = np.random.default_rng(1)
    start = [rng.standard_normal(s).astype(dtype) for s in [(50, 30), (30,)]]
    results = []
    for to_device in (lambda a: a, cp.asarray):
        params = [npgpt.nn.Parameter(to_device(a.copy())) for a in start]
        opt = npgpt.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        for step in range(5):
            for p in params:
                p.grad = to_device(np.random.default_rng(step).standard_normal(p.shape).astype(dtype))
            opt.step()
        results.append([backend.to_numpy(p.data) for p in params])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_numpy_and_cupy_train_alike_for_20_steps(dtype, tol):
    config = TrainConfig(dropout=0.0)
    rng = np.random.default_rng(2)
    distinct = [rng.integers(0, 61, (4, 17)) for _ in range(4)]
    batches = [distinct[i % 4] for i in range(20)]        # seen again and again: the loss must fall
    losses = {}
    backend.manual_seed(0)
    reference = GPT(61, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_seq_len=32, dropout=0.0)
    start = {k: v.copy() for k, v in reference.state_dict().items()}
    previous = backend.get_device()
    try:
        for device in ("cpu", "gpu"):
            backend.set_device(device)
            model = GPT(61, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_seq_len=32, dropout=0.0)
            model.to(np.dtype(dtype))
            model.load_state_dict(start)
            opt = make_optimizer(model, config)
            losses[device] = [float(train_step(model, opt, [(b[:, :-1], b[:, 1:])], config.grad_clip))
                              for b in batches]
    finally:
        backend.set_device(previous)
    np.testing.assert_allclose(losses["gpu"], losses["cpu"], rtol=tol)
    assert losses["cpu"][-1] < losses["cpu"][0]


def test_gpu_checkpoint_resumes_on_cpu_and_back(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text(open(npgpt.data.bundled_corpus_path(), encoding="utf-8").read()[:20000], encoding="utf-8")
    common = ["--data", str(data), "--tokenizer", "char", "--d-model", "16", "--num-heads", "2", "--num-layers",
              "1", "--d-ff", "32", "--max-seq-len", "16", "--seq-len", "16", "--batch-size", "4",
              "--eval-interval", "4", "--sample-tokens", "10", "--out-dir", str(tmp_path / "run")]
    previous = backend.get_device()
    try:
        assert train_main(common + ["--device", "gpu", "--max-iters", "4"]) == 0
        assert train_main(common + ["--device", "cpu", "--max-iters", "8", "--resume"]) == 0
        assert train_main(common + ["--device", "gpu", "--max-iters", "12", "--resume"]) == 0
    finally:
        backend.set_device(previous)
    out = capsys.readouterr().out
    assert "on gpu" in out and "on cpu" in out and "resuming from step 8" in out
    arrays, meta = load_checkpoint(str(tmp_path / "run" / "ckpt.npz"))
    assert meta["step"] == 12 and all(isinstance(a, np.ndarray) for a in arrays.values())


def test_training_step_makes_no_host_round_trip(cp):
    cupyx = pytest.importorskip("cupyx")
    if not hasattr(cupyx, "allow_synchronize"):
        pytest.skip("this CuPy has no cupyx.allow_synchronize to detect synchronisation")
    previous = backend.get_device()
    try:
        backend.set_device("gpu")
        model = GPT(61, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_seq_len=32, dropout=0.1)
        opt = make_optimizer(model, TrainConfig())
        batch = np.random.default_rng(0).integers(0, 61, (4, 17))
        train_step(model, opt, [(batch[:, :-1], batch[:, 1:])], 1.0)        # warm-up: kernels compile
        cp.cuda.get_current_stream().synchronize()
        with cupyx.allow_synchronize(False):
            loss = train_step(model, opt, [(batch[:, :-1], batch[:, 1:])], 1.0)
        assert backend.is_gpu_array(loss)
    finally:
        backend.set_device(previous)


def test_fused_dropout_kernels(cp, monkeypatch):
    x = npgpt.Tensor(cp.ones((200, 500), dtype=cp.float32), requires_grad=True)
    backend.manual_seed(0)
    y = F.dropout(x, 0.3)
    values = backend.to_numpy(y.data)
    kept = values != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(values[kept], 1 / 0.7, rtol=1e-6)
    y.sum().backward()
    np.testing.assert_array_equal(backend.to_numpy(x.grad), values)     # the same mask, regenerated
    backend.manual_seed(0)
    np.testing.assert_array_equal(backend.to_numpy(F.dropout(x, 0.3).data), values)   # seeded
    assert not np.array_equal(backend.to_numpy(F.dropout(x, 0.3).data), values)      # and fresh each call

    rng = np.random.default_rng(0)
    q, k, v = (npgpt.Tensor(cp.asarray(rng.standard_normal((2, 3, 6, 4))), requires_grad=True) for _ in range(3))

    def attention(a, b, c):
        backend.manual_seed(5)           # the same mask at every evaluation of the finite differences
        return F.scaled_dot_product_attention(a, b, c, is_causal=True, dropout_p=0.3)
    npgpt.gradcheck(attention, [q, k, v])
    # the block-by-block path: a fused kernel per block, each with its own seed
    monkeypatch.setattr(cuda_ops, "BLOCKED_ATTENTION_SCORES", 0)
    q, k, v = (npgpt.Tensor(cp.asarray(rng.standard_normal((1, 2, 130, 4))), requires_grad=True) for _ in range(3))
    npgpt.gradcheck(attention, [q, k, v], max_probes=30)


def _tiny_gpt(dtype, dropout):
    backend.manual_seed(0)
    model = GPT(61, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_seq_len=32, dropout=dropout)
    model.to(np.dtype(dtype))
    return model


@pytest.mark.parametrize("dtype,tol,accum", [("float64", 1e-12, 1), ("float32", 1e-5, 1), ("float64", 1e-12, 2)])
def test_cuda_graph_replays_equal_eager_steps(dtype, tol, accum):
    """Eight steps with a changing learning rate and gradient clipping (and accum micro-batches a step):
    replaying the recorded step gives the losses and the parameters of launching every kernel from Python."""
    config = TrainConfig(dropout=0.0, grad_clip=0.5)
    rng = np.random.default_rng(3)
    distinct = [rng.integers(0, 61, (4, 17)) for _ in range(2)]
    batches = [distinct[i % 2] for i in range(8)]           # seen again and again: the loss must fall
    previous = backend.get_device()
    results = {}
    try:
        backend.set_device("gpu")
        for mode in ("eager", "graph"):
            model = _tiny_gpt(dtype, 0.0)
            opt = make_optimizer(model, config)
            def eager_step(micro):
                return train_step(model, opt, micro, config.grad_clip)
            step = GraphStep(eager_step, opt, 61) if mode == "graph" else eager_step
            losses = []
            for i, b in enumerate(batches):
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(i, 1e-2, 1e-3, 2, 8)
                losses.append(float(step([(b[:, :-1], b[:, 1:]), (b[::-1, 1:], b[::-1, :-1])][:accum])))
            if mode == "graph":
                assert step.fallback_reason is None, step.fallback_reason
                assert step.replays == 7             # the first step runs eagerly, the second records
            results[mode] = (losses, [backend.to_numpy(p.data) for p in model.parameters()],
                             [s["step"] for s in opt.state.values()])
    finally:
        backend.set_device(previous)
    (eager_losses, eager_params, eager_steps), (graph_losses, graph_params, graph_steps) = results.values()
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=tol)
    for a, b in zip(eager_params, graph_params):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
    assert graph_steps == eager_steps == [8] * len(eager_steps)
    assert eager_losses[-1] < eager_losses[0]


def test_cuda_graph_replays_draw_fresh_dropout_masks():
    previous = backend.get_device()
    try:
        backend.set_device("gpu")
        model = _tiny_gpt("float32", 0.2)
        opt = make_optimizer(model, TrainConfig())
        for group in opt.param_groups:
            group["lr"] = 0.0                      # nothing changes but the dropout masks
        graph = GraphStep(lambda b: train_step(model, opt, b, 1.0), opt, 61)
        batch = np.random.default_rng(4).integers(0, 61, (4, 17))
        losses = [float(graph([(batch[:, :-1], batch[:, 1:])])) for _ in range(5)]
        assert graph.fallback_reason is None and graph.replays == 4
        assert len(set(losses)) == 5, losses
    finally:
        backend.set_device(previous)


def test_cuda_graph_falls_back_to_eager_when_recording_fails(capsys):
    previous = backend.get_device()
    try:
        backend.set_device("gpu")
        model = _tiny_gpt("float64", 0.0)
        opt = make_optimizer(model, TrainConfig())

        def step_that_reads_the_loss(batches):      # a host round trip: a graph cannot record it
            loss = train_step(model, opt, batches, 1.0)
            backend.to_numpy(loss)
            return loss
        graph = GraphStep(step_that_reads_the_loss, opt, 61)
        batch = np.random.default_rng(5).integers(0, 61, (4, 17))
        losses = [float(graph([(batch[:, :-1], batch[:, 1:])])) for _ in range(4)]
        assert graph.fallback_reason is not None and graph.replays == 0
        assert "runs eagerly" in capsys.readouterr().out
        assert [s["step"] for s in opt.state.values()] == [4] * len(opt.state)   # each step counted once
        assert losses[-1] < losses[0]
    finally:
        backend.set_device(previous)

"""The tutorial's GPT: structure, init, tying, dropout, memory, and parity with the PyTorch reference."""

import gc
import math
import tracemalloc
import weakref

import numpy as np
import pytest

import npgpt
import npgpt.functional as F
from npgpt import backend
from npgpt.model import GPT, parameter_breakdown

pytestmark = pytest.mark.textbook      # run again with NPGPT_FAST=0 in CI

ODD = dict(vocab_size=97, d_model=48, num_heads=3, num_layers=3, d_ff=200, max_seq_len=64)
TUTORIAL = dict(vocab_size=10000, d_model=256, num_heads=4, num_layers=4, d_ff=1024, max_seq_len=512)


def lm_loss(model, ids):
    xp = backend.get_array_module(model.token_embedding.weight.data)
    ids = xp.asarray(ids)
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, model.vocab_size), ids[:, 1:].reshape(-1))


def test_parameter_count_and_names():
    model = GPT(10000)
    assert model.num_parameters() == 5_846_528
    assert parameter_breakdown()[1] == 5_846_528
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == ["token_embedding.weight", "position_embedding.weight", "blocks.0.attn_norm.weight"]
    assert "blocks.0.attention.W_q.weight" in names and "blocks.3.ffn.linear1.bias" in names
    assert "output_proj.weight" not in names            # tied: counted once
    assert "output_proj.weight" in model.state_dict()   # but saved under both keys, as PyTorch does
    assert len(model.parameters()) == len(names)


def test_init_statistics():
    npgpt.manual_seed(0)
    model = GPT(**TUTORIAL)
    for name, p in model.named_parameters():
        values = p.numpy()
        if name.endswith("norm.weight") or name == "ln_f.weight":
            assert np.all(values == 1), name
        elif name.endswith("bias"):
            assert np.all(values == 0), name
        else:
            assert abs(values.std() - 0.02) < 0.002 and abs(values.mean()) < 0.002, name


def test_weight_tying_is_one_array_even_after_a_step():
    model = GPT(**ODD, dropout=0.0)
    assert model.output_proj.weight is model.token_embedding.weight
    opt = npgpt.optim.AdamW(model.parameters(), lr=1e-2)
    lm_loss(model, np.random.default_rng(0).integers(0, 97, (2, 9))).backward()
    opt.step()
    state = model.state_dict()
    assert state["output_proj.weight"] is state["token_embedding.weight"]
    model.to(np.float64)
    assert model.output_proj.weight is model.token_embedding.weight


def test_clear_errors():
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by num_heads \(3\)"):
        GPT(11, d_model=10, num_heads=3)
    model = GPT(11, d_model=8, num_heads=2, num_layers=1, d_ff=16, max_seq_len=4)
    with pytest.raises(ValueError, match="exceeds max_seq_len=4"):
        model(np.zeros((1, 5), dtype=np.int64))
    with pytest.raises(IndexError, match=r"\[0, 11\)"):
        model(np.full((1, 3), 11))
    bad = model.state_dict()
    bad = {k: v for k, v in bad.items() if k != "ln_f.bias"}
    with pytest.raises(KeyError, match="missing keys.*ln_f.bias"):
        model.load_state_dict(bad)
    other = GPT(11, d_model=12, num_heads=2, num_layers=1, d_ff=16, max_seq_len=4)
    with pytest.raises(ValueError, match="token_embedding.weight has shape"):
        model.load_state_dict(other.state_dict())


def test_initial_loss_is_log_vocab():
    npgpt.manual_seed(1)
    model = GPT(**TUTORIAL)
    ids = np.random.default_rng(0).integers(0, 10000, (8, 65))
    assert abs(lm_loss(model, ids).item() - math.log(10000)) < 0.1


def test_whole_model_gradcheck():
    npgpt.manual_seed(2)
    model = GPT(vocab_size=11, d_model=8, num_heads=2, num_layers=2, d_ff=12, max_seq_len=8, dropout=0.0)
    model.to(np.float64)
    xp = backend.get_array_module(model.ln_f.weight.data)
    for p in model.parameters():   # larger weights than the 0.02 init, so every path matters
        p.data[...] = xp.asarray(np.random.default_rng(p.size).standard_normal(p.shape) * 0.5)
    ids = np.random.default_rng(3).integers(0, 11, (2, 6))   # T = 5 after the shift
    params = model.parameters()
    npgpt.gradcheck(lambda *ps: lm_loss(model, ids), params, max_probes=60)


def test_dropout_train_is_seeded_and_eval_equals_no_dropout():
    npgpt.manual_seed(3)
    model = GPT(**ODD, dropout=0.2)
    plain = GPT(**ODD, dropout=0.0)
    plain.load_state_dict(model.state_dict())
    ids = np.random.default_rng(0).integers(0, 97, (2, 10))
    npgpt.manual_seed(10)
    a = model(ids).numpy()
    b = model(ids).numpy()
    npgpt.manual_seed(10)
    c = model(ids).numpy()
    assert not np.allclose(a, b), "training mode must be stochastic"
    np.testing.assert_array_equal(a, c)   # and reproducible from the seed
    model.eval()
    np.testing.assert_array_equal(model(ids).numpy(), model(ids).numpy())
    np.testing.assert_allclose(model(ids).numpy(), plain(ids).numpy(), rtol=1e-6, atol=1e-7)


def test_dropout_module_in_eval_mode_or_at_zero_is_the_identity_without_drawing():
    x = npgpt.Tensor(np.arange(12.0).reshape(3, 4), requires_grad=True)
    state = backend.global_rng().bit_generator.state
    off = npgpt.nn.Dropout(0.0)
    off.train()
    on = npgpt.nn.Dropout(0.5)
    on.eval()
    for layer in (off, on):
        assert layer(x) is x                           # the input itself: no op, no graph node
    assert backend.global_rng().bit_generator.state == state      # and no random numbers drawn
    raw = on(np.ones(3))
    assert isinstance(raw, npgpt.Tensor) and np.array_equal(raw.data, np.ones(3))
    on.p = 1.5                                         # set after construction: still refused in eval mode
    with pytest.raises(ValueError, match="p must lie in"):
        on(x)
    on.p = 0.5
    on.train()
    dropped = on(npgpt.Tensor(np.ones((50, 50))))
    assert 0.4 < (dropped.data == 0).mean() < 0.6 and set(np.unique(dropped.data)) == {0.0, 2.0}


def test_memory_stays_flat_over_training_steps():
    npgpt.manual_seed(4)
    model = GPT(**ODD, dropout=0.1)
    opt = npgpt.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    probes, sizes = [], []
    tracemalloc.start()
    try:
        for step in range(50):
            loss = lm_loss(model, rng.integers(0, 97, (4, 17)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            probes.append(weakref.ref(loss))
            del loss
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert all(p() is None for p in probes[:-1]), "an earlier step's graph is still alive"
    growth = sizes[-1] - sizes[9]
    assert growth < 256 * 1024, f"memory grew by {growth / 1024:.0f} KiB between step 10 and step 50"


# ---- parity with the PyTorch reference ----------------------------------------------------------------------

@pytest.fixture
def reference(torch):
    from benchmarks import reference
    return reference


def make_pair(torch, reference, config, dtype_np, dtype_torch, seed=0):
    torch.manual_seed(seed)
    theirs = reference.GPT(**config, dropout=0.0).to(dtype_torch)
    ours = GPT(**config, dropout=0.0).to(dtype_np)
    reference.copy_torch_to_npgpt(theirs, ours)
    return ours, theirs


def rel_err(a, b):
    a, b = backend.to_numpy(a), backend.to_numpy(b)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("config", [ODD, TUTORIAL], ids=["odd", "tutorial"])
def test_float64_parity_logits_loss_grads_and_10_adamw_steps(torch, reference, config):
    ours, theirs = make_pair(torch, reference, config, np.float64, torch.float64)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    V = config["vocab_size"]
    rng = np.random.default_rng(1)
    opt_ours = npgpt.optim.AdamW(ours.parameters(), lr=1e-3)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-3)
    for step in range(10):
        ids = rng.integers(0, V, (3, 13))
        logits_ours = ours(ids[:, :-1])
        logits_theirs = theirs(torch.from_numpy(ids[:, :-1]))
        loss_ours = F.cross_entropy(logits_ours.reshape(-1, V), ids[:, 1:].reshape(-1))
        loss_theirs = torch.nn.functional.cross_entropy(logits_theirs.reshape(-1, V),
                                                        torch.from_numpy(ids[:, 1:]).reshape(-1))
        if step == 0:
            assert rel_err(logits_ours.data, logits_theirs.detach().numpy()) < 1e-10
            assert abs(loss_ours.item() - loss_theirs.item()) < 1e-10 * abs(loss_theirs.item())
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
        loss_ours.backward()
        loss_theirs.backward()
        if step == 0:
            theirs_params = dict(theirs.named_parameters())
            for name, p in ours.named_parameters():
                assert rel_err(p.grad, theirs_params[name].grad.numpy()) < 1e-9, name
        opt_ours.step()
        opt_theirs.step()
    theirs_state = theirs.state_dict()
    for name, value in ours.state_dict().items():
        assert rel_err(value, theirs_state[name].numpy()) < 1e-8, name


def test_float32_parity_at_tutorial_config(torch, reference):
    ours, theirs = make_pair(torch, reference, TUTORIAL, np.float32, torch.float32, seed=5)
    ids = np.random.default_rng(2).integers(0, 10000, (2, 64))
    logits = ours(ids)
    assert logits.dtype == np.float32
    expected = theirs(torch.from_numpy(ids)).detach().numpy()
    assert rel_err(logits.data, expected) < 1e-4


def test_tutorial_mask_argument_matches_reference(torch, reference):
    ours, theirs = make_pair(torch, reference, ODD, np.float64, torch.float64, seed=6)
    ids = np.random.default_rng(3).integers(0, 97, (2, 7))
    mask = np.triu(np.ones((7, 7), dtype=bool), k=1)
    mask[4, 1] = True                                  # block one more pair: a custom mask, tutorial style
    expected = theirs(torch.from_numpy(ids), torch.from_numpy(mask)).detach().numpy()
    assert rel_err(ours(ids, mask).data, expected) < 1e-10

"""Hugging Face interop, held against code nobody here wrote: transformers' GPT2LMHeadModel and GPT2Tokenizer,
the `tokenizers` library and the `safetensors` package. Nothing is downloaded: every model and tokenizer is
made in the test."""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest

from optional import need

import npgpt
from npgpt.generate import generate
from npgpt.optim import AdamW
from npgpt import functional as F
from npgpt.program import hf
from npgpt.program.data import read_text
from npgpt.program.hf import PretrainedError
from npgpt.program.tokenizer import BPETokenizer, TokenizerError

transformers = need("transformers", "hf-test")
torch = need("torch", "hf-test")
tokenizers = need("tokenizers", "hf-test")
safetensors_numpy = need("safetensors.numpy", "hf-test")

TEXTS = ["", "Hello, world!", "naïve café — Ünïcödé 東京 Москва مرحبا", "emoji 😀👍🏽 and 🇫🇷 flags",
         "runs   of    spaces\t\ttabs \t \n\n\n  newlines  ", "I'm sure you'll see they've done it, don't we'd",
         "ROMEO'S 'quoted' O'Brien's", "digits 1234567890 3.14159 2024-12-01 ½ ² ٣", "  leading and trailing  ",
         "First Citizen:\nBefore we proceed any further, hear me speak.\n", "<|endoftext|>after a special token",
         "x" * 300 + " " + "ab" * 100, "tab\tseparated\tvalues\r\nwindows line",
         "no-break\u00a0space, ideographic\u3000space, \x1cfile separator\x1d \x1e"]


# ---------------------------------------------------------------------------------------------------------
# Models made by transformers, read by npgpt

def random_gpt2(activation, seed=0, vocab=97, n_embd=48, n_layer=3, n_head=3, n_positions=32, n_inner=None):
    """A GPT2LMHeadModel with random weights, biases and LayerNorm parameters (none at their init values)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, n_inner=n_inner, activation_function=activation,
                                     bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if ".ln_" in name + "." and name.endswith("weight") else 0.0))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    dirs = {}
    for activation in ("gelu_new", "gelu"):
        path = tmp_path_factory.mktemp(activation)
        model = random_gpt2(activation)
        model.save_pretrained(path)
        dirs[activation] = (str(path), model)
    return dirs


IDS = np.random.default_rng(0).integers(0, 97, size=(2, 21))


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_transformers_gpt2_loads_with_equal_logits(hf_dirs, activation):
    path, theirs = hf_dirs[activation]
    ref32 = theirs(torch.tensor(IDS)).logits.detach().numpy()
    ref64 = theirs.double()(torch.tensor(IDS)).logits.detach().numpy()
    theirs.float()

    ours = npgpt.GPT.from_pretrained(path).eval()
    assert ours.token_embedding.weight.dtype == np.float32
    assert ours.gelu_approximate == ("tanh" if activation == "gelu_new" else "none") and ours.attention_bias
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    logits = ours(IDS).data
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref32, rtol=0, atol=1e-4)

    ours64 = npgpt.GPT.from_pretrained(path, dtype="float64").eval()
    logits64 = ours64(IDS).data
    assert logits64.dtype == np.float64
    np.testing.assert_allclose(logits64, ref64, rtol=0, atol=1e-9)


def test_sharded_checkpoint_loads(hf_dirs, tmp_path):
    _, theirs = hf_dirs["gelu_new"]
    theirs.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    ours = npgpt.GPT.from_pretrained(str(tmp_path)).eval()
    np.testing.assert_allclose(ours(IDS).data, theirs(torch.tensor(IDS)).logits.detach().numpy(), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# npgpt models, read by transformers

def trained_npgpt(**kw):
    """An npgpt GPT of odd sizes (d_ff not 4 x d_model), trained a few AdamW steps so no weight is at its init."""
    npgpt.manual_seed(3)
    model = npgpt.GPT(vocab_size=61, d_model=36, num_heads=3, num_layers=2, d_ff=100, max_seq_len=24, dropout=0.0,
                      **kw)
    optimizer = AdamW(model.parameters(), lr=3e-2)
    rng = np.random.default_rng(1)
    for _ in range(4):
        batch = rng.integers(0, 61, size=(4, 13))
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 61), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("options", [{}, {"attention_bias": True, "gelu_approximate": "tanh", "layer_norm_eps": 1e-6}],
                         ids=["tutorial", "gpt2-options"])
def test_npgpt_export_loads_in_transformers(tmp_path, options):
    ours = trained_npgpt(**options)
    ours.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["activation_function"] == ("gelu_new" if options else "gelu") and config["n_inner"] == 100
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    ids = np.random.default_rng(2).integers(0, 61, size=(3, 17))
    np.testing.assert_allclose(theirs(torch.tensor(ids)).logits.detach().numpy(), ours(ids).data,
                               rtol=0, atol=1e-4)

    prompt = ids[:1, :5]
    ours_greedy = generate(ours, prompt, 12, temperature=0)                      # with the KV cache
    theirs_greedy = theirs.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False, use_cache=True,
                                    pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours_greedy, theirs_greedy)

    again = npgpt.GPT.from_pretrained(str(tmp_path)).state_dict()              # and back, exactly
    for name, a in ours.state_dict().items():
        np.testing.assert_array_equal(again.pop(name), a, err_msg=name)
    assert all(name.endswith("bias") and not a.any() for name, a in again.items())   # zero attention biases
    assert len(again) == (0 if options else 2 * 4)


def test_safetensors_reader_and_writer_agree_with_the_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b.c": rng.standard_normal(7),
               "d": rng.standard_normal((2, 0, 3)).astype(np.float32), "e": np.float16([1.5, -2.25])}
    ours = tmp_path / "ours.safetensors"
    hf.write_safetensors(str(ours), tensors)
    back = safetensors_numpy.load_file(str(ours))
    assert set(back) == set(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and np.array_equal(back[k], tensors[k])
    theirs = tmp_path / "theirs.safetensors"
    safetensors_numpy.save_file(tensors, str(theirs))
    entries, start = hf.read_safetensors_header(str(theirs))
    for k in tensors:
        assert np.array_equal(hf.read_tensor(str(theirs), entries[k], start), tensors[k])


def test_bfloat16_tensors_widen_to_float32(tmp_path):
    values = np.float32([1.0, -2.5, 3.140625, 0.0])
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()           # bfloat16 = top 16 bits
    header = json.dumps({"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, len(raw)]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw)
    entries, start = hf.read_safetensors_header(str(path))
    np.testing.assert_array_equal(hf.read_tensor(str(path), entries["x"], start), values)


# ---------------------------------------------------------------------------------------------------------
# Bad directories: each a PretrainedError naming the file

@pytest.fixture
def good_dir(hf_dirs, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(hf_dirs["gelu_new"][0], path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def rewrite_tensors(path, change):
    tensors = safetensors_numpy.load_file(str(path / "model.safetensors"))
    change(tensors)
    safetensors_numpy.save_file(tensors, str(path / "model.safetensors"))


def load_error(path):
    with pytest.raises(PretrainedError) as info:
        npgpt.GPT.from_pretrained(str(path))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_another_architecture_names_the_field(good_dir):
    edit_config(good_dir, model_type="llama")
    assert load_error(good_dir).startswith(f"{good_dir}/config.json: model_type is 'llama', not 'gpt2'")
    edit_config(good_dir, model_type="gpt2", activation_function="relu")
    assert "config.json: activation_function is 'relu'" in load_error(good_dir)
    edit_config(good_dir, activation_function="gelu_new", tie_word_embeddings=False)
    assert "config.json: tie_word_embeddings is False" in load_error(good_dir)
    edit_config(good_dir, tie_word_embeddings=True, n_embd="48")
    assert "config.json: n_embd is '48', not a positive integer" in load_error(good_dir)


def test_missing_tensor_is_named(good_dir):
    rewrite_tensors(good_dir, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    assert load_error(good_dir) == (f"{good_dir}/model.safetensors: missing tensor h.1.mlp.c_fc.bias "
                                    "(config.json has n_layer 3)")


def test_shape_that_disagrees_with_the_config(good_dir):
    edit_config(good_dir, n_inner=100)
    assert load_error(good_dir) == (f"{good_dir}/model.safetensors: h.0.mlp.c_fc.weight has shape (48, 192), but "
                                    f"{good_dir}/config.json implies (48, 100)")


def test_unknown_tensors_are_refused(good_dir):
    def add(t):
        t["transformer.h.0.attn.q_norm.weight"] = np.ones(48, np.float32)
    rewrite_tensors(good_dir, add)
    assert "model.safetensors: unknown tensors transformer.h.0.attn.q_norm.weight" in load_error(good_dir)


def test_truncated_and_corrupt_files(good_dir):
    weights = good_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    message = load_error(good_dir)
    assert message.startswith(f"{weights}: truncated: tensor ") and "download it again" in message
    weights.write_bytes(data[:5])
    assert load_error(good_dir).startswith(f"{weights}: truncated (5 bytes")
    weights.write_bytes((10 ** 12).to_bytes(8, "little") + data[8:])
    assert load_error(good_dir).startswith(f"{weights}: corrupt or truncated: the header claims")
    weights.write_bytes(data[:8] + b"{not json" + data[17:])
    assert load_error(good_dir).startswith(f"{weights}: corrupt safetensors header")


def test_pickle_only_and_empty_directories(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1,
                                                      "vocab_size": 5, "n_positions": 4}))
    assert load_error(tmp_path) == f"{tmp_path}/model.safetensors: no such file (and no model.safetensors.index.json)"
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert "pickle, which npgpt never loads" in load_error(tmp_path)
    assert load_error(tmp_path / "nowhere").startswith(f"{tmp_path}/nowhere: no such directory")


# ---------------------------------------------------------------------------------------------------------
# Tokenizers: trained by `tokenizers`, read by npgpt; trained by npgpt, read by `tokenizers` and transformers

@pytest.fixture(scope="module")
def corpus():
    return read_text()


@pytest.fixture(scope="module")
def hf_tokenizer_dir(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tokenizer")
    trained = tokenizers.ByteLevelBPETokenizer()
    trained.train_from_iterator([corpus], vocab_size=700, min_frequency=2, show_progress=False,
                                special_tokens=["<|endoftext|>"])
    trained.save_model(str(path))
    return str(path), trained


def test_npgpt_encodes_as_tokenizers_and_gpt2tokenizer(hf_tokenizer_dir, corpus):
    path, theirs = hf_tokenizer_dir
    ours = BPETokenizer.from_pretrained(path)
    slow = transformers.GPT2Tokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    assert ours.vocab_size == theirs.get_vocab_size() == 700
    for text in TEXTS:
        ids = ours.encode(text)
        assert isinstance(ids, list)
        assert ids == slow.encode(text), text
        if "<|endoftext|>" not in text:          # the bare `tokenizers` model has no added tokens
            assert ids == theirs.encode(text).ids, text
        assert ours.decode(ids) == text
    assert ours.encode("<|endoftext|>") == [theirs.token_to_id("<|endoftext|>")]
    sample = corpus[:20000]
    assert ours.encode(sample) == theirs.encode(sample).ids


def test_tokenizer_json_reads_the_same(hf_tokenizer_dir, tmp_path):
    path, theirs = hf_tokenizer_dir
    theirs.save(str(tmp_path / "tokenizer.json"))
    from_json = BPETokenizer.from_pretrained(str(tmp_path))
    from_files = BPETokenizer.from_pretrained(path)
    for text in TEXTS:
        assert from_json.encode(text) == from_files.encode(text)


def test_npgpt_bpe_saved_and_loaded_by_tokenizers(corpus, tmp_path):
    ours = BPETokenizer.train(corpus, 600, progress=False)
    ours.save_pretrained(str(tmp_path))
    theirs = tokenizers.ByteLevelBPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    slow = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in TEXTS + [corpus[:20000]]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text).ids, text
        if "<|endoftext|>" not in text:          # GPT2Tokenizer adds that token of its own
            assert ids == slow.encode(text), text
    again = BPETokenizer.from_pretrained(str(tmp_path))
    assert again.encode(corpus[:20000]) == ours.encode(corpus[:20000])


def test_bad_tokenizer_files_name_the_file(hf_tokenizer_dir, tmp_path):
    path, _ = hf_tokenizer_dir
    shutil.copy(os.path.join(path, "vocab.json"), tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nq zz\n")
    with pytest.raises(TokenizerError, match=r"merges.txt: merge 3 \(q zz\) names a token that is not in vocab.json"):
        BPETokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t h\n")
    with pytest.raises(TokenizerError, match="merges.txt: line 2 is 'Ġ t h', not two tokens"):
        BPETokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "vocab.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="vocab.json: not valid JSON"):
        BPETokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(TokenizerError, match="no vocab.json \\+ merges.txt and no tokenizer.json"):
        BPETokenizer.from_pretrained(str(tmp_path / ".."))


# ---------------------------------------------------------------------------------------------------------
# The programs: sample --from-pretrained, train --init-from, export

@pytest.fixture(scope="module")
def hf_gpt2_with_tokenizer(hf_tokenizer_dir, tmp_path_factory):
    """A tiny random GPT-2 (tanh GELU, biases) whose vocabulary is the 700-token BPE, as one HF directory."""
    path = tmp_path_factory.mktemp("gpt2_dir")
    random_gpt2("gelu_new", seed=5, vocab=700, n_embd=32, n_layer=2, n_head=2, n_positions=64).save_pretrained(path)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(hf_tokenizer_dir[0], name), path)
    return str(path)


def test_sample_from_pretrained_is_transformers_greedy(hf_gpt2_with_tokenizer, capsys):
    from npgpt.program import sample
    code = sample.main(["--from-pretrained", hf_gpt2_with_tokenizer, "--prompt", "ROMEO:", "--temperature", "0",
                        "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0
    slow = transformers.GPT2Tokenizer(os.path.join(hf_gpt2_with_tokenizer, "vocab.json"),
                                      os.path.join(hf_gpt2_with_tokenizer, "merges.txt"))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_with_tokenizer).eval()
    prompt = torch.tensor([slow.encode("ROMEO:")])
    expected = theirs.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist()
    assert out == slow.decode(expected) + "\n"


def test_train_init_from_fine_tunes_then_exports(hf_gpt2_with_tokenizer, tmp_path, capsys):
    from npgpt.program import export, train
    out_dir = str(tmp_path / "run")
    code = train.main(["--init-from", hf_gpt2_with_tokenizer, "--out-dir", out_dir, "--max-iters", "3",
                       "--eval-interval", "3", "--eval-iters", "1", "--batch-size", "2", "--seq-len", "32",
                       "--warmup-iters", "1", "--sample-tokens", "0", "--lr", "1e-3"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "bpe tokenizer with 700 tokens" in printed.out
    # the command that started the run, repeated with --resume, continues it
    assert train.main(["--init-from", hf_gpt2_with_tokenizer, "--out-dir", out_dir, "--resume", "--max-iters", "4",
                       "--eval-interval", "4", "--eval-iters", "1", "--sample-tokens", "0"]) == 0
    assert "resuming from step 3 of 4" in capsys.readouterr().out
    assert train.main(["--init-from", hf_gpt2_with_tokenizer, "--out-dir", str(tmp_path / "other"),
                       "--d-model", "64"]) == 2
    assert f"--d-model 64 contradicts {hf_gpt2_with_tokenizer}/config.json (d_model 32)" in capsys.readouterr().err

    exported = str(tmp_path / "exported")
    assert export.main(["--out-dir", out_dir, "--to", exported]) == 0
    assert sorted(os.listdir(exported)) == ["config.json", "merges.txt", "model.safetensors", "tokenizer_config.json",
                                            "vocab.json"]
    assert export.main(["--out-dir", out_dir, "--to", exported]) == 2          # refuses to overwrite
    assert "already holds files" in capsys.readouterr().err
    tuned = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    start = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_with_tokenizer).eval()
    moved = [(a - b).abs().max().item() for a, b in zip(tuned.parameters(), start.parameters())]
    assert min(moved) > 0 and max(moved) < 0.05                                # fine-tuned: every tensor moved a little
    ours = npgpt.GPT.from_pretrained(exported).eval()
    ids = np.random.default_rng(4).integers(0, 700, size=(1, 20))
    np.testing.assert_allclose(ours(ids).data, tuned(torch.tensor(ids)).logits.detach().numpy(), rtol=0, atol=1e-4)
    slow = transformers.GPT2Tokenizer(os.path.join(exported, "vocab.json"), os.path.join(exported, "merges.txt"))
    text = "ROMEO: what, ho!"
    assert slow.encode(text) == BPETokenizer.from_pretrained(hf_gpt2_with_tokenizer).encode(text)


def test_init_from_needs_the_tokenizer_files(hf_dirs, tmp_path, capsys):
    from npgpt.program import train
    path = hf_dirs["gelu"][0]
    assert train.main(["--init-from", path, "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {path}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json); --init-from "
                   "fine-tunes a model together with its tokenizer\n")


def test_a_char_run_exports_its_model_and_says_the_tokenizer_cannot(tmp_path, capsys):
    from npgpt.program import export, train
    out_dir = str(tmp_path / "run")
    assert train.main(["--tokenizer", "char", "--d-model", "16", "--num-heads", "2", "--num-layers", "1",
                       "--d-ff", "24", "--max-seq-len", "16", "--seq-len", "8", "--batch-size", "2",
                       "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "0",
                       "--out-dir", out_dir]) == 0
    capsys.readouterr()
    assert export.main(["--out-dir", out_dir, "--to", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr()
    assert "wrote config.json, model.safetensors to" in printed.out
    assert "char tokenizer has no Hugging Face GPT-2 form; only the model was written" in printed.err
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    from npgpt.program.sample import load_model
    ours, _ = load_model(os.path.join(out_dir, "best.npz"))
    ids = np.arange(10)[None] % ours.vocab_size
    np.testing.assert_allclose(theirs(torch.tensor(ids)).logits.detach().numpy(), ours.eval()(ids).data,
                               rtol=0, atol=1e-4)


def test_the_public_names():
    from npgpt.model import GPT
    assert npgpt.GPT is GPT and callable(GPT.from_pretrained) and callable(GPT.save_pretrained)
    assert npgpt.tokenizer.BPETokenizer is BPETokenizer


def test_init_from_takes_the_shape_and_fine_tuning_rates(hf_gpt2_with_tokenizer):
    from npgpt.program.config import TrainConfig
    config = hf.init_from_config(TrainConfig(init_from=hf_gpt2_with_tokenizer), given={"init_from"})
    assert (config.vocab_size, config.d_model, config.num_heads, config.num_layers, config.d_ff,
            config.max_seq_len, config.tokenizer) == (700, 32, 2, 2, 128, 64, "bpe")
    assert config.seq_len == 64 and (config.lr, config.min_lr) == (3e-5, 3e-6)
    given = hf.init_from_config(TrainConfig(init_from=hf_gpt2_with_tokenizer, lr=1e-4, seq_len=16),
                                given={"init_from", "lr", "seq_len"})
    assert (given.lr, given.min_lr, given.seq_len) == (1e-4, 1e-5, 16)

"""Tokenizers (round trips, BPE equal to a naive recount) and the data pipeline."""

import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npgpt.program.data import DataError, bundled_corpus_path, get_batch, read_text, split_tokens
from npgpt.program.tokenizer import (BPETokenizer, CharTokenizer, TokenizerError, _merge_pair, build_tokenizer,
                                     pre_tokenize, tokenizer_from_dict)

SAMPLE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n"
          "Ünïcödé — naïve café, 東京 2024's test_case!\n") * 3


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(SAMPLE, 400)


def naive_bpe_merges(text, vocab_size):
    """The textbook algorithm: recount every pair over every word before each merge."""
    words = Counter(pre_tokenize(text))
    seqs = {w: list(w.encode("utf-8")) for w in words}
    merges = []
    while len(merges) < vocab_size - 256:
        counts = Counter()
        for w, f in words.items():
            for pair in zip(seqs[w], seqs[w][1:]):
                counts[pair] += f
        if not counts:
            break
        best_count = max(counts.values())
        if best_count < 2:
            break
        best = min(p for p, c in counts.items() if c == best_count)   # ties: the smallest pair
        merges.append(best)
        for w in seqs:
            seqs[w] = _merge_pair(seqs[w], best, 255 + len(merges))
    return merges


def test_incremental_bpe_equals_naive_recount():
    assert BPETokenizer.train(SAMPLE, 330).merges == naive_bpe_merges(SAMPLE, 330)


def test_bpe_learns_the_obvious_first_merge():
    tok = BPETokenizer.train("aaab aaab aaab", 258)
    assert tok.merges[0] == (ord("a"), ord("a"))
    assert tok.decode(tok.encode("aaab")) == "aaab"


@given(text=st.text())
def test_bpe_round_trips_any_string(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@given(text=st.text(alphabet=sorted(set(SAMPLE))))
def test_char_round_trips_its_alphabet(text):
    tok = CharTokenizer.train(SAMPLE)
    assert tok.decode(tok.encode(text)) == text


def test_bpe_compresses_and_serialises(bpe):
    ids = bpe.encode(SAMPLE)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert len(ids) < len(SAMPLE.encode("utf-8")) / 2
    assert max(ids) < bpe.vocab_size
    again = tokenizer_from_dict(bpe.to_dict())
    assert again.encode(SAMPLE) == ids


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer.train("abc")
    with pytest.raises(TokenizerError, match="'z' is not in this character vocabulary"):
        tok.encode("abz")


def test_bpe_cache_is_written_and_reused(tmp_path):
    first = build_tokenizer("bpe", SAMPLE, 300, cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith("-300.json")
    second = build_tokenizer("bpe", SAMPLE, 300, cache_dir=str(tmp_path))
    assert second.merges == first.merges


def test_bundled_corpus_is_installed():
    text = read_text()
    assert os.path.getsize(bundled_corpus_path()) == 1115394
    assert text.startswith("First Citizen:")


def test_split_and_batches():
    ids = np.arange(1000)
    train, val = split_tokens(ids, seq_len=8)
    assert len(train) == 900 and len(val) == 100 and val[0] == 900
    x, y = get_batch(train, 4, 8, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 8)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])          # targets are inputs shifted by one
    assert y.max() < 900
    x2, _ = get_batch(train, 4, 8, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)                        # seeded


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="is a directory"):
        read_text(str(tmp_path))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*offset 3"):
        read_text(str(bad))
    with pytest.raises(DataError, match="corpus too short"):
        split_tokens(np.arange(50), seq_len=8)


# ---------------------------------------------------------------------------------------------------------
# GPT-2's pre-tokenizer, text read in slices, progress, and what a repetitive corpus does

def test_pre_tokenizer_splits_as_gpt2():
    assert pre_tokenize("Hello  world's 42\t\tx\n\n y") == \
        ["Hello", " ", " world", "'s", " 42", "\t", "\t", "x", "\n\n", " y"]
    assert pre_tokenize("don't DON'T x²3 a_b 東京!? ") == \
        ["don", "'t", " DON", "'", "T", " x", "²3", " a", "_", "b", " 東京", "!?", " "]
    assert pre_tokenize("") == []


@given(text=st.text(alphabet=st.sampled_from(list(" \n\t\n ab1,'é😀\u3000\x1c"))))
def test_reading_in_slices_keeps_every_piece(text):
    from npgpt.program.tokenizer import _slices
    slices = list(_slices(text, size=3))
    assert "".join(slices) == text
    assert [p for s in slices for p in pre_tokenize(s)] == pre_tokenize(text)


def test_tokenizers_saved_before_gpt2s_pre_tokenizer_encode_as_trained():
    merges = [(ord("a"), 0xC2)]                        # 'a' + the first byte of '²'
    old = tokenizer_from_dict({"kind": "bpe", "merges": merges})         # a checkpoint of npgpt's first BPE
    new = tokenizer_from_dict({"kind": "bpe", "merges": merges, "pretokenizer": "gpt2"})
    assert old.encode("a²") == [256, 0xB2]               # its pieces: 'a²' (one word)
    assert new.encode("a²") == [ord("a"), 0xC2, 0xB2]     # GPT-2's: 'a', '²'
    with pytest.raises(TokenizerError, match="earlier pre-tokenizer"):
        old.save_pretrained("unused")


def test_decode_refuses_ids_outside_the_vocabulary(bpe):
    with pytest.raises(TokenizerError, match=f"token id {bpe.vocab_size} is outside this vocabulary"):
        bpe.decode([1, bpe.vocab_size])
    with pytest.raises(TokenizerError, match="token id -1 is outside"):
        bpe.decode([-1])


def test_long_jobs_show_progress_with_an_eta(monkeypatch, capsys):
    from npgpt.program import tokenizer
    monkeypatch.setattr(tokenizer, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(tokenizer, "PROGRESS_EVERY_S", 0.0)
    tok = BPETokenizer.train(SAMPLE, 300)
    tok.encode(SAMPLE)
    err = capsys.readouterr().err.splitlines()
    for label in ("tokenizer: pre-tokenizing: ", "tokenizer: learning merges: ", "tokenizer: encoding: "):
        lines = [line for line in err if line.startswith(label)]
        assert any("| ETA " in line for line in lines), label
        assert "done in" in lines[-1]
    BPETokenizer.train(SAMPLE, 300, progress=False).encode(SAMPLE, progress=False)
    assert capsys.readouterr().err == ""


def test_a_repetitive_corpus_says_what_happened(tmp_path, monkeypatch, capsys):
    from npgpt.program import train
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "a.txt"
    data.write_text("a" * 200_000)
    code = train.main(["--data", str(data), "--out-dir", str(tmp_path / "out"), "--d-model", "16", "--num-heads", "2",
                       "--num-layers", "1", "--d-ff", "32", "--max-iters", "1", "--sample-tokens", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "the bpe tokenizer turned these 200,000 characters into 6 tokens" in err
    assert "only 1 distinct piece (the commonest is 'aaaaaaaaaaaa'..., 200,000 characters long)" in err
    assert "--tokenizer char" in err


def test_data_must_be_a_regular_file(tmp_path):
    with pytest.raises(DataError, match="/dev/zero is not a regular file"):
        read_text("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="is not a regular file"):
        read_text(str(fifo))             # refused at once, not a wait for a writer


@given(text=st.text(alphabet=st.sampled_from(list("aab b\nc'é")), max_size=200))
def test_incremental_bpe_equals_naive_recount_on_any_text(text):
    assert BPETokenizer.train(text, 290, progress=False).merges == naive_bpe_merges(text, 290)


def test_encoding_the_training_text_again_equals_a_fresh_tokenizer():
    trained = BPETokenizer.train(SAMPLE, 400, progress=False)     # its cache holds training's encodings
    fresh = tokenizer_from_dict(trained.to_dict())
    assert trained.encode(SAMPLE) == fresh.encode(SAMPLE)
    assert trained.encode(SAMPLE[::-1]) == fresh.encode(SAMPLE[::-1])

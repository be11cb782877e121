"""Tokenizers: characters, and a byte-level BPE trained from scratch.

CharTokenizer: one id per distinct character of the corpus.

BPETokenizer (byte-level byte-pair encoding, as in GPT-2): text is split into word-like pieces, each piece is
UTF-8 bytes (ids 0..255), and training repeatedly merges the most frequent adjacent pair of ids into a new
id until the vocabulary is full. Training keeps pair counts up to date incrementally: a merge only touches
the words that contain the merged pair, so it never recounts the corpus. Any string round-trips:
``decode(encode(text)) == text``.

Both serialise to a JSON-able dict (``to_dict`` / ``tokenizer_from_dict``) saved inside every checkpoint.

Shapes: text -> ids (N,) int64 -> text.

Next to read: ``npgpt/data.py``.
"""

import hashlib
import heapq
import json
import os
import re
from collections import Counter, defaultdict

import numpy as np

# Word-like pieces: contractions, letters, digits, other symbols (each with an optional leading space),
# runs of whitespace; the final `.` catches anything else so no character is ever dropped.
_PIECE = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+|.", re.DOTALL)


class TokenizerError(ValueError):
    """Text the tokenizer cannot encode, or a saved tokenizer that does not load."""


class CharTokenizer:
    kind = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text):
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        try:
            return np.array([self.index[c] for c in text], dtype=np.int64)
        except KeyError as exc:
            raise TokenizerError(f"character {exc.args[0]!r} is not in this character vocabulary "
                                 "(it never occurs in the training text); remove it from the prompt") from None

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self):
        return {"kind": "char", "chars": "".join(self.chars)}


class BPETokenizer:
    kind = "bpe"

    def __init__(self, merges):
        self.merges = [tuple(m) for m in merges]                   # [(a, b)] in merge order
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        self.token_bytes = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self._cache = {}

    @property
    def vocab_size(self):
        return 256 + len(self.merges)

    @classmethod
    def train(cls, text, vocab_size):
        """Learn vocab_size - 256 merges from `text` (fewer if the text runs out of repeated pairs)."""
        if vocab_size < 256:
            raise TokenizerError(f"a byte-level BPE needs vocab_size >= 256, got {vocab_size}")
        word_counts = Counter(_PIECE.findall(text))
        words = [list(w.encode("utf-8")) for w in word_counts]     # each distinct piece as a list of ids
        freqs = list(word_counts.values())

        pair_counts = defaultdict(int)                             # (a, b) -> occurrences in the corpus
        pair_words = defaultdict(set)                              # (a, b) -> indices of words holding it
        for w, (ids, f) in enumerate(zip(words, freqs)):
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += f
                pair_words[pair].add(w)
        # Max-heap of (-count, pair); stale entries are skipped when popped (lazy deletion)
        heap = [(-c, pair) for pair, c in pair_counts.items()]
        heapq.heapify(heap)

        merges = []
        while len(merges) < vocab_size - 256 and heap:
            neg_count, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -neg_count:
                continue                                           # stale entry
            if -neg_count < 2:
                break                                              # no pair repeats any more
            new_id = 256 + len(merges)
            merges.append(pair)
            touched = {}
            for w in pair_words.pop(pair):
                ids, f = words[w], freqs[w]
                for old in zip(ids, ids[1:]):                      # remove the word's old pairs ...
                    pair_counts[old] -= f
                    touched[old] = True
                merged = _merge_pair(ids, pair, new_id)
                words[w] = merged
                for new in zip(merged, merged[1:]):                # ... and add its new ones
                    pair_counts[new] += f
                    pair_words[new].add(w)
                    touched[new] = True
            pair_counts.pop(pair, None)
            for p in touched:
                count = pair_counts.get(p, 0)
                if count > 0:
                    heapq.heappush(heap, (-count, p))
                else:
                    pair_counts.pop(p, None)
        return cls(merges)

    def _encode_piece(self, piece):
        ids = self._cache.get(piece)
        if ids is None:
            ids = list(piece.encode("utf-8"))
            while len(ids) > 1:
                # merge the adjacent pair that was learned first, as training did
                best = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, 1 << 60))
                if best not in self.ranks:
                    break
                ids = _merge_pair(ids, best, 256 + self.ranks[best])
            self._cache[piece] = ids
        return ids

    def encode(self, text):
        out = []
        for piece in _PIECE.findall(text):
            out.extend(self._encode_piece(piece))
        return np.array(out, dtype=np.int64)

    def decode(self, ids):
        """Bytes of the ids joined, then UTF-8 (an incomplete character from sampling shows as U+FFFD)."""
        return b"".join(self.token_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")

    def to_dict(self):
        return {"kind": "bpe", "merges": [list(m) for m in self.merges]}


def _merge_pair(ids, pair, new_id):
    """ids with every non-overlapping occurrence of `pair` (left to right) replaced by new_id."""
    out, i, a, b = [], 0, pair[0], pair[1]
    n = len(ids)
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def tokenizer_from_dict(d):
    try:
        if d["kind"] == "char":
            return CharTokenizer(d["chars"])
        if d["kind"] == "bpe":
            return BPETokenizer(d["merges"])
    except (KeyError, TypeError) as exc:
        raise TokenizerError(f"saved tokenizer is malformed ({exc})") from None
    raise TokenizerError(f"unknown tokenizer kind {d.get('kind')!r}")


def build_tokenizer(kind, text, vocab_size=10000, cache_dir=None):
    """A trained tokenizer for `text`; BPE merges are cached on disk, keyed by the text and vocab size."""
    if kind == "char":
        return CharTokenizer.train(text)
    if kind != "bpe":
        raise TokenizerError(f"unknown tokenizer {kind!r}: use 'char' or 'bpe'")
    cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                          "npgpt")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = os.path.join(cache_dir, f"bpe-{digest}-{vocab_size}.json")
    try:
        with open(path, encoding="utf-8") as f:
            return tokenizer_from_dict(json.load(f))
    except (OSError, ValueError):
        pass                                  # not cached yet (or unreadable): train and cache it
    tokenizer = BPETokenizer.train(text, vocab_size)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(tokenizer.to_dict(), f)
        os.replace(tmp, path)
    except OSError:
        pass                                  # a read-only home only costs the cache
    return tokenizer

"""Tokenizers: characters, and GPT-2's byte-level BPE, trained here or read from a Hugging Face directory.

CharTokenizer: one id per distinct character of the corpus.

BPETokenizer (byte-level byte-pair encoding, as in GPT-2): GPT-2's pre-tokenizer splits the text into pieces
(contractions; runs of letters, of digits or of other symbols, each with an optional leading space; runs of
whitespace), each piece becomes its UTF-8 bytes, one token per byte, and the learned merges join adjacent
tokens, the earliest-learned pair first. Training counts every distinct piece once, with its frequency
(natural text has few distinct words: Tiny Shakespeare repeated 40 times still has 15,057), then repeatedly
merges the most frequent adjacent pair into a new token, keeping the pair counts up to date incrementally:
a merge only touches the words that hold its pair, so it never recounts the corpus. Any string round-trips:
``decode(encode(text)) == text``.

The Hugging Face format: vocab.json (token -> id) and merges.txt (the merges in order, "a b" per line), or
the same inside tokenizer.json, with every byte written as one printable character (GPT-2's byte-to-unicode
map). ``BPETokenizer.from_pretrained(directory)`` reads it and encodes exactly as the `tokenizers` library
and transformers' GPT2Tokenizer do; ``save_pretrained(directory)`` writes npgpt's own BPE in that format.

Both tokenizers serialise to a JSON-able dict (``to_dict`` / ``tokenizer_from_dict``) saved inside every
checkpoint. Jobs that take more than a few seconds (pre-tokenizing, training, encoding) print their progress
and an ETA to stderr.

Shapes: text -> ids (N,) -> text.

Next to read: ``npgpt/program/data.py``.
"""

import functools
import gc
import hashlib
import heapq
import json
import os
import re
import sys
import time
from array import array
from collections import Counter, defaultdict
from itertools import chain

import numpy as np

# GPT-2's pre-tokenizer, as the `regex` module (GPT2Tokenizer) and Oniguruma (the `tokenizers` library) read it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The pre-tokenizer of npgpt's first BPE, kept so that tokenizers saved in older checkpoints encode as they
# were trained (their dicts carry no "pretokenizer" key).
_LEGACY_PIECE = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+|.", re.DOTALL)


def _char_class(codepoints):
    """The body of a regex character class matching exactly these sorted code points, as ranges."""
    parts, start, prev = [], None, None
    for cp in codepoints + [None]:
        if start is not None and cp == prev + 1:
            prev = cp
            continue
        if start is not None:
            parts.append(f"\\U{start:08x}" if start == prev else f"\\U{start:08x}-\\U{prev:08x}")
        start = prev = cp
    return "".join(parts)


@functools.lru_cache(maxsize=None)
def gpt2_pretokenizer():
    """GPT2_PATTERN compiled for Python's `re`, which has no \\p{L} or \\p{N}: the classes are spelt out from
    the Unicode database. \\p{L} (Lu Ll Lt Lm Lo) is str.isalpha; \\p{N} (Nd Nl No) is str.isnumeric minus the
    letters that carry a numeric value (CJK numerals, which are L); \\s is Unicode White_Space, which is
    str.isspace without U+001C..U+001F (`re`'s \\s includes those four, `regex` and Oniguruma do not).

    Speed: `re` looks a character of the Basic Multilingual Plane up in a table, but walks the ranges above
    U+FFFF one by one, so each class is split in two and the second half is tried only for such characters.
    """
    letters, numbers, spaces = [], [], []
    for cp in range(0x110000):
        c = chr(cp)
        if c.isalpha():
            letters.append(cp)
        elif c.isnumeric():
            numbers.append(cp)
        elif c.isspace() and not 0x1C <= cp <= 0x1F:
            spaces.append(cp)

    def low(cps):
        return _char_class([c for c in cps if c < 0x10000])

    def high(cps):
        return _char_class([c for c in cps if c >= 0x10000])
    astral = r"(?![\x00-\uffff])"                    # the next character lies above U+FFFF
    S = _char_class(spaces)                          # all in the BMP
    L = rf"(?:[{low(letters)}]|{astral}[{high(letters)}])"
    N = rf"(?:[{low(numbers)}]|{astral}[{high(numbers)}])"
    other = rf"(?:[^{S}{low(letters)}{low(numbers)}\U00010000-\U0010ffff]|{astral}[^{high(letters)}{high(numbers)}])"
    return re.compile(rf"'(?:[stmd]|re|ve|ll)| ?{L}+| ?{N}+| ?{other}+|[{S}]+(?![^{S}])|[{S}]+")


def pre_tokenize(text):
    """GPT-2's pieces of `text`: "Hello  world's 42" -> ['Hello', ' ', ' world', "'s", ' 42']."""
    return gpt2_pretokenizer().findall(text)


# Where a long text may be cut without changing its pieces: a whitespace character right after a
# non-whitespace one always starts a piece (no piece runs from non-space into space, and the pattern only
# looks ahead), so the pieces of the parts are the pieces of the whole.
_SAFE_CUT = re.compile(r"(?<=[^\s\x1c-\x1f])[\n ]")


def _slices(text, size=1 << 20):
    """Consecutive slices of about `size` characters, cut only where a piece always begins."""
    start, n = 0, len(text)
    while start < n:
        end = start + size
        if end >= n:
            yield text[start:]
            return
        cut = _SAFE_CUT.search(text, end)
        if cut is None:
            yield text[start:]
            return
        yield text[start:cut.start()]
        start = cut.start()


def bytes_to_unicode():
    """GPT-2's map from the 256 byte values to printable characters: the printable Latin-1 bytes stand for
    themselves, the other 68 (control codes, space, ...) take the code points 256, 257, ... in order, so every
    token is a readable string (' the' is written 'Ġthe')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


class TokenizerError(ValueError):
    """Text the tokenizer cannot encode, or a saved tokenizer that does not load."""


PROGRESS_AFTER_S = 3.0          # jobs shorter than this print no progress
PROGRESS_EVERY_S = 5.0          # one progress line this often (in a terminal: the line is rewritten twice a second)


class _Progress:
    """`label: 12.0/45.0 M chars | 3.1 M chars/s | ETA 0m11s` on stderr, for jobs that last more than
    PROGRESS_AFTER_S seconds (shorter ones print nothing)."""

    def __init__(self, label, total, unit="", scale=1.0, enabled=True):
        self.label, self.total, self.unit, self.scale = label, total, unit, scale
        self.enabled = enabled
        self.start = self.last = time.perf_counter()
        self.printed = False
        self.tty = enabled and sys.stderr.isatty()

    def _amount(self, x):
        return f"{x / self.scale:,.1f}" if self.scale != 1 else f"{x:,.0f}"

    def update(self, done):
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.start < PROGRESS_AFTER_S or now - self.last < (0.5 if self.tty else PROGRESS_EVERY_S):
            return
        self.last = now
        rate = done / (now - self.start)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_text = f"{int(eta) // 60}m{int(eta) % 60:02d}s" if eta < 1e6 else "?"
        line = (f"{self.label}: {self._amount(done)}/{self._amount(self.total)} {self.unit} | "
                f"{self._amount(rate)} {self.unit}/s | ETA {eta_text}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        self.printed = True

    def close(self, summary=""):
        if self.printed:
            elapsed = time.perf_counter() - self.start
            line = f"{self.label}: done in {elapsed:.1f}s{summary}"
            print(("\r" + line + " " * 20) if self.tty else line, file=sys.stderr, flush=True)


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
                                 "(it never occurs in the text the tokenizer was built from)") from None

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self):
        return {"kind": "char", "chars": "".join(self.chars)}


class BPETokenizer:
    """Byte-level BPE: `merges` [(a, b)] token-id pairs in the order learned, and the bytes of every id.

    vocab: the bytes of each id, or None for npgpt's own layout (ids 0..255 are the bytes themselves, merge i
    makes id 256 + i). special_tokens: {text: id}, matched in the text before pre-tokenizing (GPT-2's
    <|endoftext|>), as GPT2Tokenizer and the `tokenizers` library match their added tokens.
    """

    kind = "bpe"

    def __init__(self, merges, vocab=None, special_tokens=None, pretokenizer="gpt2", add_prefix_space=False):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.own_layout = vocab is None
        if vocab is None:
            self.token_bytes = [bytes([i]) for i in range(256)]
            for a, b in self.merges:
                self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
            merged = range(256, 256 + len(self.merges))
        else:
            self.token_bytes = [bytes(t) for t in vocab]
            index, special_ids = {}, set((special_tokens or {}).values())
            for i, t in enumerate(self.token_bytes):
                if i not in special_ids:                           # a special token is never a merge's result
                    index.setdefault(t, i)
            missing = [b for b in range(256) if bytes([b]) not in index]
            if missing:
                raise TokenizerError(f"the vocabulary has no token for byte 0x{missing[0]:02x} "
                                     f"({len(missing)} bytes missing): not a byte-level BPE")
            self._byte_ids = [index[bytes([b])] for b in range(256)]
            try:
                merged = [index[self.token_bytes[a] + self.token_bytes[b]] for a, b in self.merges]
            except (KeyError, IndexError):
                raise TokenizerError("a merge joins tokens that are not in the vocabulary, or makes one that "
                                     "is not") from None
        self.ranks = {}                                            # (a, b) -> (rank, id of the merged token)
        for rank, (pair, new_id) in enumerate(zip(self.merges, merged)):
            self.ranks.setdefault(pair, (rank, new_id))
        self.special_tokens = dict(special_tokens or {})
        for text, i in self.special_tokens.items():
            if not 0 <= i < len(self.token_bytes):
                raise TokenizerError(f"special token {text!r} has id {i}, outside the vocabulary")
        self._special = (re.compile("(" + "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len,
                                                                                   reverse=True)) + ")")
                         if self.special_tokens else None)
        if pretokenizer not in ("gpt2", "legacy"):
            raise TokenizerError(f"unknown pre-tokenizer {pretokenizer!r}")
        self.pretokenizer, self.add_prefix_space = pretokenizer, bool(add_prefix_space)
        self._cache, self._cache_limit = {}, 1 << 20              # piece -> ids, bounded for unbounded text

    @property
    def vocab_size(self):
        return len(self.token_bytes)

    def _pattern(self):
        return gpt2_pretokenizer() if self.pretokenizer == "gpt2" else _LEGACY_PIECE

    # ---- training -------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, text, vocab_size, progress=True):
        """Learn vocab_size - 256 merges from `text` (fewer if the text runs out of repeated pairs)."""
        if vocab_size < 256:
            raise TokenizerError(f"a byte-level BPE needs vocab_size >= 256, got {vocab_size}")
        word_counts = count_pieces(text, progress=progress)
        merges, pieces_ids = learn_merges(word_counts, vocab_size - 256, progress)
        tokenizer = cls(merges)
        # training has encoded every distinct piece of `text` already: encoding it again is only look-ups
        tokenizer._cache = dict(zip(word_counts, pieces_ids))
        tokenizer._cache_limit = max(tokenizer._cache_limit, len(tokenizer._cache))
        return tokenizer

    # ---- encoding and decoding ----------------------------------------------------------------------------
    def _encode_piece(self, piece):
        ids = self._cache.get(piece)
        if ids is None:
            data = piece.encode("utf-8", errors="surrogatepass")
            ids = list(data) if self.own_layout else [self._byte_ids[b] for b in data]
            ranks = self.ranks
            while len(ids) > 1:
                # merge the adjacent pair that was learned first (every occurrence, left to right), as training did
                best = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, _NO_MERGE))
                if best not in ranks:
                    break
                ids = _merge_pair(ids, best, ranks[best][1])
            if len(self._cache) >= self._cache_limit:
                self._cache.clear()                                # bounded memory on text of many distinct words
            self._cache[piece] = ids
        return ids

    def encode(self, text, progress=True):
        """Token ids of `text`, a list of ints (a long text shows its progress on stderr)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, not {type(text).__name__}")
        parts = self._special.split(text) if self._special is not None else [text]
        if self.add_prefix_space and parts[0][:1] not in ("", " "):
            parts[0] = " " + parts[0]
        bar = _Progress("tokenizer: encoding", len(text), "M chars", scale=1e6, enabled=progress)
        out, done, findall = [], 0, self._pattern().findall
        for k, part in enumerate(parts):
            if k % 2:                                              # a special token, matched whole
                out.append(self.special_tokens[part])
                done += len(part)
                continue
            for chunk in _slices(part):
                pieces = findall(chunk)
                ids = {piece: self._encode_piece(piece) for piece in set(pieces)}   # each distinct piece once
                out.extend(chain.from_iterable(map(ids.__getitem__, pieces)))
                done += len(chunk)
                bar.update(done)
        bar.close(f": {len(out):,} tokens")
        return out

    def decode(self, ids):
        """Bytes of the ids joined, then UTF-8 (an incomplete character from sampling shows as U+FFFD)."""
        ids = [int(i) for i in ids]
        if ids and not 0 <= min(ids) <= max(ids) < len(self.token_bytes):
            bad = next(i for i in ids if not 0 <= i < len(self.token_bytes))
            raise TokenizerError(f"token id {bad} is outside this vocabulary (0..{len(self.token_bytes) - 1})")
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    # ---- saving ---------------------------------------------------------------------------------------------
    def to_dict(self):
        d = {"kind": "bpe", "merges": [list(m) for m in self.merges]}
        if self.pretokenizer == "gpt2":
            d["pretokenizer"] = "gpt2"
        if not self.own_layout:
            d["vocab"] = [t.hex() for t in self.token_bytes]
        if self.special_tokens:
            d["special_tokens"] = self.special_tokens
        if self.add_prefix_space:
            d["add_prefix_space"] = True
        return d

    @classmethod
    def from_dict(cls, d):
        vocab = [bytes.fromhex(t) for t in d["vocab"]] if "vocab" in d else None
        return cls(d["merges"], vocab, d.get("special_tokens"), d.get("pretokenizer", "legacy"),
                   d.get("add_prefix_space", False))

    def save_pretrained(self, directory):
        """vocab.json and merges.txt (GPT-2's byte-level format) in `directory`, which `tokenizers` and
        transformers' GPT2Tokenizer load; each file is written whole or not at all."""
        if self.pretokenizer != "gpt2":
            raise TokenizerError("this tokenizer was trained with npgpt's earlier pre-tokenizer, which Hugging Face "
                                 "tokenizers do not reproduce; retrain it (delete the cached bpe-*.json)")
        strings = ["".join(_BYTE_TO_CHAR[b] for b in t) for t in self.token_bytes]
        for text, i in self.special_tokens.items():
            strings[i] = text
        vocab = {}
        for i, s in enumerate(strings):
            if s in vocab:
                raise TokenizerError(f"tokens {vocab[s]} and {i} are the same bytes {s!r}; vocab.json cannot hold "
                                     "both")
            vocab[s] = i
        lines = ["#version: 0.2"] + [f"{strings[a]} {strings[b]}" for a, b in self.merges]
        os.makedirs(directory, exist_ok=True)
        _write_atomic(os.path.join(directory, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
        _write_atomic(os.path.join(directory, "merges.txt"), "\n".join(lines) + "\n")
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": self.add_prefix_space,
                  "model_max_length": 1024, "errors": "replace",
                  "bos_token": None, "eos_token": None, "unk_token": None, "pad_token": None}
        for text in self.special_tokens:
            if text == "<|endoftext|>":
                config.update(bos_token=text, eos_token=text, unk_token=text)
        _write_atomic(os.path.join(directory, "tokenizer_config.json"), json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, directory):
        """The tokenizer of a Hugging Face directory: vocab.json + merges.txt, else tokenizer.json."""
        return load_pretrained_tokenizer(directory)


_NO_MERGE = (1 << 62, -1)


def _merge_counting(ids, pair, new_id, f, delta):
    """_merge_pair(ids, pair, new_id), and the change of every pair count it makes, times the word's
    frequency f, added into delta. Returns (merged ids, the new pairs) or (None, ()) when `pair` is absent.

    Only the neighbours of an occurrence change: in x a b y, the pairs (x, a), (a, b), (b, y) go and
    (x, N), (N, y) come, N the new token. When occurrences touch (a b a b), the pair between them, (b, a), is
    counted once, as the left neighbour of the second, which becomes (N, N).
    """
    a, b = pair
    n = len(ids)
    out, created, i, found = [], [], 0, False
    while True:
        try:
            j = ids.index(a, i)                                  # the next a, found at C speed
        except ValueError:
            break
        if j + 1 >= n or ids[j + 1] != b:
            out.extend(ids[i:j + 1])
            i = j + 1
            continue
        out.extend(ids[i:j])
        if out:                                                  # (x, a) becomes (x', N); x' may be N itself
            delta[(ids[j - 1], a)] -= f
            left = (out[-1], new_id)
            delta[left] += f
            created.append(left)
        delta[pair] -= f
        if j + 2 < n and not (ids[j + 2] == a and j + 3 < n and ids[j + 3] == b):
            delta[(b, ids[j + 2])] -= f                          # (b, y) becomes (N, y), unless y starts
            right = (new_id, ids[j + 2])                         # the next occurrence (counted there)
            delta[right] += f
            created.append(right)
        out.append(new_id)
        i, found = j + 2, True
    if not found:
        return None, ()
    out.extend(ids[i:])
    return out, created


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


def learn_merges(word_counts, n_merges, progress=True):
    """Up to n_merges merges [(a, b)] from {piece: frequency}: each time the most frequent adjacent pair
    (ties: the smallest pair), stopping early when no pair occurs twice. Merge i makes token 256 + i.
    Returns the merges and every piece's ids after them (its encoding), in the order of word_counts.

    Each distinct piece is a list of ids with its frequency f. pair_counts holds every pair's occurrences in
    the corpus; pair_words lists, for each pair, the words that have held it (stale entries are skipped), so a
    merge visits only the words holding its pair, and in each only the pairs beside an occurrence change
    (_merge_counting); only the pairs whose count changed go back on the heap. The garbage collector is paused
    meanwhile: the millions of small lists it would otherwise scan again and again hold no cycles.
    """
    words = [list(w.encode("utf-8")) for w in word_counts]        # each distinct piece as a list of ids
    freqs = list(word_counts.values())
    pair_counts = defaultdict(int)                                # (a, b) -> occurrences in the corpus
    pair_words = defaultdict(lambda: array("i"))                  # (a, b) -> words that have held it
    for w, (ids, f) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += f
            pair_words[pair].append(w)                            # twice if it occurs twice: skipped then
    # Max-heap of (-count, pair); an entry whose count is no longer the pair's is skipped when popped.
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    visited = array("i", [-1]) * len(words)                       # the last merge that rewrote each word
    merges = []
    bar = _Progress("tokenizer: learning merges", n_merges, "merges", enabled=progress)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(merges) < n_merges and heap:
            neg_count, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -neg_count:
                continue                                          # stale entry
            if -neg_count < 2:
                break                                             # no pair repeats any more
            new_id, rank = 256 + len(merges), len(merges)
            merges.append(pair)
            delta = defaultdict(int)                              # net change of each pair's count
            for w in pair_words.pop(pair):
                if visited[w] == rank:
                    continue                                      # listed twice
                visited[w] = rank
                merged, created = _merge_counting(words[w], pair, new_id, freqs[w], delta)
                if merged is not None:                            # None: a stale entry, the pair has left it
                    words[w] = merged
                    for new in created:                           # the word's other pairs are listed already
                        pair_words[new].append(w)
            for p, change in delta.items():
                if change:
                    count = pair_counts[p] + change
                    if count > 0:
                        pair_counts[p] = count
                        heapq.heappush(heap, (-count, p))
                    else:
                        pair_counts.pop(p, None)
            pair_counts.pop(pair, None)
            bar.update(len(merges))
    finally:
        if gc_was_enabled:
            gc.enable()
    bar.close(f": {len(merges):,} merges from {len(words):,} distinct pieces")
    return merges, words


def count_pieces(text, progress=True, pattern=None):
    """Counter {piece: occurrences} of GPT-2's pieces of `text`, read in slices (progress on stderr)."""
    findall = (pattern or gpt2_pretokenizer()).findall
    counts = Counter()
    bar = _Progress("tokenizer: pre-tokenizing", len(text), "M chars", scale=1e6, enabled=progress)
    done = 0
    for chunk in _slices(text):
        counts.update(findall(chunk))
        done += len(chunk)
        bar.update(done)
    bar.close(f": {len(counts):,} distinct pieces")
    return counts


def _write_atomic(path, content):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------------------
# Reading a Hugging Face tokenizer directory

def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read it ({exc.strerror})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from None


def _token_bytes(token):
    """The bytes a byte-level token string stands for ('Ġthe' -> b' the'), or None for a string outside
    the byte map (an added token, kept as its UTF-8 text)."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return None


def load_pretrained_tokenizer(directory):
    """A BPETokenizer from vocab.json + merges.txt (with tokenizer_config.json's added tokens), or from
    tokenizer.json; one-line TokenizerError naming the file and the problem otherwise."""
    if not os.path.isdir(directory):
        what = "is a file, not a directory" if os.path.exists(directory) else "no such directory"
        raise TokenizerError(f"{directory}: {what}; give a Hugging Face GPT-2 directory "
                             "(vocab.json and merges.txt, or tokenizer.json)")
    vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    json_path = os.path.join(directory, "tokenizer.json")
    add_prefix_space = False
    if os.path.exists(vocab_path) and os.path.exists(merges_path):
        vocab = _read_json(vocab_path)
        try:
            with open(merges_path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{merges_path}: cannot read it ({exc})") from None
        merges = []
        for number, line in enumerate(lines, 1):
            if not line or (number == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise TokenizerError(f"{merges_path}: line {number} is {line[:40]!r}, not two tokens 'a b'")
            merges.append((pair, number))
        added, merges_file = {}, merges_path
        config_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(config_path):
            config = _read_json(config_path)
            add_prefix_space = bool(config.get("add_prefix_space", False))
            for i, token in (config.get("added_tokens_decoder") or {}).items():
                added[token["content"] if isinstance(token, dict) else str(token)] = int(i)
    elif os.path.exists(json_path):
        spec = _read_json(json_path)
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{json_path}: model type is {model.get('type')!r}, not 'BPE'")
        pre = spec.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
            raise TokenizerError(f"{json_path}: pre_tokenizer is {pre.get('type')!r} (use_regex "
                                 f"{pre.get('use_regex')}), not GPT-2's ByteLevel with its regex")
        if spec.get("normalizer"):
            raise TokenizerError(f"{json_path}: has a normalizer ({spec['normalizer'].get('type')}), which "
                                 "GPT-2's byte-level BPE does not")
        add_prefix_space = bool(pre.get("add_prefix_space", False))
        vocab, merges_file = model.get("vocab") or {}, json_path
        merges = [((m.split(" ") if isinstance(m, str) else list(m)), n)      # "a b" or ["a", "b"]
                  for n, m in enumerate(model.get("merges") or [], 1)]
        added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens") or []}
        vocab_path = json_path
    else:
        raise TokenizerError(f"{directory}: no vocab.json + merges.txt and no tokenizer.json; a GPT-2 "
                             "tokenizer directory holds those files")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise TokenizerError(f"{vocab_path}: the vocabulary is not a mapping of tokens to integer ids")
    size = max(list(vocab.values()) + list(added.values()) + [-1]) + 1
    token_bytes, special = [None] * size, {}
    for token, i in vocab.items():
        if i < 0:
            raise TokenizerError(f"{vocab_path}: token {token!r} has the negative id {i}")
        if token_bytes[i] is not None:
            raise TokenizerError(f"{vocab_path}: id {i} is given to two tokens")
        data = _token_bytes(token)
        if data is None:
            special[token] = i
            data = token.encode("utf-8")
        token_bytes[i] = data
    for token, i in added.items():
        if token_bytes[i] is None:
            token_bytes[i] = token.encode("utf-8")
        special[token] = i
    if "<|endoftext|>" in vocab:             # GPT2Tokenizer's bos, eos and unk token, matched whole
        special["<|endoftext|>"] = vocab["<|endoftext|>"]
    holes = [i for i, t in enumerate(token_bytes) if t is None]
    if holes:
        raise TokenizerError(f"{vocab_path}: no token has id {holes[0]} ({len(holes)} ids missing); the ids must "
                             f"run from 0 to {size - 1}")
    index, special_ids = {}, set(special.values())
    for i, t in enumerate(token_bytes):
        if i not in special_ids:
            index.setdefault(t, i)
    pairs = []
    for (a, b), number in merges:
        ids = [index.get(_token_bytes(a)), index.get(_token_bytes(b))]
        joined = (_token_bytes(a) or b"") + (_token_bytes(b) or b"")
        if None in ids or joined not in index:
            raise TokenizerError(f"{merges_file}: merge {number} ({a} {b}) names a token that is not in "
                                 f"{os.path.basename(vocab_path)}")
        pairs.append(ids)
    try:
        return BPETokenizer(pairs, token_bytes, special, "gpt2", add_prefix_space)
    except TokenizerError as exc:
        raise TokenizerError(f"{vocab_path}: {exc}") from None


def explain_token_count(tokenizer, text, n_tokens):
    """Why a long `text` became only n_tokens tokens, to end an error message ('' when nothing stands out)."""
    if getattr(tokenizer, "kind", None) != "bpe" or len(text) < 8 * max(n_tokens, 1):
        return ""
    pieces = count_pieces(text, progress=False)
    top = pieces.most_common(1)[0][0]
    distinct = f"{len(pieces):,} distinct piece{'s' if len(pieces) != 1 else ''}"
    return (f"; the bpe tokenizer turned these {len(text):,} characters into {n_tokens:,} tokens because the text "
            f"holds only {distinct} (the commonest is {top[:12]!r}{'...' if len(top) > 12 else ''}, "
            f"{len(top):,} characters long), and BPE merges repetition into ever longer tokens: use "
            "--tokenizer char, a smaller --vocab-size, or a more varied text")


def tokenizer_from_dict(d):
    try:
        if d["kind"] == "char":
            return CharTokenizer(d["chars"])
        if d["kind"] == "bpe":
            return BPETokenizer.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise TokenizerError(f"saved tokenizer is malformed ({exc})") from None
    raise TokenizerError(f"unknown tokenizer kind {d.get('kind')!r}")


def build_tokenizer(kind, text, vocab_size=10000, cache_dir=None, progress=True):
    """A trained tokenizer for `text`; BPE merges are cached on disk, keyed by the text and vocab size."""
    if kind == "char":
        return CharTokenizer.train(text)
    if kind != "bpe":
        raise TokenizerError(f"unknown tokenizer {kind!r}: use 'char' or 'bpe'")
    cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                          "npgpt")
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]
    path = os.path.join(cache_dir, f"bpe-gpt2-{digest}-{vocab_size}.json")
    try:
        with open(path, encoding="utf-8") as f:
            return tokenizer_from_dict(json.load(f))
    except (OSError, ValueError):
        pass                                  # not cached yet (or unreadable): train and cache it
    tokenizer = BPETokenizer.train(text, vocab_size, progress=progress)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(tokenizer.to_dict(), f)
        os.replace(tmp, path)
    except OSError:
        pass                                  # a read-only home only costs the cache
    return tokenizer

"""Hugging Face GPT-2 directories: read one into npgpt's GPT, write npgpt's GPT as one.

    model = npgpt.GPT.from_pretrained("path/to/gpt2")     # config.json + model.safetensors (or shards)
    model.save_pretrained("export/")                        # transformers.GPT2LMHeadModel.from_pretrained loads it
    tokenizer = npgpt.tokenizer.BPETokenizer.from_pretrained("path/to/gpt2")    # vocab.json + merges.txt

GPT-2 is npgpt's GPT with attention biases, tanh GELU ("gelu_new") and its LayerNorm epsilon (model.py). The
names map one to one; GPT-2's linear layers are ``Conv1D`` modules that store the weight as (in, out), npgpt's
Linear as (out, in), so every matrix is transposed on the way, and GPT-2 fuses Q, K and V in one ``c_attn``:

    GPT-2 (transformer.)               npgpt
    wte.weight          (V, C)         token_embedding.weight, tied to output_proj.weight (GPT-2's lm_head)
    wpe.weight          (P, C)         position_embedding.weight      (P = n_positions = max_seq_len)
    h.i.ln_1, h.i.ln_2                 blocks.i.attn_norm, blocks.i.ffn_norm
    h.i.attn.c_attn     (C, 3C), (3C,) blocks.i.attention.W_q | W_k | W_v, each (C, C) = a third, transposed
    h.i.attn.c_proj     (C, C)         blocks.i.attention.W_o (transposed)
    h.i.mlp.c_fc        (C, F)         blocks.i.ffn.linear1 (transposed; F = n_inner = d_ff)
    h.i.mlp.c_proj      (F, C)         blocks.i.ffn.linear2 (transposed)
    ln_f                               ln_f

The tutorial's GPT has no attention biases and exact GELU, so it is written with zero biases and
activation_function "gelu": every npgpt model exports.

The safetensors format is read and written here, in a few lines: 8 bytes giving the header's length n, n
bytes of JSON naming each tensor's dtype, shape and byte range, then the raw little-endian data. So loading
needs neither torch nor the safetensors package, every problem (another architecture, a missing tensor, a
wrong shape, a truncated file, unknown keys) is found in the headers and config.json before any tensor is
read, and each is a one-line PretrainedError naming the file. Pickle files (pytorch_model.bin) are never read.

Why here and not in model.py: the textbook knows the network, not file formats, and never imports the
program. GPT.from_pretrained and GPT.save_pretrained are therefore defined in this module and attached to
the GPT class when it is imported, which ``npgpt.GPT`` (npgpt/__init__.py) always does first.

Shapes: C = n_embd, H = n_head, F = n_inner, V = vocab_size, P = n_positions.
"""

import json
import math
import os

import numpy as np

from .. import backend
from ..model import GPT
from .checkpoint import CheckpointError
from .tokenizer import BPETokenizer, TokenizerError

WEIGHTS, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"


class PretrainedError(CheckpointError):
    """A Hugging Face directory that npgpt cannot read; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------------------
# safetensors: [n: u64 little-endian][n bytes of JSON header][data]

_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
           "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
           "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
_CODES = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16"}


def read_safetensors_header(path):
    """{name: (dtype code, shape, (begin, end))} and the offset of the data, every range checked against the
    file's size, without reading any tensor."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PretrainedError(f"{path}: truncated ({size} bytes, not even the 8-byte header length); "
                                      "copy or download it again")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 << 20):
                raise PretrainedError(f"{path}: corrupt or truncated: the header claims {n:,} bytes, the file "
                                      f"holds {size:,}; copy or download it again")
            raw = f.read(n)
    except OSError as exc:
        raise PretrainedError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise PretrainedError(f"{path}: corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            dtype = _DTYPES[code]
            if min(shape, default=0) < 0 or not 0 <= begin <= end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise PretrainedError(f"{path}: corrupt header entry for tensor {name} ({str(info)[:80]})") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise PretrainedError(f"{path}: corrupt: tensor {name} {code} {shape} needs "
                                  f"{math.prod(shape) * dtype.itemsize:,} bytes, its range holds {end - begin:,}")
        if end > data_size:
            raise PretrainedError(f"{path}: truncated: tensor {name} ends at byte {end:,} of the data, the file "
                                  f"holds {data_size:,}; copy or download it again")
        entries[name] = (code, shape, (begin, end))
    return entries, data_start


def read_tensor(path, entry, data_start):
    """One tensor as a NumPy array (float16 and bfloat16 widened to float32)."""
    code, shape, (begin, end) = entry
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = f.read(end - begin)
    if len(raw) != end - begin:
        raise PretrainedError(f"{path}: truncated while reading")
    array = np.frombuffer(raw, dtype=_DTYPES[code]).reshape(shape)
    if code == "BF16":              # bfloat16 is the top half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="))


def write_safetensors(path, tensors, metadata=None):
    """{name: float array} as a safetensors file, written to a temporary file and renamed over `path`."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _CODES:
            raise PretrainedError(f"{path}: cannot store {name} of dtype {array.dtype}")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _CODES[array.dtype.newbyteorder("=")], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)                   # the data starts 8-byte aligned, as the format advises
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for array in arrays:
                f.write(array.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------------------
# config.json

_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def read_config(directory):
    """GPT's keyword arguments from a GPT-2 config.json, every field that npgpt cannot honour refused."""
    path = os.path.join(directory, CONFIG)
    if not os.path.isdir(directory):
        what = "is a file, not a directory" if os.path.exists(directory) else "no such directory"
        raise PretrainedError(f"{directory}: {what}; give a Hugging Face GPT-2 directory "
                              "(config.json, model.safetensors)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise PretrainedError(f"{path}: no such file; a GPT-2 directory holds config.json and "
                              "model.safetensors") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PretrainedError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PretrainedError(f"{path}: not a JSON object")
    if config.get("model_type") != "gpt2":
        raise PretrainedError(f"{path}: model_type is {config.get('model_type')!r}, not 'gpt2'; npgpt reads "
                              "GPT-2 checkpoints only")

    def positive(name, default=None):
        value = config.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PretrainedError(f"{path}: {name} is {value!r}, not a positive integer")
        return value

    d_model, num_heads = positive("n_embd"), positive("n_head")
    if d_model % num_heads:
        raise PretrainedError(f"{path}: n_embd {d_model} is not divisible by n_head {num_heads}")
    d_ff = 4 * d_model if config.get("n_inner") is None else positive("n_inner")
    activation = config.get("activation_function", "gelu_new")
    if activation not in _GELU:
        raise PretrainedError(f"{path}: activation_function is {activation!r}; npgpt's GPT has GELU only "
                              f"({', '.join(_GELU)})")
    refused = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
               "tie_word_embeddings": True}
    for name, needed in refused.items():
        if bool(config.get(name, needed)) != needed:
            raise PretrainedError(f"{path}: {name} is {config[name]!r}; npgpt's GPT supports only {needed}")
    eps = config.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise PretrainedError(f"{path}: layer_norm_epsilon is {eps!r}, not a positive number")
    dropout = config.get("resid_pdrop", 0.1)
    return dict(vocab_size=positive("vocab_size"), d_model=d_model, num_heads=num_heads,
                num_layers=positive("n_layer"), d_ff=d_ff,
                max_seq_len=positive("n_positions", config.get("n_ctx")),
                dropout=float(dropout) if isinstance(dropout, (int, float)) else 0.1,
                attention_bias=True, gelu_approximate=_GELU[activation], layer_norm_eps=float(eps))


def gpt2_config(model):
    """The config.json of `model` as GPT2LMHeadModel reads it."""
    p = float(model.dropout_p)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": model.vocab_size,
            "n_positions": model.max_seq_len, "n_embd": model.d_model, "n_layer": model.num_layers,
            "n_head": model.num_heads, "n_inner": model.d_ff,
            "activation_function": "gelu_new" if model.gelu_approximate == "tanh" else "gelu",
            "layer_norm_epsilon": model.layer_norm_eps, "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True,
            "use_cache": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
            "dtype": str(np.dtype(model.token_embedding.weight.dtype))}


# ---------------------------------------------------------------------------------------------------------
# The tensors: GPT-2's names and shapes, and the conversion both ways

def expected_shapes(kw):
    """{GPT-2 tensor name (without 'transformer.'): shape} for GPT keyword arguments `kw`."""
    C, F = kw["d_model"], kw["d_ff"]
    shapes = {"wte.weight": (kw["vocab_size"], C), "wpe.weight": (kw["max_seq_len"], C),
              "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(kw["num_layers"]):
        h = f"h.{i}."
        shapes.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
                       h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
                       h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                       h + "mlp.c_fc.weight": (C, F), h + "mlp.c_fc.bias": (F,),
                       h + "mlp.c_proj.weight": (F, C), h + "mlp.c_proj.bias": (C,)})
    return shapes


def _is_buffer(name):
    """The causal-mask buffers that older GPT-2 files carry (h.i.attn.bias, h.i.attn.masked_bias)."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "h" and parts[2] == "attn" and parts[3] in ("bias", "masked_bias")


def npgpt_state(tensors, C):
    """GPT-2 tensors (names without 'transformer.') -> npgpt's state dict: Conv1D transposed, c_attn split."""
    state = {"token_embedding.weight": tensors["wte.weight"], "output_proj.weight": tensors["wte.weight"],
             "position_embedding.weight": tensors["wpe.weight"],
             "ln_f.weight": tensors["ln_f.weight"], "ln_f.bias": tensors["ln_f.bias"]}
    i = 0
    while f"h.{i}.ln_1.weight" in tensors:
        h, b = f"h.{i}.", f"blocks.{i}."
        w_qkv, b_qkv = tensors[h + "attn.c_attn.weight"], tensors[h + "attn.c_attn.bias"]    # (C, 3C), (3C,)
        for k, name in enumerate(("W_q", "W_k", "W_v")):
            state[b + f"attention.{name}.weight"] = w_qkv[:, k * C:(k + 1) * C].T               # (C, C) out x in
            state[b + f"attention.{name}.bias"] = b_qkv[k * C:(k + 1) * C]
        state[b + "attention.W_o.weight"] = tensors[h + "attn.c_proj.weight"].T
        state[b + "attention.W_o.bias"] = tensors[h + "attn.c_proj.bias"]
        state[b + "ffn.linear1.weight"] = tensors[h + "mlp.c_fc.weight"].T                      # (F, C)
        state[b + "ffn.linear1.bias"] = tensors[h + "mlp.c_fc.bias"]
        state[b + "ffn.linear2.weight"] = tensors[h + "mlp.c_proj.weight"].T                    # (C, F)
        state[b + "ffn.linear2.bias"] = tensors[h + "mlp.c_proj.bias"]
        for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            state[b + f"{ours}.weight"] = tensors[h + f"{hf}.weight"]
            state[b + f"{ours}.bias"] = tensors[h + f"{hf}.bias"]
        i += 1
    return state


def gpt2_tensors(model):
    """npgpt's parameters -> GPT-2's tensors ('transformer.' names; zero attention biases where npgpt has none)."""
    p = {name: backend.to_numpy(a) for name, a in model.state_dict().items()}
    zeros = np.zeros(model.d_model, dtype=p["token_embedding.weight"].dtype)
    out = {"wte.weight": p["token_embedding.weight"], "wpe.weight": p["position_embedding.weight"],
           "ln_f.weight": p["ln_f.weight"], "ln_f.bias": p["ln_f.bias"]}
    for i in range(model.num_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        out[h + "attn.c_attn.weight"] = np.concatenate([p[b + f"attention.{n}.weight"].T
                                                        for n in ("W_q", "W_k", "W_v")], axis=1)    # (C, 3C)
        out[h + "attn.c_attn.bias"] = np.concatenate([p.get(b + f"attention.{n}.bias", zeros)
                                                      for n in ("W_q", "W_k", "W_v")])
        out[h + "attn.c_proj.weight"] = p[b + "attention.W_o.weight"].T
        out[h + "attn.c_proj.bias"] = p.get(b + "attention.W_o.bias", zeros)
        out[h + "mlp.c_fc.weight"] = p[b + "ffn.linear1.weight"].T
        out[h + "mlp.c_fc.bias"] = p[b + "ffn.linear1.bias"]
        out[h + "mlp.c_proj.weight"] = p[b + "ffn.linear2.weight"].T
        out[h + "mlp.c_proj.bias"] = p[b + "ffn.linear2.bias"]
        for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            out[h + f"{hf}.weight"], out[h + f"{hf}.bias"] = p[b + f"{ours}.weight"], p[b + f"{ours}.bias"]
    return {"transformer." + k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# Directories

def _weight_files(directory):
    """[(file, {tensor name: header entry}, data offset)] for model.safetensors or the shards of its index."""
    single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, INDEX)
    if os.path.exists(single):
        entries, start = read_safetensors_header(single)
        return [(single, entries, start)]
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PretrainedError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
        files = []
        for shard in shards:
            path = os.path.join(directory, shard)
            if not os.path.exists(path):
                raise PretrainedError(f"{index}: names the shard {shard}, which is not in {directory}")
            entries, start = read_safetensors_header(path)
            for name, file in weight_map.items():
                if file == shard and name not in entries:
                    raise PretrainedError(f"{path}: missing tensor {name} (the index puts it there)")
            files.append((path, {n: e for n, e in entries.items() if weight_map.get(n) == shard}, start))
        return files
    if any(os.path.exists(os.path.join(directory, f)) for f in ("pytorch_model.bin", "tf_model.h5")):
        raise PretrainedError(f"{directory}: only pytorch_model.bin (pickle, which npgpt never loads); convert it "
                              "with transformers: GPT2LMHeadModel.from_pretrained(d).save_pretrained(d) writes "
                              "model.safetensors")
    raise PretrainedError(f"{os.path.join(directory, WEIGHTS)}: no such file (and no {INDEX})")


def read_tensors(directory, kw):
    """GPT-2's tensors of `directory`, names without 'transformer.', every name and shape checked first."""
    shapes = expected_shapes(kw)
    config_path = os.path.join(directory, CONFIG)
    located, unknown = {}, []
    files = _weight_files(directory)
    for path, entries, start in files:
        for name, entry in entries.items():
            short = name[len("transformer."):] if name.startswith("transformer.") else name
            if short in shapes:
                located[short] = (path, entry, start)
            elif short == "lm_head.weight" or name == "lm_head.weight":
                if entry[1] != shapes["wte.weight"]:
                    raise PretrainedError(f"{path}: lm_head.weight has shape {entry[1]}, wte.weight "
                                          f"{shapes['wte.weight']}")
            elif not _is_buffer(short):
                unknown.append((path, name))
    if unknown:
        names = ", ".join(n for _, n in unknown[:3])
        raise PretrainedError(f"{unknown[0][0]}: unknown tensors {names}{' ...' if len(unknown) > 3 else ''} "
                              f"({len(unknown)} in all), which GPT2LMHeadModel does not have")
    where = files[0][0] if len(files) == 1 else os.path.join(directory, INDEX)
    for short, shape in shapes.items():
        if short not in located:
            raise PretrainedError(f"{where}: missing tensor {short} (config.json has n_layer {kw['num_layers']})")
        path, (code, found, _), _ = located[short]
        if found != shape:
            raise PretrainedError(f"{path}: {short} has shape {found}, but {config_path} implies {shape}")
        if code not in ("F64", "F32", "F16", "BF16"):
            raise PretrainedError(f"{path}: {short} is {code}, not a floating-point tensor")
    return {short: read_tensor(path, entry, start) for short, (path, entry, start) in located.items()}


def load_model(directory, dtype=None, dropout=None, cls=GPT):
    """A GPT holding the weights of a Hugging Face GPT-2 directory; float32 unless dtype says otherwise."""
    dtype = np.dtype(dtype or "float32")
    if dtype not in (np.float32, np.float64):
        raise PretrainedError(f"dtype {dtype} is not supported: use float32 or float64")
    kw = read_config(directory)
    if dropout is not None:
        kw["dropout"] = dropout
    tensors = read_tensors(directory, kw)
    model = cls(**kw)
    if dtype != np.float32:
        model.to(dtype)
    model.load_state_dict(npgpt_state(tensors, kw["d_model"]))
    return model


def save_model(model, directory):
    """Write `model` as a Hugging Face GPT-2 directory: config.json and model.safetensors (lm_head tied)."""
    if os.path.exists(os.path.join(directory, INDEX)):
        raise PretrainedError(f"{os.path.join(directory, INDEX)}: the directory holds a sharded checkpoint, which "
                              "would shadow the new one; choose an empty directory")
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, WEIGHTS), gpt2_tensors(model), {"format": "pt"})
    path = os.path.join(directory, CONFIG)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(gpt2_config(model), f, indent=2)
    os.replace(tmp, path)
    return directory


def load_weights(model, directory):
    """Copy the weights of a Hugging Face GPT-2 directory into `model`, a GPT of the same shape."""
    kw = read_config(directory)
    model.load_state_dict(npgpt_state(read_tensors(directory, kw), kw["d_model"]))
    return model


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning: python -m npgpt.train --init-from DIR

_SHAPE_FIELDS = ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len")
# The learning rate of nanoGPT's GPT-2 fine-tuning config, used with --init-from unless --lr is given (and
# --min-lr a tenth of it): the default 1e-3 suits a model trained from scratch and wrecks pretrained weights.
FINE_TUNE_LR = 3e-5


def init_from_config(config, given=()):
    """The training config with the shape of the model in config.init_from (from its config.json) and the
    bpe tokenizer; a shape flag given on the command line that contradicts the directory is an error."""
    kw = read_config(config.init_from)
    has = [os.path.exists(os.path.join(config.init_from, f)) for f in ("vocab.json", "merges.txt", "tokenizer.json")]
    if not (has[0] and has[1] or has[2]):
        raise PretrainedError(f"{config.init_from}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json); "
                              "--init-from fine-tunes a model together with its tokenizer")
    shape = dict({name: kw[name] for name in _SHAPE_FIELDS}, tokenizer="bpe")
    for name, value in shape.items():
        if name in given and getattr(config, name) != value:
            raise PretrainedError(f"--{name.replace('_', '-')} {getattr(config, name)} contradicts "
                                  f"{os.path.join(config.init_from, CONFIG)} ({name} {value}); drop the flag, "
                                  "the model's shape comes from --init-from")
    values = dict(config.to_dict(), **shape)
    if "seq_len" not in given:
        values["seq_len"] = min(config.seq_len, kw["max_seq_len"])
    if "lr" not in given:                              # a pretrained model wants small steps
        values["lr"] = FINE_TUNE_LR
    if "min_lr" not in given:
        values["min_lr"] = values["lr"] / 10
    return type(config)(**values)


def run_model_kwargs(config, vocab_size, saved_model_config=None):
    """GPT's keyword arguments for a training run: config.model_kwargs, plus GPT-2's options (attention
    biases, tanh GELU, its epsilon) when the run starts from a Hugging Face directory; a resumed run takes
    those from its checkpoint's model_config, so the directory is no longer needed."""
    kwargs = config.model_kwargs(vocab_size)
    if getattr(config, "init_from", ""):
        options = saved_model_config if saved_model_config is not None else read_config(config.init_from)
        if options["vocab_size"] != vocab_size:
            raise PretrainedError(f"{config.init_from}: the tokenizer has {vocab_size:,} tokens and the model "
                                  f"{options['vocab_size']:,}; npgpt fine-tunes only a model whose vocabulary is "
                                  "its tokenizer's")
        kwargs.update({k: options[k] for k in ("attention_bias", "gelu_approximate", "layer_norm_eps")})
    return kwargs


def load_pretrained(directory, dtype=None):
    """(model, tokenizer) from a Hugging Face GPT-2 directory that holds its tokenizer files too."""
    model = load_model(directory, dtype)
    tokenizer = BPETokenizer.from_pretrained(directory)
    if tokenizer.vocab_size > model.vocab_size:
        raise TokenizerError(f"{directory}: the tokenizer has {tokenizer.vocab_size:,} tokens, the model only "
                             f"{model.vocab_size:,} (config.json vocab_size)")
    return model, tokenizer


def _from_pretrained(cls, path, dtype=None):
    """A GPT from a Hugging Face GPT-2 directory (config.json + model.safetensors, or a sharded index).
    dtype: None or 'float32' (the default), or 'float64' for parity checks."""
    return load_model(path, dtype, cls=cls)


def _save_pretrained(self, path):
    """Write this GPT as a Hugging Face GPT-2 directory that transformers.GPT2LMHeadModel loads."""
    return save_model(self, path)


GPT.from_pretrained = classmethod(_from_pretrained)
GPT.save_pretrained = _save_pretrained

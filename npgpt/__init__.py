"""npgpt: a GPT language model built from scratch on NumPy, with its own reverse-mode autograd.

    import npgpt
    x = npgpt.tensor([[1.0, 2.0]], requires_grad=True)
    y = (x * x).sum()
    y.backward()            # x.grad == [[2., 4.]]

Three layers, in reading order:

    the textbook    npgpt/backend.py -> engine.py -> functional.py -> gradcheck.py -> nn.py -> optim.py
                    -> model.py -> generate.py: the plain maths, one path per op
    the fast paths  npgpt/fast/: faster bodies for some ops, registered with the dispatcher (engine.py)
    the program     npgpt/program/: training, sampling, checkpoints, data, tokenizers, learner tools;
                    python -m npgpt.train, .sample, .proof, .viz
"""

from . import backend
from . import functional
from . import nn
from . import optim
from .backend import manual_seed, set_device, get_device
from .gradcheck import GradcheckError, gradcheck
from .engine import Tensor, is_grad_enabled, no_grad, tensor
from . import fast      # registers the fast paths with the dispatcher (NPGPT_FAST=0: none run)

__version__ = "0.1.0"


def __getattr__(name):
    # GPT is imported on first use, so that `python -m npgpt.model` runs model.py only once. Importing
    # program/hf.py attaches GPT.from_pretrained and GPT.save_pretrained (Hugging Face directories).
    if name == "GPT":
        from .program import hf
        return hf.GPT
    if name == "tokenizer":                 # npgpt.tokenizer.BPETokenizer, npgpt.tokenizer.CharTokenizer
        from .program import tokenizer
        return tokenizer
    raise AttributeError(f"module 'npgpt' has no attribute {name!r}")

__all__ = ["Tensor", "tensor", "no_grad", "is_grad_enabled", "gradcheck", "GradcheckError", "GPT",
           "functional", "nn", "optim", "backend", "fast", "manual_seed", "set_device", "get_device"]

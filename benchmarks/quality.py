"""Time to quality: npgpt and the PyTorch reference trained for the same wall-clock budget.

Both train the `shakespeare-char` preset on the bundled corpus with the same data order (the same seeded
batch generator), the same AdamW settings, learning-rate schedule and gradient clipping, each in its own
process with the same threads, one after the other. At the end of the budget each reports its validation loss
over the same fixed validation batches.

    python -m benchmarks.quality --impl npgpt --budget 120     (the suite runs both)
"""

import argparse
import json
import math
import sys
import time

import numpy as np


def _setup(device):
    from npgpt.program.config import PRESETS, TrainConfig
    from npgpt.program.train import Run
    config = TrainConfig(**dict(PRESETS["shakespeare-char"], preset="shakespeare-char", device=device,
                                out_dir="unused", sample_tokens=0))
    return config, Run(config)


def train_npgpt(budget, device):
    from npgpt import backend
    from npgpt.program.train import estimate_loss
    config, run = _setup(device)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < budget and steps < config.max_iters:
        for group in run.optimizer.param_groups:
            group["lr"] = run.lr_at(steps)
        run.train_step(run.next_micro_batches())
        backend.synchronize()
        steps += 1
    elapsed = time.perf_counter() - start
    return steps, elapsed, estimate_loss(run.model, run.val_tokens, config, config.seed + 1)


def train_torch(budget, device, threads):
    import torch
    from benchmarks.reference import GPT
    from npgpt.program.data import get_batch
    torch.set_num_threads(threads)
    config, run = _setup("cpu")       # the same tokens, split and batch generator as npgpt's run
    dev = "cuda" if device == "gpu" else "cpu"
    torch.manual_seed(config.seed)
    model = GPT(**config.model_kwargs(run.tokenizer.vocab_size)).to(dev)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=config.lr, betas=(config.beta1, config.beta2))
    F = torch.nn.functional

    def loss_of(inputs, targets):
        logits = model(torch.from_numpy(inputs).to(dev))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).to(dev).reshape(-1))

    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < budget and steps < config.max_iters:
        for group in opt.param_groups:
            group["lr"] = run.lr_at(steps)
        opt.zero_grad()
        for inputs, targets in run.next_micro_batches():
            (loss_of(inputs, targets) / config.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
        steps += 1
    elapsed = time.perf_counter() - start
    model.eval()
    rng = np.random.default_rng(config.seed + 1)
    losses = []
    with torch.no_grad():
        for _ in range(config.eval_iters):
            losses.append(loss_of(*get_batch(run.val_tokens, config.batch_size, config.seq_len, rng)).item())
    return steps, elapsed, sum(losses) / len(losses)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("npgpt", "torch"), required=True)
    p.add_argument("--budget", type=float, default=120.0, help="wall-clock seconds of training")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.impl == "npgpt":
        steps, elapsed, val = train_npgpt(args.budget, args.device)
    else:
        steps, elapsed, val = train_torch(args.budget, args.device, args.threads)
    print(json.dumps({"impl": args.impl, "steps": steps, "seconds": elapsed, "val_loss": val,
                      "finite": math.isfinite(val)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

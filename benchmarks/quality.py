"""Time to quality: npgpt and the PyTorch reference trained for the same wall-clock budget.

Both train the `shakespeare-char` preset on the bundled corpus with the same data order (the same seeded
batch generator), the same AdamW settings, learning-rate schedule and gradient clipping, each in its own
process with the same threads, one after the other; PyTorch's model uses F.scaled_dot_product_attention.
Every EVAL_EVERY steps each measures its validation loss over the same fixed validation batches (the clock
stops meanwhile), and records the training time at which the loss first reached TARGET; it stops there, at
the budget, or at the preset's last step, and reports its final validation loss.

    python -m benchmarks.quality --impl npgpt --budget 120     (the suite runs both)
"""

import argparse
import json
import math
import sys
import time

import numpy as np

TARGET = 1.88          # nanoGPT's reported validation loss for this preset
EVAL_EVERY = 100


def _setup(device):
    from npgpt.program.config import PRESETS, TrainConfig
    from npgpt.program.train import Run
    config = TrainConfig(**dict(PRESETS["shakespeare-char"], preset="shakespeare-char", device=device,
                                out_dir="unused", sample_tokens=0))
    return config, Run(config)


def _train(step, evaluate, budget, max_iters):
    """(steps, training seconds, final validation loss, seconds to reach TARGET or None)."""
    elapsed, steps, reached, val = 0.0, 0, None, None
    while elapsed < budget and steps < max_iters:
        start = time.perf_counter()
        step(steps)
        elapsed += time.perf_counter() - start
        steps += 1
        if steps % EVAL_EVERY == 0 or steps == max_iters:
            val = evaluate()
            if reached is None and val <= TARGET:
                reached = elapsed
                break
    if val is None or steps % EVAL_EVERY:
        val = evaluate()
    return steps, elapsed, val, reached


def train_npgpt(budget, device):
    from npgpt import backend
    from npgpt.program.train import estimate_loss
    config, run = _setup(device)

    def step(i):
        for group in run.optimizer.param_groups:
            group["lr"] = run.lr_at(i)
        run.train_step(run.next_micro_batches())
        backend.synchronize()
    return _train(step, lambda: estimate_loss(run.model, run.val_tokens, config, config.seed + 1), budget,
                  config.max_iters)


def train_torch(budget, device, threads):
    import torch
    from benchmarks.reference import GPT
    from npgpt.program.data import get_batch
    torch.set_num_threads(threads)
    config, run = _setup("cpu")       # the same tokens, split and batch generator as npgpt's run
    dev = "cuda" if device == "gpu" else "cpu"
    torch.manual_seed(config.seed)
    model = GPT(**config.model_kwargs(run.tokenizer.vocab_size), attention="sdpa").to(dev)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=config.lr, betas=(config.beta1, config.beta2))
    F = torch.nn.functional

    def loss_of(inputs, targets):
        logits = model(torch.from_numpy(inputs).to(dev))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).to(dev).reshape(-1))

    def step(i):
        for group in opt.param_groups:
            group["lr"] = run.lr_at(i)
        opt.zero_grad()
        for inputs, targets in run.next_micro_batches():
            (loss_of(inputs, targets) / config.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    def evaluate():
        model.eval()
        rng = np.random.default_rng(config.seed + 1)
        losses = []
        with torch.no_grad():
            for _ in range(config.eval_iters):
                losses.append(loss_of(*get_batch(run.val_tokens, config.batch_size, config.seq_len, rng)).item())
        model.train()
        return sum(losses) / len(losses)
    return _train(step, evaluate, budget, config.max_iters)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("npgpt", "torch"), required=True)
    p.add_argument("--budget", type=float, default=120.0, help="wall-clock seconds of training")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.impl == "npgpt":
        steps, elapsed, val, reached = train_npgpt(args.budget, args.device)
    else:
        steps, elapsed, val, reached = train_torch(args.budget, args.device, args.threads)
    print(json.dumps({"impl": args.impl, "steps": steps, "seconds": elapsed, "val_loss": val,
                      "seconds_to_target": reached, "target": TARGET, "finite": math.isfinite(val)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CUDA graphs: the whole training step recorded once on the GPU, then replayed with one launch per step.

A small model's step on a GPU is hundreds of tiny kernels, and launching each from Python costs more than
running it. CUDA stream capture records every kernel the step launches into a graph; replaying the graph
launches them all at once, with no Python in between. What changes from step to step has to live in device
memory the graph reads: the batch (copied into fixed buffers before each replay), the learning rate and
AdamW's bias corrections (``AdamW.advance_for_replay``), and the dropout generator's state (which CuPy keeps
on the device). Everything the graph allocates comes from a memory pool of its own, so no other code can be
handed memory that a replay will write.

The first two steps run eagerly (they compile the kernels and fill the memory pools); the third is recorded
and replayed, and every later step is a replay. If recording fails, training carries on eagerly.
"""

import warnings

import numpy as np

from . import backend


class CudaGraphStep:
    """train_step(model, optimizer, micro_batches, grad_clip) as a replayable CUDA graph (fixed batch shape)."""

    eager_steps = 2

    def __init__(self, step_fn, model, optimizer, grad_clip):
        self.cp = backend.module_for("gpu")
        self.step_fn, self.model, self.optimizer, self.grad_clip = step_fn, model, optimizer, grad_clip
        self.stream = self.cp.cuda.Stream(non_blocking=True)
        self.pool = self.cp.cuda.MemoryPool()
        self.graph, self.loss, self.buffers, self.replays = None, None, None, 0
        self.steps, self.failed = 0, None

    def _check(self, micro_batches):
        vocab = self.model.vocab_size
        for inputs, targets in micro_batches:
            for ids in (inputs, targets):
                if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                    raise IndexError(f"token ids must lie in [0, {vocab}); check the tokenizer's vocabulary size")

    def __call__(self, micro_batches):
        micro_batches = [(np.asarray(x), np.asarray(y)) for x, y in micro_batches]
        self._check(micro_batches)
        shapes = [(x.shape, y.shape) for x, y in micro_batches]
        if self.failed or self.steps < self.eager_steps or (self.buffers is not None and shapes != [
                (x.shape, y.shape) for x, y in self.buffers]):
            self.steps += 1
            return self.step_fn(self.model, self.optimizer, micro_batches, self.grad_clip)
        current = self.cp.cuda.get_current_stream()
        self.stream.wait_event(current.record())        # the graph starts after earlier work ...
        with self.stream:
            if self.graph is None:
                self._record(micro_batches)
            else:
                self.optimizer.advance_for_replay()
            if self.graph is not None:
                for (x, y), (x_buf, y_buf) in zip(micro_batches, self.buffers):
                    x_buf.set(x, stream=self.stream)
                    y_buf.set(y, stream=self.stream)
                self.graph.launch(self.stream)
                self.replays += 1
        current.wait_event(self.stream.record())        # ... and later work waits for the graph
        self.steps += 1
        if self.graph is None:                          # recording failed: this step runs eagerly
            return self.step_fn(self.model, self.optimizer, micro_batches, self.grad_clip)
        return self.loss.copy()                         # the next replay overwrites self.loss

    def _record(self, micro_batches):
        cp = self.cp
        self.buffers = [(cp.asarray(x), cp.asarray(y)) for x, y in micro_batches]
        self.stream.synchronize()
        steps_before = {key: state["step"] for key, state in self.optimizer.state.items()}
        grads_before = [p.grad for p in self.model.parameters()]
        try:
            with cp.cuda.using_allocator(self.pool.malloc):
                self.stream.begin_capture(cp.cuda.runtime.streamCaptureModeRelaxed)
                try:
                    self.loss = self.step_fn(self.model, self.optimizer, self.buffers, self.grad_clip)
                finally:
                    graph = self.stream.end_capture()
            self.graph = graph
            # recording ran step() on the host once (it counted the step); its settings go to the device now
            self.optimizer.advance_for_replay(count=False)
        except Exception as exc:   # an op that cannot be recorded: stay eager (correct, only slower)
            self.failed = f"{type(exc).__name__}: {exc}"
            self.graph = None
            for key, step in steps_before.items():
                self.optimizer.state[key]["step"] = step
            for p, grad in zip(self.model.parameters(), grads_before):
                p.grad = grad
            warnings.warn(f"CUDA graph recording failed ({self.failed}); training continues without it")

"""The GPU training step recorded once as a CUDA graph, then replayed: one launch a step instead of hundreds.

At the tutorial's size a training step is several hundred small kernels, and Python takes longer to launch
them than the GPU takes to run them. CuPy's stream capture records the kernels that one step launches, with
their arguments and buffers, into a CUDA graph; replaying the graph launches all of them at once, without
Python. Every matrix product goes through ``cublas.py`` so that it can be recorded too.

A replay repeats the recording exactly, so whatever must change from step to step lives in device memory
that the recorded kernels read, and is written before each replay:

    the batch              copied into the same input buffers (after a check on the host)
    learning rate, Adam's bias corrections    a small array AdamW's kernels read (ops.AdamWSchedule)
    dropout masks          hashed from (seed, replay counter, index); the graph's last kernel counts the replay

Memory: arrays made while recording come from a pool of the graph's own, so nothing outside the graph ever
reuses a buffer the graph writes. The parameters, the optimizer's moments and the input buffers were made
before recording and are shared with eager code.

The first call with a batch shape runs the step eagerly (compiling the kernels and creating the optimizer's
moments), the second records and launches, later ones replay. If recording fails, ``fallback_reason`` says
why and every later step runs eagerly: the results are the same, only slower.

Shapes: micro-batches [(inputs, targets)] of (B, T) ids, as ``train.train_step`` takes them.

Next to read: ``npgpt/program/train.py``, which uses this on the GPU.
"""

import numpy as np

from ... import backend
from . import kernels, ops
from .capture import copy_into


class GraphStep:
    """step = GraphStep(step_fn, optimizer, vocab_size); loss = step(micro_batches), a device array.

    `step_fn(micro_batches)` runs one whole training step (zero_grad, forward, backward, optimizer step) and
    returns its loss as a device array; its device work may depend only on the batch arrays it is given and
    on what the optimizer and the dropout kernels read from device memory.
    """

    def __init__(self, step_fn, optimizer, vocab_size):
        self.step_fn, self.optimizer, self.vocab_size = step_fn, optimizer, vocab_size
        self.fallback_reason = None
        self.replays = 0
        self._shape_key, self._graph, self._pool, self._buffers, self._loss = None, None, None, None, None
        self._eager_steps = 0
        self._stream = None

    def __call__(self, micro_batches):
        for inputs, targets in micro_batches:
            self._check_ids(inputs)
            self._check_ids(targets)
        if self.fallback_reason is not None:
            return self.step_fn(micro_batches)
        key = tuple((x.shape, y.shape, np.dtype(x.dtype).str, np.dtype(y.dtype).str) for x, y in micro_batches)
        if key != self._shape_key:          # a new batch shape: warm up and record again
            self._start_over(key, micro_batches)
        if self._eager_steps < 1:
            self._eager_steps += 1
            return self.step_fn(micro_batches)
        with self._stream:
            for (inputs, targets), (input_buffer, target_buffer) in zip(micro_batches, self._buffers):
                copy_into(input_buffer, inputs)
                copy_into(target_buffer, targets)
            if self._graph is None:
                try:
                    self._record()
                except Exception as exc:            # anything that cannot be recorded: stay eager
                    self._give_up(f"{type(exc).__name__}: {exc}")
                    return self.step_fn(micro_batches)
                ops.adamw_schedule.replay_step(count=False)    # step() counted while recording
            else:
                ops.adamw_schedule.replay_step()
            self._graph.launch(self._stream)
            self.replays += 1
            return self._loss.copy()        # the graph rewrites its own loss buffer at the next replay

    def pool_bytes(self):
        """Device memory held by the graph's own pool (its activations and gradients), in bytes."""
        return self._pool.total_bytes() if self._pool is not None else 0

    def _check_ids(self, ids):
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"GraphStep: batches must hold integer token ids, not {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise IndexError(f"GraphStep: token ids must lie in [0, {self.vocab_size}), found "
                             f"{ids.min()}..{ids.max()}; check the tokenizer's vocabulary size")

    def _start_over(self, key, micro_batches):
        cp = backend.module_for("gpu")
        self._shape_key, self._graph, self._pool, self._loss = key, None, None, None
        self._eager_steps = 0
        # A blocking stream: work on the default stream (evaluation, reading the loss) waits for it
        self._stream = self._stream or cp.cuda.Stream()
        self._buffers = [(cp.empty(np.shape(x), dtype=np.asarray(x).dtype),
                          cp.empty(np.shape(y), dtype=np.asarray(y).dtype)) for x, y in micro_batches]

    def _record(self):
        cp = backend.module_for("gpu")
        counted = [(state, state["step"]) for state in self.optimizer.state.values()]
        kernels.replay_counter()                     # made outside the graph's pool: it outlives the graph
        pool = cp.cuda.MemoryPool()
        try:
            with cp.cuda.using_allocator(pool.malloc):
                self._stream.begin_capture()
                try:
                    loss = self.step_fn(self._buffers)
                    kernels.advance_replay_counter()
                except BaseException:
                    try:
                        self._stream.end_capture()
                    except Exception:
                        pass
                    raise
                graph = self._stream.end_capture()
        except BaseException:
            for state, step in counted:              # the recording updated nothing: undo its step count
                state["step"] = step
            raise
        self._graph, self._pool, self._loss = graph, pool, loss
        # the eager warm-up's temporaries are not needed again: give their memory back
        cp.get_default_memory_pool().free_all_blocks()

    def _give_up(self, reason):
        self.fallback_reason = reason
        self._graph, self._pool, self._loss = None, None, None
        print(f"npgpt: the training step cannot be recorded as a CUDA graph ({reason}); it runs eagerly",
              flush=True)

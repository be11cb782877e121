"""Data parallelism across processes: MPI (mpi4py) for launching and the CPU, NCCL (CuPy) between GPUs.

    mpiexec -n 2 python -m npgpt.train --grad-accum 1       # one model trained by two processes
    mpiexec -n 2 python -m npgpt.train --check-replicas     # ... checking after every step that they agree
    mpiexec -hosts node1,node2 -n 4 python -m npgpt.train   # four processes on two machines

A plain ``python -m npgpt.train`` never imports this module's MPI side: ``launched_world()`` looks at the
variables that mpiexec sets (PMI_RANK and PMI_SIZE for MPICH, OMPI_COMM_WORLD_SIZE for Open MPI, ...) and
returns None when there are none.

Every rank (process) holds the whole model. One optimizer step over N ranks, each with grad_accum = k:

    1. every rank draws the step's N*k micro-batches from the same data generator (the generator stays
       identical everywhere) and keeps micro-batches r*k .. r*k + k - 1, those that one process with
       --grad-accum N*k would use in the same positions;
    2. forward and backward on its k micro-batches, each loss scaled by 1/(N*k);
    3. the gradients are summed across ranks by one Allreduce of one flat buffer, which also carries the
       scaled losses and each rank's Ctrl-C flag:  g = sum_r sum_i grad(loss_ri / (N*k)), the gradient of the
       mean loss over all N*k micro-batches;
    4. every rank clips and updates with the same numbers, so the parameters stay identical (they start
       identical too: rank 0's are broadcast). --check-replicas compares a checksum of parameters, AdamW
       moments and data generator after every step.

So ``mpiexec -n 2 ... --grad-accum 1`` computes the same step as one process with ``--grad-accum 2`` (the
sums are grouped differently, so equal to rounding). Dropout masks come from a generator seeded by
(seed, rank, step): fixed, different on each rank, and the same again on a resumed run.

Rank 0 prints, writes metrics.jsonl and the checkpoints; the evaluation batches are shared among the ranks
and their losses summed. A checkpoint records the world size, so a run resumed at another world size keeps
the global batch (world size x grad_accum micro-batches a step) unless --grad-accum is given.

Faults. A collective that would wait forever is a nonblocking one polled against --dist-timeout. A rank
that raises reports on a separate communicator: when every rank fails together (a bad flag, a NaN loss)
rank 0 prints the one message and all exit with its code; otherwise the failing rank prints one line
naming itself and leaves with os._exit, and mpiexec ends the others (an MPI program that returns normally
would wait for its peers in MPI_Finalize). Checkpoints are written atomically, so the last good one stays.

--zero-stage 1 (ZeRO stage 1): AdamW's moments are split across the ranks, each rank updating its block of the
parameters and an Allgather sharing the result (ShardedAdamW, at the end of this file).

GPUs: one rank per GPU (chosen by the local rank). ``--dist-backend nccl`` sums the device buffers with
NCCL (``cupy.cuda.nccl``) on the current stream, the NCCL id broadcast over MPI; without it, the flat
buffer is copied to the host and summed by MPI. Under mpiexec the step is not recorded as a CUDA graph.

Shapes: the flat buffer is (P + 2,): every gradient raveled in parameter order, the loss, the stop flag.

Next to read: ``npgpt/program/train.py``, which calls ``launched_world`` and the World's methods.
"""

import hashlib
import json
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager

import numpy as np

from .. import backend
from ..fast.cpu.threads import blas_threads
from ..optim import adamw_update

# Variables that the common launchers set in every process they start.
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCHER_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
INSTALL_HINT = "pip install 'npgpt[mpi]'"
AGREE_SECONDS = 2.0      # how long a failing rank waits to learn whether every rank failed the same way
FAULT_KINDS = ("raise", "kill", "hang", "perturb")


class DistError(RuntimeError):
    """A problem with a distributed run that the user can fix (the message says how). Exit code 2."""


class InjectedFault(RuntimeError):
    """The failure that --inject-fault asks for (a debugging aid: it shows how the run stops)."""


def launched_by_mpiexec(environ=None):
    """True when this process was started by mpiexec / mpirun / srun (their variables are set)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCHER_SIZE_VARIABLES + LAUNCHER_RANK_VARIABLES)


def _rank_from_environment():
    for name in LAUNCHER_RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def launched_world():
    """The World of this process when mpiexec started it, else None (and mpi4py is never imported)."""
    if not launched_by_mpiexec():
        return None
    try:
        import mpi4py
        mpi4py.rc.thread_level = "funneled"      # only the main thread calls MPI (the workers compute)
        from mpi4py import MPI
    except ImportError as exc:
        if _rank_from_environment() != 0:        # one message for the whole run, from rank 0
            raise SystemExit(2) from None
        raise DistError(f"started by mpiexec, but mpi4py is not installed ({exc}); {INSTALL_HINT}") from None
    return World(MPI)


def parse_fault(text):
    """'RANK:STEP[:KIND]' -> (rank, step, kind), or None for ''. KIND: raise (default), kill, hang, perturb."""
    if not text:
        return None
    parts = text.split(":")
    try:
        rank, step = int(parts[0]), int(parts[1])
        kind = parts[2] if len(parts) > 2 else "raise"
    except (ValueError, IndexError):
        raise DistError(f"--inject-fault {text!r}: give RANK:STEP or RANK:STEP:KIND, e.g. 1:3 or 1:3:kill") \
            from None
    if len(parts) > 3 or kind not in FAULT_KINDS or rank < 0 or step < 1:
        raise DistError(f"--inject-fault {text!r}: RANK >= 0, STEP >= 1, KIND one of {', '.join(FAULT_KINDS)}")
    return rank, step, kind


def resumed_grad_accum(saved_grad_accum, saved_world_size, world_size):
    """grad_accum that keeps a checkpoint's global batch (world size x grad_accum micro-batches a step)."""
    total = saved_grad_accum * saved_world_size
    if total % world_size:
        raise DistError(f"--resume: the checkpoint took {total} micro-batches a step ({saved_world_size} "
                        f"rank(s) x --grad-accum {saved_grad_accum}), which {world_size} rank(s) cannot share "
                        "evenly; pass --grad-accum to choose a new global batch")
    return total // world_size


def _megabytes(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _checksum(arrays):
    """A 64-bit digest of the arrays' bytes (bitwise: replicas must agree exactly)."""
    digest = hashlib.blake2b(digest_size=8)
    for a in arrays:
        digest.update(np.ascontiguousarray(backend.to_numpy(a)).view(np.uint8).reshape(-1))
    return int(np.frombuffer(digest.digest(), dtype=np.uint64)[0])


class World:
    """This process's place among the ranks, and the collectives a training step needs."""

    def __init__(self, MPI):
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.fault_comm = self.comm.Dup()        # failures are agreed here, apart from the step's collectives
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        # Each rank gets its share of this machine's cores, for its data-parallel threads and for BLAS.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads_per_rank = max(1, min(4, cores // self.local_size))
        self._blas = blas_threads(self.threads_per_rank)
        self._blas.__enter__()                   # for the life of the process
        self.timeout = 600.0
        self.transport = "mpi"
        self.fault = None
        self.zero_stage = 0
        self.moment_bytes = None                 # with ZeRO-1: (this rank's AdamW moments, unsharded), bytes
        self.step = 0                            # the step being computed, counted from 1
        self.stop_flag = None                    # the loop's Ctrl-C flag (its `requested`), read every step
        self.stopping = False                    # True once any rank asked to stop: all stop after this step
        self.allreduce_seconds = 0.0             # time spent summing gradients (packing included)
        self._nccl = None
        self._buffers = {}
        self.stderr = sys.stderr
        if self.rank != 0:                       # one voice: rank 0's
            sys.stdout = open(os.devnull, "w")
            sys.stderr = open(os.devnull, "w")

    # ---- setup ----------------------------------------------------------------------------------------
    def configure(self, config):
        """Take the run's distributed settings (before the device is chosen: a GPU per local rank)."""
        self.timeout = float(config.dist_timeout)
        if not self.timeout > 0:
            raise DistError(f"--dist-timeout must be positive, got {config.dist_timeout}")
        self.fault = parse_fault(config.inject_fault)
        self.transport = config.dist_backend
        self.zero_stage = config.zero_stage
        if self.zero_stage not in (0, 1):
            raise DistError(f"--zero-stage must be 0 or 1 (AdamW's moments sharded), got {config.zero_stage}")
        if self.transport == "nccl" and config.device == "cpu":
            raise DistError("--dist-backend nccl sums GPU buffers; use --device gpu, or --dist-backend mpi on "
                            "the CPU")
        if config.device != "cpu":
            self._choose_gpu()

    def _choose_gpu(self):
        """One GPU per rank on each machine: the local rank picks it (before anything is allocated)."""
        try:
            import cupy
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:                         # no CuPy or no GPU: --device says what happens next
            return
        if self.transport == "nccl" and count < self.local_size:
            raise DistError(f"--dist-backend nccl needs a GPU per rank, and this machine has {count} GPU(s) for "
                            f"{self.local_size} ranks; start fewer ranks per machine, or use --dist-backend mpi")
        if count:
            cupy.cuda.Device(self.local_rank % count).use()

    def describe(self):
        where = f"{self.size} rank" + ("s" if self.size != 1 else "")
        if self.local_size != self.size:
            where += f" ({self.local_size} on this machine)"
        text = f"data parallel over {where}, gradients summed by {self.transport.upper()}"
        if self.moment_bytes is not None:
            mine, whole = self.moment_bytes
            text += f"; ZeRO-1: each rank keeps {_megabytes(mine)} of AdamW moments instead of {_megabytes(whole)}"
        return text

    # ---- waiting with a bound -------------------------------------------------------------------------
    def _wait(self, request, what):
        """Complete a nonblocking collective, or raise DistError after --dist-timeout seconds."""
        deadline = time.monotonic() + self.timeout
        polls = 0
        while not request.Test():
            polls += 1
            if polls > 2000:                      # a slow peer: poll gently, leave the core to the others
                time.sleep(0.0005)
            if time.monotonic() > deadline:
                raise DistError(f"no answer from the other ranks for {self.timeout:.0f} s during {what}; "
                                "a rank is stuck or gone (its own error, if any, is above); "
                                "raise --dist-timeout if a step legitimately takes longer")

    def _allreduce(self, buffer, what):
        """Sum `buffer` (a NumPy array) over the ranks, in place."""
        if self.size > 1:
            self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM), what)

    def _broadcast(self, buffer, what):
        if self.size > 1:
            self._wait(self.comm.Ibcast(buffer, root=0), what)

    def _buffer(self, name, size, dtype, xp):
        key = (name, size, np.dtype(dtype), xp.__name__)
        if key not in self._buffers:
            self._buffers = {k: v for k, v in self._buffers.items() if k[0] != name}
            self._buffers[key] = xp.empty(size, dtype=dtype)
        return self._buffers[key]

    # ---- the step ---------------------------------------------------------------------------------------
    @contextmanager
    def stepping(self, step, seed):
        """Around one optimizer step (`step` counted from 1): this rank's dropout generator."""
        self.step = step
        if self.size == 1:                        # one rank: exactly a plain process
            yield
            return
        state = np.random.SeedSequence([seed, self.rank, step]).generate_state(1, np.uint64)[0]
        with backend.using_rng(backend.default_rng(int(state) >> 1)):
            yield

    def allreduce_gradients(self, params, loss):
        """Sum every parameter's .grad, the step's (scaled) loss and the stop flags over the ranks.

        One flat buffer, one collective. Returns the summed loss; sets self.stopping.
        """
        self._maybe_fault(params)
        started = time.perf_counter()
        xp = backend.get_array_module(params[0].data)
        total = sum(p.size for p in params)
        flat = self._buffer("grads", total + 2, params[0].dtype, xp)       # (P + 2,)
        offset = 0
        for p in params:
            if p.grad is None:
                flat[offset:offset + p.size] = 0
            else:
                flat[offset:offset + p.size] = p.grad.reshape(-1)
            offset += p.size
        flat[total] = loss
        flat[total + 1] = 1.0 if (self.stop_flag is not None and self.stop_flag.requested) else 0.0
        what = f"the gradient allreduce of step {self.step}"
        if self.transport == "nccl":
            self._nccl_allreduce(flat, what)
        elif xp is np:
            self._allreduce(flat, what)
        else:                                     # GPU buffers, MPI on the host
            host = backend.to_numpy(flat)
            self._allreduce(host, what)
            flat[...] = xp.asarray(host)
        offset = 0
        for p in params:
            summed = flat[offset:offset + p.size].reshape(p.shape)
            if p.grad is None:
                p.grad = summed.copy()
            else:
                p.grad[...] = summed
            offset += p.size
        self.stopping = bool(float(flat[total + 1]) > 0)
        loss = flat[total:total + 1].reshape(()).copy()
        self.allreduce_seconds += time.perf_counter() - started
        return loss

    def _maybe_fault(self, params):
        if self.fault is None:
            return
        rank, step, kind = self.fault
        if rank != self.rank or step != self.step:
            return
        if kind == "raise":
            raise InjectedFault(f"injected fault at step {step} (--inject-fault {rank}:{step})")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # dies as if the machine took the process away
        if kind == "hang":
            while True:
                time.sleep(3600)
        if kind == "perturb":                      # a replica that drifts: --check-replicas must notice
            params[0].data.reshape(-1)[0] += 1e-3

    def sum_over_ranks(self, value, what):
        """A float summed over the ranks (float64)."""
        buffer = np.array([value], dtype=np.float64)
        self._allreduce(buffer, what)
        return float(buffer[0])

    # ---- replicas -----------------------------------------------------------------------------------------
    def broadcast_parameters(self, model, optimizer):
        """Rank 0's parameters and AdamW moments to every rank: the replicas start identical."""
        arrays = [p.data for p in model.parameters()]
        for state in optimizer.state_dict()["exp_avg"] + optimizer.state_dict()["exp_avg_sq"]:
            if state is not None:
                arrays.append(state)
        if self.size == 1:
            return
        xp = backend.get_array_module(arrays[0])
        for dtype in sorted({a.dtype.str for a in arrays}):
            group = [a for a in arrays if a.dtype.str == dtype]
            flat = np.concatenate([backend.to_numpy(a).reshape(-1) for a in group])
            self._broadcast(flat, "the broadcast of rank 0's parameters")
            offset = 0
            for a in group:
                a[...] = xp.asarray(flat[offset:offset + a.size].reshape(a.shape))
                offset += a.size

    def check_replicas(self, model, optimizer, data_rng, step):
        """Compare checksums of the parameters, AdamW's moments and the data generator across ranks."""
        if isinstance(optimizer, ShardedAdamW):   # each rank holds other moments, by design
            moments, steps = [], [optimizer.steps]
        else:
            state = optimizer.state_dict()
            moments, steps = [a for a in state["exp_avg"] + state["exp_avg_sq"] if a is not None], state["step"]
        parts = {"parameters": [p.data for p in model.parameters()],
                 "AdamW moments": moments,
                 "data generator and step": [np.frombuffer(json.dumps(
                     [backend.rng_state(data_rng), steps, step], sort_keys=True).encode(), np.uint8)]}
        mine = np.array([_checksum(arrays) for arrays in parts.values()], dtype=np.uint64)
        everyone = np.empty((self.size, len(parts)), dtype=np.uint64)
        if self.size > 1:
            self._wait(self.comm.Iallgather(mine, everyone), f"the replica check after step {step}")
        else:
            everyone[0] = mine
        for r in range(1, self.size):
            for name, a, b in zip(parts, everyone[0], everyone[r]):
                if a != b:
                    raise DistError(f"replicas differ after step {step}: rank {r}'s {name} are not rank 0's "
                                    f"(checksum {b:016x} vs {a:016x}); the ranks must run the same command on "
                                    "the same data and checkpoint")

    # ---- ZeRO stage 1 --------------------------------------------------------------------------------------
    def shard_optimizer(self, optimizer):
        """--zero-stage 1: this rank's ShardedAdamW in place of `optimizer` (whose moments it slices), or
        `optimizer` itself."""
        if self.zero_stage != 1:
            return optimizer
        sharded = ShardedAdamW(optimizer, self)
        itemsize = np.dtype(sharded.exp_avg.dtype).itemsize
        self.moment_bytes = (2 * sharded.exp_avg.size * itemsize, 2 * sharded.total * itemsize)
        return sharded

    def optimizer_for_saving(self, optimizer):
        """What a checkpoint saves of `optimizer`: itself, or with ZeRO-1 the moments gathered on rank 0
        (every rank calls this; ranks other than 0 get None, as they write nothing)."""
        if not isinstance(optimizer, ShardedAdamW):
            return optimizer
        return optimizer.gathered()

    # ---- NCCL (GPUs) ----------------------------------------------------------------------------------------
    def _nccl_allreduce(self, flat, what):
        """Sum a CuPy buffer over the ranks with NCCL, on the current stream."""
        from cupy.cuda import nccl
        import cupy
        if self._nccl is None:
            # the id: 128 bytes (C chars, signed or not) as CuPy hands them out, sent as int16 to hold either
            uid = np.zeros(getattr(nccl, "NCCL_UNIQUE_ID_BYTES", 128), dtype=np.int16)
            if self.rank == 0:
                uid[...] = np.array(nccl.get_unique_id(), dtype=np.int16)
            self._broadcast(uid, "the broadcast of the NCCL id")
            self._nccl = nccl.NcclCommunicator(self.size, tuple(int(b) for b in uid), self.rank)
        kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
        stream = cupy.cuda.get_current_stream()
        self._nccl.allReduce(flat.data.ptr, flat.data.ptr, flat.size, kinds[flat.dtype], nccl.NCCL_SUM, stream.ptr)

    # ---- failures -------------------------------------------------------------------------------------------
    def _every_rank_failing(self):
        """True when every rank reaches this point within AGREE_SECONDS (the same error everywhere)."""
        if self.size == 1:
            return True
        request = self.fault_comm.Ibarrier()
        deadline = time.monotonic() + AGREE_SECONDS
        while not request.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def fail(self, exc, code, expected):
        """Stop this rank for `exc`. If every rank fails together, rank 0 prints the message and this returns
        `code`; otherwise this rank prints one line naming itself and ends the process (mpiexec then ends
        the others). `expected`: an error of the user's making (no traceback)."""
        message = " ".join(str(exc).split()) if expected or isinstance(exc, InjectedFault) \
            else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if self._every_rank_failing():
            if self.rank == 0:
                if not expected and not isinstance(exc, InjectedFault):
                    traceback.print_exception(type(exc), exc, exc.__traceback__, file=self.stderr)
                print(f"error: {message}", file=self.stderr, flush=True)
            return code
        if not expected and not isinstance(exc, InjectedFault):
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=self.stderr)
        print(f"error: rank {self.rank} of {self.size}: {message}", file=self.stderr, flush=True)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


class ShardedAdamW:
    """ZeRO stage 1: AdamW with its two moments split across the ranks, equal to the unsharded update.

    The parameters, in the optimizer's order, are laid end to end as one vector of P numbers, cut into N
    blocks of S = ceil(P / N); rank r keeps the moments m, v of block r only: 2 S numbers instead of 2 P.
    Each step (the gradients already summed, so whole on every rank, and clipped):

        update block r of the parameters with block r of the gradients and moments   (AdamW is elementwise)
        all-gather the N updated blocks into every rank's parameters

    AdamW acts on each number alone, so cutting it anywhere gives the unsharded result exactly. The summed
    gradient is kept whole (an allreduce rather than a reduce-scatter), which costs one more pass of P
    numbers but leaves clipping's global norm and the per-layer gradient statistics as they are.

    Shapes: exp_avg, exp_avg_sq (hi - lo,), this rank's block; the gather buffer (N * S,).
    """

    def __init__(self, optimizer, world):
        self.world = world
        self.inner = optimizer                   # its zero_grad, and its groups' settings (lr, betas, ...)
        self.param_groups = optimizer.param_groups
        entries = [(group, p) for group in self.param_groups for p in group["params"]]
        for _, p in entries:
            if not p.data.flags.c_contiguous:
                raise DistError("--zero-stage 1 needs contiguous parameters; run without it")
        self.entries = entries
        self.total = sum(p.size for _, p in entries)                           # P
        self.block = -(-self.total // world.size)                              # S
        self.lo = min(self.total, world.rank * self.block)
        self.hi = min(self.total, self.lo + self.block)
        # (group, param, start and end in the raveled param, start in this rank's block) where they overlap
        self.pieces = [piece for piece in self._all_pieces() if piece[3] > piece[2]]
        xp = backend.get_array_module(entries[0][1].data)
        dtype = entries[0][1].dtype
        self.exp_avg = xp.zeros(self.hi - self.lo, dtype=dtype)
        self.exp_avg_sq = xp.zeros(self.hi - self.lo, dtype=dtype)
        saved = optimizer.state_dict()           # a resumed run's moments: this rank's block of them
        self.steps = max(saved["step"]) if saved["step"] else 0
        for (group, p, a, b, at), m, v in zip(self._all_pieces(), saved["exp_avg"], saved["exp_avg_sq"]):
            if m is not None and a < b:
                self.exp_avg[at:at + b - a] = xp.asarray(m).reshape(-1)[a:b]
                self.exp_avg_sq[at:at + b - a] = xp.asarray(v).reshape(-1)[a:b]
        optimizer.state.clear()                  # the whole moments are no longer kept

    def _all_pieces(self):
        """For every parameter (in order): (group, param, a, b, at), a == b where it is outside this block."""
        offset = 0
        for group, p in self.entries:
            a, b = max(self.lo, offset), min(self.hi, offset + p.size)
            yield (group, p, a - offset, b - offset, a - self.lo) if a < b else (group, p, 0, 0, 0)
            offset += p.size

    def zero_grad(self):
        self.inner.zero_grad()

    def step(self):
        self.steps += 1
        for group, p, a, b, at in self.pieces:
            if p.grad is None:
                continue
            settings = (group["lr"], *group["betas"], group["eps"], group["weight_decay"], self.steps)
            adamw_update(p.data.reshape(-1)[a:b], p.grad.reshape(-1)[a:b],
                         self.exp_avg[at:at + b - a], self.exp_avg_sq[at:at + b - a], settings)
        self._gather_parameters()

    def _gather_parameters(self):
        xp = backend.get_array_module(self.entries[0][1].data)
        mine = np.zeros(self.block, dtype=self.exp_avg.dtype)                 # (S,), zero-padded
        for _, p, a, b, at in self.pieces:
            mine[at:at + b - a] = backend.to_numpy(p.data.reshape(-1)[a:b])
        everyone = np.empty(self.block * self.world.size, dtype=mine.dtype)   # (N * S,)
        world = self.world
        if world.size > 1:
            world._wait(world.comm.Iallgather(mine, everyone),
                        f"the parameter all-gather of step {world.step} (ZeRO-1)")
        else:
            everyone[:] = mine
        offset = 0
        for _, p in self.entries:
            p.data.reshape(-1)[...] = xp.asarray(everyone[offset:offset + p.size])
            offset += p.size

    def gathered(self):
        """Rank 0: an object whose state_dict() is the unsharded AdamW's (for a checkpoint); others: None."""
        world = self.world
        both = np.zeros((2, self.block), dtype=self.exp_avg.dtype)            # (2, S): m and v, zero-padded
        both[0, :self.hi - self.lo] = backend.to_numpy(self.exp_avg)
        both[1, :self.hi - self.lo] = backend.to_numpy(self.exp_avg_sq)
        everyone = np.empty((world.size, 2, self.block), dtype=both.dtype) if world.rank == 0 else None
        if world.size > 1:
            world._wait(world.comm.Igather(both, everyone, root=0), "the gather of AdamW's moments (ZeRO-1)")
        else:
            everyone[0] = both
        if world.rank != 0:
            return None
        m_all = everyone[:, 0, :].reshape(-1)[:self.total]                     # (P,)
        v_all = everyone[:, 1, :].reshape(-1)[:self.total]
        state = {"step": [], "exp_avg": [], "exp_avg_sq": [], "lr": [g["lr"] for g in self.param_groups]}
        offset = 0
        for _, p in self.entries:
            state["step"].append(self.steps)
            state["exp_avg"].append(m_all[offset:offset + p.size].reshape(p.shape) if self.steps else None)
            state["exp_avg_sq"].append(v_all[offset:offset + p.size].reshape(p.shape) if self.steps else None)
            offset += p.size
        return _SavedState(state)


class _SavedState:
    """An optimizer as a checkpoint sees it: a state_dict() and nothing else."""

    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state

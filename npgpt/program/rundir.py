"""The out dir of a training run: one run at a time, never mixed with another, its log in step with its checkpoint.

- ``lock``: a file holding the pid of the run that owns the directory, locked with flock(2) while it runs. The
  kernel drops the flock when its process dies however it dies (SIGKILL included), so a lock file whose flock
  is free is stale: the next run takes it over and says so. A second live run is refused, naming the pid.
- A directory that already holds a run (``ckpt.npz``, ``best.npz`` or ``metrics.jsonl``) is continued only with
  --resume, and deleted only with --overwrite, once the new run has been set up.
- ``metrics.jsonl`` holds one JSON object per logged step. On --resume the records after the checkpoint's step
  (logged, then lost with the process before the next save) are dropped, so no step appears twice.

Next to read: ``npgpt/program/checkpoint.py``.
"""

import json
import math
import os
import secrets
import socket

from .cli import os_error_fix

try:
    import fcntl
except ImportError:                     # not POSIX: the lock file alone (O_EXCL), without stale detection
    fcntl = None

RUN_FILES = ("ckpt.npz", "best.npz", "metrics.jsonl")
LOCK_NAME = "lock"


class RunDirError(RuntimeError):
    """The out dir cannot be used as asked; the message says why and what to do."""


class RunDirLock:
    """Hold --out-dir for this process: ``with RunDirLock(out_dir, log=print): ...``."""

    def __init__(self, out_dir, log=print):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.log = log
        self._fd = None
        self._created_dir = False

    def __enter__(self):
        if os.path.isfile(self.out_dir):
            raise RunDirError(f"--out-dir {self.out_dir} is a file; --out-dir takes a directory, where the run "
                              "keeps its checkpoints and log")
        try:
            if not os.path.isdir(self.out_dir):
                os.makedirs(self.out_dir)
                self._created_dir = True
            self._acquire()
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename and exc.filename != self.out_dir else ""
            raise RunDirError(f"cannot use --out-dir {self.out_dir} ({exc.strerror or exc}{where}); "
                              f"{os_error_fix(exc)}") from None
        remove_temporary_files(self.out_dir)
        return self

    def _acquire(self):
        if fcntl is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self._write_owner()
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise RunDirError(f"--out-dir {self.out_dir} is in use by another training run ({owner}); "
                                  "wait for it to finish, stop it, or choose another --out-dir") from None
            # the file may have been removed (and made anew) by its last owner between open and flock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_owner(fd)
        self._fd = fd
        if stale:
            self.log(f"note: taking over the lock of a run that is no longer running ({stale}) in "
                     f"{self.out_dir}")
        self._write_owner()

    def _write_owner(self):
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        os.fsync(self._fd)

    def __exit__(self, *exc):
        if self._fd is not None:
            try:
                os.remove(self.path)          # removed while still locked: no one can take a dying lock
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._created_dir:
            try:
                os.rmdir(self.out_dir)        # a run that stopped before writing anything leaves no directory
            except OSError:
                pass
        return False


def _read_owner(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def remove_temporary_files(out_dir):
    """Delete the temporary files a killed writer left (``ckpt.npz.tmp-<pid>-<hex>``); the lock makes it safe."""
    for name in os.listdir(out_dir):
        if any(name.startswith(f"{base}.tmp") for base in RUN_FILES):
            try:
                os.remove(os.path.join(out_dir, name))
            except OSError:
                pass


def previous_run(out_dir):
    """The files of an earlier run in out_dir, e.g. ['ckpt.npz', 'metrics.jsonl'] (empty: a fresh directory)."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]


def clear_previous_run(out_dir):
    """--overwrite: delete the earlier run's files (the new run is set up and about to write its own)."""
    removed = previous_run(out_dir)
    for name in removed:
        os.remove(os.path.join(out_dir, name))
    return removed


def _finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def metrics_line(record):
    """One metrics.jsonl line, strict JSON: a nan or inf figure (a gradient norm that overflowed) becomes null.

    The loss and validation loss never get here non-finite: the run stops before logging them.
    """
    return json.dumps(_finite_or_null(record), allow_nan=False) + "\n"


def trim_metrics(path, step):
    """Keep the records of steps <= step (the checkpoint's) and drop torn or unreadable lines; atomic rewrite."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
            except ValueError:
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
    return dropped

"""What the commands share at their front door: a closed stdout, a checkpoint given in place of its run, and
the fix for a file that could not be written.

A reader that goes away (`python -m npgpt.proof | head -1`) makes the next write to stdout raise
BrokenPipeError; a command stops there quietly, as `cat` does: silence_stdout(), then exit. A directory name
that is not UTF-8 is printed as its own bytes, whatever the locale: run_command(). A command that stops
cleanly on a signal installs its handlers for the run alone: signal_handlers().

Next to read: ``npgpt/program/sample.py``, a command that uses both.
"""

import codecs
import errno
import os
import signal
import sys


def run_command(main):
    """A command's entry point (`python -m npgpt.train`): sys.exit(main()), stdout and stderr first set to
    print a path's undecodable bytes back as they were.

    A directory name that is not UTF-8 reaches Python as a str holding lone surrogates (os.fsdecode). Under a
    UTF-8 locale other than C.UTF-8, Python's stdout refuses them ('strict'): the first print of such a path
    would fail, at the end of a run whose work is done. Its stderr shows them as escapes (run\\udcff), not
    the name one would type. 'surrogateescape' writes the name's own bytes, as ls does; on a UTF-8 stream it
    changes nothing else, since every other character has its encoding. Only the process's entry point calls
    this: the streams are then the command's own.
    """
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and _is_utf8(getattr(stream, "encoding", None)):
            stream.reconfigure(errors="surrogateescape")
    sys.exit(main())


def _is_utf8(encoding):
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except (LookupError, TypeError):
        return False


class signal_handlers:
    """``with signal_handlers(signums, handler):`` handler(signum, frame) for each of `signums` while the block
    runs; the handlers before are put back after it. Off the main thread Python takes no handler: the signals
    then behave as they did."""

    def __init__(self, signums, handler):
        self.signums, self.handler, self.previous = tuple(signums), handler, {}

    def __enter__(self):
        for signum in self.signums:
            try:
                self.previous[signum] = signal.signal(signum, self.handler)
            except ValueError:          # not the main thread
                break
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        return False


def silence_stdout():
    """stdout (its file descriptor, so Python's last flush too) pointed at os.devnull: the reader is gone.

    Without it, the text still buffered would raise BrokenPipeError again when the interpreter exits.
    """
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):      # no stdout, or one that is not a file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


def out_dir_problem(out_dir):
    """The one-line problem when --out-dir names a file (a checkpoint such as out/ckpt.npz), else None."""
    if not os.path.isfile(out_dir):
        return None
    run_dir, name = os.path.split(os.path.normpath(out_dir))
    return (f"--out-dir {out_dir} is a file; --out-dir takes the run's directory (here: {run_dir or '.'}), "
            f"and --checkpoint the file's name ({name})")


def os_error_fix(exc, directory_flag="--out-dir"):
    """The fix for an OSError met writing a command's files, by its kind: a full disk, a place without write
    permission, a directory where a file goes, or anything else."""
    space = f"free some space or choose another {directory_flag}"
    writable = f"choose a writable {directory_flag}"
    return {errno.ENOSPC: space, getattr(errno, "EDQUOT", errno.ENOSPC): space,
            errno.EACCES: writable, errno.EPERM: writable, errno.EROFS: writable,
            errno.EISDIR: f"that path is a directory where a file goes: move it away or choose another "
                          f"{directory_flag}"}.get(exc.errno, f"check that path, or choose another {directory_flag}")

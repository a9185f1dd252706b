"""Command-line plumbing shared by every script: flag checks, and the one __main__ error guard.

A user's mistake (a bad file, too little memory, ctrl-C, a closed pipe, a peer process that died) ends a
script with one line naming the problem, never a traceback from deep inside; a bug still shows its traceback.
"""
import argparse
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from plumbing.sources import DataError


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help that shows each flag's default where it has one (not None, not a switch's False) and its help text
    does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def require(p, a, names, ok, rule):
    """p.error for the first flag of `names` (attribute names of `a`) whose value, when given, fails ok():
    '--flag-name must be RULE'."""
    for name in names:
        value = getattr(a, name)
        if value is not None and not ok(value):
            p.error(f"--{name.replace('_', '-')} must be {rule}")


def device_problem(device, names=("cpu", "cuda")):
    """Why the --device string `device` cannot be used on this machine, as a message, or None. `names`: the
    device types the caller takes (cuda:N always included), as its message lists them."""
    try:
        dev = torch.device(device)
    except RuntimeError:  # "gpu", "auto"
        dev = None
    if dev is None or dev.type not in names:
        return f"--device {device}: expected {', '.join(names)} or cuda:N"
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        return f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible)"
    return None


def writable(folder):
    return os.path.isdir(folder) and os.access(folder, os.W_OK)


def check_output_dir(p, flag, path):
    """p.error unless folder `path` exists writable or can be created: its nearest existing parent is writable."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not writable(existing):
        p.error(f"{flag} {path}: {existing} is not a writable folder")


def check_output_file(p, flag, path):
    """p.error unless `path` can be written as a file: a name in an existing, writable folder."""
    if path and (os.path.isdir(path) or not writable(os.path.dirname(os.path.abspath(path)))):
        p.error(f"{flag} {path}: not a file name in an existing, writable folder")


def progress(label, total=None, every=2.0, total_bytes=None):
    """A progress line on stderr, at most every `every` seconds (and at the end): update(texts_done, bytes_done).
    total=None: a stream of unknown length (no eta). The eta comes from the bytes read where total_bytes is
    given (texts differ in length, and featurize reads the longest first), else from the texts."""
    start = time.time()
    last = [start, None]  # when the last line was printed, and at which count

    def update(n, nbytes, final=False):
        now = time.time()
        if final and n == last[1]:  # said already: end its line
            print(file=sys.stderr, end="\n" if sys.stderr.isatty() else "", flush=True)
        elif final or now - last[0] > every:
            last[0], last[1], el = now, n, max(now - start, 1e-9)
            of = f"/{total}" if total is not None else ""
            left = (total_bytes - nbytes) / max(nbytes, 1) if total_bytes else \
                (total - n) / max(n, 1) if total is not None else None
            eta = f", eta {el * left:.0f}s" if left is not None else ""
            end = "\n" if final or not sys.stderr.isatty() else "\r"
            print(f"{label}: {n}{of} texts, {n / el:.1f} texts/s, {nbytes / el / 1e3:.1f} kB/s, {el:.0f}s elapsed"
                  f"{eta}", end=end, file=sys.stderr, flush=True)
    return update


def out_of_memory(e):
    """Whether exception e is a failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or "DefaultCPUAllocator" in str(e)


def main_guard(main, oom="lower --batch-size", interrupted="interrupted"):
    """Run main() as a script's __main__. Bad input (DataError, OSError) and running out of memory end with one
    'error: ...' line (exit 1; `oom`: the hint), ctrl-C with the `interrupted` line (exit 130), a closed stdout
    quietly (exit 1). Under torchrun, a collective that failed because a peer died or hangs names this rank
    and exits at once: the process group's threads, still waiting on the lost peer, would abort a normal exit."""
    try:
        return main()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr, flush=True)
        sys.exit(130)
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail
        sys.exit(1)
    except DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. an unwritable output: the message names the path
        sys.exit(f"error: {type(e).__name__}: {e}")
    except RuntimeError as e:
        multi = dist.is_initialized()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if out_of_memory(e):
            why = f"out of memory ({first}); {oom}"
        elif multi and (isinstance(e, dist.DistError) or "gloo" in str(e) or "NCCL" in str(e)):
            why = (f"a collective with the other processes failed ({first}). Another process died or stopped "
                   f"answering (see its log; --timeout bounds the wait); restart with --resume to continue from "
                   f"the last checkpoint.")
        elif multi:  # not the peers' fault: the whole story
            traceback.print_exc()
            why = f"{type(e).__name__}: {first}"
        else:
            raise
        if not multi:
            sys.exit(f"error: {why}")
        print(f"error: rank {dist.get_rank()}: {why}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

"""Prepared-corpus folders: written whole or not at all, one preparation at a time, nothing else replaced.

data.prepare writes a corpus into OUT.tmp and swaps it in for OUT (the old one renamed OUT.old, the new one
to OUT, then OUT.old deleted): an interrupted run leaves the old corpus or the new one, never half of one.
A lock file beside OUT (deleted when done) makes two preparations of one folder wait for each other.
"""
import contextlib
import errno
import os
import shutil

from plumbing.sources import DataError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; there, two preparations of one folder must not overlap
    fcntl = None

SPLITS = ("train", "val", "test")

# Everything prepare() writes into its folder: a folder holding only these (and meta.json) is a prepared corpus.
CORPUS_FILES = {f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")} | {"meta.json"}


def only_corpus_files(folder, complete):
    """Whether folder is a folder holding nothing but prepare()'s files, and if `complete` either none or meta.json."""
    if not os.path.isdir(folder):
        return False
    names = set(os.listdir(folder)) - {".DS_Store"}  # what macOS's Finder leaves in a folder it has shown
    return names <= CORPUS_FILES and (not complete or not names or "meta.json" in names)


def check_out(out_dir):
    if os.path.lexists(out_dir) and not only_corpus_files(out_dir, complete=True):
        raise DataError(f"{out_dir}: exists and is neither empty nor a prepared corpus; refusing to replace it, "
                        f"choose another output folder")


@contextlib.contextmanager
def locked(path, log, busy=None):
    """Hold an exclusive lock on the file `path` for the with-block, across processes: waiting for another
    holder, or with `busy` (a message) raising DataError(busy) at once. The holder deletes the lock file before
    it lets go, so that nothing is left behind; a waiter that then finds its file gone (it locked a deleted
    file) opens the path again."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    while True:
        f = open(path, "a")
        try:
            if fcntl:
                fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except OSError as e:
            if busy and e.errno in (errno.EAGAIN, errno.EACCES):  # EACCES: where flock is emulated by fcntl
                f.close()
                raise DataError(busy) from None
            # e.g. Lustre or NFS mounted without locks: ENOLCK, ENOSYS
            log(f"warning: no file lock on {path} ({e.strerror}); going on unlocked")
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        f.close()  # the previous holder deleted it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        f.close()


@contextlib.contextmanager
def replacing(out_dir):
    """A fresh OUT.tmp to write a corpus into; when the with-block ends without an exception it replaces out_dir
    whole (OUT.old in between), and when it raises (or is interrupted) OUT.tmp is deleted and out_dir kept."""
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    for leftover in (tmp, old):  # from an interrupted run: deleted only if it holds nothing else
        if os.path.lexists(leftover) and not only_corpus_files(leftover, complete=False):
            raise DataError(f"{leftover}: is in the way (not a temporary folder of data.py); move it away")
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_out(out_dir)  # again: something may have been put there during the run
    if os.path.lexists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)

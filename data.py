"""Corpus preparation and the memory-mapped byte loader for truncated-BPTT training.

Puri et al. 2018 (arXiv 1808.01371), "Data": the text is one long byte stream (Amazon reviews, 40 GB),
cut into train/val/test shards 1000/1/1, read by many processes without shuffling. Here:

- prepare(): raw sources -> DIR/{train,val,test}.bin (flat uint8 bytes) + .idx (int64 document
  offsets) + meta.json. Streams document by document: memory does not grow with the corpus.
  Sources: plain text (one document per line), JSON lines (field `reviewText` by default, the
  Amazon dumps' format), CSV/TSV (a text column), any of these compressed as its name says (.gz, .bz2,
  .xz), and IMDB's `aclImdb` folder or tarball (train/unsup + train/pos + train/neg; never test, which
  transfer.py holds out). DIR must be new, empty or a previous prepared corpus, which is replaced whole.
- normalize(): the reference model's text preprocessing, also used by transfer.py.
- ByteLoader: B rows, each reading its own contiguous stream, so window k+1 of a row starts where
  window k ended and the recurrent state carries over. The batch at step s is a pure function of s.

    python data.py SOURCE [SOURCE ...] --out DIR [--text-field reviewText] [--val-frac 0.01]
"""
import argparse
import bz2
import contextlib
import csv
import errno
import gzip
import hashlib
import html
import io
import json
import lzma
import os
import random
import shutil
import sys
import tarfile
import zlib

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; there, two preparations of one folder must not overlap
    fcntl = None

SPLITS = ("train", "val", "test")


def normalize(text, errors="replace"):
    """Radford et al.'s preprocessing: HTML unescape, newlines to spaces, frame as '\\n ' + text + ' '.

    Returns UTF-8 bytes: the model reads bytes, so a document is its byte string. errors="surrogateescape"
    gives back the raw bytes of a text decoded with it (generate.py's byte primes).
    """
    text = html.unescape(text).replace("\n", " ").strip()
    return ("\n " + text + " ").encode("utf-8", errors=errors)


class DataError(Exception):
    """Bad input: the message names the file and the problem."""


# What reading a damaged file raises: gzip's and bz2's errors are OSError or EOFError, xz's LZMAError, a damaged
# deflate block's zlib.error.
BAD_FILE = (OSError, EOFError, zlib.error, lzma.LZMAError)


# Compressions read by their extension, and the magic numbers that tell what a file really is (bz2's with its
# block size digit and first block's magic: a text may well begin with "BZh").
DECOMPRESS = {".gz": ("gzip", gzip.open), ".bz2": ("bz2", bz2.open), ".xz": ("xz", lzma.open)}
MAGIC = {b"\x1f\x8b": "gzip", **{b"BZh%d1AY&SY" % n: "bz2" for n in range(1, 10)}, b"\xfd7zXZ\x00": "xz",
         b"PK\x03\x04": "zip", b"\x28\xb5\x2f\xfd": "zstd"}


def _compression(raw):
    """The compression a binary file's first bytes (peeked, not read: a pipe is read once) say, or None."""
    return next((fmt for magic, fmt in MAGIC.items() if raw.peek(10).startswith(magic)), None)


def _open_text(path):
    """Text of a source, decompressed by its extension; a file compressed otherwise is an error, not read as text.
    utf-8-sig drops the byte-order mark of Excel's "CSV UTF-8" (it would otherwise prefix the first column name);
    a UTF-16 byte-order mark (Excel's "Unicode text") is read as UTF-16, not as text full of NUL bytes."""
    raw = open(path, "rb")
    found = _compression(raw)
    named, opener = DECOMPRESS.get(os.path.splitext(path)[1].lower(), (None, None))
    if found and found != named:
        raw.close()
        ext = next((ext for ext, (fmt, _) in DECOMPRESS.items() if fmt == found), None)
        raise DataError(f"{path}: compressed with {found} but not named *{ext}; rename it" if ext else
                        f"{path}: compressed with {found}; decompress it first, or use .gz/.bz2/.xz")
    if opener:
        raw = opener(raw, "rb")
    utf16 = raw.peek(2)[:2] in (b"\xff\xfe", b"\xfe\xff")  # the byte-order mark of Excel's "Unicode text"
    return io.TextIOWrapper(raw, encoding="utf-16" if utf16 else "utf-8-sig", errors="replace", newline="")


# The longest line (document) read, in characters: a longer one is skipped and counted, read in bounded pieces,
# so that a file with no newline (a 1 GB "line") costs bounded memory. A review is a few kB.
MAX_LINE = 2**22


def _lines(f, skip, limit=None):
    """(lineno, line) for each line of text file f; a line over `limit` characters goes to skip(lineno, why)."""
    limit = limit or MAX_LINE
    lineno = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if len(line) > limit and line[-1] not in "\r\n":  # longer than the limit: drain the rest of it
            while line and line[-1] not in "\r\n":
                line = f.readline(2**20)
            skip(lineno, f"line longer than {limit} characters")
            continue
        yield lineno, line


def inner_name(path):
    """path lower-cased (R.CSV is a CSV) and without a .gz/.bz2/.xz suffix: the name that tells the format."""
    base, ext = os.path.splitext(path.lower())
    return base if ext in DECOMPRESS else path.lower()


def _kind(path):
    name = inner_name(path)
    if os.path.isdir(path) or name.endswith((".tar", ".tgz")) or ".tar." in os.path.basename(name):
        return "imdb"  # a .tar.lz4 too: its error says it is not a tarball read here, rather than reading bytes
    for ext, kind in ((".jsonl", "json"), (".json", "json"), (".csv", "csv"), (".tsv", "tsv")):
        if name.endswith(ext):
            return kind
    return "text"


IMDB_PARTS = ("train/unsup", "train/pos", "train/neg")  # the pretraining text: never test/


def _imdb_root(path):
    return path if os.path.basename(os.path.normpath(path)) == "aclImdb" else os.path.join(path, "aclImdb")


def imdb_documents(path, parts=IMDB_PARTS):
    """Yield (part, text) for IMDB reviews under `parts` of an aclImdb folder or its tarball, in a
    deterministic order (sorted file names in a folder, member order in a tarball)."""
    parts = tuple(parts)
    if os.path.isdir(path):
        for part in parts:
            d = os.path.join(_imdb_root(path), part)
            if not os.path.isdir(d):
                raise DataError(f"{path}: no folder {part} (expected the aclImdb layout)")
            for name in sorted(os.listdir(d)):
                if name.endswith(".txt"):
                    with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                        yield part, f.read()
        return
    try:
        with open(path, "rb") as raw:
            found = _compression(raw)
            opener = next((op for fmt, op in DECOMPRESS.values() if fmt == found), None)
            f = opener(raw, "rb") if opener else raw
            with tarfile.open(fileobj=f, mode="r|") as tf:  # stream mode: members in order, never all at once
                for m in tf:
                    if not (m.isfile() and m.name.endswith(".txt")):
                        continue
                    part = os.path.dirname(m.name)
                    part = part[part.index("/") + 1 :] if "/" in part else part
                    if part in parts:
                        yield part, tf.extractfile(m).read().decode("utf-8", errors="replace")
            # tarfile ends quietly where a cut falls on a member's header: reading the compressed stream to its
            # end-of-stream marker is what tells a complete archive from a truncated one (EOFError)
            while f.read(1 << 20):
                pass
    except (tarfile.TarError, *BAD_FILE) as e:
        raise DataError(f"{path}: cannot read as a tar archive ({type(e).__name__}: {e})")


def documents(path, text_field="reviewText", stats=None):
    """Yield the text of each document of one raw source. Lines without the field are counted in
    stats['skipped'] (with the first few reasons in stats['examples']), not fatal."""
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", 0)
    stats.setdefault("examples", [])

    def skip(lineno, why):
        stats["skipped"] += 1
        if len(stats["examples"]) < 5:
            stats["examples"].append(f"{path}:{lineno}: {why}")

    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    kind = _kind(path)
    if kind == "imdb":
        for _, text in imdb_documents(path):
            yield text
        return
    try:
        with _open_text(path) as f:
            if kind == "json":
                for lineno, line in _lines(f, skip):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line).get(text_field)
                    except (ValueError, AttributeError, RecursionError):  # RecursionError: [[[[... nested deep
                        skip(lineno, "not a JSON object")
                        continue
                    if isinstance(text, str):
                        yield text
                    else:
                        skip(lineno, f"no string field {text_field!r}")
            elif kind in ("csv", "tsv"):
                # Lines come from _lines, so a line over MAX_LINE is skipped and counted as in the other kinds, and
                # the csv module's field limit (131,072 by default) rises to MAX_LINE; only a quoted field over
                # several lines adding up to more fails: the rest of its record cannot be told from new rows.
                csv.field_size_limit(MAX_LINE)
                lineno = [1]  # of the last line read: a skipped row's line (its last, for a multi-line row)
                lines = (line for lineno[0], line in _lines(f, skip))
                # strict: a stray quote is an error, not a quoted field that swallows the rest of the file
                reader = csv.DictReader(lines, delimiter="," if kind == "csv" else "\t", strict=True)
                fields = reader.fieldnames or []
                column = text_field if text_field in fields else next(
                    (c for c in ("text", "sentence", "review") if c in fields), None)
                if column is None:
                    raise DataError(f"{path}: no text column {text_field!r} (columns: {fields})")
                done = lineno[0]
                try:
                    for row in reader:
                        if row.get(column):
                            yield row[column]
                        else:
                            skip(lineno[0], f"empty or missing {column!r}")
                        done = lineno[0]
                except csv.Error as e:
                    raise DataError(f"{path}:{done + 1}: malformed row ({e}); a stray quote?") from None
            else:
                for _, line in _lines(f, skip):
                    if line.strip():
                        yield line
    except (csv.Error, *BAD_FILE) as e:  # a truncated/corrupt archive, binary CSV
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})")


# Everything prepare() writes into its folder: a folder holding only these (and meta.json) is a prepared corpus.
CORPUS_FILES = {f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")} | {"meta.json"}


def _only_corpus_files(folder, complete):
    """Whether folder is a folder holding nothing but prepare()'s files, and if `complete` either none or meta.json."""
    if not os.path.isdir(folder):
        return False
    names = set(os.listdir(folder)) - {".DS_Store"}  # what macOS's Finder leaves in a folder it has shown
    return names <= CORPUS_FILES and (not complete or not names or "meta.json" in names)


def _check_out(out_dir):
    if os.path.lexists(out_dir) and not _only_corpus_files(out_dir, complete=True):
        raise DataError(f"{out_dir}: exists and is neither empty nor a prepared corpus; refusing to replace it, "
                        f"choose another output folder")


@contextlib.contextmanager
def locked(path, log, busy=None):
    """Hold an exclusive lock on the file `path` for the with-block, across processes: waiting for another
    holder, or with `busy` (a message) raising DataError(busy) at once. The lock file stays: deleting it would
    let a third process lock a new file while a second waits on the old."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        try:
            if fcntl:
                fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except OSError as e:
            if busy and e.errno in (errno.EAGAIN, errno.EACCES):  # EACCES: where flock is emulated by fcntl
                raise DataError(busy) from None
            # e.g. Lustre or NFS mounted without locks: ENOLCK, ENOSYS
            log(f"warning: no file lock on {path} ({e.strerror}); going on unlocked")
        yield


def prepare(sources, out_dir, text_field="reviewText", val_frac=0.01, test_frac=0.01, seed=0, log=print, reuse=False):
    """Stream `sources` into out_dir/{split}.bin + {split}.idx + meta.json; returns the meta dict.

    Each document goes to val with probability val_frac, test with test_frac, else train, drawn
    from a generator seeded by `seed`: the split is a pure function of the sources' contents+order.
    out_dir must be new, empty or a previous prepared corpus, and hold no source. The corpus is written into
    OUT.tmp, then swapped in (the old one renamed to OUT.old, the new one to OUT, then OUT.old deleted): an
    interrupted run leaves the old corpus or the new one, never half of one. With reuse=True, a corpus another
    process prepared in out_dir while this one waited for the lock is returned as it is.
    """
    if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise DataError(f"bad split fractions val={val_frac} test={test_frac}")
    out_dir = os.path.realpath(out_dir)  # a symlinked folder: its target is what gets replaced
    for src in sources:  # all checked before the first is read: a typo in the last one costs no wait
        if not os.path.exists(src):
            raise DataError(f"{src}: no such file or folder")
        with contextlib.suppress(ValueError):  # Windows: paths on two drives, so not inside
            if os.path.commonpath([os.path.realpath(src), out_dir]) == out_dir:
                raise DataError(f"{src}: the source lies inside the output folder {out_dir}; choose another one")
    _check_out(out_dir)  # before the lock, so that a refused folder gets no OUT.lock beside it
    with locked(out_dir + ".lock", log):  # one preparation of out_dir at a time (two runs started together)
        if reuse and os.path.isfile(os.path.join(out_dir, "meta.json")):
            with open(os.path.join(out_dir, "meta.json")) as f:
                return json.load(f)
        return _write(sources, out_dir, text_field, val_frac, test_frac, seed, log)


def _write(sources, out_dir, text_field, val_frac, test_frac, seed, log):
    """prepare() once the lock is held."""
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    for leftover in (tmp, old):  # from an interrupted run: deleted only if it holds nothing else
        if os.path.lexists(leftover) and not _only_corpus_files(leftover, complete=False):
            raise DataError(f"{leftover}: is in the way (not a temporary folder of data.py); move it away")
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(tmp)
    rng = random.Random(seed)
    stats = {"skipped": 0, "examples": []}
    bins = {s: open(os.path.join(tmp, s + ".bin"), "wb") for s in SPLITS}
    idxs = {s: open(os.path.join(tmp, s + ".idx"), "wb") for s in SPLITS}
    pos = dict.fromkeys(SPLITS, 0)
    docs = dict.fromkeys(SPLITS, 0)
    try:
        for src in sources:
            for text in documents(src, text_field, stats):
                r = rng.random()
                split = "val" if r < val_frac else "test" if r < val_frac + test_frac else "train"
                b = normalize(text)
                idxs[split].write(np.int64(pos[split]).tobytes())
                bins[split].write(b)
                pos[split] += len(b)
                docs[split] += 1
                if sum(docs.values()) % 100000 == 0:
                    log(f"prepare: {sum(docs.values())} documents, {sum(pos.values()) / 1e6:.1f} MB")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for f in (*bins.values(), *idxs.values()):
            f.close()
    if pos["train"] == 0:
        shutil.rmtree(tmp)
        why = f"; skipped {stats['skipped']} lines, e.g. " + "; ".join(stats["examples"][:2]) if stats["skipped"] else ""
        if sum(docs.values()):  # found, but the split drew none of them for train
            raise DataError(f"{', '.join(sources)}: none of its {sum(docs.values())} documents went to train "
                            f"(val {docs['val']}, test {docs['test']}); lower the val/test fractions")
        raise DataError(f"{', '.join(sources)}: no documents found (empty corpus){why}")
    if stats["skipped"]:
        log(f"prepare: skipped {stats['skipped']} lines, e.g. " + "; ".join(stats["examples"]))
    meta = {"sources": [os.path.abspath(s) for s in sources], "text_field": text_field, "val_frac": val_frac,
            "test_frac": test_frac, "seed": seed, "bytes": pos, "documents": docs, "skipped": stats["skipped"]}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    _check_out(out_dir)  # again: something may have been put there during the run
    if os.path.lexists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    log(f"prepare: {out_dir}: " + ", ".join(f"{s} {docs[s]} docs {pos[s] / 1e6:.2f} MB" for s in SPLITS))
    return meta


def _fingerprint(path):
    """Size and mtime of a file; of an aclImdb folder, the names, sizes and mtimes of the files it is read from
    (writing a file inside a folder leaves the folder's own size and mtime as they were; files elsewhere under
    it, a cache folder there included, are not read, so they do not count)."""
    if not os.path.isdir(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    h = hashlib.sha1()  # about 0.5 s for IMDB's 75k training files
    for part in IMDB_PARTS:
        d = os.path.join(_imdb_root(path), part)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            st = os.stat(os.path.join(d, name))
            h.update(os.fsencode(part + "/" + name) + b"\0%d\0%d\n" % (st.st_size, st.st_mtime_ns))
    return [h.hexdigest()]


def resolve(data, cache_dir, text_field="reviewText", val_frac=0.01, test_frac=0.01, seed=0, log=print):
    """A prepared corpus folder for `data`: itself if it holds meta.json (logging its own split settings where
    they differ from the ones given), else a cached preparation keyed by the source's path, size and mtime (a
    folder's: its files') and the split settings (prepared on first use, once: a second process asking for it
    meanwhile waits for the first one's)."""
    if os.path.isdir(data) and os.path.isfile(os.path.join(data, "meta.json")):
        try:
            with open(os.path.join(data, "meta.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{os.path.join(data, 'meta.json')}: unreadable ({e})")
        asked = {"text_field": text_field, "val_frac": val_frac, "test_frac": test_frac}
        if any(meta.get(k) != v for k, v in asked.items()):  # fixed when it was prepared: say which apply
            log(f"data: {data} is a prepared corpus; its own " + ", ".join(f"{k} {meta.get(k)}" for k in asked)
                + " apply, not the ones given here")
        return data
    if not os.path.exists(data):
        raise DataError(f"{data}: no such file or folder")
    key = json.dumps([os.path.abspath(data), *_fingerprint(data), text_field, val_frac, test_frac, seed])
    out = os.path.join(cache_dir, os.path.basename(os.path.normpath(data)) + "-" + hashlib.sha1(key.encode()).hexdigest()[:10])
    if not os.path.isfile(os.path.join(out, "meta.json")):
        log(f"prepare: {data} -> {out}")
        prepare([data], out, text_field, val_frac, test_frac, seed, log, reuse=True)
    return out


class ByteLoader:
    """Truncated-BPTT batches over a flat byte file, without shuffling (the paper's setting).

    The file of N bytes is cut into B equal streams, row b reading bytes [b*L, (b+1)*L), L = N // B.
    Window k of every row covers [k*T, k*T + T] of its stream (T+1 bytes: inputs and next-byte targets),
    so consecutive windows of a row are contiguous and its state carries over. Step s reads window
    s mod K, K = (L - 1) // T windows per epoch. A process of rank r in a world of W takes rows
    [r*B/W, (r+1)*B/W): the global batch is the same for any W.
    """

    def __init__(self, path, batch_size, seq_len, rank=0, world=1):
        if batch_size % world:
            raise DataError(f"global batch {batch_size} is not divisible by {world} processes")
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise DataError(f"{path}: missing or empty corpus file")
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.path, self.B, self.T = path, batch_size, seq_len
        self.L = len(self.data) // batch_size
        self.steps_per_epoch = (self.L - 1) // seq_len
        if self.steps_per_epoch < 1:
            raise DataError(f"{path}: {len(self.data)} bytes is too small for {batch_size} rows of "
                            f"{seq_len + 1} bytes; lower --batch-size or --seq-len")
        local = batch_size // world
        self.rows = np.arange(rank * local, (rank + 1) * local)
        self.offsets = np.arange(seq_len + 1)

    def window(self, step):
        """Window index within the epoch; 0 means the streams restart (reset the state)."""
        return step % self.steps_per_epoch

    def batch(self, step):
        """(x, y): int64 arrays [B/W, T]: inputs and next-byte targets for this process at `step`."""
        k = self.window(step)
        idx = self.rows[:, None] * self.L + k * self.T + self.offsets  # [B/W, T+1]
        chunk = self.data[idx].astype(np.int64)
        return chunk[:, :-1], chunk[:, 1:]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Prepare a byte corpus for train.py.")
    p.add_argument("sources", nargs="+",
                   help="text / .jsonl / .csv / .tsv files (or .gz/.bz2/.xz), an aclImdb folder or tarball")
    p.add_argument("--out", required=True, help="output folder: new, empty or a corpus to replace")
    p.add_argument("--text-field", default="reviewText", help="JSON field or CSV column holding the text")
    p.add_argument("--val-frac", type=float, default=0.01, help="share of documents in val (paper: 0.001)")
    p.add_argument("--test-frac", type=float, default=0.01, help="share of documents in test (paper: 0.001)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split")
    a = p.parse_args()
    try:
        prepare(a.sources, a.out, a.text_field, a.val_frac, a.test_frac, a.seed)
    except DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. an unwritable --out: the message names the path
        sys.exit(f"error: {type(e).__name__}: {e}")
    except KeyboardInterrupt:  # the partial output is already removed, a previous corpus in --out kept
        print(f"interrupted: {a.out} left as it was", file=sys.stderr)
        sys.exit(130)

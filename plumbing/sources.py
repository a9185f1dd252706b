"""Readers of raw text sources: compression, plain text, JSON lines, CSV/TSV and IMDB's aclImdb layout.

What data.prepare reads its documents from, one at a time, in bounded memory. Bad input is a DataError whose
message names the file (and the line) and the problem; lines without the text are skipped and counted.
"""
import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import os
import tarfile
import zlib


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


def compression(raw):
    """The compression a binary file's first bytes (peeked, not read: a pipe is read once) say, or None."""
    return next((fmt for magic, fmt in MAGIC.items() if raw.peek(10).startswith(magic)), None)


def open_text(path):
    """Text of a source, decompressed by its extension; a file compressed otherwise is an error, not read as text.
    utf-8-sig drops the byte-order mark of Excel's "CSV UTF-8" (it would otherwise prefix the first column name);
    a UTF-16 byte-order mark (Excel's "Unicode text") is read as UTF-16, not as text full of NUL bytes."""
    raw = open(path, "rb")
    found = compression(raw)
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


def not_text(path, sample=1 << 16):
    """Why the file `path` (decompressed as named) does not look like text, or None: in its first 64k characters,
    more than 0.1% NUL bytes or more than 20% bytes that are not UTF-8 (random bytes: about half; a binary file,
    an image or a model: most). Text in another 8-bit encoding (Latin-1) stays well below that."""
    try:
        with open_text(path) as f:
            head = f.read(sample)
    except BAD_FILE as e:  # a truncated or damaged archive
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})")
    nul, bad = head.count("\0") / max(len(head), 1), head.count("\ufffd") / max(len(head), 1)
    if nul > 0.001 or bad > 0.2:
        return f"does not look like text ({nul:.1%} NUL bytes, {bad:.0%} not UTF-8 in its first {len(head)} characters)"
    return None


# The longest line (document) read, in characters: a longer one is skipped and counted, read in bounded pieces,
# so that a file with no newline (a 1 GB "line") costs bounded memory. A review is a few kB.
MAX_LINE = 2**22


def read_lines(f, skip, limit=None):
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


def source_kind(path):
    name = inner_name(path)
    if os.path.isdir(path) or name.endswith((".tar", ".tgz")) or ".tar." in os.path.basename(name):
        return "imdb"  # a .tar.lz4 too: its error says it is not a tarball read here, rather than reading bytes
    for ext, kind in ((".jsonl", "json"), (".json", "json"), (".csv", "csv"), (".tsv", "tsv")):
        if name.endswith(ext):
            return kind
    return "text"


IMDB_PARTS = ("train/unsup", "train/pos", "train/neg")  # the pretraining text: never test/


def imdb_root(path):
    return path if os.path.basename(os.path.normpath(path)) == "aclImdb" else os.path.join(path, "aclImdb")


def imdb_documents(path, parts=IMDB_PARTS):
    """Yield (part, text) for IMDB reviews under `parts` of an aclImdb folder or its tarball, in a
    deterministic order (sorted file names in a folder, member order in a tarball)."""
    parts = tuple(parts)
    if os.path.isdir(path):
        for part in parts:
            d = os.path.join(imdb_root(path), part)
            if not os.path.isdir(d):
                raise DataError(f"{path}: no folder {part} (expected the aclImdb layout)")
            for name in sorted(os.listdir(d)):
                if name.endswith(".txt"):
                    with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                        yield part, f.read()
        return
    try:
        with open(path, "rb") as raw:
            found = compression(raw)
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
    kind = source_kind(path)
    if kind == "imdb":
        for _, text in imdb_documents(path):
            yield text
        return
    try:
        with open_text(path) as f:
            if kind == "json":
                for lineno, line in read_lines(f, skip):
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
                # Lines come from read_lines, so a line over MAX_LINE is skipped and counted as in the other kinds, and
                # the csv module's field limit (131,072 by default) rises to MAX_LINE; only a quoted field over
                # several lines adding up to more fails: the rest of its record cannot be told from new rows.
                csv.field_size_limit(MAX_LINE)
                lineno = [1]  # of the last line read: a skipped row's line (its last, for a multi-line row)
                lines = (line for lineno[0], line in read_lines(f, skip))
                # strict: a stray quote is an error, not a quoted field that swallows the rest of the file
                reader = csv.DictReader(lines, delimiter="," if kind == "csv" else "\t", strict=True)
                fields = reader.fieldnames or []
                column = text_field if text_field in fields else next(
                    (c for c in ("text", "sentence", "review") if c in fields), None)
                if column is None:
                    raise DataError(f"{path}: no text column {text_field!r} (columns: {fields})")
                stats["column"] = column  # prepare says which column it read
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
                for _, line in read_lines(f, skip):
                    if line.strip():
                        yield line
    except (csv.Error, *BAD_FILE) as e:  # a truncated/corrupt archive, binary CSV
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})")


def fingerprint(path):
    """Size and mtime of a file; of an aclImdb folder, the names, sizes and mtimes of the files it is read from
    (writing a file inside a folder leaves the folder's own size and mtime as they were; files elsewhere under
    it, a cache folder there included, are not read, so they do not count)."""
    if not os.path.isdir(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    h = hashlib.sha1()  # about 0.5 s for IMDB's 75k training files
    for part in IMDB_PARTS:
        d = os.path.join(imdb_root(path), part)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            st = os.stat(os.path.join(d, name))
            h.update(os.fsencode(part + "/" + name) + b"\0%d\0%d\n" % (st.st_size, st.st_mtime_ns))
    return [h.hexdigest()]

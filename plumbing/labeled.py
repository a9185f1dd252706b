"""Labelled text files for transfer: CSV/TSV/JSON lines with a text and a binary label, SST-2 and IMDB.

Each loader returns {split: (texts, labels int64 array)}; bad input is a DataError naming the file, the line
and the problem (a label that is not binary, a stray quote, a missing column, an empty split).
"""
import csv
import json
import os

import numpy as np

from plumbing import cli, sources
from plumbing.sources import BAD_FILE, DataError, imdb_documents, inner_name, open_text, read_lines

LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "neg": 0, "pos": 1, "negative": 0, "positive": 1,
          "false": 0, "true": 1}


def _label(value, where):
    key = str(value).strip().lower() if not isinstance(value, bool) else str(value).lower()
    if key not in LABELS:
        raise DataError(f"{where}: label {value!r} is not binary (expected 0/1, neg/pos, negative/positive, "
                        "false/true)")
    return LABELS[key]


def _json_row(path, n, line):
    """Line n of a JSON-lines file, parsed; errors name the file's line, not json's place in the one line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        if not line.lstrip().startswith("["):
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        row = []
    if isinstance(row, list):
        raise DataError(f"{path}:{n}: a JSON array; expected one JSON object per line (JSON lines)")
    return row


def rows(path, text_column="text", label_column="label"):
    """(line, text, label) for each row of a .csv / .tsv / .json(l) file (optionally .gz/.bz2/.xz) with named
    columns, streamed; line is the row's last line in the file. label_column=None reads texts only (label None),
    and then also plain text: one text per line of any other file (empty lines skipped)."""
    ext = os.path.splitext(inner_name(path))[1]
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    plain = ext not in (".csv", ".tsv", ".jsonl", ".json")
    if plain and label_column is not None:
        raise DataError(f"{path}: unknown format {ext!r} (expected .csv, .tsv, .jsonl or .json, optionally "
                        ".gz/.bz2/.xz)")
    n = 1  # the line of the last row read
    columns = [c for c in (text_column, label_column) if c is not None]
    try:
        with open_text(path) as f:  # decompressed as named; without Excel's byte-order mark
            def too_long(n, why):
                raise DataError(f"{path}:{n}: {why}")
            if plain:
                found = ((n, {text_column: line.rstrip("\r\n")}) for n, line in read_lines(f, too_long) if line.strip())
            elif ext in (".csv", ".tsv"):
                csv.field_size_limit(sources.MAX_LINE)  # the default 131,072 characters is shorter than some reviews
                # strict: a stray quote is an error, not a quoted field that swallows the rest of the file
                reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",", strict=True)
                found = ((reader.line_num, r) for r in reader)  # the row's last line: quoted fields may span several
                for col in columns:
                    if col not in (reader.fieldnames or []):
                        raise DataError(f"{path}: no column {col!r} (columns: {reader.fieldnames})")
            else:
                found = ((n, _json_row(path, n, line)) for n, line in read_lines(f, too_long) if line.strip())
            for n, row in found:
                if not isinstance(row, dict) or not isinstance(row.get(text_column), str) \
                        or (label_column is not None and row.get(label_column) in (None, "")):
                    raise DataError(f"{path}:{n}: no {text_column!r} text" +
                                    (f" or no {label_column!r} label" if label_column is not None else ""))
                yield n, row[text_column], None if label_column is None else _label(row[label_column], f"{path}:{n}")
    except csv.Error as e:
        raise DataError(f"{path}:{n + 1}: malformed row ({e}); a stray quote?") from None
    except (ValueError, RecursionError, *BAD_FILE) as e:  # a bad archive, a JSON nested too deep
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})")


def read_labeled(path, text_column="text", label_column="label"):
    """(texts, labels int64 array) from a .csv / .tsv / .json(l) file (optionally .gz/.bz2/.xz) with named columns."""
    got = [(text, label) for _, text, label in rows(path, text_column, label_column)]
    if not got:
        raise DataError(f"{path}: no labelled rows (empty split)")
    return [t for t, _ in got], np.array([k for _, k in got], dtype=np.int64)


def carve(texts, labels, frac, seed=0):
    """Split off a seeded random `frac` of (texts, labels): returns (rest, carved)."""
    perm = np.random.default_rng(seed).permutation(len(texts))
    k = int(round(frac * len(texts)))
    pick = lambda ix: ([texts[i] for i in ix], labels[ix])  # noqa: E731
    return pick(np.sort(perm[k:])), pick(np.sort(perm[:k]))


def load_sst2(data_dir):
    """Radford et al.'s SST-2 CSVs (label,sentence): DIR/{train,dev,test}.csv (or DIR/sst2/...)."""
    if not os.path.isfile(os.path.join(data_dir, "train.csv")) and os.path.isdir(os.path.join(data_dir, "sst2")):
        data_dir = os.path.join(data_dir, "sst2")
    return {s: read_labeled(os.path.join(data_dir, f + ".csv"), "sentence", "label")
            for s, f in (("train", "train"), ("val", "dev"), ("test", "test"))}


def load_imdb(path, val_frac=0.2, seed=0):
    """IMDB from an aclImdb folder, its parent, its .tar.gz/.tar.xz, or a folder holding that tarball.
    val = a seeded `val_frac` of train (the paper's peers' 20%); the order does not depend on the source."""
    if os.path.isdir(path) and not os.path.isdir(os.path.join(path, "aclImdb")) \
            and os.path.basename(os.path.normpath(path)) != "aclImdb":
        tars = sorted(f for f in os.listdir(path) if f.startswith("aclImdb") and ".tar" in f)
        path = os.path.join(path, tars[0]) if tars else path
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    got = {"train": [], "test": []}
    for part, text in imdb_documents(path, parts=("train/pos", "train/neg", "test/pos", "test/neg")):
        split, cls = part.split("/")
        got[split].append((int(cls == "pos"), text))
    for split, items in got.items():
        if not items or len({y for y, _ in items}) < 2:
            raise DataError(f"{path}: {split}/pos and {split}/neg must both hold reviews (empty split)")
        items.sort()  # (label, text): a folder and its tarball give the same order, hence the same val
    out = {s: ([t for _, t in it], np.array([y for y, _ in it], dtype=np.int64)) for s, it in got.items()}
    out["train"], out["val"] = carve(*out["train"], val_frac, seed)
    return out


def load_files(train, val, test, text_column, label_column, val_frac=0.2, seed=0):
    splits = {"train": read_labeled(train, text_column, label_column),
              "test": read_labeled(test, text_column, label_column)}
    if val:
        splits["val"] = read_labeled(val, text_column, label_column)
    else:
        splits["train"], splits["val"] = carve(*splits["train"], val_frac, seed)
    return splits


def load_task(a, log=print):
    """The splits of transfer.py's arguments: --task sst2|imdb under --data-dir, or --train/--val/--test files;
    with --limit, a seeded subset of at most that many texts per split. train must hold both classes; a
    validation or test split of one class is usable (its accuracy is still a measure) and gets a note."""
    if a.task == "sst2":
        splits = load_sst2(a.data_dir)
    elif a.task == "imdb":
        splits = load_imdb(a.data_dir, a.val_frac, a.seed)
    else:
        splits = load_files(a.train, a.val, a.test, a.text_column, a.label_column, a.val_frac, a.seed)
    for name, (texts, labels) in splits.items():
        if a.limit and len(texts) > a.limit:
            splits[name] = carve(texts, labels, a.limit / len(texts), a.seed)[1]
        if len(classes := set(splits[name][1].tolist())) < 2:
            if name == "train":
                raise DataError(f"train split: only one class present ({len(splits[name][1])} rows); a classifier "
                                f"needs both")
            log(f"note: the {name} split holds only label {classes.pop()} ({len(splits[name][1])} rows)")
    return splits


def add_task_arguments(p):
    """The flags that choose the labelled splits, for transfer.py and finetune.py (see load_task)."""
    p.add_argument("--task", choices=("sst2", "imdb"), help="a known dataset under --data-dir")
    p.add_argument("--data-dir", help="sst2: folder of train/dev/test.csv; imdb: aclImdb folder or tarball")
    p.add_argument("--train", help="labelled .csv/.tsv/.jsonl/.json file, optionally .gz/.bz2/.xz (instead of --task)")
    p.add_argument("--val", help="validation file (default: --val-frac of --train)")
    p.add_argument("--test", help="test file")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--val-frac", type=float, default=0.2, help="share of train carved as validation where there is "
                   "no validation file (imdb; --train without --val); sst2 uses its dev.csv")
    p.add_argument("--limit", type=int, help="use at most N texts per split (a seeded subset)")


def check_task_arguments(p, a):
    """p.error unless the flags of add_task_arguments name one task or a set of files."""
    if a.task and (a.train or a.test or a.val):
        p.error("give either --task with --data-dir, or --train/--test files, not both")
    if a.task and not a.data_dir:
        p.error(f"--task {a.task} needs --data-dir")
    if not a.task and not (a.train and a.test):
        p.error("give --task sst2|imdb --data-dir DIR, or --train FILE --test FILE [--val FILE]")
    cli.require(p, a, ("val_frac",), lambda v: 0 < v < 1, "in (0, 1)")
    cli.require(p, a, ("limit",), lambda v: 1 <= v < 2**62, ">= 1")

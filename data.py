"""The training text as one byte stream: document shards, and the loader of truncated-BPTT windows.

Puri et al. 2018 (arXiv 1808.01371), "Data": the text (Amazon reviews, 40 GB) is one long stream of bytes,
split into train/val/test shards by document (1000/1/1 in the paper) and read by many processes without
shuffling. Radford et al. 2017 frame every document as "\\n " + text + " " (normalize: also what transfer.py
feeds the model, so that it sees reviews as it saw them in pretraining).

- ByteLoader: B rows, each reading its own contiguous stream, so window k+1 of a row starts where window k
  ended and the recurrent state carries over. The batch at step s is a pure function of s; rank r of W
  processes reads rows [r*B/W, (r+1)*B/W), so the global batch is the same for any W.
- prepare(): raw sources -> DIR/{train,val,test}.bin (flat uint8 bytes, memory-mapped by ByteLoader) + .idx
  (int64 document offsets) + meta.json, document by document: memory does not grow with the corpus.
  The readers of each format are plumbing/sources.py; the folder's safe replacement plumbing/folders.py;
  the command line's one-line errors plumbing/cli.py.
- resolve(): train.py's --data: a prepared folder, or a raw source prepared on first use into a cache.

    python data.py SOURCE [SOURCE ...] --out DIR [--text-field reviewText] [--val-frac 0.01] [--test-frac 0.01]
    python data.py aggressive_dedup.json.gz --out data/amazon --val-frac 0.001 --test-frac 0.001   # the paper's
"""
import argparse
import hashlib
import html
import json
import os
import random

import numpy as np

from plumbing import cli
from plumbing.folders import SPLITS, check_out, locked, replacing
from plumbing.sources import DataError, documents, fingerprint, not_text, source_kind


def normalize(text, errors="replace"):
    """Radford et al.'s preprocessing: HTML unescape, newlines to spaces, frame as '\\n ' + text + ' '.

    Returns UTF-8 bytes: the model reads bytes, so a document is its byte string. errors="surrogateescape"
    gives back the raw bytes of a text decoded with it (tools/generate.py's byte primes).
    """
    text = html.unescape(text).replace("\n", " ").strip()
    return ("\n " + text + " ").encode("utf-8", errors=errors)


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


def prepare(sources, out_dir, text_field="reviewText", val_frac=0.01, test_frac=0.01, seed=0, log=print, reuse=False,
            allow_binary=False):
    """Stream `sources` into out_dir/{split}.bin + {split}.idx + meta.json; returns the meta dict.

    Each document goes to val with probability val_frac, test with test_frac, else train, drawn
    from a generator seeded by `seed`: the split is a pure function of the sources' contents+order.
    out_dir must be new, empty or a previous prepared corpus, and hold no source; it is replaced whole or not
    at all (plumbing/folders.py). With reuse=True, a corpus another process prepared in out_dir while this one
    waited for the lock is returned as it is. A source that does not look like text (random bytes, a program)
    is refused unless allow_binary.
    """
    if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise DataError(f"bad split fractions val={val_frac} test={test_frac}")
    out_dir = os.path.realpath(out_dir)  # a symlinked folder: its target is what gets replaced
    for src in sources:  # all checked before the first is read: a typo in the last one costs no wait
        if not os.path.exists(src):
            raise DataError(f"{src}: no such file or folder")
        try:
            inside = os.path.commonpath([os.path.realpath(src), out_dir]) == out_dir
        except ValueError:  # Windows: paths on two drives, so not inside
            inside = False
        if inside:
            raise DataError(f"{src}: the source lies inside the output folder {out_dir}; choose another one")
        # (a named pipe is not peeked at: it can be read only once)
        if not allow_binary and os.path.isfile(src) and source_kind(src) != "imdb" and (why := not_text(src)):
            raise DataError(f"{src}: {why}; --allow-binary reads it anyway")
    check_out(out_dir)  # before the lock, so that a refused folder gets no OUT.lock beside it
    with locked(out_dir + ".lock", log):  # one preparation of out_dir at a time (two runs started together)
        if reuse and os.path.isfile(os.path.join(out_dir, "meta.json")):
            with open(os.path.join(out_dir, "meta.json")) as f:
                return json.load(f)
        with replacing(out_dir) as tmp:
            meta = write_shards(sources, tmp, text_field, val_frac, test_frac, seed, log)
    log(f"prepare: {out_dir}: " + ", ".join(f"{s} {meta['documents'][s]} docs {meta['bytes'][s] / 1e6:.2f} MB"
                                            for s in SPLITS)
        + "".join(f"; the text of {src}: its column {col!r}" for src, col in meta.get("columns", {}).items()))
    return meta


def write_shards(sources, folder, text_field, val_frac, test_frac, seed, log):
    """The split itself, into `folder`: every document normalised, drawn to a shard, appended to its .bin."""
    rng = random.Random(seed)
    stats = {"skipped": 0, "examples": []}
    bins = {s: open(os.path.join(folder, s + ".bin"), "wb") for s in SPLITS}
    idxs = {s: open(os.path.join(folder, s + ".idx"), "wb") for s in SPLITS}
    pos, docs = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    columns = {}  # the CSV/TSV column each such source was read from
    try:
        for src in sources:
            stats.pop("column", None)
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
            if "column" in stats:
                columns[src] = stats["column"]
    finally:
        for f in (*bins.values(), *idxs.values()):
            f.close()
    if pos["train"] == 0:
        why = f"; skipped {stats['skipped']} lines, e.g. " + "; ".join(stats["examples"][:2]) if stats["skipped"] else ""
        if sum(docs.values()):  # found, but the split drew none of them for train
            raise DataError(f"{', '.join(sources)}: none of its {sum(docs.values())} documents went to train "
                            f"(val {docs['val']}, test {docs['test']}); lower the val/test fractions")
        raise DataError(f"{', '.join(sources)}: no documents found (empty corpus){why}")
    if stats["skipped"]:
        log(f"prepare: skipped {stats['skipped']} lines, e.g. " + "; ".join(stats["examples"]))
    meta = {"sources": [os.path.abspath(s) for s in sources], "text_field": text_field, "val_frac": val_frac,
            "test_frac": test_frac, "seed": seed, "bytes": pos, "documents": docs, "skipped": stats["skipped"],
            "columns": columns}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def resolve(data, cache_dir, text_field="reviewText", val_frac=0.01, test_frac=0.01, seed=0, log=print,
            allow_binary=False):
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
    key = json.dumps([os.path.abspath(data), *fingerprint(data), text_field, val_frac, test_frac, seed])
    out = os.path.join(cache_dir, os.path.basename(os.path.normpath(data)) + "-" + hashlib.sha1(key.encode()).hexdigest()[:10])
    if not os.path.isfile(os.path.join(out, "meta.json")):
        log(f"prepare: {data} -> {out}")
        prepare([data], out, text_field, val_frac, test_frac, seed, log, reuse=True, allow_binary=allow_binary)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Prepare a byte corpus for train.py.")
    p.add_argument("sources", nargs="+",
                   help="text / .jsonl / .csv / .tsv files (or .gz/.bz2/.xz), an aclImdb folder or tarball")
    p.add_argument("--out", required=True, help="output folder: new, empty or a corpus to replace")
    p.add_argument("--text-field", default="reviewText", help="JSON field or CSV column holding the text")
    p.add_argument("--val-frac", type=float, default=0.01, help="share of documents in val (paper: 0.001)")
    p.add_argument("--test-frac", type=float, default=0.01, help="share of documents in test (paper: 0.001)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split")
    p.add_argument("--allow-binary", action="store_true", help="read a source that does not look like text")
    a = p.parse_args()
    # ctrl-C: the partial output is already removed, a previous corpus in --out kept
    cli.main_guard(lambda: prepare(a.sources, a.out, a.text_field, a.val_frac, a.test_frac, a.seed,
                                   allow_binary=a.allow_binary),
                   interrupted=f"interrupted: {a.out} left as it was")

"""data.py: normalisation, preparation from every source kind, bad input, and the BPTT loader."""
import bz2
import csv
import gzip
import io
import json
import lzma
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import types
import zipfile

import numpy as np
import pytest

import data
from plumbing import folders, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_imdb(root, n=3):
    """A tiny aclImdb tree: n reviews in each of train/unsup, train/pos, train/neg, test/pos."""
    texts = {}
    for part in ("train/unsup", "train/pos", "train/neg", "test/pos"):
        os.makedirs(os.path.join(root, "aclImdb", part))
        for k in range(n):
            text = f"{part} review {k}<br />it was &amp; fine"
            with open(os.path.join(root, "aclImdb", part, f"{k}_7.txt"), "w") as f:
                f.write(text)
            texts.setdefault(part, []).append(text)
    return texts


def read_split(out, split):
    raw = np.fromfile(os.path.join(out, split + ".bin"), dtype=np.uint8).tobytes()
    idx = np.fromfile(os.path.join(out, split + ".idx"), dtype=np.int64)
    return [raw[a:b] for a, b in zip(idx, list(idx[1:]) + [len(raw)])]


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w:bz2"])
def test_a_truncated_imdb_tarball_is_an_error_wherever_it_is_cut(tmp_path, mode):
    write_imdb(str(tmp_path / "src"), n=8)
    tar = tmp_path / "aclImdb.tar"
    with tarfile.open(tar, mode) as tf:
        tf.add(str(tmp_path / "src" / "aclImdb"), arcname="aclImdb")
    whole = tar.read_bytes()
    assert sum(1 for _ in sources.imdb_documents(str(tar))) == 24
    quiet, missed = 0, []
    for cut in range(20, len(whole) - 1, 7):
        tar.write_bytes(whole[:cut])
        try:  # the reference: tarfile alone, which stops without a word where a cut lands in a member's header
            with tarfile.open(tar, "r|*") as tf:
                list(tf)
            quiet += 1
        except (tarfile.TarError, EOFError):
            pass
        try:
            sum(1 for _ in sources.imdb_documents(str(tar)))
            missed.append(cut)
        except data.DataError as e:
            assert "cannot read as a tar archive" in str(e), e
    assert quiet, "no cut that tarfile alone accepts: the test shows nothing"
    assert not missed, f"{len(missed)} of {len(whole) // 7} cuts read as a complete archive, e.g. at bytes {missed[:5]}"
    for at in range(20, len(whole), 41):  # a flipped byte: an error naming the file, whatever the decompressor raises
        tar.write_bytes(whole[:at] + bytes([whole[at] ^ 0xFF]) + whole[at + 1:])
        try:
            sum(1 for _ in sources.imdb_documents(str(tar)))  # a flip inside a review's text can go unnoticed
        except data.DataError as e:
            assert "cannot read as a tar archive" in str(e), e


def test_the_format_follows_the_extension_in_any_case_and_utf16_is_read_as_utf16(tmp_path):
    want = [b"\n one ", b"\n two "]
    (tmp_path / "R.CSV").write_text("id,text\n1,one\n2,two\n")
    (tmp_path / "R.JSONL").write_text('{"reviewText": "one"}\n{"reviewText": "two"}\n')
    (tmp_path / "movies.tarantino.jsonl").write_text('{"reviewText": "one"}\n{"reviewText": "two"}\n')
    with gzip.open(tmp_path / "R.TSV.GZ", "wt") as f:
        f.write("id\ttext\n1\tone\n2\ttwo\n")
    (tmp_path / "u16.csv").write_text("id,text\n1,one\n2,two\n", encoding="utf-16")  # Excel's "Unicode text"
    with gzip.open(tmp_path / "u16.txt.gz", "wt", encoding="utf-16-be") as f:
        f.write("\ufeffone\ntwo\n")
    (tmp_path / "x.tar.lz4").write_bytes(b"\x04\x22\x4d\x18 lz4 frames are not read here")
    with pytest.raises(data.DataError, match="x.tar.lz4: cannot read as a tar archive"):  # not as text
        data.prepare([str(tmp_path / "x.tar.lz4")], str(tmp_path / "lz4"), log=quiet)
    for name in ("R.CSV", "R.JSONL", "movies.tarantino.jsonl", "R.TSV.GZ", "u16.csv", "u16.txt.gz"):
        data.prepare([str(tmp_path / name)], str(tmp_path / name.replace(".", "_")), val_frac=0, test_frac=0, log=quiet)
        got = read_split(str(tmp_path / name.replace(".", "_")), "train")
        assert got == want, f"{name}: {got}"


def test_normalize_matches_the_reference_preprocessing():
    assert data.normalize("a &amp; b\nc  ") == b"\n a & b c "
    assert data.normalize("caf\u00e9") == "\n caf\u00e9 ".encode()
    assert data.normalize("  \n lead and trail \n ") == b"\n lead and trail "  # stripped at both ends


def test_a_file_sources_cache_key_follows_every_setting_and_the_files_mtime(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"reviewText": "one", "text": "uno"}\n{"reviewText": "two", "text": "dos"}\n')
    cache = str(tmp_path / "cache")

    def key(**kw):
        return data.resolve(str(src), cache, **{"val_frac": 0.0, "test_frac": 0.0, "log": quiet, **kw})

    base = key()
    assert key() == base, "the same settings prepare again"
    for kw in ({"text_field": "text"}, {"val_frac": 0.5}, {"test_frac": 0.5}, {"seed": 1}):
        assert key(**kw) != base, f"{kw}: the corpus of other settings was reused"
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place, same size
    assert key() != base, "a rewritten source of the same size: the stale corpus was reused"


def test_a_prepared_folder_is_used_as_it_is_and_says_when_its_split_differs(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("".join(f"doc {i}\n" for i in range(50)))
    out = str(tmp_path / "corpus")
    data.prepare([str(src)], out, val_frac=0.1, test_frac=0.2, log=quiet)
    said = []
    assert data.resolve(out, str(tmp_path / "cache"), val_frac=0.1, test_frac=0.2, log=said.append) == out
    assert said == [], said
    assert data.resolve(out, str(tmp_path / "cache"), log=said.append) == out  # train.py's defaults, 0.01
    assert len(said) == 1 and "val_frac 0.1, test_frac 0.2 apply" in said[0], said
    assert not os.path.exists(tmp_path / "cache"), "a prepared folder was prepared again"
    with open(os.path.join(out, "meta.json"), "w") as f:
        f.write("{")
    with pytest.raises(data.DataError, match="meta.json: unreadable"):
        data.resolve(out, str(tmp_path / "cache"), log=quiet)


def test_prepare_plain_text_split_is_deterministic_and_complete(tmp_path):
    src = tmp_path / "corpus.txt"
    docs = [f"document number {i} &lt;3" for i in range(300)]
    src.write_text("\n".join(docs) + "\n\n")
    for out, seed in (("a", 5), ("b", 5), ("c", 6)):
        data.prepare([str(src)], str(tmp_path / out), val_frac=0.05, test_frac=0.2, seed=seed, log=lambda *a: None)
    got = {s: read_split(str(tmp_path / "a"), s) for s in data.SPLITS}
    assert sorted(sum(got.values(), [])) == sorted(data.normalize(d) for d in docs)
    assert all(got[s] == read_split(str(tmp_path / "b"), s) for s in data.SPLITS), "same seed, different split"
    assert got["val"] != read_split(str(tmp_path / "c"), "val"), "another seed, the same split"
    # the split re-derived: one uniform draw per document from the seeded generator, val below 0.05, test below 0.25
    rng = random.Random(5)
    want = {s: [] for s in data.SPLITS}
    for d in docs:
        r = rng.random()
        want["val" if r < 0.05 else "test" if r < 0.25 else "train"].append(data.normalize(d))
    assert got == want, {s: (len(got[s]), len(want[s])) for s in data.SPLITS}
    assert not os.path.exists(str(tmp_path / "a") + ".tmp")


def test_prepare_jsonl_gz_counts_lines_without_the_field(tmp_path):
    src = tmp_path / "reviews.jsonl.gz"
    lines = [json.dumps({"reviewText": "good one"}), json.dumps({"summary": "no text"}), "{broken", "",
             json.dumps({"reviewText": "bad one"})]
    with gzip.open(src, "wt") as f:
        f.write("\n".join(lines) + "\n")
    logs = []
    meta = data.prepare([str(src)], str(tmp_path / "out"), val_frac=0, test_frac=0, log=logs.append)
    assert read_split(str(tmp_path / "out"), "train") == [b"\n good one ", b"\n bad one "]
    assert meta["skipped"] == 2
    assert any("reviews.jsonl.gz:2" in line and "reviews.jsonl.gz:3" in line for line in logs), logs


def test_prepare_csv_and_tsv_columns(tmp_path):
    (tmp_path / "a.csv").write_text('label,sentence\n1,"nice, really"\n0,awful\n')
    (tmp_path / "b.tsv").write_text("id\tbody\n1\thello there\n")
    data.prepare([str(tmp_path / "a.csv")], str(tmp_path / "o1"), val_frac=0, test_frac=0, log=lambda *a: None)
    assert read_split(str(tmp_path / "o1"), "train") == [b"\n nice, really ", b"\n awful "]
    data.prepare([str(tmp_path / "b.tsv")], str(tmp_path / "o2"), text_field="body", val_frac=0, test_frac=0,
                 log=lambda *a: None)
    assert read_split(str(tmp_path / "o2"), "train") == [b"\n hello there "]
    with pytest.raises(data.DataError, match=r"b\.tsv: no text column 'missing'"):
        data.prepare([str(tmp_path / "b.tsv")], str(tmp_path / "o3"), text_field="missing", log=lambda *a: None)


def test_imdb_folder_and_tarball_give_the_same_training_text_without_test(tmp_path):
    texts = write_imdb(str(tmp_path / "src"))
    tar = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(str(tmp_path / "src" / "aclImdb"), arcname="aclImdb")
    folder = data.prepare([str(tmp_path / "src")], str(tmp_path / "f"), val_frac=0, test_frac=0, log=lambda *a: None)
    tarred = data.prepare([str(tar)], str(tmp_path / "t"), val_frac=0, test_frac=0, log=lambda *a: None)
    shutil.copy(tar, tmp_path / "aclImdb.TGZ")  # the other name of a .tar.gz, in any case
    data.prepare([str(tmp_path / "aclImdb.TGZ")], str(tmp_path / "z"), val_frac=0, test_frac=0, log=lambda *a: None)
    a, b = read_split(str(tmp_path / "f"), "train"), read_split(str(tmp_path / "t"), "train")
    want = {data.normalize(t) for p in ("train/unsup", "train/pos", "train/neg") for t in texts[p]}
    assert set(a) == set(b) == want and len(a) == 9
    assert read_split(str(tmp_path / "z"), "train") == b
    assert folder["documents"] == tarred["documents"]


def test_bad_inputs_get_clear_errors(tmp_path):
    (tmp_path / "fine.txt").write_text("a review\n")
    logs = []
    with pytest.raises(data.DataError, match="nope.txt: no such file"):  # before fine.txt is read
        data.prepare([str(tmp_path / "fine.txt"), str(tmp_path / "nope.txt")], str(tmp_path / "o"), log=logs.append)
    assert logs == [] and not os.path.exists(str(tmp_path / "o") + ".lock"), logs
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(data.DataError, match="empty.txt: no documents found"):
        data.prepare([str(tmp_path / "empty.txt")], str(tmp_path / "o"), log=lambda *a: None)
    with pytest.raises(data.DataError, match=r"fine.txt: none of its 1 documents went to train \(val 1, test 0\)"):
        data.prepare([str(tmp_path / "fine.txt")], str(tmp_path / "o"), val_frac=0.999999, test_frac=0, log=quiet)
    (tmp_path / "trunc.txt.gz").write_bytes(gzip.compress(b"hello\n" * 1000)[:50])
    with pytest.raises(data.DataError, match="trunc.txt.gz: cannot read"):
        data.prepare([str(tmp_path / "trunc.txt.gz")], str(tmp_path / "o"), log=lambda *a: None)
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(str(tmp_path / "o") + ".tmp"), "leftovers"
    (tmp_path / "small.bin").write_bytes(b"abc")
    with pytest.raises(data.DataError, match="too small"):
        data.ByteLoader(str(tmp_path / "small.bin"), batch_size=2, seq_len=4)



def quiet(*a):
    pass


def cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_prepare_never_deletes_what_it_did_not_write(tmp_path):
    x = tmp_path / "x"
    x.mkdir()
    (x / "reviews.txt").write_text("a review\n" * 20)
    (x / "notes.txt").write_text("mine")
    with pytest.raises(data.DataError, match=r"reviews\.txt: the source lies inside the output folder .*x"):
        data.prepare([str(x / "reviews.txt")], str(x), log=quiet)
    p = cli("reviews.txt", "--out", ".", cwd=x)
    assert p.returncode == 1 and p.stderr.startswith("error: reviews.txt: the source lies inside the output folder"), \
        p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    (tmp_path / "src.txt").write_text("another review\n" * 20)
    with pytest.raises(data.DataError, match=r"x: exists and is neither empty nor a prepared corpus"):
        data.prepare([str(tmp_path / "src.txt")], str(x), log=quiet)
    assert sorted(os.listdir(x)) == ["notes.txt", "reviews.txt"], "files of the output folder were deleted"
    (tmp_path / "c.tmp").mkdir()  # a folder of the user's where the temporary folder goes
    (tmp_path / "c.tmp" / "notes.txt").write_text("mine")
    with pytest.raises(data.DataError, match=r"c\.tmp: is in the way"):
        data.prepare([str(tmp_path / "src.txt")], str(tmp_path / "c"), log=quiet)
    assert os.listdir(tmp_path / "c.tmp") == ["notes.txt"]


def test_prepare_replaces_a_previous_corpus_whole(tmp_path, monkeypatch):
    (tmp_path / "src.txt").write_text("".join(f"review {i}\n" for i in range(50)))
    out = str(tmp_path / "c")
    old = data.prepare([str(tmp_path / "src.txt")], out, seed=1, log=quiet)
    old_train = read_split(out, "train")
    os.makedirs(out + ".tmp")  # a leftover of a killed run: only prepare's files, so it is cleaned
    open(os.path.join(out + ".tmp", "train.bin"), "wb").close()
    replace = os.replace

    def killed_while_swapping(a, b):  # the run dies between moving the old corpus aside and the new one in
        if a.endswith(".tmp"):
            raise KeyboardInterrupt
        replace(a, b)

    monkeypatch.setattr(os, "replace", killed_while_swapping)
    with pytest.raises(KeyboardInterrupt):
        data.prepare([str(tmp_path / "src.txt")], out, seed=2, log=quiet)
    assert not os.path.exists(out), "a half corpus"
    assert read_split(out + ".old", "train") == old_train and os.path.isfile(os.path.join(out + ".old", "meta.json")), \
        "the previous corpus was lost"
    monkeypatch.setattr(os, "replace", replace)
    new = data.prepare([str(tmp_path / "src.txt")], out, seed=2, log=quiet)
    assert (old["seed"], new["seed"]) == (1, 2) and json.load(open(os.path.join(out, "meta.json")))["seed"] == 2
    assert sorted(os.listdir(tmp_path)) == ["c", "src.txt"], os.listdir(tmp_path)  # the lock file deleted
    open(os.path.join(out, ".DS_Store"), "wb").close()  # the Finder has shown the folder: still a corpus
    assert data.prepare([str(tmp_path / "src.txt")], out, seed=3, log=quiet)["seed"] == 3


WAIT_FOR_THE_LOCK = """
import fcntl, sys, types
import data
from plumbing import folders
from plumbing import folders, sources

def flock(f, op):  # says when this process has to wait for the lock
    try:
        fcntl.flock(f, op | fcntl.LOCK_NB)
    except BlockingIOError:
        print("waiting", flush=True)
        fcntl.flock(f, op)

folders.fcntl = types.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)
print(data.resolve(sys.argv[1], sys.argv[2], log=lambda *a: None))
"""


def test_resolve_waits_for_a_preparation_in_progress_and_uses_it(tmp_path):
    """Two train.py runs started together on one raw source: the second waits for the first one's corpus
    (here the test is the first: it holds OUT.lock, then puts a corpus in place) instead of preparing again."""
    fcntl = pytest.importorskip("fcntl")
    (tmp_path / "src.txt").write_text("a review\n" * 50)
    out = data.resolve(str(tmp_path / "src.txt"), str(tmp_path / "cache"), log=quiet)
    shutil.rmtree(out)
    with open(out + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        second = subprocess.Popen([sys.executable, "-c", WAIT_FOR_THE_LOCK, str(tmp_path / "src.txt"),
                                   str(tmp_path / "cache")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        said = second.stdout.readline()
        if said == "waiting\n":
            os.makedirs(out)
            with open(os.path.join(out, "meta.json"), "w") as f:
                json.dump({"by": "the first process"}, f)
    said += second.communicate(timeout=60)[0]
    assert second.returncode == 0 and said == f"waiting\n{out}\n", f"the second process did not wait: {said!r}"
    assert os.listdir(out) == ["meta.json"] and json.load(open(os.path.join(out, "meta.json"))) == {
        "by": "the first process"}, "the second process prepared the corpus again"


def test_resolve_sees_files_change_inside_a_folder_source(tmp_path):
    write_imdb(str(tmp_path / "src"))
    a = data.resolve(str(tmp_path / "src"), str(tmp_path / "cache"), val_frac=0, test_frac=0, log=quiet)
    folder = os.stat(tmp_path / "src" / "aclImdb" / "train" / "pos")
    (tmp_path / "src" / "aclImdb" / "train" / "pos" / "1_7.txt").write_text("rewritten")
    assert os.stat(tmp_path / "src" / "aclImdb" / "train" / "pos").st_mtime_ns == folder.st_mtime_ns
    b = data.resolve(str(tmp_path / "src"), str(tmp_path / "cache"), val_frac=0, test_frac=0, log=quiet)
    assert a != b and b"\n rewritten " in read_split(b, "train"), "the cached corpus is stale"
    assert data.resolve(str(tmp_path / "src"), str(tmp_path / "cache"), val_frac=0, test_frac=0, log=quiet) == b


def test_a_cache_inside_a_folder_source_does_not_change_its_key(tmp_path):
    write_imdb(str(tmp_path / "src"))
    cache = str(tmp_path / "src" / "prepared")  # train.py's default --cache-dir inside a --data folder
    outs = {data.resolve(str(tmp_path / "src"), cache, log=quiet) for _ in range(3)}
    assert len(outs) == 1 and len(os.listdir(cache)) == 1, (outs, os.listdir(cache))  # the corpus (its lock deleted)


def test_without_file_locks_preparation_goes_on_with_a_warning(tmp_path, monkeypatch):
    def no_locks(f, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(folders, "fcntl", types.SimpleNamespace(flock=no_locks, LOCK_EX=2))
    (tmp_path / "s.txt").write_text("a review\n")
    logs = []
    data.prepare([str(tmp_path / "s.txt")], str(tmp_path / "o"), val_frac=0, test_frac=0, log=logs.append)
    assert read_split(str(tmp_path / "o"), "train") == [b"\n a review "]
    assert "no file lock" in logs[0] and "No locks available" in logs[0], logs


def test_a_symlinked_out_is_written_through_and_a_refused_out_gets_no_lock(tmp_path):
    (tmp_path / "s.txt").write_text("a review\n")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    for _ in range(2):  # the second replaces the first corpus
        data.prepare([str(tmp_path / "s.txt")], str(tmp_path / "link"), val_frac=0, test_frac=0, log=quiet)
        assert os.path.islink(tmp_path / "link") and read_split(str(tmp_path / "real"), "train") == [b"\n a review "]
    assert sorted(os.listdir(tmp_path)) == ["link", "real", "s.txt"], os.listdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes").write_text("mine")
    with pytest.raises(data.DataError, match="mine: exists and is neither empty nor a prepared corpus"):
        data.prepare([str(tmp_path / "s.txt")], str(tmp_path / "mine"), log=quiet)
    assert not os.path.exists(tmp_path / "mine.lock")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_a_compressed_named_pipe_is_read_once(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt.gz")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "data.py"), "pipe.txt.gz", "--out", "out",
                          "--val-frac", "0", "--test-frac", "0"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    with open(tmp_path / "pipe.txt.gz", "wb") as pipe:
        pipe.write(gzip.compress(b"a piped review\nanother\n"))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert read_split(str(tmp_path / "out"), "train") == [b"\n a piped review ", b"\n another "]


def test_bz2_xz_and_mislabelled_compressed_sources(tmp_path):
    lines = "\n".join(json.dumps({"reviewText": f"review {i}"}) for i in range(3)) + "\n"
    want = [data.normalize(f"review {i}") for i in range(3)]
    for name, compress in (("r.jsonl.bz2", bz2.compress), ("r.jsonl.xz", lzma.compress)):
        (tmp_path / name).write_bytes(compress(lines.encode()))
        data.prepare([str(tmp_path / name)], str(tmp_path / name) + ".out", val_frac=0, test_frac=0, log=quiet)
        assert read_split(str(tmp_path / name) + ".out", "train") == want, name
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("r.jsonl", lines)
    (tmp_path / "gz.txt").write_bytes(gzip.compress(b"hello\n"))
    (tmp_path / "xz.gz").write_bytes(lzma.compress(b"hello\n"))
    (tmp_path / "bz.jsonl").write_bytes(bz2.compress(lines.encode()))
    (tmp_path / "r.zip").write_bytes(zipped.getvalue())
    (tmp_path / "r.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 20)
    for name, message in (("gz.txt", "gz.txt: compressed with gzip but not named *.gz"),
                          ("xz.gz", "xz.gz: compressed with xz but not named *.xz"),
                          ("bz.jsonl", "bz.jsonl: compressed with bz2 but not named *.bz2"),
                          ("r.zip", "r.zip: compressed with zip; decompress it first, or use .gz/.bz2/.xz"),
                          ("r.zst", "r.zst: compressed with zstd; decompress it first")):
        with pytest.raises(data.DataError) as e:
            data.prepare([str(tmp_path / name)], str(tmp_path / "o"), log=quiet)
        assert message in str(e.value), e.value
    (tmp_path / "bzh.txt").write_text("BZh9 is where this text starts\n")  # a text, not bz2
    data.prepare([str(tmp_path / "bzh.txt")], str(tmp_path / "o"), val_frac=0, test_frac=0, log=quiet)
    corrupt = bytearray(gzip.compress(b"hello world\n" * 1000))
    corrupt[20:30] = b"\xff" * 10  # a bad deflate stream: zlib.error, not OSError
    (tmp_path / "bad.txt.gz").write_bytes(bytes(corrupt))
    (tmp_path / "bad.txt.xz").write_bytes(lzma.compress(b"hello world\n" * 1000)[:-30] + b"\0" * 30)
    for name in ("bad.txt.gz", "bad.txt.xz"):
        with pytest.raises(data.DataError, match=name + ": cannot read"):
            data.prepare([str(tmp_path / name)], str(tmp_path / "o2"), log=quiet)


def test_csv_long_fields_and_excel_byte_order_mark(tmp_path, monkeypatch, request):
    (tmp_path / "long.csv").write_text("text\n" + "x" * 200_000 + "\nshort\n")
    data.prepare([str(tmp_path / "long.csv")], str(tmp_path / "o1"), val_frac=0, test_frac=0, log=quiet)
    assert read_split(str(tmp_path / "o1"), "train") == [data.normalize("x" * 200_000), b"\n short "]
    (tmp_path / "excel.csv").write_text("text,label\nfine,1\n", encoding="utf-8-sig")
    data.prepare([str(tmp_path / "excel.csv")], str(tmp_path / "o2"), val_frac=0, test_frac=0, log=quiet)
    assert read_split(str(tmp_path / "o2"), "train") == [b"\n fine "]
    request.addfinalizer(lambda limit=csv.field_size_limit(): csv.field_size_limit(limit))
    monkeypatch.setattr(sources, "MAX_LINE", 100)
    (tmp_path / "over.csv").write_text("id,text\n1,short\n2," + "y" * 1000 + "\n3,after\n")
    logs = []
    meta = data.prepare([str(tmp_path / "over.csv")], str(tmp_path / "o3"), val_frac=0, test_frac=0, log=logs.append)
    assert read_split(str(tmp_path / "o3"), "train") == [b"\n short ", b"\n after "] and meta["skipped"] == 1
    assert "over.csv:3: line longer than 100 characters" in logs[0], logs
    (tmp_path / "lines.csv").write_text('text\n"' + "z\n" * 60 + '"\n')  # one field of 120 characters
    with pytest.raises(data.DataError, match="lines.csv:2: malformed row .*field larger than field limit"):
        data.prepare([str(tmp_path / "lines.csv")], str(tmp_path / "o4"), log=quiet)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_ctrl_c_exits_with_one_line_and_keeps_the_previous_corpus(tmp_path):
    (tmp_path / "old.txt").write_text("old review\n" * 20)
    assert cli("old.txt", "--out", "out", cwd=tmp_path).returncode == 0
    os.mkfifo(tmp_path / "pipe.txt")
    # preexec_fn: a terminal's ctrl-C, also when a script runs the tests in the background (`make test &`
    # in a non-interactive shell makes every child ignore SIGINT)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "data.py"), "pipe.txt", "--out", "out"], cwd=tmp_path,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    with open(tmp_path / "pipe.txt", "w") as pipe:  # opens once data.py reads it: it is inside prepare()
        pipe.write("new review\n" * 20)
        pipe.flush()
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and err == "interrupted: out left as it was\n", err
    assert set(read_split(str(tmp_path / "out"), "train")) == {b"\n old review "}
    assert not os.path.exists(tmp_path / "out.tmp")


def make_bin(tmp_path, n=10_000):
    path = tmp_path / "train.bin"
    stream = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    stream.tofile(path)
    return str(path), stream


def test_loader_rows_are_contiguous_streams_across_steps(tmp_path):
    path, stream = make_bin(tmp_path)
    B, T = 4, 16
    loader = data.ByteLoader(path, B, T)
    L = len(stream) // B
    rows = [[] for _ in range(B)]
    for step in range(loader.steps_per_epoch):
        x, y = loader.batch(step)
        assert x.shape == (B, T) and (x[:, 1:] == y[:, :-1]).all()
        for b in range(B):
            rows[b].extend(x[b])
    for b in range(B):  # concatenated windows of row b are exactly its stream [b*L, b*L + K*T)
        want = stream[b * L: b * L + loader.steps_per_epoch * T]
        assert np.array_equal(np.array(rows[b]), want), f"row {b} is not contiguous"
    x0, _ = loader.batch(0)
    xe, _ = loader.batch(loader.steps_per_epoch)  # the next epoch starts over, without shuffling
    assert loader.window(loader.steps_per_epoch) == 0 and np.array_equal(x0, xe)


def test_loader_windows_stay_inside_their_row_when_rows_are_a_whole_number_of_windows(tmp_path):
    B, T, k = 3, 8, 5  # each row exactly k*T bytes: its last window would need one byte of the next row
    path = tmp_path / "exact.bin"
    stream = np.repeat(np.arange(B, dtype=np.uint8), k * T)  # row b's bytes are all b
    stream.tofile(path)
    loader = data.ByteLoader(str(path), B, T)
    assert loader.steps_per_epoch == k - 1, f"{loader.steps_per_epoch} windows per epoch, want {k - 1}"
    for step in range(loader.steps_per_epoch):
        x, y = loader.batch(step)
        assert (x == np.arange(B)[:, None]).all() and (y == np.arange(B)[:, None]).all(), f"step {step} crosses rows"


def test_loader_ranks_partition_the_global_batch_and_steps_are_pure(tmp_path):
    path, _ = make_bin(tmp_path)
    whole = data.ByteLoader(path, 8, 16)
    parts = [data.ByteLoader(path, 8, 16, rank=r, world=4) for r in range(4)]
    for step in (0, 5, 17, 123):
        x, y = whole.batch(step)
        xs = np.concatenate([p.batch(step)[0] for p in parts])
        ys = np.concatenate([p.batch(step)[1] for p in parts])
        assert np.array_equal(x, xs) and np.array_equal(y, ys), f"step {step}"
        assert np.array_equal(x, data.ByteLoader(path, 8, 16).batch(step)[0]), "step is not reproducible"
    with pytest.raises(data.DataError, match="not divisible"):
        data.ByteLoader(path, 8, 16, rank=0, world=3)

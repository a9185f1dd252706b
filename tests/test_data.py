"""data.py: normalisation, preparation from every source kind, bad input, and the BPTT loader."""
import gzip
import io
import json
import os
import tarfile

import numpy as np
import pytest

import data


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


def test_normalize_matches_the_reference_preprocessing():
    assert data.normalize("a &amp; b\nc  ") == b"\n a & b c "
    assert data.normalize("caf\u00e9") == "\n caf\u00e9 ".encode()


def test_prepare_plain_text_split_is_deterministic_and_complete(tmp_path):
    src = tmp_path / "corpus.txt"
    docs = [f"document number {i} &lt;3" for i in range(300)]
    src.write_text("\n".join(docs) + "\n\n")
    meta = data.prepare([str(src)], str(tmp_path / "a"), val_frac=0.1, test_frac=0.1, seed=5, log=lambda *a: None)
    data.prepare([str(src)], str(tmp_path / "b"), val_frac=0.1, test_frac=0.1, seed=5, log=lambda *a: None)
    got = {s: read_split(str(tmp_path / "a"), s) for s in data.SPLITS}
    assert sorted(sum(got.values(), [])) == sorted(data.normalize(d) for d in docs)
    assert all(got[s] == read_split(str(tmp_path / "b"), s) for s in data.SPLITS), "same seed, different split"
    assert 10 <= meta["documents"]["val"] <= 50 and 10 <= meta["documents"]["test"] <= 50, meta["documents"]
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
    a, b = read_split(str(tmp_path / "f"), "train"), read_split(str(tmp_path / "t"), "train")
    want = {data.normalize(t) for p in ("train/unsup", "train/pos", "train/neg") for t in texts[p]}
    assert set(a) == set(b) == want and len(a) == 9
    assert folder["documents"] == tarred["documents"]


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match="nope.txt: no such file"):
        data.prepare([str(tmp_path / "nope.txt")], str(tmp_path / "o"), log=lambda *a: None)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(data.DataError, match="empty.txt: no documents found"):
        data.prepare([str(tmp_path / "empty.txt")], str(tmp_path / "o"), log=lambda *a: None)
    (tmp_path / "trunc.txt.gz").write_bytes(gzip.compress(b"hello\n" * 1000)[:50])
    with pytest.raises(data.DataError, match="trunc.txt.gz: cannot read"):
        data.prepare([str(tmp_path / "trunc.txt.gz")], str(tmp_path / "o"), log=lambda *a: None)
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(str(tmp_path / "o") + ".tmp"), "leftovers"
    (tmp_path / "small.bin").write_bytes(b"abc")
    with pytest.raises(data.DataError, match="too small"):
        data.ByteLoader(str(tmp_path / "small.bin"), batch_size=2, seq_len=4)


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

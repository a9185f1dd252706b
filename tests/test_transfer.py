"""transfer.py: featurisation (against the reference loop, bf16, the schedule), the solvers against scikit-learn, the neuron finder,
the loaders and their errors, the command line end to end on a tiny checkpoint."""
import bz2
import gzip
import io
import json
import lzma
import os
import re
import tarfile
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import mlstm
import train
import transfer
from data import DataError
from fast import inference, logistic
from plumbing import labeled, reports


def problem(n=300, d=12, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    w = rng.normal(size=d) * (rng.random(d) < 0.5)
    y = (X @ w + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    return X, y


@pytest.mark.parametrize("C", [2.0**-6, 2.0**-2, 1.0, 4.0])
def test_l2_matches_sklearn(C):
    X, y = problem()
    w, b = transfer.fit_l2(X, y, C)
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=10000).fit(X, y)
    diff = max(np.abs(w - ref.coef_[0]).max(), abs(b - ref.intercept_[0]))
    assert diff < 1e-6, f"L2 coefficients differ from sklearn by {diff:.2e}"


def test_l2_never_takes_a_step_that_raises_the_objective(monkeypatch):
    X, y = problem()
    w0, b0 = transfer.fit_l2(X, y, 1.0, max_iter=3)  # short of the optimum: a descent step exists
    solve = logistic._solve_pd
    monkeypatch.setattr(logistic, "_solve_pd", lambda A, g: -solve(A, g))  # every direction points uphill
    w, b = transfer.fit_l2(X, y, 1.0, init=(w0, b0))
    diff = max(np.abs(w - w0).max(), abs(b - b0))
    assert diff == 0, f"an uphill direction moved the fit by {diff:.2e}"


def test_l1_warns_when_it_stops_at_max_iter():
    X, y = problem(seed=1)
    with pytest.warns(UserWarning, match="max_iter=2 before converging"):  # two Newton steps from zero: too few
        transfer.fit_l1(X, y, 1.0, tol=1e-9, max_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged fit stays silent
        transfer.fit_l1(X, y, 1.0, tol=1e-9)


@pytest.mark.parametrize("C", [2.0**-6, 2.0**-3, 1.0])
def test_l1_matches_sklearn(C):
    X, y = problem(seed=1)
    w, b = transfer.fit_l1(X, y, C, tol=1e-9)
    ref = LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", tol=1e-10, max_iter=10000,
                             intercept_scaling=1e4).fit(X, y)  # huge scaling: liblinear's bias ~unpenalised
    rw = ref.coef_[0]
    diff = max(np.abs(w - rw).max(), abs(b - ref.intercept_[0]))
    assert diff < 1e-3, f"L1 coefficients differ from sklearn by {diff:.2e}"
    assert set(np.flatnonzero(w)) == set(np.flatnonzero(np.abs(rw) > 1e-6)), (np.flatnonzero(w), np.flatnonzero(rw))
    acc, ref_acc = transfer.accuracy(X, y, w, b), ref.score(X, y)
    assert abs(acc - ref_acc) <= 1 / len(y) + 1e-12, (acc, ref_acc)  # at most one point on the boundary


def test_neuron_finder_recovers_planted_feature():
    rng = np.random.default_rng(3)
    n, d, planted = 400, 64, 37
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, d))
    X[:, planted] = -(2 * y - 1) * 1.5 + rng.normal(size=n)  # informative, with a negative sign
    Z = transfer.standardize(X)[0]
    best = transfer.fit_select(Z[:300], y[:300], Z[300:], y[300:], "l1")
    assert int(np.argmax(np.abs(best["w"]))) == planted, np.argsort(-np.abs(best["w"]))[:5]
    assert best["w"][planted] < 0
    t, acc = transfer.threshold_fit(Z[:300, planted], y[:300], sign=-1.0)
    brute = max(((-Z[:300, planted] > s) == (y[:300] == 1)).mean() for s in np.append(-Z[:300, planted], -np.inf))
    assert abs(acc - brute) < 1e-12, (acc, brute)


def tiny_model(seed=0, hidden=16):
    torch.manual_seed(seed)
    return mlstm.MLSTM(hidden=hidden, embed=8).eval()


def texts(n=9, seed=0):
    rng = np.random.default_rng(seed)
    return [bytes(rng.integers(32, 127, int(k)).astype(np.uint8)) for k in rng.integers(1, 70, n)]


def reference_features(model, byte_strings, feature):
    """Each text alone through mlstm.py's own loop of `cell` (model.rnn, return_cells), pooled by hand: the last
    state, the mean and the max over the text's steps (an empty text: zeros)."""
    rows = []
    for b in byte_strings:
        if not b:
            rows.append(np.zeros(model.hidden * len(transfer.FEATURES[feature])))
            continue
        with torch.no_grad():
            hs, cs, _ = model.rnn(torch.tensor(list(b))[None], return_cells=True)
        seq = {"h": hs[0].double(), "c": cs[0].double()}
        pools = {"last": lambda v: v[-1], "mean": lambda v: v.mean(0), "max": lambda v: v.amax(0)}
        rows.append(torch.cat([pools[how](seq[state]) for state, how in transfer.FEATURES[feature]]).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_featurize_equals_the_reference_loop_for_every_pool(batch_size):
    """Texts of very different lengths (0 to 600 bytes) read together, rows refilled as texts end: every feature
    equals the text read alone through mlstm.py's loop of `cell`, whatever the batch (padding never counts)."""
    model = tiny_model()
    rng = np.random.default_rng(1)
    bs = [bytes(rng.integers(0, 256, int(k)).astype(np.uint8)) for k in (600, 1, 0, 37, 2, 250, 9, 9, 120, 3)]
    got = transfer.featurize(model, bs, tuple(transfer.FEATURES), batch_size=batch_size)
    x, lens = transfer.padded([b for b in bs if b])  # transfer.pool, the definition, on one padded batch
    with torch.no_grad():
        hs, cs, _ = model.rnn(x, return_cells=True)
    for feature in transfer.FEATURES:
        want = reference_features(model, bs, feature)
        diff = np.abs(got[feature] - want).max()
        assert diff < 1e-5, f"{feature}, batch {batch_size}: max |featurize - reference| = {diff:.2e}"
        pooled = transfer.features({"h": hs, "c": cs}, lens, feature).numpy()
        diff = np.abs(pooled - want[[k for k, b in enumerate(bs) if b]]).max()
        assert diff < 1e-5, f"{feature}: max |transfer.features of a padded batch - reference| = {diff:.2e}"


def test_featurize_in_bf16_stays_within_bf16s_rounding_of_the_reference():
    """bf16 matrix products (fast/inference.py keeps the gate math and the cell state in float32): the features
    within bf16's rounding of the float64 reference, relative to the features' scale."""
    model = tiny_model(hidden=64)
    bs = texts(n=12)
    got = transfer.featurize(model.to(torch.bfloat16), bs, tuple(transfer.FEATURES), batch_size=5)
    model.float()
    for feature in transfer.FEATURES:
        want = reference_features(model, bs, feature)
        err = np.abs(got[feature] - want).max() / np.abs(want).max()
        assert err < 3e-2, f"{feature} in bf16: max |diff| / max |reference| = {err:.2e}"


def test_schedule_keeps_rows_full_and_the_reading_rows_a_prefix():
    lengths = np.array([5, 0, 9, 3, 3, 7, 1, 12, 2])
    rows, row, first = inference.schedule(lengths, 3)
    assert rows == 3 and row[1] == -1, (rows, row)
    spans = sorted((row[i], first[i], first[i] + lengths[i]) for i in range(len(lengths)) if lengths[i])
    for (r, _, end), (r2, start, _) in zip(spans, spans[1:]):  # a row's texts follow each other without a gap
        assert r != r2 or start == end, spans
    totals = [max(e for r2, _, e in spans if r2 == r) for r in range(rows)]
    assert totals == sorted(totals, reverse=True) and totals[0] - totals[-1] <= max(lengths), totals
    assert inference.schedule(lengths, 100)[0] == 8  # never more rows than texts to read


def test_the_featurisation_settings_follow_the_machine(monkeypatch):
    monkeypatch.setattr(inference, "bf16_matrix_units", lambda: ["AMX"])
    dtype, batch, why = inference.settings("cpu")
    assert (dtype, batch) == ("bf16", 256) and "bf16 matrix units: AMX" in why, why
    monkeypatch.setattr(inference, "bf16_matrix_units", lambda: [])
    assert inference.settings("cpu")[:2] == ("fp32", 128)
    assert inference.settings("cpu", "bf16", 32)[:2] == ("bf16", 32) and "as given" in inference.settings("cpu", "bf16")[2]
    assert inference.settings("cuda", model_dtype="fp16")[:2] == ("fp16", 256)


def test_the_progress_eta_comes_from_the_bytes(capsys, monkeypatch):
    from plumbing import cli
    clock = iter([0.0, 10.0, 10.0])
    monkeypatch.setattr(cli.time, "time", lambda: next(clock))
    update = cli.progress("featurize", total=100, every=0.0, total_bytes=1000)
    update(10, 500)  # a tenth of the texts but half of the bytes in 10 s: 10 s to go, not 90
    assert "eta 10s" in capsys.readouterr().err


def write(path, text):
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_read_labeled_formats(tmp_path):
    want = (["good film", "bad, awful"], [1, 0])
    files = [write(tmp_path / "a.csv", 'label,text\n1,good film\n0,"bad, awful"\n'),
             write(tmp_path / "a.tsv", "text\tlabel\ngood film\tpos\nbad, awful\tneg\n"),
             write(tmp_path / "a.jsonl.gz", '{"text": "good film", "label": 1}\n\n{"text": "bad, awful", "label": "0"}\n'),
             write(tmp_path / "UP.CSV.GZ", 'label,text\n1,good film\n0,"bad, awful"\n'),
             write(tmp_path / "UP.TSV", "text\tlabel\ngood film\tpos\nbad, awful\tneg\n")]
    for name, compress in (("b.csv.xz", lzma.compress), ("b.tsv.bz2", bz2.compress)):
        (tmp_path / name).write_bytes(compress(open(files[name.endswith("bz2")], "rb").read()))
        files.append(str(tmp_path / name))
    for f in files:
        t, y = labeled.read_labeled(f)
        assert (t, y.tolist()) == want, f
    (tmp_path / "c.csv").write_bytes(lzma.compress(b"label,text\n1,x\n"))
    with pytest.raises(DataError, match="c.csv: compressed with xz but not named"):
        labeled.read_labeled(str(tmp_path / "c.csv"))


@pytest.mark.parametrize("content,message", [
    ("label,body\n1,x\n", "no column 'text'"),
    ("label,text\n1,x\n2,y\n", "not binary"),
    ("label,text\n", "empty split"),
    ("label,text\n1\n", "no 'text' text"),
])
def test_read_labeled_errors(tmp_path, content, message):
    with pytest.raises(DataError, match=message) as e:
        labeled.read_labeled(write(tmp_path / "bad.csv", content))
    assert "bad.csv" in str(e.value)


def test_read_labeled_missing(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        labeled.read_labeled(str(tmp_path / "none.csv"))


ROW = '{"text": "a", "label": 1}'


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", f"{ROW}\n\n{ROW}\nnot json\n", "bad.jsonl:4: not valid JSON (Expecting value)"),
    ("bad.jsonl", f'{ROW}\n{{"text": "b", "label": 0,}}\n', "bad.jsonl:2: not valid JSON (Expecting property name"),
    ("array.json", f"[{ROW}, {ROW}]\n", "array.json:1: a JSON array; expected one JSON object per line"),
    ("pretty.json", f"[\n {ROW}\n]\n", "pretty.json:1: a JSON array; expected one JSON object per line"),
    ("a.txt", "text,label\n", "unknown format '.txt' (expected .csv, .tsv, .jsonl or .json, optionally .gz/.bz2/.xz)"),
])
def test_read_labeled_json_errors_name_the_line(tmp_path, name, content, message):
    with pytest.raises(DataError) as e:
        labeled.read_labeled(write(tmp_path / name, content))
    assert message in str(e.value) and "\n" not in str(e.value), e.value


def test_read_labeled_excel_bom_and_long_reviews(tmp_path):
    long = "a fine film " * 20_000  # 240,000 characters: over csv's default field limit of 131,072
    (tmp_path / "excel.csv").write_bytes("\ufefftext,label\n".encode() + f'"{long}",pos\n"short, bad",neg\n'.encode())
    t, y = labeled.read_labeled(str(tmp_path / "excel.csv"))
    assert (t, y.tolist()) == ([long, "short, bad"], [1, 0]), "the byte-order mark or the long field was not read"


def imdb_tar(tmp_path, n=5):
    path = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in ("pos", "neg", "unsup"):
                for i in range(n if cls != "unsup" or split == "train" else 0):
                    raw = f"{split} {cls} review {i}<br />the end".encode()
                    info = tarfile.TarInfo(f"aclImdb/{split}/{cls}/{i}_7.txt")
                    info.size = len(raw)
                    tar.addfile(info, io.BytesIO(raw))
    return path


def test_load_imdb_and_sst2(tmp_path):
    splits = labeled.load_imdb(str(imdb_tar(tmp_path, n=10)))
    assert {s: len(t) for s, (t, _) in splits.items()} == {"train": 16, "val": 4, "test": 20}
    assert not any("unsup" in t for t, _ in [splits["train"]])
    seen = set(splits["train"][0]) | set(splits["val"][0])
    assert len(seen) == 20 and all(t.startswith("train") for t in seen)
    for f in ("train", "dev", "test"):
        write(tmp_path / f"{f}.csv", "label,sentence\n1,fine\n0,poor\n")
    s = labeled.load_sst2(str(tmp_path))
    assert s["val"][0] == ["fine", "poor"] and s["test"][1].tolist() == [1, 0]


def test_heatmap_html_escapes_and_checks():
    page = reports.heatmap_html([b"<b>\xc3\xa9", b"ok"], [[1, -1, 0.5, 0.5, 0.25], [0, 0]], title="t")
    assert "&lt;" in page and "\u00e9" in page and "<b>" not in page.split("</h3>")[1]
    with pytest.raises(ValueError, match="bytes but"):
        reports.heatmap_html([b"abc"], [[1, 2]])


def toy_task(tmp_path, n_train=60, n_test=30):
    """train.csv and test.csv of a separable toy task in tmp_path: 'wonderful great' vs 'awful bad'."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [("1", "wonderful great " * int(k)) if i % 2 else ("0", "awful bad " * int(k))
                for i, k in enumerate(rng.integers(1, 4, n))]
        write(tmp_path / f"{split}.csv", "label,text\n" + "".join(f"{y},{t}\n" for y, t in rows))
    return ["--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv")]


def tiny_checkpoint(tmp_path, hidden=16):
    path = str(tmp_path / "ckpt.pt")
    config = {"hidden": hidden, "embed": 8, "no_weight_norm": False, "dtype": "fp32"}
    train.save_checkpoint(path, {"model": tiny_model(hidden=hidden).state_dict(), "config": config})
    return path


def test_cli_end_to_end(tmp_path, capsys):
    """A tiny train.py checkpoint, a separable toy task, the whole CLI: results JSON, heatmap, cache."""
    corpus = write(tmp_path / "corpus.txt", "".join(f"this is line {i} of a tiny corpus\n" for i in range(200)))
    train.main(train.parse_args(["--data", corpus, "--out", str(tmp_path / "run"), "--hidden", "16",
                                 "--embed", "8", "--batch-size", "4", "--seq-len", "16", "--iters", "3",
                                 "--eval-every", "1000", "--log-every", "1", "--save-every", "3", "--sample-chars", "0",
                                 "--cache-dir", str(tmp_path / "prep"), "--device", "cpu"]))
    argv = ["--checkpoint", str(tmp_path / "run" / "ckpt.pt"), *toy_task(tmp_path), "--json", str(tmp_path / "r.json"),
            "--device", "cpu", "--bow-vocab", "50"]
    res = transfer.run(transfer.parse_args(argv), log=lambda *a: None)
    saved = json.load(open(tmp_path / "r.json"))
    for key in ("test_acc", "val_acc", "C", "nonzero", "neuron", "neuron_test_acc", "baseline_test_acc"):
        assert saved[key] == res[key], key
    assert res["baseline_test_acc"] == 1.0, res["baseline"]  # the words separate the classes exactly
    assert 0 <= res["neuron"] < 16 and res["C"] in transfer.GRID
    assert (tmp_path / "run" / "transfer-files-ckpt" / "heatmap.html").stat().st_size > 0
    assert not any(res["featurize"][s]["cached"] for s in ("train", "test"))
    again = transfer.run(transfer.parse_args(argv), log=lambda *a: None)
    assert all(again["featurize"][s]["cached"] for s in ("train", "val", "test"))
    assert again["test_acc"] == res["test_acc"]
    lines = []
    skip = transfer.run(transfer.parse_args(argv[:-1] + ["0"]), log=lines.append)  # --bow-vocab 0: no baseline
    assert skip["baseline"] is None and skip["baseline_test_acc"] is None and skip["test_acc"] == res["test_acc"]
    assert not any("bag of" in line for line in lines), lines


def brute_threshold_acc(v, y):
    """The best accuracy of `predict 1 iff v > t` over every t: each value, and below all of them."""
    return max(float(((v > t) == (y == 1)).mean()) for t in np.append(v, -np.inf))


def run_on_features(tmp_path, monkeypatch, feats, labels):
    """transfer.run on given features: one CSV per split whose row i reads "SPLIT text i", and cached_features
    monkeypatched to return feats[SPLIT][i] for it. -> (run's results, what it logged)."""
    files = {s: write(tmp_path / f"{s}.csv", "label,text\n" + "".join(f"{k},{s} text {i}\n" for i, k in enumerate(y)))
             for s, y in labels.items()}

    def fake_features(model, checkpoint, name, byte_strings, cache_dir, feature="cell", dtype="fp32", **kw):
        words = [b.split() for b in byte_strings]  # b"\n train text 17 ": the row of the features it gets
        assert all(w[0].decode() == name for w in words), (name, byte_strings[:3])
        X = feats[name][[int(w[-1]) for w in words]]
        return (X if isinstance(feature, str) else {f: X for f in feature}), False

    monkeypatch.setattr(transfer, "cached_features", fake_features)
    argv = ["--checkpoint", tiny_checkpoint(tmp_path, feats["train"].shape[1]), "--train", files["train"], "--val",
            files["val"], "--test", files["test"], "--out", str(tmp_path / "out"), "--device", "cpu", "--bow-vocab",
            "0", "--heatmap", "0"]
    logged = []
    return transfer.run(transfer.parse_args(argv), log=logged.append), logged


def test_reported_numbers_match_sklearn_on_planted_features(tmp_path, monkeypatch):
    """run()'s reported numbers against independent references: the features are faked (cached_features
    monkeypatched) with one strongly informative unit of negative sign, one weaker and noise units, test noisier
    than validation (their accuracies differ); sklearn's L1 logistic regression (saga) on StandardScaler
    features at the reported C, and brute-force thresholds for the neuron alone."""
    hidden, planted = 16, 11
    rng = np.random.default_rng(12)  # a seed where the four val/test accuracies differ by 4+ examples
    sizes, noise = {"train": 200, "val": 120, "test": 120}, {"train": 1.0, "val": 1.0, "test": 3.0}
    feats, labels = {}, {}
    for s, n in sizes.items():
        y = (np.arange(n) < round(0.7 * n)).astype(np.int64)  # 70% positive: the bias matters
        rng.shuffle(y)
        X = rng.normal(size=(n, hidden))
        X[:, planted] = -(2 * y - 1) * 1.5 + noise[s] * rng.normal(size=n)
        X[:, 4] = (2 * y - 1) * 0.6 + noise[s] * rng.normal(size=n)  # weaker: the classifier is not the neuron
        feats[s], labels[s] = (3 * X + 5).astype(np.float32), y  # off centre and scale: standardising matters
    res, _ = run_on_features(tmp_path, monkeypatch, feats, labels)

    scaler = StandardScaler().fit(feats["train"].astype(np.float64))
    Z = {s: scaler.transform(feats[s].astype(np.float64)) for s in sizes}

    def sk(C):
        return LogisticRegression(C=C, l1_ratio=1.0, solver="saga", tol=1e-12, max_iter=100000).fit(
            Z["train"], labels["train"])  # saga: the bias unpenalised, as in transfer's objective

    ref = sk(res["C"])
    want = {s: ref.score(Z[s], labels[s]) for s in sizes}
    for s in sizes:
        got, tol = res[f"{s}_acc"], 1 / sizes[s] + 1e-12  # at most one example on the boundary
        assert abs(got - want[s]) <= tol, f"{s}_acc {got} but sklearn's L1 at C={res['C']} gives {want[s]}: " \
                                          f"differ by {abs(got - want[s]):.4f} > {tol:.4f}"
    val_by_C = {C: sk(C).score(Z["val"], labels["val"]) for C in transfer.GRID}
    best = max(val_by_C.values())
    assert val_by_C[res["C"]] >= best - 1 / sizes["val"] - 1e-12, \
        f"C={res['C']} picked; sklearn's val acc by C: {val_by_C}"

    assert int(np.argmax(np.abs(ref.coef_[0]))) == planted, ref.coef_  # the design's premise, by sklearn
    assert res["neuron"] == planted and res["neuron_sign"] == -1, \
        f"neuron {res['neuron']} sign {res['neuron_sign']}, planted {planted} sign -1"
    sign, t = res["neuron_sign"], res["neuron_threshold"]
    v = {s: sign * Z[s][:, planted] for s in sizes}
    brute = brute_threshold_acc(v["train"], labels["train"])
    at_t = {s: float(((v[s] > t) == (labels[s] == 1)).mean()) for s in sizes}
    diffs = {"train best": abs(res["neuron_train_acc"] - brute), "train at t": abs(at_t["train"] - brute),
             **{s: abs(res[f"neuron_{s}_acc"] - at_t[s]) for s in ("val", "test")}}
    assert max(diffs.values()) < 1e-12, \
        f"neuron accuracies {[res[f'neuron_{s}_acc'] for s in sizes]}, brute force {brute} (train), " \
        f"at t={t}: {at_t}; max difference {max(diffs.values()):.3g} ({diffs})"
    four = [want["val"], want["test"], at_t["val"], at_t["test"]]  # a swap of any two fields must be seen
    assert min(abs(p - q) for i, p in enumerate(four) for q in four[i + 1:]) > 1.5 / sizes["test"], four


def test_an_l1_fit_that_keeps_no_unit_leaves_the_neuron_to_l2(tmp_path, monkeypatch):
    """Pure-noise features and 70% positive labels: every C's all-zero L1 fit ties the majority class on
    validation, and the smallest C wins. The neuron is then the L2 fit's largest weight, not unit 0."""
    rng, feats, labels = np.random.default_rng(0), {}, {}
    for s, n in (("train", 100), ("val", 60), ("test", 60)):
        labels[s] = (np.arange(n) < round(0.7 * n)).astype(np.int64)
        feats[s] = rng.normal(size=(n, 8)).astype(np.float32)
    res, notes = run_on_features(tmp_path, monkeypatch, feats, labels)
    assert res["fits"]["l1"]["nonzero"] == 0, f"the premise: L1 keeps no unit, got {res['fits']['l1']}"
    Z = transfer.standardize(feats["train"])[0]
    w2 = transfer.fit_l2(Z, labels["train"], res["fits"]["l2"]["C"])[0]
    assert res["neuron_fit"] == "l2" and res["neuron"] == int(np.argmax(np.abs(w2))) != 0, \
        f"neuron {res['neuron']} from {res['neuron_fit']}; L2 weights {w2}"
    assert any("L1 fit kept no unit" in str(m) for m in notes), notes


def planted_task(seed=0, sizes=(("train", 80), ("val", 40), ("test", 40)), units=6):
    """Features with unit 0 informative, the rest noise; labels alternating."""
    rng, feats, labels = np.random.default_rng(seed), {}, {}
    for s, n in sizes:
        labels[s] = np.arange(n) % 2
        feats[s] = (rng.normal(size=(n, units)) + 2.0 * labels[s][:, None] * (np.arange(units) == 0)).astype(np.float32)
    return feats, labels


def test_a_fit_that_fails_is_one_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """A solver that raises at one C (a singular system, say): that C is one line naming the feature, the
    penalty and C, skipped; the other Cs, the other penalty and the output model are there."""
    real = transfer.fit_l1

    def flaky(X, y, C, **kw):
        if C == 0.5:
            raise torch.linalg.LinAlgError("linalg.cholesky: the input is not positive-definite")
        return real(X, y, C, **kw)

    monkeypatch.setattr(transfer, "fit_l1", flaky)
    res, _ = run_on_features(tmp_path, monkeypatch, *planted_task())
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if "failed" in line]
    assert failed == ["fit cell l1: C 0.5 (8/11): failed, skipped (LinAlgError: linalg.cholesky: the input is not "
                      "positive-definite)"], err
    assert [p["C"] for p in res["fits"]["l1"]["path"]] == [C for C in transfer.GRID if C != 0.5]
    assert res["neuron"] == 0 and res["test_acc"] > 0.7 and os.path.isfile(tmp_path / "out" / "classifier.pt"), res


def test_every_fit_of_the_asked_penalty_failing_falls_back_to_the_other(tmp_path, monkeypatch, capsys):
    def broken(X, y, C, **kw):
        raise FloatingPointError("a Newton system stays singular after damping")

    monkeypatch.setattr(transfer, "fit_l1", broken)
    res, notes = run_on_features(tmp_path, monkeypatch, *planted_task())
    err = capsys.readouterr().err
    assert err.count("fit cell l1: C ") == len(transfer.GRID) and "fit cell l1: every C failed" in err, err
    assert res["penalty"] == "l2" and res["fits"]["l1"] is None and res["neuron_fit"] == "l2", res
    assert any("every l1 fit failed" in str(m) for m in notes), notes
    monkeypatch.setattr(transfer, "fit_l2", broken)
    with pytest.raises(DataError, match="every fit failed"):
        run_on_features(tmp_path, monkeypatch, *planted_task())


def test_a_validation_or_test_split_of_one_class_is_used_with_a_note(tmp_path, monkeypatch):
    feats, labels = planted_task()
    labels["val"] = np.ones_like(labels["val"])
    res, notes = run_on_features(tmp_path, monkeypatch, feats, labels)
    assert any("the val split holds only label 1" in str(m) for m in notes), notes
    assert 0 <= res["val_acc"] <= 1 and res["test_acc"] > 0.7, res


def test_the_generic_command_on_a_1000_row_csv_runs_to_the_end(tmp_path, capsys):
    """The README's 'bring your own CSV' command on 1000 rows of many distinct words: the bag-of-words L1 fit
    then has more free features than rows, whose Hessian is singular (it raised a Cholesky error once)."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(3000)]
    rows = []
    for i in range(1000):
        words = list(rng.choice(vocab, 6)) + ["great" if i % 2 else "awful"] * int(rng.random() < 0.7)
        rows.append(f"{i % 2},{' '.join(words)}\n")
    train_csv = write(tmp_path / "a.csv", "label,text\n" + "".join(rows[:800]))
    test_csv = write(tmp_path / "b.csv", "label,text\n" + "".join(rows[800:]))
    argv = ["--checkpoint", tiny_checkpoint(tmp_path), "--train", train_csv, "--test", test_csv,
            "--text-column", "text", "--label-column", "label", "--device", "cpu", "--heatmap", "2"]
    res = transfer.run(transfer.parse_args(argv), log=lambda *a: None)
    assert res["baseline"]["test_acc"] > 0.75 and res["baseline"]["nonzero"] > 0, res["baseline"]
    err = capsys.readouterr().err
    assert "failed" not in err, err  # every fit converged: none was skipped


def test_the_feature_cache_misses_on_any_change_of_checkpoint_texts_feature_or_dtype(tmp_path):
    model, bs = tiny_model(), texts()
    ckpt = write(tmp_path / "c.pt", "stands in for the checkpoint")
    other = write(tmp_path / "d.pt", "stands in for the checkpoint")  # same size and contents, another file
    cache = str(tmp_path / "cache")

    def hit(path=ckpt, strings=bs, feature="cell", dtype="fp32"):
        return transfer.cached_features(model, path, "train", strings, cache, feature, dtype)[1]

    assert not hit() and hit(), "the first call featurises, the second reads the cache"
    changes = {"another checkpoint file": dict(path=other), "another text": dict(strings=bs[:-1] + [bs[-1] + b"!"]),
               "another feature": dict(feature="mean"), "another dtype": dict(dtype="bf16")}
    for what, kw in changes.items():
        assert not hit(**kw), f"{what}: a stale cache was read"
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # retrained in place: same size, newer
    assert not hit(), "a rewritten checkpoint of the same size: a stale cache was read"


def test_bag_of_words_counts_train_vocabulary_by_texts_containing_each_word():
    train_texts = ["good good film", "good plot", "bad film", "dull"]
    M_train, M_test = transfer.bag_of_words(train_texts, ["good unseen unseen film", "unseen", "unseen"], vocab=3)
    # in how many train texts: film 2, good 2, bad 1, dull 1, plot 1 -> film, good, bad (ties alphabetical)
    want_train = [[1, 2, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0]]  # columns film, good, bad; counts, not presence
    assert M_train.tolist() == want_train and M_test.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]], \
        (M_train.tolist(), M_test.tolist())  # "unseen", in 3 test texts, is not in the vocabulary


@pytest.mark.parametrize("cut", [0, 40, -8])  # empty, header cut short, data cut short
def test_damaged_feature_cache_is_a_miss(tmp_path, cut):
    model, bs, ckpt = tiny_model(), texts(), write(tmp_path / "c.pt", "stands in for the checkpoint")
    X, hit = transfer.cached_features(model, ckpt, "train", bs, str(tmp_path / "cache"))
    (path,) = (tmp_path / "cache").iterdir()
    path.write_bytes(path.read_bytes()[:cut])  # a crash, a full disk
    again, hit = transfer.cached_features(model, ckpt, "train", bs, str(tmp_path / "cache"))
    assert not hit and np.array_equal(again, X), "a damaged cache file was not featurised again"
    assert transfer.cached_features(model, ckpt, "train", bs, str(tmp_path / "cache"))[1], "not overwritten"


def test_outputs_are_written_whole_and_results_last(tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--checkpoint", tiny_checkpoint(tmp_path), *toy_task(tmp_path, 24, 12), "--out", str(out),
            "--device", "cpu", "--bow-vocab", "0", "--heatmap", "3", "--heatmap-bytes", "12"]
    transfer.run(transfer.parse_args(argv), log=lambda *a: None)
    shown = re.findall(r'<div class="t">(.*?)</div>', (out / "heatmap.html").read_text())
    shown = [re.sub("<[^>]*>", "", t) for t in shown]  # the text, without its one span per character
    want = ["\u21b5 wonderful ", "\u21b5 wonderful ", "\u21b5 awful bad "]  # 2 positive, 1 negative; 12 bytes each
    assert shown == want, f"--heatmap 3 --heatmap-bytes 12 showed {shown}"
    assert sorted(f.name for f in out.iterdir()) == ["classifier.pt", "heatmap.html", "histogram.txt", "results.json"]
    (out / "results.json").write_text("earlier run")

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(reports, "histogram_text", fail)
    with pytest.raises(OSError, match="disk full"):
        transfer.run(transfer.parse_args(argv), log=lambda *a: None)
    assert (out / "results.json").read_text() == "earlier run", "results.json written before the other outputs"


@pytest.mark.parametrize("flags,message", [
    (["--heatmap", "-1"], "--heatmap must be >= 0"),
    (["--heatmap-bytes", "0"], "--heatmap-bytes must be >= 1"),
    (["--seed", "-3"], "--seed must be in [0, 2^63)"),
    (["--seed", str(2**63)], "--seed must be in [0, 2^63)"),
    (["--device", "bogus"], "--device bogus: expected cpu, cuda or cuda:N"),
    (["--out", "{tmp}/ckpt.pt/out"], "--out {tmp}/ckpt.pt/out: {tmp}/ckpt.pt is not a writable folder"),
    (["--json", "{tmp}/none/r.json"], "--json {tmp}/none/r.json: not a file name in an existing, writable folder"),
    (["--json", "{tmp}"], "--json {tmp}: not a file name"),
])
def test_bad_flags_are_clear_errors(tmp_path, capsys, flags, message):
    ckpt = write(tmp_path / "ckpt.pt", "checked only once the flags are")
    with pytest.raises(SystemExit):
        transfer.parse_args(["--checkpoint", ckpt, "--train", "a.csv", "--test", "b.csv",
                             *(f.format(tmp=tmp_path) for f in flags)])
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err, err


def test_parsing_creates_no_output_folder(tmp_path):
    ckpt = write(tmp_path / "ckpt.pt", "checked only once the flags are")
    a = transfer.parse_args(["--checkpoint", ckpt, "--train", "a.csv", "--test", "b.csv", "--out",
                             str(tmp_path / "new" / "out")])
    assert a.out == str(tmp_path / "new" / "out") and not (tmp_path / "new").exists(), "a failed run would leave it"

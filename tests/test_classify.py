"""classify.py and the output model: transfer.py's classifier.pt applied to its own test split gives back the
accuracy transfer reported; the file refuses another language model; inputs, outputs and streaming."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

import classify
import data
import mlstm
import train
import transfer
from fp16 import DTYPES
from plumbing import output_model

WORDS = "good great fine bad awful poor the film was plot and but".split()


def noisy_task(tmp_path, n_train=80, n_val=40, n_test=50):
    """CSV splits whose label follows the words, with 15% of labels flipped: neither trivial nor chance."""
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        lines = ["label,text"]
        for _ in range(n):
            y = int(rng.integers(0, 2))
            words = list(rng.choice(WORDS[:3] if y else WORDS[3:6], 2)) + list(rng.choice(WORDS[6:], 3))
            lines.append(f"{y if rng.random() > 0.15 else 1 - y},{' '.join(rng.permutation(words))}")
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return {s: str(tmp_path / f"{s}.csv") for s in ("train", "val", "test")}


def checkpoint(tmp_path, name="ckpt.pt", seed=0):
    torch.manual_seed(seed)
    path = str(tmp_path / name)
    config = {"hidden": 16, "embed": 8, "no_weight_norm": False, "dtype": "fp32"}
    train.save_checkpoint(path, {"model": mlstm.MLSTM(hidden=16, embed=8).state_dict(), "config": config})
    return path


@pytest.fixture
def fitted(tmp_path):
    files = noisy_task(tmp_path)
    ckpt = checkpoint(tmp_path)
    argv = ["--checkpoint", ckpt, "--train", files["train"], "--val", files["val"], "--test", files["test"],
            "--out", str(tmp_path / "out"), "--device", "cpu", "--bow-vocab", "0", "--heatmap", "2",
            "--feature", "cell,concat"]
    res = transfer.run(transfer.parse_args(argv), log=lambda *a: None)
    return res, files, ckpt, str(tmp_path / "out" / "classifier.pt")


def classify_run(*argv):
    return classify.main(classify.parse_args(list(argv)))


def test_the_output_model_reproduces_the_reported_test_accuracy(fitted, tmp_path):
    res, files, ckpt, model = fitted
    assert 0.5 < res["test_acc"] < 1.0, f"the premise, a task neither trivial nor chance: {res['test_acc']}"
    out = str(tmp_path / "pred.csv")
    got = classify_run("--model", model, "--input", files["test"], "--label-column", "label", "--out", out)
    assert got["accuracy"] == res["test_acc"], f"classify {got['accuracy']} vs transfer's {res['test_acc']}"
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50 and {r["label"] for r in rows} == {"0", "1"}
    assert all(0 <= float(r["probability"]) <= 1 and (float(r["probability"]) > 0.5) == (r["label"] == "1")
               for r in rows), rows[:3]
    clf = output_model.load(model)
    assert clf["feature"] == res["feature"] and clf["reported"]["test_acc"] == res["test_acc"]
    # The neuron column is the neuron's feature value times its sign: from an independent featurisation.
    texts = [r["text"] for r in rows]
    lm = output_model.language_model(clf, model).to(DTYPES[clf["dtype"]])  # as fitted: bf16 where the CPU has AMX
    feats = transfer.featurize(lm.eval(), [data.normalize(t) for t in texts], clf["feature"], clf["batch_size"])
    want = clf["neuron"]["sign"] * feats[:, clf["neuron"]["index"]]
    diff = np.abs(np.array([float(r["neuron"]) for r in rows]) - want).max()
    assert diff < 1e-5, f"neuron column differs by {diff:.2e}"


def test_streamed_blocks_and_formats_give_the_same_predictions(fitted, tmp_path):
    _, files, _, model = fitted
    whole = str(tmp_path / "whole.jsonl")
    classify_run("--model", model, "--input", files["test"], "--out", whole)
    texts = [json.loads(line)["text"] for line in open(whole)]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n\n")  # one text per line; an empty line is skipped
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"review": t}) + "\n" for t in texts))
    for inp, extra in ((str(tmp_path / "t.txt"), []), (str(tmp_path / "t.jsonl"), ["--text-column", "review"])):
        out = str(tmp_path / "blocks.csv")
        classify_run("--model", model, "--input", inp, *extra, "--block", "7", "--out", out)
        got = list(csv.DictReader(open(out)))
        want = [json.loads(line) for line in open(whole)]
        assert [r["text"] for r in got] == texts and [int(r["label"]) for r in got] == [w["label"] for w in want]
        diff = max(abs(float(r["probability"]) - w["probability"]) for r, w in zip(got, want))
        assert diff < 1e-5, f"{inp} in blocks of 7: probabilities differ by {diff:.2e}"


def test_a_classifier_refuses_another_language_model(fitted, tmp_path, capsys):
    _, files, ckpt, model = fitted
    other = checkpoint(tmp_path, "other.pt", seed=1)
    with pytest.raises(SystemExit, match="was made for another language model"):
        classify_run("--model", model, "--checkpoint", other, "good film")
    moved = str(tmp_path / "moved.pt")
    shutil.move(ckpt, moved)
    with pytest.raises(SystemExit, match="which is not there; give --checkpoint"):
        classify_run("--model", model, "good film")
    classify_run("--model", model, "--checkpoint", moved, "good film", "awful plot")  # the same bytes: accepted
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "row,label,probability,neuron,text" and len(out.splitlines()) == 3, out


@pytest.mark.parametrize("what, message", [
    ("checkpoint", "a language model checkpoint; expected the classifier.pt"),
    ("junk", "not a readable classifier"),
    ("missing", "no such classifier file"),
])
def test_not_a_classifier_is_a_clear_error(fitted, tmp_path, what, message):
    _, _, ckpt, _ = fitted
    path = {"checkpoint": ckpt, "junk": str(tmp_path / "junk.pt"), "missing": str(tmp_path / "none.pt")}[what]
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match=message):
        classify_run("--model", path, "good film")


def test_bad_input_names_the_file_and_leaves_no_partial_output(fitted, tmp_path, capsys):
    _, _, _, model = fitted
    (tmp_path / "bad.csv").write_text("id,text\n" + "1,fine\n" * 10 + "2\n")  # a row without text after ten
    out = tmp_path / "p.csv"
    with pytest.raises(Exception, match="bad.csv:12: no 'text' text"):
        classify_run("--model", model, "--input", str(tmp_path / "bad.csv"), "--out", str(out), "--block", "4")
    assert not out.exists() and not (tmp_path / "p.csv.tmp").exists(), os.listdir(tmp_path)
    for flags, said in ((["good"], "--model"), (["--model", model], "give texts on the command line or --input"),
                        (["--model", model, "x", "--out", str(tmp_path / "p.txt")], "name it .csv or .jsonl"),
                        (["--model", model, "x", "--label-column", "y"], "--label-column goes with --input")):
        with pytest.raises(SystemExit):
            classify.parse_args(flags)
        assert said in capsys.readouterr().err


def test_an_empty_or_binary_input_is_refused_and_the_count_is_said_once(fitted, tmp_path, capsys):
    _, files, _, model = fitted
    (tmp_path / "empty.txt").write_text("\n\n")
    out = tmp_path / "p.csv"
    with pytest.raises(data.DataError, match="empty.txt: no texts in it"):
        classify_run("--model", model, "--input", str(tmp_path / "empty.txt"), "--out", str(out))
    assert not out.exists() and not (tmp_path / "p.csv.tmp").exists(), os.listdir(tmp_path)
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(SystemExit):
        classify.parse_args(["--model", model, "--input", str(tmp_path / "random.bin")])
    err = capsys.readouterr().err
    assert "random.bin: does not look like text" in err and "--allow-binary reads it anyway" in err, err
    # forced: classified as texts of replacement characters
    assert classify_run("--model", model, "--input", str(tmp_path / "random.bin"), "--out", str(out),
                        "--allow-binary")["texts"] > 0
    capsys.readouterr()
    classify_run("--model", model, "--input", files["test"], "--label-column", "label", "--out", str(out))
    err = capsys.readouterr().err
    assert err.count("50 texts") == 1 and "accuracy 0." in err, err  # the progress line says the count, once


def test_two_models_in_one_folder_get_two_output_folders_and_never_replace_each_other(tmp_path, capsys):
    files = noisy_task(tmp_path)
    a, b = checkpoint(tmp_path, "a.pt", seed=0), checkpoint(tmp_path, "b.pt", seed=1)
    task = ["--train", files["train"], "--test", files["test"], "--device", "cpu", "--bow-vocab", "0", "--heatmap", "0"]
    for ckpt in (a, b):
        transfer.run(transfer.parse_args(["--checkpoint", ckpt, *task]), log=lambda *a: None)
    for name, ckpt in (("a", a), ("b", b)):
        clf = output_model.load(str(tmp_path / f"transfer-files-{name}" / "classifier.pt"))
        assert clf["checkpoint"]["sha256"] == output_model.sha256(ckpt), name
    with pytest.raises(SystemExit):  # b's run into a's folder: refused before featurising
        transfer.parse_args(["--checkpoint", b, *task, "--out", str(tmp_path / "transfer-files-a")])
    assert "holds the classifier of another language model" in capsys.readouterr().err
    transfer.parse_args(["--checkpoint", a, *task, "--out", str(tmp_path / "transfer-files-a")])  # its own: fine

"""finetune.py: the pooled head against a per-text reference, the batches, the auxiliary loss, a run that learns
and whose output model classify.py reproduces, bf16 through fp16.py, and 2 processes equal to 1."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import classify
import finetune
import mlstm
import train
from plumbing import output_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy(tmp_path, n_train=96, n_test=40):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [("1", "wonderful great " * int(k)) if i % 2 else ("0", "awful bad " * int(k))
                for i, k in enumerate(rng.integers(1, 4, n))]
        (tmp_path / f"{split}.csv").write_text("label,text\n" + "".join(f"{y},{t}\n" for y, t in rows))
    torch.manual_seed(0)
    config = {"hidden": 16, "embed": 8, "no_weight_norm": False, "dtype": "fp32"}
    train.save_checkpoint(str(tmp_path / "m.pt"), {"model": mlstm.MLSTM(hidden=16, embed=8).state_dict(),
                                                   "config": config})
    return ["--checkpoint", str(tmp_path / "m.pt"), "--train", str(tmp_path / "train.csv"),
            "--test", str(tmp_path / "test.csv"), "--device", "cpu", "--log-every", "4"]


def test_pooled_head_equals_each_text_read_alone_float64():
    """Padded batch against each text alone: its last hidden state, mean and max over its own bytes only."""
    torch.manual_seed(1)
    clf = finetune.Classifier(mlstm.MLSTM(hidden=12, embed=6)).double()
    with torch.no_grad():
        clf.head.weight.normal_(), clf.head.bias.normal_()
    texts = [b"\n a b ", b"\n longer text here ", b"\n x"]
    x, lens = finetune.padded(texts, "cpu")
    got, _ = clf(x, lens)  # gradients on: the training loop of fast/loop.py
    got = got.detach()
    for k, t in enumerate(texts):
        with torch.no_grad():  # the plain loop of mlstm.cell, over the text's own bytes
            hs, _, _ = clf.lm.rnn(torch.tensor([list(t)]))
            pooled = torch.cat([hs[0, -1], hs[0].mean(0), hs[0].amax(0)])
            want = pooled @ clf.head.weight[0] + clf.head.bias[0]
        assert abs(float(got[k] - want)) < 1e-12, f"text {k}: {float(got[k])} vs {float(want)}"


def test_epoch_batches_are_full_disjoint_length_sorted_and_seeded():
    lengths = np.random.default_rng(0).integers(1, 500, 1013)
    batches = finetune.epoch_batches(lengths, 16, seed=3, epoch=0)
    flat = np.concatenate(batches)
    assert all(len(b) == 16 for b in batches) and len(batches) == 1013 // 16
    assert len(set(flat.tolist())) == len(flat), "a text twice in one epoch"
    assert all((np.diff(lengths[b]) >= 0).all() for b in batches), "a batch not sorted by length"
    again, other = finetune.epoch_batches(lengths, 16, 3, 0), finetune.epoch_batches(lengths, 16, 3, 1)
    assert all((a == b).all() for a, b in zip(batches, again)) and not all((a == b).all() for a, b in zip(batches, other))


def test_lm_loss_is_the_mean_next_byte_loss_within_each_text():
    torch.manual_seed(2)
    x, lens = finetune.padded([b"abcd", b"xy", b"z"], "cpu")
    logits = torch.randn(3, x.shape[1], 256)
    terms = [F.cross_entropy(logits[k, t], x[k, t + 1], reduction="sum") for k in range(3) for t in range(int(lens[k]) - 1)]
    want = torch.stack(terms).mean()
    got = finetune.lm_loss(logits, x, lens)
    assert abs(float(got - want)) < 1e-6, (float(got), float(want))


def test_a_run_learns_and_classify_reproduces_its_test_accuracy(tmp_path, capsys):
    argv = toy(tmp_path) + ["--batch-size", "8", "--epochs", "3", "--lr", "3e-3", "--eval-every", "12",
                            "--patience", "5", "--lm-weight", "0.5", "--out", str(tmp_path / "ft")]
    res = finetune.main(finetune.parse_args(argv))
    assert res["test_acc"] > 0.9, res
    got = classify.main(classify.parse_args(["--model", res["classifier"], "--input", str(tmp_path / "test.csv"),
                                             "--label-column", "label"]))
    assert got["accuracy"] == res["test_acc"], (got, res)
    clf = output_model.load(res["classifier"])
    assert clf["kind"] == "finetuned" and clf["reported"]["test_acc"] == res["test_acc"]
    events = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    assert any("val_acc" in e for e in events) and any("loss" in e for e in events)
    with pytest.raises(SystemExit, match="holds its own language model"):
        output_model.language_model(clf, res["classifier"], checkpoint=str(tmp_path / "m.pt"))


def test_bf16_runs_through_mixed_precision(tmp_path):
    argv = toy(tmp_path) + ["--batch-size", "8", "--epochs", "1", "--dtype", "bf16", "--out", str(tmp_path / "b")]
    res = finetune.main(finetune.parse_args(argv))
    assert res["dtype"] == "bf16" and 0 <= res["test_acc"] <= 1 and os.path.isfile(res["classifier"])


def test_two_processes_train_the_same_model_as_one(tmp_path):
    """torchrun with 2 gloo processes, each reading half of every global batch, against 1 process: the same
    saved weights (the gradients are averaged in another order: float rounding only)."""
    base = toy(tmp_path) + ["--batch-size", "8", "--epochs", "1", "--lr", "3e-3", "--eval-every", "1000"]
    finetune.main(finetune.parse_args(base + ["--out", str(tmp_path / "one")]))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "finetune.py"), *base, "--out", str(tmp_path / "two")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = (output_model.load(str(tmp_path / d / "classifier.pt")) for d in ("one", "two"))
    diff = max([float((one["model"][k] - two["model"][k]).abs().max()) for k in one["model"]] +
               [float((one["w"] - two["w"]).abs().max())])
    assert diff < 1e-5, f"2 processes vs 1: max |weight diff| {diff:.2e}"
    assert one["reported"]["test_acc"] == two["reported"]["test_acc"]

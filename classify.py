"""Apply an output model to new text: the language model reads each text, the classifier on top labels it.

The seed's output model, "language model base + classifier on top": transfer.py writes one (a logistic
regression on the pretrained mLSTM's features, which names its language model by content hash) and so does
finetune.py (the mLSTM fine-tuned with its linear head, weights included). For every text this writes its
label (1 positive, 0 negative), the probability of positive, and the sentiment neuron's value times its sign
(higher = more positive; empty for a fine-tuned model), as CSV or JSON lines. Large inputs stream through in
blocks of --block texts, with a progress line; with --label-column it also reports the accuracy.

    python classify.py --model out/demo/transfer-sst2-ckpt/classifier.pt "A gripping, funny film." "Dull and long."
    python classify.py --model M --input reviews.txt --out predictions.csv        # one text per line
    python classify.py --model M --input reviews.jsonl.gz --text-column text --out predictions.jsonl
    python classify.py --model M --input ../shared/data/sst2/test.csv --text-column sentence --label-column label
    python classify.py --model M --checkpoint copy-of-the-model.pt ...    # a probe's language model, moved

Texts are framed like the pretraining corpus (data.normalize). The features, and so the predictions, are
transfer.py's own: its test-split accuracy comes back on the same test file.
"""
import argparse
import csv
import json
import os
import sys

import numpy as np
import torch

import data
from fp16 import DTYPES
from plumbing import cli, labeled, output_model
from plumbing.sources import DataError, not_text
from transfer import DEVICES, featurize


def predict(clf, model, texts, batch_size=None):
    """Output model `clf` on `texts` (str), read by its language model `model`: (logits [N], positive iff > 0;
    the neuron's value times its sign [N] or None; the bytes read). Texts are framed as the corpus was (data.normalize) and, for
    a model fine-tuned on texts cut to their last max_bytes bytes, cut the same way."""
    byte_strings = [data.normalize(t) for t in texts]
    if clf.get("max_bytes"):
        byte_strings = [b[-clf["max_bytes"]:] for b in byte_strings]
    X = featurize(model, byte_strings, clf["feature"], batch_size or clf.get("batch_size") or 64)
    return (*output_model.decide(clf, X), sum(map(len, byte_strings)))


def blocks(a):
    """Lists of at most a.block (row, text, label) from the command line's texts or a.input."""
    source = ((k, t, None) for k, t in enumerate(a.texts, 1)) if a.texts else \
        labeled.rows(a.input, a.text_column, a.label_column)
    block = []
    for row in source:
        block.append(row)
        if len(block) == a.block:
            yield block
            block = []
    if block:
        yield block


def writer(path):
    """(write(record), close(ok)): CSV or JSON lines by the name (stdout: CSV), into PATH.tmp, renamed into place on
    success: a failed run leaves no half-written file."""
    fields = ["row", "label", "probability", "neuron", "text"]
    f = open(path + ".tmp", "w", newline="", encoding="utf-8") if path else sys.stdout
    jsonl = bool(path) and path.lower().endswith((".jsonl", ".json"))
    out = None if jsonl else csv.DictWriter(f, fields, lineterminator="\n")
    if out:
        out.writeheader()

    def write(record):
        f.write(json.dumps(record) + "\n") if jsonl else out.writerow(record)

    def close(ok):
        if path:
            f.close()
            os.replace(path + ".tmp", path) if ok else os.remove(path + ".tmp")
        else:
            f.flush()
    return write, close


def main(a):
    clf = output_model.load(a.model)
    model = output_model.language_model(clf, a.model, a.checkpoint, a.device)
    dtype = a.dtype or clf["dtype"]  # the features' precision at fitting: the same predictions
    model = model.to(dtype=DTYPES[dtype]).eval()
    rep = clf["reported"]
    print(f"classify: {a.model} ({clf['kind']}, {clf['feature']} features, {clf['checkpoint']['hidden']} units; "
          f"it reported test accuracy {rep['test_acc']:.4f} on {rep['task']}) on {a.device} {dtype}",
          file=sys.stderr, flush=True)
    write, close = writer(a.out)
    n = right = labelled = nbytes = 0
    progress = cli.progress("classify")
    ok = False
    try:
        for block in blocks(a):
            logits, neuron, size = predict(clf, model, [t for _, t, _ in block], a.batch_size)
            for k, (row, text, label) in enumerate(block):
                predicted = int(logits[k] > 0)
                write(dict(row=row, label=predicted, probability=round(float(1 / (1 + np.exp(-logits[k]))), 6),
                           neuron=None if neuron is None else round(float(neuron[k]), 6), text=text))
                if label is not None:
                    labelled, right = labelled + 1, right + (predicted == label)
            n, nbytes = n + len(block), nbytes + size
            progress(n, nbytes)
        if n == 0:
            raise DataError(f"{a.input}: no texts in it (empty lines are skipped); nothing written")
        progress(n, nbytes, final=True)
        ok = True
    finally:
        close(ok)
    said = ([f"wrote {a.out}"] if a.out else []) + \
        ([f"accuracy {right / labelled:.4f} on {labelled} labelled texts"] if labelled else [])
    if said:  # the count and speed are the progress line's
        print("classify: " + "; ".join(said), file=sys.stderr)
    return dict(texts=n, accuracy=right / labelled if labelled else None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Label texts with an output model of transfer.py or finetune.py.",
                                formatter_class=cli.Help)
    p.add_argument("texts", nargs="*", help="texts to classify (or --input)")
    p.add_argument("--model", required=True, help="classifier.pt written by transfer.py or finetune.py")
    p.add_argument("--input", help="a text file (one text per line) or .csv/.tsv/.jsonl, optionally .gz/.bz2/.xz")
    p.add_argument("--text-column", default="text", help="the CSV column / JSON field of the text")
    p.add_argument("--label-column", help="a column of true labels: report the accuracy")
    p.add_argument("--out", help="predictions file, .csv or .jsonl (default: CSV on stdout)")
    p.add_argument("--checkpoint", help="a probe's language model, where it is not where it was (same sha256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: the precision the classifier was fitted in")
    p.add_argument("--batch-size", type=int, help="texts read at once (default: the classifier's, as it was fitted)")
    p.add_argument("--block", type=int, default=4096, help="texts read, classified and written at a time")
    p.add_argument("--allow-binary", action="store_true", help="read an --input that does not look like text")
    a = p.parse_args(argv)
    if bool(a.texts) == bool(a.input):
        p.error("give texts on the command line or --input FILE (one of them)")
    if a.label_column and not a.input:
        p.error("--label-column goes with --input")
    cli.require(p, a, ("batch_size", "block"), lambda v: v >= 1, ">= 1")
    if why := cli.device_problem(a.device, DEVICES):
        p.error(why)
    if a.input and not os.path.isfile(a.input):
        p.error(f"--input {a.input}: no such file")
    try:
        if a.input and not a.allow_binary and (why := not_text(a.input)):
            p.error(f"--input {a.input}: {why}; --allow-binary reads it anyway")
    except DataError as e:  # compressed otherwise than named, a damaged archive
        p.error(f"--input {e}")
    cli.check_output_file(p, "--out", a.out)
    if a.out and not a.out.lower().endswith((".csv", ".jsonl", ".json")):
        p.error(f"--out {a.out}: name it .csv or .jsonl")
    if a.out and a.input and os.path.abspath(a.out) == os.path.abspath(a.input):
        p.error("--out would overwrite --input")
    return a


if __name__ == "__main__":
    args = parse_args()
    cli.main_guard(lambda: main(args), oom="lower --batch-size or --block",
                   interrupted=f"interrupted: {args.out} not written" if args.out else
                   "interrupted: the rows above were written")

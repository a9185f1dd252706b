"""The output model: a fitted sentiment classifier in one file, and the check that it meets its language model.

transfer.py (a logistic regression on the pretrained model's features) and finetune.py (the mLSTM trained end
to end with a linear head) each write one; classify.py applies either to new text. A dict of tensors and plain
values, written atomically with torch.save and read back with weights_only=True after a CRC-32 check:

  kind          "probe" (reads the language model named by `checkpoint`) or "finetuned" (holds its own)
  feature       transfer.FEATURES name of the features the linear layer reads; dtype: their compute precision,
  batch_size    and the rows read at once (bf16 products may round differently for another batch)
  mean, std     [D] float32 standardisation of the features (0 and 1 for a fine-tuned head)
  w [D], b      the linear layer (float64): label 1 (positive) iff ((x - mean) / std) @ w + b > 0
  C, penalty    the regularisation it was fitted with (None for a fine-tuned head)
  neuron        {index, unit, sign, threshold} of the sentiment neuron, or None
  checkpoint    {path, sha256, hidden}: the language model it was made with (its content hash)
  model, config the fine-tuned mLSTM's weights and its train.py config (finetuned only)
  reported      {task, train_acc, val_acc, test_acc}: what the command that made it measured
"""
import hashlib
import os

import numpy as np
import torch

from mlstm import MLSTM, model_config
from plumbing.checkpoints import load_pretrained, read_checkpoint

FORMAT = "mlstm-sentiment classifier 1"


def sha256(*paths):
    """The content hash of a file (or of several, their bytes in order): what names a language model, wherever it
    is moved."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def save(path, clf):
    """Write the classifier dict `clf` to `path` whole or not at all."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({"format": FORMAT, **clf}, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports an unwritable path as a RuntimeError
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise SystemExit(f"error: cannot write the classifier {path} ({type(e).__name__}: {e})")


def load(path):
    """The classifier dict in `path`; SystemExit naming the file for anything else (a language model, a damaged
    file)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such classifier file")
    try:
        clf = read_checkpoint(path)
    except Exception as e:  # truncated, corrupted, not torch.save's format, a pickle that would run code
        raise SystemExit(f"error: {path}: not a readable classifier ({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(clf, dict) or clf.get("format") != FORMAT:
        what = "a language model checkpoint" if isinstance(clf, dict) and "config" in clf else "not a classifier"
        raise SystemExit(f"error: {path}: {what}; expected the classifier.pt that transfer.py or finetune.py writes")
    return clf


def language_model(clf, path, checkpoint=None, device="cpu"):
    """The mLSTM that classifier `clf` (read from `path`) reads its features with: a fine-tuned one's own weights,
    or a probe's language model: `checkpoint` if given, else the file it was made with, refused unless its
    content hash is the one the classifier recorded."""
    made = clf["checkpoint"]
    if clf["kind"] == "finetuned":
        if checkpoint is not None:
            raise SystemExit(f"error: {path} is a fine-tuned classifier: it holds its own language model; "
                             f"drop --checkpoint")
        model = MLSTM(**model_config(clf["config"]))
        model.load_state_dict(clf["model"])
        return model.to(device)
    checkpoint = checkpoint or made["path"]
    if not os.path.isfile(checkpoint):
        raise SystemExit(f"error: {path} was made with {made['path']}, which is not there; give --checkpoint "
                         f"(a copy of it: sha256 {made['sha256'][:16]}...)")
    if sha256(checkpoint) != made["sha256"]:
        raise SystemExit(f"error: {path} was made for another language model: {made['path']} (sha256 "
                         f"{made['sha256'][:16]}...), not {checkpoint} (sha256 {sha256(checkpoint)[:16]}...)")
    return load_pretrained(checkpoint, device)[0]


def probe(feature, dtype, batch_size, moments, wb, C, penalty, neuron, checkpoint, hidden, reported):
    """transfer.py's output model: logistic regression (w, b) on standardised `feature`s of `checkpoint`, with the
    sentiment neuron of transfer.sentiment_neuron's results."""
    (mu, sd), (w, b) = moments, wb
    return dict(kind="probe", feature=feature, dtype=dtype, batch_size=batch_size, mean=torch.from_numpy(mu),
                std=torch.from_numpy(sd),
                w=torch.from_numpy(w), b=b, C=C, penalty=penalty,
                neuron=dict(index=neuron["neuron"], unit=neuron["neuron_unit"], state=neuron["neuron_state"],
                            sign=neuron["neuron_sign"], threshold=neuron["neuron_threshold"]),
                checkpoint=dict(path=os.path.abspath(checkpoint), sha256=sha256(checkpoint), hidden=hidden),
                reported=reported)


def decide(clf, X):
    """Output model `clf` on features X [N, D]: (logits [N] float64, positive iff > 0; the sentiment neuron's
    value times its sign [N], higher = more positive, or None)."""
    Z = (X - clf["mean"].numpy()) / clf["std"].numpy()  # the standardisation of fitting, in the same float32
    n = clf["neuron"]
    return np.asarray(Z, dtype=np.float64) @ clf["w"].numpy() + clf["b"], \
        None if n is None else n["sign"] * X[:, n["index"]]

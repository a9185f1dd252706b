"""Transfer learning: featurise text with the pretrained byte mLSTM, fit logistic regression, find the
sentiment neuron, and keep the result as an output model that classify.py applies to new text.

Radford et al. 2017 (arXiv 1704.01444) sections 3.1-3.2 and Puri et al. 2018 (arXiv 1808.01371), "Transfer
learning": each text is normalised (data.normalize, the pretraining corpus' function) and read byte by byte;
its feature is the mLSTM cell state after the last byte (`cell`, the paper's). Beyond the paper, pools over all
of the text's bytes (ULMFiT's and sentiment-discovery's): the cell state's mean or max, `concat` = last, mean
and max side by side, and the same of the hidden state. A logistic regression on the standardised features
(bias unpenalised) is fitted with an L1 penalty (the reference's choice) and with L2 (fast/logistic.py), its C
picked on validation over 2^-8 ... 2^2 (ties: the smaller C) and reported on test. The sentiment neuron is the
unit with the largest |weight| under L1; it is also scored alone (one threshold fitted on train). Baseline:
the same classifier on bag-of-words counts of the same splits.

    python transfer.py --task sst2 --data-dir ../shared/data/sst2   # the released model (models/), the default
    python transfer.py --task sst2 --data-dir ../shared/data/sst2 --feature all      # every feature, one pass
    python transfer.py --checkpoint CKPT --task imdb --data-dir ../shared/data/imdb [--limit 2000]
    python transfer.py --checkpoint CKPT --train a.csv [--val b.csv] --test c.jsonl \\
        --text-column text --label-column label
    options: --feature cell,mean,max,concat,hidden,hidden-concat|all  --penalty l1|l2  --json results.json
             --out DIR  --cache-dir DIR  --device cuda|cpu  --dtype fp32|fp16|bf16  --batch-size N
    python classify.py --model CKPT_DIR/transfer-sst2-CKPT_NAME/classifier.pt "A gripping, funny film."

The features are `pool`s of the states of mlstm.py's loop, computed as featurize reads (its step:
fast/inference.py, tested equal; on a CPU in bf16 where it has bf16 matrix units). Of the features asked for,
the one whose --penalty fit is best on validation is reported and written as the output model (--out/
classifier.pt: plumbing/output_model.py). Features are cached as .npy in --cache-dir (plumbing/feature_cache.py;
default CKPT_DIR/features/, safe to delete). Writes to --out (default CKPT_DIR/transfer-TASK-CKPT_NAME/):
results.json, classifier.pt, heatmap.html (the neuron per byte, each text's label and prediction),
histogram.txt (+ .png) (plumbing/reports.py). The labelled files are read by plumbing/labeled.py, the model by
plumbing/checkpoints.py, the baseline's word counts made by plumbing/baseline.py.
"""
import argparse
import os
import sys
import time
from functools import partial

import numpy as np
import torch

import data
from data import SPLITS
from fast import inference
from fast.logistic import fit_l1, fit_l2
from fp16 import DTYPES
from plumbing import cli, feature_cache, labeled, output_model
from plumbing.baseline import bag_of_words
from plumbing.checkpoints import RELEASED, load_pretrained
from plumbing.reports import write_all
from plumbing.sources import DataError

# A feature pools the cell state c (or the hidden state h) of every byte of a text; several pools side by side.
FEATURES = {
    "cell": (("c", "last"),),  # Radford et al.'s: the cell state after the last byte
    "hidden": (("h", "last"),),
    "mean": (("c", "mean"),),
    "max": (("c", "max"),),
    "concat": (("c", "last"), ("c", "mean"), ("c", "max")),  # ULMFiT's concatenated pooling, of the cell state
    "hidden-concat": (("h", "last"), ("h", "mean"), ("h", "max")),  # finetune.py's head reads this one
}
# --device types: cpu, cuda, and Apple's GPU where there is one (inference only; untested here)
DEVICES = ("cpu", "cuda") + (("mps",) if torch.backends.mps.is_available() else ())
GRID = [2.0 ** k for k in range(-8, 3)]  # C = 2^-8 ... 2^2


def padded(byte_strings, device="cpu"):
    """x [B, longest] right-padded byte ids and lens [B], on `device`: a batch of texts for the model."""
    lens = np.array([len(b) for b in byte_strings], dtype=np.int64)
    x = np.zeros((len(byte_strings), max(int(lens.max(initial=0)), 1)), dtype=np.int64)
    for r, b in enumerate(byte_strings):
        x[r, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return torch.from_numpy(x).to(device), torch.from_numpy(lens).to(device)


def pool(seq, lens, how):
    """Each row's states seq [B, T, H] pooled over its own first lens[b] >= 1 steps (padding after them never
    counts): the "last" one, their "mean" or their "max" -> [B, H]. The definition of the features: featurize
    computes them as it reads, and finetune.py's head reads them (differentiably) through `features`."""
    B, T, _ = seq.shape
    if how == "last":
        return seq[torch.arange(B, device=seq.device), lens - 1]
    valid = (torch.arange(T, device=seq.device) < lens[:, None])[..., None]  # [B, T, 1]
    if how == "mean":
        return (seq * valid).sum(1) / lens[:, None].to(seq.dtype)
    return seq.masked_fill(~valid, -torch.inf).amax(1)


def features(states, lens, feature):
    """FEATURES[feature] of whole sequences: states {"h": hs, "c": cs} [B, T, H] -> [B, D], pools side by side."""
    return torch.cat([pool(states[state], lens, how) for state, how in FEATURES[feature]], 1)


@torch.inference_mode()
def featurize(model, byte_strings, feature="cell", batch_size=64, progress=None):
    """[N, D] features of `byte_strings` (D = H per pool), or {name: [N, D]} for a tuple of names, all in one
    pass: computed on the model's device in its dtype, returned as float32 numpy arrays. They are `pool`s of the
    states of mlstm.cell's loop over each text, computed as it reads by fast/inference.py (tested equal to
    `features` of model.rnn's states): `batch_size` rows at once, each its own text from a zero state, a row
    refilled with the next text as its own ends, no padding read and no [B, T, H] states kept.
    progress(texts_done, bytes_done, final) hears as texts finish."""
    names = (feature,) if isinstance(feature, str) else tuple(feature)
    if unknown := [f for f in names if f not in FEATURES]:
        raise ValueError(f"feature must be one of {tuple(FEATURES)}, not {unknown[0]!r}")
    pools = list(dict.fromkeys(sp for f in names for sp in FEATURES[f]))  # (state, pool) pairs
    out = inference.pooled_states(model, byte_strings, pools, batch_size, progress)
    X = {f: torch.cat([out[sp] for sp in FEATURES[f]], 1).cpu().numpy() for f in names}
    return X[feature] if isinstance(feature, str) else X


def cached_features(model, checkpoint, name, byte_strings, cache_dir, feature="cell", dtype="fp32", **kw):
    """featurize() through the feature cache (plumbing/feature_cache.py): (features, was_cached). A tuple of
    names comes back as a dict; the ones not cached are computed together in one pass."""
    names = (feature,) if isinstance(feature, str) else tuple(feature)
    paths = {f: feature_cache.cache_path(cache_dir, name, checkpoint, byte_strings, f, dtype) for f in names}
    X = {f: feature_cache.load(paths[f], (len(byte_strings), model.hidden * len(FEATURES[f]))) for f in names}
    if missing := [f for f in names if X[f] is None]:
        said = cli.progress(f"featurize {name}", len(byte_strings), total_bytes=sum(map(len, byte_strings)))
        new = featurize(model, byte_strings, tuple(missing), progress=said, **kw)
        X.update({f: feature_cache.save(paths[f], new[f]) for f in missing})
    return (X[feature] if isinstance(feature, str) else X), not missing


def moments(train):
    """train's mean and std per column (std 0 -> 1): the standardisation every split gets."""
    mu, sd = train.mean(0), train.std(0)
    return mu, np.where(sd > 1e-12, sd, 1.0)


def standardize(train, *others):
    """Scale every split by train's mean and std (std 0 -> 1)."""
    mu, sd = moments(train)
    return [(x - mu) / sd for x in (train, *others)]


def accuracy(X, y, w, b):
    return float(((np.asarray(X, dtype=np.float64) @ w + b > 0) == (np.asarray(y) == 1)).mean())


def fit_select(Xtr, ytr, Xva, yva, penalty="l1", Cs=GRID, device="cpu", progress=None):
    """Fit along the C grid (ascending, warm-started); keep the best validation accuracy (ties: smaller C).
    progress(line), when given, hears of each fit. A fit that fails numerically is that line and is skipped;
    None if every one failed."""
    fit = fit_l1 if penalty == "l1" else fit_l2
    best, path, init = None, [], None
    for k, C in enumerate(sorted(Cs), 1):
        t0 = time.time()
        try:
            w, b = init = fit(Xtr, ytr, C, init=init, device=device)
        except (RuntimeError, ValueError, ArithmeticError) as e:  # linear algebra, non-finite values
            if progress:
                why = f"{type(e).__name__.lstrip('_')}: {(str(e).splitlines() or [''])[0][:200]}"
                progress(f"C {C:g} ({k}/{len(Cs)}): failed, skipped ({why})")
            continue
        r = dict(C=C, w=w, b=b, val_acc=accuracy(Xva, yva, w, b), nonzero=int((w != 0).sum()))
        path.append({k: r[k] for k in ("C", "val_acc", "nonzero")})
        if progress:
            progress(f"C {C:g} ({k}/{len(Cs)}): val {r['val_acc']:.4f}, {r['nonzero']} nonzero, {time.time() - t0:.1f}s")
        if best is None or r["val_acc"] > best["val_acc"]:
            best = r
    return dict(best, path=path) if best else None


def threshold_fit(x, y, sign=1.0):
    """Best t for `predict 1 iff sign*x > t` on (x, y): (t, accuracy). Thresholds between distinct values."""
    v = sign * np.asarray(x, dtype=np.float64)
    o = np.argsort(v, kind="stable")
    vs, ys = v[o], np.asarray(y)[o]
    below_neg = np.concatenate([[0], np.cumsum(1 - ys)])  # k values below t: negatives predicted right
    above_pos = ys.sum() - np.concatenate([[0], np.cumsum(ys)])
    acc = (below_neg + above_pos) / len(v)
    ok = np.ones(len(v) + 1, bool)
    ok[1:-1] = vs[1:] > vs[:-1]
    k = int(np.argmax(np.where(ok, acc, -1)))
    t = -np.inf if k == 0 else np.inf if k == len(v) else (vs[k - 1] + vs[k]) / 2
    return float(t), float(acc[k])


def sentiment_neuron(ws, Z, y, feature, hidden, log):
    """The unit of the largest L1 weight, its sign and the threshold that makes it a classifier alone (fitted on
    train), with its accuracy on each split. An L1 fit that kept no unit (features no better than the majority
    class at the chosen C) leaves the choice to the L2 fit, rather than to unit 0 of an all-zero w."""
    fit = "l1" if "l1" in ws and (np.any(ws["l1"]) or "l2" not in ws) else "l2"
    if fit == "l2":
        log(f"note: the L1 fit {'kept no unit at the chosen C' if 'l1' in ws else 'failed'}; the neuron is the L2 "
            f"fit's largest weight")
    index = int(np.argmax(np.abs(ws[fit])))
    sign = 1.0 if ws[fit][index] >= 0 else -1.0
    thr, train_acc = threshold_fit(Z["train"][:, index], y["train"], sign)
    acc = {s: float(((sign * Z[s][:, index] > thr) == (y[s] == 1)).mean()) for s in ("val", "test")}
    state, pool = FEATURES[feature][index // hidden]  # which pool of which state, and its unit
    return dict(neuron=index, neuron_unit=index % hidden, neuron_state=state, neuron_pool=pool, neuron_fit=fit,
                neuron_sign=int(sign), neuron_threshold=thr, neuron_train_acc=train_acc,
                neuron_val_acc=acc["val"], neuron_test_acc=acc["test"])


@torch.inference_mode()
def unit_trace(model, byte_string, unit, feature="cell"):
    """The value of one unit after every byte of one text ([len] float array): cell state, or hidden."""
    x = torch.tensor(list(byte_string), dtype=torch.int64, device=model.wh.device)[None]
    hs, cs, _ = model.rnn(x, return_cells=True)
    return (hs if feature in ("hidden", "h") else cs)[0, :, unit].float().cpu().numpy()


def fit_scored(Z, y, penalty, device, label):
    """fit_select on standardised train/val, scored on train, val and test, its progress on stderr;
    -> (the scores, (w, b)), or (None, None) if every C failed."""
    t0 = time.time()
    say = lambda line: print(f"fit {label} {penalty}: {line}", file=sys.stderr, flush=True)  # noqa: E731
    r = fit_select(Z["train"], y["train"], Z["val"], y["val"], penalty, device=device, progress=say)
    if r is None:
        say("every C failed: no classifier")
        return None, None
    return dict(C=r["C"], nonzero=r["nonzero"], train_acc=accuracy(Z["train"], y["train"], r["w"], r["b"]),
                val_acc=r["val_acc"], test_acc=accuracy(Z["test"], y["test"], r["w"], r["b"]),
                seconds=round(time.time() - t0, 2), path=r["path"]), (r["w"], r["b"])


def fit_feature(feature, X, y, hidden, device, log):
    """Both penalties' fits on one feature, and its sentiment neuron."""
    mu, sd = moments(X["train"])
    Z = {s: (X[s] - mu) / sd for s in SPLITS}
    fits, wb = {}, {}
    for pen in ("l1", "l2"):
        fits[pen], wb[pen] = fit_scored(Z, y, pen, device, feature)
    ws = {p: r[0] for p, r in wb.items() if r is not None}
    return dict(fits=fits, wb=wb, moments=(mu, sd),
                neuron=sentiment_neuron(ws, Z, y, feature, hidden, log) if ws else None)


def run(a, log=print):
    """The whole experiment for parsed arguments `a`; returns the results dict (also written as JSON)."""
    splits = labeled.load_task(a, log)
    model, config = load_pretrained(a.checkpoint, a.device)
    trained = config.get("dtype") if config.get("dtype") in DTYPES else "fp32"
    a.dtype, a.batch_size, why = inference.settings(a.device, a.dtype, a.batch_size, trained)
    model = model.to(dtype=DTYPES[a.dtype]).eval()
    log(f"transfer: {a.checkpoint} (H={model.hidden}) on {a.device}, {why}; "
        + ", ".join(f"{s} {len(t)}" for s, (t, _) in splits.items()))
    # 1. Features: pools of the states after reading each (normalised) text, every feature asked for in one pass.
    X, y, B, stats = {}, {}, {}, {}
    for s in SPLITS:
        B[s], y[s] = [data.normalize(t) for t in splits[s][0]], splits[s][1]
        t0 = time.time()
        X[s], hit = cached_features(model, a.checkpoint, s, B[s], a.cache_dir, tuple(a.feature), a.dtype,
                                    batch_size=a.batch_size)
        el, nb = time.time() - t0, sum(map(len, B[s]))
        stats[s] = dict(texts=len(B[s]), bytes=nb, seconds=round(el, 3), cached=hit,
                        texts_per_s=round(len(B[s]) / el, 1), bytes_per_s=round(nb / el))
    # 2. Logistic regression, L1 and L2 with C chosen on validation, and the sentiment neuron, per feature.
    t0 = time.time()
    per = {f: fit_feature(f, {s: X[s][f] for s in SPLITS}, y, model.hidden, a.device, log) for f in a.feature}
    if not any(per[f]["fits"][a.penalty] for f in a.feature):
        other = "l2" if a.penalty == "l1" else "l1"
        if not any(per[f]["fits"][other] for f in a.feature):
            raise DataError("every fit failed (see the lines above): no classifier to report")
        log(f"note: every {a.penalty} fit failed (see the lines above); the output model is the {other} fit")
        a.penalty = other
    fitted = [f for f in a.feature if per[f]["fits"][a.penalty]]
    best = max(fitted, key=lambda f: (per[f]["fits"][a.penalty]["val_acc"], -a.feature.index(f)))
    t1, base = time.time(), None
    if a.bow_vocab:  # the baseline does not depend on the checkpoint: --bow-vocab 0 skips it (a sweep fits it once)
        bows = standardize(*bag_of_words(*(splits[s][0] for s in SPLITS), vocab=a.bow_vocab))
        if base := fit_scored(dict(zip(SPLITS, bows)), y, a.penalty, a.device, "bag-of-words")[0]:
            base.pop("path")
            base["seconds"] = round(time.time() - t1, 2)
    r, main = per[best], per[best]["fits"][a.penalty]
    res = dict(task=a.task or "files", checkpoint=os.path.abspath(a.checkpoint), hidden=model.hidden,
               feature=best, features=list(a.feature), penalty=a.penalty, device=a.device, dtype=a.dtype,
               test_acc=main["test_acc"], val_acc=main["val_acc"], train_acc=main["train_acc"], C=main["C"],
               nonzero=main["nonzero"], **r["neuron"], baseline_test_acc=base["test_acc"] if base else None,
               baseline=base, fits=r["fits"], by_feature={f: dict(fits=per[f]["fits"], **(per[f]["neuron"] or {}))
                                                          for f in a.feature},
               featurize=stats, solver_seconds=round(time.time() - t0, 2), classifier=os.path.abspath(a.classifier))
    clf = output_model.probe(best, a.dtype, a.batch_size, r["moments"], r["wb"][a.penalty], main["C"], a.penalty,
                             r["neuron"],
                             a.checkpoint, model.hidden, {k: res[k] for k in ("task", "train_acc", "val_acc", "test_acc")})
    write_all(a, res, per, clf, B["test"], X["test"][best], y["test"], partial(unit_trace, model), log)
    return res


def feature_list(s):
    """--feature: comma-separated names of FEATURES, or all."""
    names = list(FEATURES) if s == "all" else [f for f in s.split(",") if f]
    if not names or set(names) - set(FEATURES) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names from {', '.join(FEATURES)} (comma-separated), "
                                         f"or all; not {s!r}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sentiment transfer from a pretrained byte mLSTM (see the docstring).",
                                formatter_class=cli.Help)
    p.add_argument("--checkpoint", default=os.path.relpath(RELEASED),
                   help="train.py checkpoint or released model (.pt); default: the released model, %(default)s")
    labeled.add_task_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the carved validation and of --limit")
    p.add_argument("--feature", type=feature_list, default=["cell"], help="features, comma-separated, or all: "
                   f"{', '.join(FEATURES)} (default: cell, the state after the last byte: the paper's)")
    p.add_argument("--penalty", choices=("l1", "l2"), default="l1", help="the reported classifier (both are fitted)")
    p.add_argument("--bow-vocab", type=int, default=2000, help="words of the bag-of-words baseline (0: skip the baseline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="featurisation precision (default: bf16 on a CPU with bf16 "
                   "matrix units, else fp32; the checkpoint's training precision on a GPU: fast/inference.py)")
    p.add_argument("--batch-size", type=int, help="texts read at once (default: 256; 128 for fp32 on a CPU)")
    p.add_argument("--cache-dir", help="feature cache (default: CHECKPOINT_DIR/features); deletable")
    p.add_argument("--out", help="output folder (default: CHECKPOINT_DIR/transfer-TASK-CHECKPOINT_NAME)")
    p.add_argument("--classifier", help="where the output model goes (default: OUT/classifier.pt)")
    p.add_argument("--json", help="also write the results JSON here")
    p.add_argument("--heatmap", type=int, default=8, help="N test texts in heatmap.html, half of each class (an odd "
                   "N: one more positive; fewer where a class has fewer texts); 0: none")
    p.add_argument("--heatmap-bytes", type=int, default=1500, help="the first bytes shown of each heatmap text")
    a = p.parse_args(argv)
    labeled.check_task_arguments(p, a)
    cli.require(p, a, ("batch_size", "heatmap_bytes"), lambda v: v >= 1, ">= 1")
    cli.require(p, a, ("seed",), lambda v: 0 <= v < 2**63, "in [0, 2^63)")
    cli.require(p, a, ("bow_vocab",), lambda v: v >= 0, ">= 0 (0: no baseline)")
    cli.require(p, a, ("heatmap",), lambda v: v >= 0, ">= 0 (0: no texts in heatmap.html)")
    if why := cli.device_problem(a.device, DEVICES):
        p.error(why)
    if not os.path.isfile(a.checkpoint):
        p.error(f"--checkpoint {a.checkpoint}: no such file")
    ckpt_dir = os.path.dirname(os.path.abspath(a.checkpoint))
    a.cache_dir = a.cache_dir or os.path.join(ckpt_dir, "features")
    stem = os.path.splitext(os.path.basename(a.checkpoint))[0]  # two models in one folder: two output folders
    a.out = a.out or os.path.join(ckpt_dir, f"transfer-{a.task or 'files'}-{stem}")
    a.classifier = a.classifier or os.path.join(a.out, "classifier.pt")
    if os.path.isfile(a.classifier):  # never silently replace the output model of another language model
        made = output_model.load(a.classifier)["checkpoint"]
        if made["sha256"] != output_model.sha256(a.checkpoint):
            p.error(f"{a.classifier} holds the classifier of another language model ({made['path']}); give "
                    f"another --out (or --classifier), or delete it")
    cli.check_output_dir(p, "--out", a.out)  # now, not after the featurising and fitting; run() creates it
    cli.check_output_file(p, "--json", a.json)
    if os.path.dirname(os.path.abspath(a.classifier)) != os.path.abspath(a.out):
        cli.check_output_file(p, "--classifier", a.classifier)
    return a


if __name__ == "__main__":
    args = parse_args()
    cli.main_guard(lambda: run(args), oom="lower --batch-size",
                   interrupted="interrupted: no results written; the features cached so far are reused next time")

"""Transfer learning: featurise text with the pretrained byte mLSTM, fit logistic regression, find the
sentiment neuron.

Radford et al. 2017 (arXiv 1704.01444) sections 3.1-3.2 and Puri et al. 2018 (arXiv 1808.01371), "Transfer
learning": each text is normalised (data.normalize, the pretraining corpus' function) and read byte by byte;
its feature is the mLSTM cell state after the last byte (--feature hidden: the hidden state; mean: the cell
state averaged over time). A logistic regression on the standardised features (bias unpenalised) is fitted
with an L1 penalty (the reference's choice) and with L2 (fast/logistic.py), its C picked on validation over
2^-8 ... 2^2 (ties: the smaller C) and reported on test. The sentiment neuron is the unit with the largest
|weight| under L1; it is also scored alone (one threshold fitted on train). Baseline: the same classifier on
bag-of-words counts of the same splits.

    python transfer.py --task sst2 --data-dir ../shared/data/sst2   # the released model (models/), the default
    python transfer.py --checkpoint CKPT --task sst2 --data-dir ../shared/data/sst2
    python transfer.py --checkpoint CKPT --task imdb --data-dir ../shared/data/imdb [--limit 2000]
    python transfer.py --checkpoint CKPT --train a.csv [--val b.csv] --test c.jsonl \\
        --text-column text --label-column label
    options: --feature cell|hidden|mean  --penalty l1|l2  --json results.json  --out DIR  --cache-dir DIR
             --device cuda|cpu  --dtype fp32|fp16|bf16  --batch-size 64  --chunk 256

Features are cached as .npy in --cache-dir (default CKPT_DIR/features/, safe to delete; plumbing/feature_cache.py).
Writes to --out (default CKPT_DIR/transfer-TASK/): results.json, heatmap.html (the neuron per byte),
histogram.txt (+ .png). The labelled-file readers are plumbing/labeled.py.
"""
import argparse
import json
import os
import re
import time
from collections import Counter

import numpy as np
import torch

import data
import mlstm
from fast.logistic import fit_l1, fit_l2
from plumbing import cli, feature_cache, labeled
from plumbing.checkpoints import RELEASED, load_pretrained
from plumbing.reports import heatmap_html, histogram_png, histogram_text, write_file

FEATURES = ("cell", "hidden", "mean")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# --device types: cpu, cuda, and Apple's GPU where there is one (inference only; untested here)
DEVICES = ("cpu", "cuda") + (("mps",) if torch.backends.mps.is_available() else ())
GRID = [2.0 ** k for k in range(-8, 3)]  # C = 2^-8 ... 2^2


@torch.inference_mode()
def featurize(model, byte_strings, feature="cell", batch_size=64, chunk=256, progress=None):
    """[N, H] features of `byte_strings`: computed on the model's device in its dtype, returned as a float32
    numpy array.

    Texts are sorted by length (longest first) and right-padded, and each text's feature is read at its
    own last byte, so padding never changes it. Long texts go through in `chunk`-byte windows with the
    state carried; a row leaves the batch once its text is done (the active rows are a prefix)."""
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, not {feature!r}")
    p = model.wh
    lengths = np.array([len(b) for b in byte_strings], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    out = torch.zeros(len(byte_strings), model.hidden)
    done_bytes = 0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        lens = lengths[idx]
        x = np.zeros((len(idx), max(int(lens[0]), 1)), dtype=np.int64)  # [b, longest]
        for r, i in enumerate(idx):
            x[r, : lens[r]] = np.frombuffer(byte_strings[i], dtype=np.uint8)
        x, lens_t = torch.from_numpy(x).to(p.device), torch.from_numpy(lens).to(p.device)
        h, c = model.zero_state(len(idx))
        acc = torch.zeros(len(idx), model.hidden, device=p.device)
        for t0 in range(0, int(lens[0]), chunk):
            a = int((lens > t0).sum())  # rows still reading
            hs, cs, (h, c) = model.rnn(x[:a, t0 : t0 + chunk], (h[:a], c[:a]), return_cells=True)
            seq = hs if feature == "hidden" else cs  # [a, Tc, H]
            left = lens_t[:a] - t0  # bytes of each row from t0 on
            if feature == "mean":
                valid = torch.arange(seq.shape[1], device=p.device) < left[:, None]  # [a, Tc]
                acc[:a] += (seq.float() * valid[..., None]).sum(1)
            else:
                ends = (left <= seq.shape[1]).nonzero().squeeze(1)  # rows whose last byte is in this window
                acc[ends] = seq[ends, left[ends] - 1].float()
        if feature == "mean":
            acc /= lens_t.clamp(min=1)[:, None].float()
        out[torch.from_numpy(idx)] = acc.cpu()
        done_bytes += int(lens.sum())
        if progress:
            progress(s + len(idx), done_bytes, final=s + batch_size >= len(order))
    return out.numpy()


def cached_features(model, checkpoint, name, byte_strings, cache_dir, feature="cell", dtype="fp32", **kw):
    """featurize() through the feature cache (plumbing/feature_cache.py): (features, was_cached)."""
    path = feature_cache.cache_path(cache_dir, name, checkpoint, byte_strings, feature, dtype)
    progress = cli.progress(f"featurize {name}", len(byte_strings))
    return feature_cache.cached(path, (len(byte_strings), model.hidden),
                                lambda: featurize(model, byte_strings, feature, progress=progress, **kw))


def standardize(train, *others):
    """Scale every split by train's mean and std (std 0 -> 1)."""
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return [(x - mu) / sd for x in (train, *others)]


def accuracy(X, y, w, b):
    return float(((np.asarray(X, dtype=np.float64) @ w + b > 0) == (np.asarray(y) == 1)).mean())


def fit_select(Xtr, ytr, Xva, yva, penalty="l1", Cs=GRID, device="cpu"):
    """Fit along the C grid (ascending, warm-started); keep the best validation accuracy (ties: smaller C)."""
    fit = fit_l1 if penalty == "l1" else fit_l2
    best, path, init = None, [], None
    for C in sorted(Cs):
        w, b = init = fit(Xtr, ytr, C, init=init, device=device)
        r = dict(C=C, w=w, b=b, val_acc=accuracy(Xva, yva, w, b), nonzero=int((w != 0).sum()))
        path.append({k: r[k] for k in ("C", "val_acc", "nonzero")})
        if best is None or r["val_acc"] > best["val_acc"]:
            best = r
    return dict(best, path=path)


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


def sentiment_neuron(ws, Z, y, log):
    """The unit of the largest L1 weight, its sign and the threshold that makes it a classifier alone (fitted on
    train), with its accuracy on each split. An L1 fit that kept no unit (features no better than the majority
    class at the chosen C) leaves the choice to the L2 fit, rather than to unit 0 of an all-zero w."""
    fit = "l1" if np.any(ws["l1"]) else "l2"
    if fit == "l2":
        log("note: the L1 fit kept no unit at the chosen C; the neuron is the L2 fit's largest weight")
    unit = int(np.argmax(np.abs(ws[fit])))
    sign = 1.0 if ws[fit][unit] >= 0 else -1.0
    thr, train_acc = threshold_fit(Z["train"][:, unit], y["train"], sign)
    acc = {s: float(((sign * Z[s][:, unit] > thr) == (y[s] == 1)).mean()) for s in ("val", "test")}
    return dict(neuron=unit, neuron_fit=fit, neuron_sign=int(sign), neuron_threshold=thr,
                neuron_train_acc=train_acc, neuron_val_acc=acc["val"], neuron_test_acc=acc["test"])


def bag_of_words(train_texts, *others, vocab=2000):
    """Count matrices over the `vocab` lowercase words found in the most train texts (ties: alphabetical)."""
    tok = lambda t: re.findall(r"[a-z0-9']+", t.lower())  # noqa: E731
    counts = Counter(w for t in train_texts for w in set(tok(t)))
    words = {w: i for i, (w, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab])}
    mats = []
    for texts in (train_texts, *others):
        M = np.zeros((len(texts), len(words)), dtype=np.float32)
        for r, t in enumerate(texts):
            for w in tok(t):
                if w in words:
                    M[r, words[w]] += 1
        mats.append(M)
    return mats


@torch.inference_mode()
def unit_trace(model, byte_string, unit, feature="cell"):
    """The value of one unit after every byte of one text ([len] float array): cell state, or hidden."""
    x = torch.tensor(list(byte_string), dtype=torch.int64, device=model.wh.device)[None]
    hs, cs, _ = model.rnn(x, return_cells=True)
    return (hs if feature == "hidden" else cs)[0, :, unit].float().cpu().numpy()


def fit_scored(Z, y, penalty, device):
    """fit_select on standardised train/val, scored on train, val and test; with the weights."""
    t0 = time.time()
    r = fit_select(Z["train"], y["train"], Z["val"], y["val"], penalty, device=device)
    return dict(C=r["C"], nonzero=r["nonzero"], train_acc=accuracy(Z["train"], y["train"], r["w"], r["b"]),
                val_acc=r["val_acc"], test_acc=accuracy(Z["test"], y["test"], r["w"], r["b"]),
                seconds=round(time.time() - t0, 2), path=r["path"]), r["w"]


def run(a, log=print):
    """The whole experiment for parsed arguments `a`; returns the results dict (also written as JSON)."""
    splits = labeled.load_task(a)
    model, config = load_pretrained(a.checkpoint, a.device)
    if a.dtype is None:  # the checkpoint's dtype on a GPU; fp32 on CPU, where half precision is slow
        a.dtype = config.get("dtype", "fp32") if a.device.startswith("cuda") else "fp32"
        a.dtype = a.dtype if a.dtype in DTYPES else "fp32"
    model = model.to(dtype=DTYPES[a.dtype]).eval()
    log(f"transfer: {a.checkpoint} (H={model.hidden}) on {a.device} {a.dtype}; "
        + ", ".join(f"{s} {len(t)}" for s, (t, _) in splits.items()))
    # 1. Features: the state after reading each (normalised) text.
    X, y, B, stats = {}, {}, {}, {}
    for s in ("train", "val", "test"):
        B[s], y[s] = [data.normalize(t) for t in splits[s][0]], splits[s][1]
        t0 = time.time()
        X[s], hit = cached_features(model, a.checkpoint, s, B[s], a.cache_dir, a.feature, a.dtype,
                                    batch_size=a.batch_size, chunk=a.chunk)
        el, nb = time.time() - t0, sum(map(len, B[s]))
        stats[s] = dict(texts=len(B[s]), bytes=nb, seconds=round(el, 3), cached=hit,
                        texts_per_s=round(len(B[s]) / el, 1), bytes_per_s=round(nb / el))
    # 2. Logistic regression on the standardised features, L1 and L2, C chosen on validation.
    Z = dict(zip(("train", "val", "test"), standardize(X["train"], X["val"], X["test"])))
    t0 = time.time()
    fits, ws = {}, {}
    for pen in ("l1", "l2"):
        fits[pen], ws[pen] = fit_scored(Z, y, pen, a.device)
    # 3. The sentiment neuron: one unit alone.
    neuron = sentiment_neuron(ws, Z, y, log)
    t1, base = time.time(), None
    if a.bow_vocab:  # the baseline does not depend on the checkpoint: --bow-vocab 0 skips it (a sweep fits it once)
        bows = standardize(*bag_of_words(*(splits[s][0] for s in ("train", "val", "test")), vocab=a.bow_vocab))
        base = fit_scored(dict(zip(("train", "val", "test"), bows)), y, a.penalty, a.device)[0]
        base.pop("path")
        base["seconds"] = round(time.time() - t1, 2)
    main = fits[a.penalty]
    res = dict(task=a.task or "files", checkpoint=os.path.abspath(a.checkpoint), hidden=model.hidden,
               feature=a.feature, penalty=a.penalty, device=a.device, dtype=a.dtype,
               test_acc=main["test_acc"], val_acc=main["val_acc"], train_acc=main["train_acc"], C=main["C"],
               nonzero=main["nonzero"], **neuron, baseline_test_acc=base["test_acc"] if base else None,
               baseline=base, fits=fits, featurize=stats, solver_seconds=round(time.time() - t0, 2))
    report(a, res, model, B, X, y, log)
    return res


def report(a, res, model, B, X, y, log):
    """The results table on the log; heatmap.html, histogram.txt (+ .png) and results.json in --out, the results
    last, each file whole: a run that fails on the way leaves no results.json beside older pictures."""
    unit, sign, fits, base = res["neuron"], res["neuron_sign"], res["fits"], res["baseline"]
    alone = dict(C=float("nan"), nonzero=1, **{f"{s}_acc": res[f"neuron_{s}_acc"] for s in ("train", "val", "test")})
    rows = [(f"mLSTM {a.feature} + L1", fits["l1"]), (f"mLSTM {a.feature} + L2", fits["l2"]),
            (f"neuron {unit} ({'+' if sign > 0 else '-'}) alone", alone)]
    rows += [(f"bag of {a.bow_vocab} words + {a.penalty.upper()}", base)] if base else []
    log(f"\n{'classifier':<30}{'C':>10}{'nonzero':>9}{'train':>8}{'val':>8}{'test':>8}")
    for name, r in rows:
        log(f"{name:<30}{r['C']:>10.4g}{r['nonzero']:>9}{r['train_acc']:>8.4f}{r['val_acc']:>8.4f}{r['test_acc']:>8.4f}")
    os.makedirs(a.out, exist_ok=True)
    # The neuron per byte on a few test texts (half of each class, an odd one positive), and its final value per class.
    pick = [i for k, n in ((1, (a.heatmap + 1) // 2), (0, a.heatmap // 2)) for i in np.flatnonzero(y["test"] == k)[:n]]
    shown = [B["test"][i][: a.heatmap_bytes] for i in pick]
    heatmap_html(shown, [sign * unit_trace(model, b, unit, a.feature) for b in shown],
                 os.path.join(a.out, "heatmap.html"), f"sentiment neuron {unit} (sign {sign:+.0f}), {a.feature}")
    hist = histogram_text(sign * X["test"][:, unit], y["test"])
    write_file(os.path.join(a.out, "histogram.txt"),
               f"neuron {unit} x sign {sign:+.0f}: final {a.feature} value on test, by class\n{hist}\n")
    log(f"\nneuron {unit} x sign {sign:+.0f}, final {a.feature} value on test:\n{hist}")
    histogram_png(sign * X["test"][:, unit], y["test"], f"neuron {unit} final {a.feature} value",
                  os.path.join(a.out, "histogram.png"))
    for path in (os.path.join(a.out, "results.json"), a.json):
        if path:
            write_file(path, json.dumps(res, indent=1))
    log(f"\nwrote {a.out}/results.json, heatmap.html, histogram.txt" + (f" and {a.json}" if a.json else ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sentiment transfer from a pretrained byte mLSTM (see the docstring).")
    p.add_argument("--checkpoint", default=os.path.relpath(RELEASED),
                   help="train.py checkpoint or released model (.pt); default: the released model, %(default)s")
    p.add_argument("--task", choices=("sst2", "imdb"), help="a known dataset under --data-dir")
    p.add_argument("--data-dir", help="sst2: folder of train/dev/test.csv; imdb: aclImdb folder or tarball")
    p.add_argument("--train", help="labelled .csv/.tsv/.jsonl/.json file, optionally .gz/.bz2/.xz (instead of --task)")
    p.add_argument("--val", help="validation file (default: --val-frac of --train)")
    p.add_argument("--test", help="test file")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--val-frac", type=float, default=0.2, help="share of train carved as validation where there is "
                   "no validation file (imdb; --train without --val); sst2 uses its dev.csv")
    p.add_argument("--seed", type=int, default=0, help="seed of the carved validation and of --limit")
    p.add_argument("--limit", type=int, help="use at most N texts per split (a seeded subset)")
    p.add_argument("--feature", choices=FEATURES, default="cell", help="cell state after the last byte (paper)")
    p.add_argument("--penalty", choices=("l1", "l2"), default="l1", help="the reported classifier (both are fitted)")
    p.add_argument("--bow-vocab", type=int, default=2000, help="words of the bag-of-words baseline (0: skip the baseline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: the checkpoint's dtype on cuda, fp32 on cpu")
    p.add_argument("--batch-size", type=int, default=64, help="texts per featurisation batch")
    p.add_argument("--chunk", type=int, default=256, help="bytes per window of long texts (state carried)")
    p.add_argument("--cache-dir", help="feature cache (default: CHECKPOINT_DIR/features); deletable")
    p.add_argument("--out", help="output folder (default: CHECKPOINT_DIR/transfer-TASK)")
    p.add_argument("--json", help="also write the results JSON here")
    p.add_argument("--heatmap", type=int, default=8, help="N test texts in heatmap.html, half of each class (an odd "
                   "N: one more positive; fewer where a class has fewer texts); 0: none")
    p.add_argument("--heatmap-bytes", type=int, default=1500, help="the first bytes shown of each heatmap text")
    a = p.parse_args(argv)
    if a.task and (a.train or a.test or a.val):
        p.error("give either --task with --data-dir, or --train/--test files, not both")
    if a.task and not a.data_dir:
        p.error(f"--task {a.task} needs --data-dir")
    if not a.task and not (a.train and a.test):
        p.error("give --task sst2|imdb --data-dir DIR, or --train FILE --test FILE [--val FILE]")
    cli.require(p, a, ("limit", "batch_size", "chunk", "heatmap_bytes"), lambda v: v >= 1, ">= 1")
    cli.require(p, a, ("seed",), lambda v: 0 <= v < 2**63, "in [0, 2^63)")
    cli.require(p, a, ("bow_vocab",), lambda v: v >= 0, ">= 0 (0: no baseline)")
    cli.require(p, a, ("heatmap",), lambda v: v >= 0, ">= 0 (0: no texts in heatmap.html)")
    cli.require(p, a, ("val_frac",), lambda v: 0 < v < 1, "in (0, 1)")
    if why := cli.device_problem(a.device, DEVICES):
        p.error(why)
    if not os.path.isfile(a.checkpoint):
        p.error(f"--checkpoint {a.checkpoint}: no such file")
    ckpt_dir = os.path.dirname(os.path.abspath(a.checkpoint))
    a.cache_dir = a.cache_dir or os.path.join(ckpt_dir, "features")
    a.out = a.out or os.path.join(ckpt_dir, f"transfer-{a.task or 'files'}")
    existing = os.path.abspath(a.out)  # checked now, not after the featurising and fitting; created by run()
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not cli.writable(existing):
        p.error(f"--out {a.out}: {existing} is not a writable folder")
    cli.check_output_file(p, "--json", a.json)
    return a


if __name__ == "__main__":
    args = parse_args()
    cli.main_guard(lambda: run(args), oom="lower --batch-size or --chunk",
                   interrupted="interrupted: no results written; the features cached so far are reused next time")

"""Transfer learning: featurise text with the pretrained byte mLSTM, fit logistic regression, find the
sentiment neuron.

Radford et al. 2017 (arXiv 1704.01444) sections 3.1-3.2 and Puri et al. 2018 (arXiv 1808.01371), "Transfer
learning": each text is normalised (data.normalize, the pretraining corpus' function) and read byte by byte;
its feature is the mLSTM cell state after the last byte (--feature hidden: the hidden state; mean: the cell
state averaged over time). A logistic regression on the standardised features (bias unpenalised) is fitted
  - L2: Newton's method / IRLS, each step one weighted least-squares solve, exact optimum in a few steps;
  - L1 (the reference's choice): FISTA (accelerated proximal gradient, step 1/Lipschitz, adaptive restart).
Objective, sklearn's convention divided by C: sum_i logloss_i + ||w||^2 / (2C)  (L2)  or  + ||w||_1 / C  (L1).
C is picked on validation over 2^-8 ... 2^2 (ties: the smaller C) and reported on test. The sentiment
neuron is the unit with the largest |weight| under L1; it is also scored alone (one threshold fitted on
train). Baseline: the same classifier on bag-of-words counts of the same splits.

    python transfer.py --task sst2 --data-dir /work/shared/data/sst2   # the released model (models/), the default
    python transfer.py --checkpoint CKPT --task sst2 --data-dir /work/shared/data/sst2
    python transfer.py --checkpoint CKPT --task imdb --data-dir /work/shared/data/imdb [--limit 2000]
    python transfer.py --checkpoint CKPT --train a.csv [--val b.csv] --test c.jsonl \\
        --text-column text --label-column label
    options: --feature cell|hidden|mean  --penalty l1|l2  --json results.json  --out DIR  --cache-dir DIR
             --device cuda|cpu  --dtype fp32|fp16|bf16  --batch-size 64  --chunk 256

Features are cached as .npy in --cache-dir (default CKPT_DIR/features/, safe to delete), keyed by the
checkpoint's path, size and mtime, the texts' content and the feature options. Writes to --out (default
CKPT_DIR/transfer-TASK/): results.json, heatmap.html (the neuron per byte), histogram.txt (+ .png).
"""
import argparse, codecs, csv, hashlib, html, json, os, re, sys, time, warnings
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

import data
import distributed
import mlstm
from data import DataError

FEATURES = ("cell", "hidden", "mean")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# --device types: cpu, cuda, and Apple's GPU where there is one (inference only; untested here)
DEVICES = ("cpu", "cuda") + (("mps",) if torch.backends.mps.is_available() else ())
GRID = [2.0 ** k for k in range(-8, 3)]  # C = 2^-8 ... 2^2
LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "neg": 0, "pos": 1, "negative": 0, "positive": 1,
          "false": 0, "true": 1}

# ---------------------------------------------------------------- datasets: split -> (texts, labels)


def _label(value, where):
    key = str(value).strip().lower() if not isinstance(value, bool) else str(value).lower()
    if key not in LABELS:
        raise DataError(f"{where}: label {value!r} is not binary (expected 0/1, neg/pos, negative/positive, "
                        "false/true)")
    return LABELS[key]


def _json_row(path, n, line):
    """Line n of a JSON-lines file, parsed; errors name the file's line, not json's place in the one line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        if not line.lstrip().startswith("["):
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        row = []
    if isinstance(row, list):
        raise DataError(f"{path}:{n}: a JSON array; expected one JSON object per line (JSON lines)")
    return row


def read_labeled(path, text_column="text", label_column="label"):
    """(texts, labels int64 array) from a .csv / .tsv / .json(l) file (optionally .gz/.bz2/.xz) with named columns."""
    ext = os.path.splitext(data.inner_name(path))[1]
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if ext not in (".csv", ".tsv", ".jsonl", ".json"):
        raise DataError(f"{path}: unknown format {ext!r} (expected .csv, .tsv, .jsonl or .json, optionally "
                        ".gz/.bz2/.xz)")
    texts, labels, n = [], [], 1  # n: the line of the last row read
    try:
        with data._open_text(path) as f:  # decompressed as named; without Excel's byte-order mark
            if ext in (".csv", ".tsv"):
                csv.field_size_limit(data.MAX_LINE)  # the default 131,072 characters is shorter than some reviews
                # strict: a stray quote is an error, not a quoted field that swallows the rest of the file
                reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",", strict=True)
                rows = ((reader.line_num, r) for r in reader)  # the row's last line: quoted fields may span several
                for col in (text_column, label_column):
                    if col not in (reader.fieldnames or []):
                        raise DataError(f"{path}: no column {col!r} (columns: {reader.fieldnames})")
            else:
                def too_long(n, why):
                    raise DataError(f"{path}:{n}: {why}")
                rows = ((n, _json_row(path, n, line)) for n, line in data._lines(f, too_long) if line.strip())
            for n, row in rows:
                if not isinstance(row, dict) or not isinstance(row.get(text_column), str) \
                        or row.get(label_column) in (None, ""):
                    raise DataError(f"{path}:{n}: no {text_column!r} text or no {label_column!r} label")
                texts.append(row[text_column])
                labels.append(_label(row[label_column], f"{path}:{n}"))
    except csv.Error as e:
        raise DataError(f"{path}:{n + 1}: malformed row ({e}); a stray quote?") from None
    except (ValueError, RecursionError, *data.BAD_FILE) as e:  # a bad archive, a JSON nested too deep
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})")
    if not texts:
        raise DataError(f"{path}: no labelled rows (empty split)")
    return texts, np.array(labels, dtype=np.int64)


def carve(texts, labels, frac, seed=0):
    """Split off a seeded random `frac` of (texts, labels): returns (rest, carved)."""
    perm = np.random.default_rng(seed).permutation(len(texts))
    k = int(round(frac * len(texts)))
    pick = lambda ix: ([texts[i] for i in ix], labels[ix])  # noqa: E731
    return pick(np.sort(perm[k:])), pick(np.sort(perm[:k]))


def load_sst2(data_dir):
    """Radford et al.'s SST-2 CSVs (label,sentence): DIR/{train,dev,test}.csv (or DIR/sst2/...)."""
    if not os.path.isfile(os.path.join(data_dir, "train.csv")) and os.path.isdir(os.path.join(data_dir, "sst2")):
        data_dir = os.path.join(data_dir, "sst2")
    return {s: read_labeled(os.path.join(data_dir, f + ".csv"), "sentence", "label")
            for s, f in (("train", "train"), ("val", "dev"), ("test", "test"))}


def load_imdb(path, val_frac=0.2, seed=0):
    """IMDB from an aclImdb folder, its parent, its .tar.gz/.tar.xz, or a folder holding that tarball.
    val = a seeded `val_frac` of train (the paper's peers' 20%); the order does not depend on the source."""
    if os.path.isdir(path) and not os.path.isdir(os.path.join(path, "aclImdb")) \
            and os.path.basename(os.path.normpath(path)) != "aclImdb":
        tars = sorted(f for f in os.listdir(path) if f.startswith("aclImdb") and ".tar" in f)
        path = os.path.join(path, tars[0]) if tars else path
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    got = {"train": [], "test": []}
    for part, text in data.imdb_documents(path, parts=("train/pos", "train/neg", "test/pos", "test/neg")):
        split, cls = part.split("/")
        got[split].append((int(cls == "pos"), text))
    for split, items in got.items():
        if not items or len({y for y, _ in items}) < 2:
            raise DataError(f"{path}: {split}/pos and {split}/neg must both hold reviews (empty split)")
        items.sort()  # (label, text): a folder and its tarball give the same order, hence the same val
    out = {s: ([t for _, t in it], np.array([y for y, _ in it], dtype=np.int64)) for s, it in got.items()}
    out["train"], out["val"] = carve(*out["train"], val_frac, seed)
    return out


def load_files(train, val, test, text_column, label_column, val_frac=0.2, seed=0):
    splits = {"train": read_labeled(train, text_column, label_column),
              "test": read_labeled(test, text_column, label_column)}
    if val:
        splits["val"] = read_labeled(val, text_column, label_column)
    else:
        splits["train"], splits["val"] = carve(*splits["train"], val_frac, seed)
    return splits


# ---------------------------------------------------------------- featurisation


def _progress(label, total, every=2.0):
    """A progress line on stderr: update(texts_done, bytes_done)."""
    start, last = time.time(), [0.0]

    def update(n, nbytes, final=False):
        now = time.time()
        if final or now - last[0] > every:
            last[0], el = now, max(now - start, 1e-9)
            eta = el * (total - n) / max(n, 1)
            end = "\n" if final or not sys.stderr.isatty() else "\r"
            print(f"featurize {label}: {n}/{total} texts, {n / el:.1f} texts/s, {nbytes / el / 1e3:.1f} kB/s, "
                  f"{el:.0f}s elapsed, eta {eta:.0f}s", end=end, file=sys.stderr, flush=True)
    return update


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
        x = np.zeros((len(idx), max(int(lens[0]), 1)), dtype=np.int64)
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
    """featurize() through a .npy cache keyed by checkpoint, texts and options: (features, was_cached)."""
    texts = hashlib.sha1()
    for b in byte_strings:
        texts.update(len(b).to_bytes(8, "little") + b)
    st = os.stat(checkpoint)
    key = json.dumps([os.path.abspath(checkpoint), st.st_size, st.st_mtime_ns, texts.hexdigest(), feature, dtype])
    path = os.path.join(cache_dir, f"{name}-{feature}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")
    try:  # a missing, damaged (truncated by a crash) or mismatched file is a miss, overwritten below
        X = np.load(path)
        if X.shape == (len(byte_strings), model.hidden):
            return X, True
    except (ValueError, OSError, EOFError):
        pass
    X = featurize(model, byte_strings, feature, progress=_progress(name, len(byte_strings)), **kw)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            np.save(f, X)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise SystemExit(f"{cache_dir}: cannot write the feature cache ({e}); pass --cache-dir")
    return X, False


# ---------------------------------------------------------------- logistic regression (float64, full batch)


def _design(X, y, device):
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64, device=device)
    Xb = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=device)], 1)  # last column: the bias
    return Xb, torch.as_tensor(np.asarray(y), dtype=torch.float64, device=device)


def _init(init, D1, device):
    return torch.zeros(D1, dtype=torch.float64, device=device) if init is None else \
        torch.as_tensor(np.append(init[0], init[1]), dtype=torch.float64, device=device)


def fit_l2(X, y, C, init=None, tol=1e-12, max_iter=100, device="cpu"):
    """min_{w,b} sum_i [log(1+e^z_i) - y_i z_i] + ||w||^2/(2C), z = Xw + b: sklearn's LogisticRegression(C)
    (C * sum loss + ||w||^2/2) divided by C, same optimum. Newton/IRLS with step halving. -> (w, b)."""
    Xb, y = _design(X, y, device)
    reg = torch.full((Xb.shape[1],), 1.0 / C, dtype=torch.float64, device=device)
    reg[-1] = 0.0  # bias unpenalised
    th = _init(init, Xb.shape[1], device)
    obj = lambda t: (F.softplus(Xb @ t) - y * (Xb @ t)).sum() + 0.5 * (reg * t * t).sum()  # noqa: E731
    f = obj(th)
    for _ in range(max_iter):
        p = torch.sigmoid(Xb @ th)
        g = Xb.T @ (p - y) + reg * th
        A = Xb * (p * (1 - p)).sqrt()[:, None]
        Hm = A.T @ A + torch.diag(reg + 1e-12)  # X^T W X + R: the weighted least-squares normal matrix
        step = torch.linalg.solve(Hm, g)
        dec = float(g @ step)  # Newton decrement^2: twice the predicted decrease
        t = 1.0
        while (fn := obj(th - t * step)) > f - 0.25 * t * dec and t >= 1e-8:  # Armijo step halving:
            t /= 2                                                             # plain Newton can overshoot
        if t < 1e-8:  # no step lowers the objective beyond rounding: th is already the optimum
            break
        th, f = th - t * step, fn
        if dec < tol * (1.0 + abs(float(f))):
            break
    th = th.cpu().numpy()
    return th[:-1], float(th[-1])


def fit_l1(X, y, C, init=None, tol=1e-6, max_iter=20000, device="cpu"):
    """min_{w,b} sum_i logloss_i + ||w||_1 / C: sklearn's L1 LogisticRegression(C) divided by C. FISTA with
    step 1/L, L = lambda_max(Xb^T Xb)/4, adaptive restart; stops when the optimality violation (a
    subgradient residual) is below tol * N, or warns after max_iter. -> (w, b) with exact zeros."""
    Xb, y = _design(X, y, device)
    N, D1 = Xb.shape
    lam = torch.full((D1,), 1.0 / C, dtype=torch.float64, device=device)
    lam[-1] = 0.0
    L = float(torch.linalg.eigvalsh(Xb.T @ Xb)[-1]) / 4 * 1.0001
    th = _init(init, D1, device)
    z, tk = th.clone(), 1.0
    grad = lambda t: Xb.T @ (torch.sigmoid(Xb @ t) - y)  # noqa: E731
    for it in range(max_iter):
        v = z - grad(z) / L
        new = torch.sign(v) * (v.abs() - lam / L).clamp(min=0)  # soft threshold (prox of the L1 term)
        if float(((z - new) * (new - th)).sum()) > 0:  # momentum points uphill: restart it
            tk = 1.0
        tn = (1 + (1 + 4 * tk * tk) ** 0.5) / 2
        z, th, tk = new + (tk - 1) / tn * (new - th), new, tn
        if it % 10 == 9:
            g = grad(th)
            viol = torch.where(th != 0, (g + lam * torch.sign(th)).abs(), (g.abs() - lam).clamp(min=0))
            if float(viol.max()) < tol * N:
                break
    else:  # the loop never met the stopping test
        warnings.warn(f"fit_l1 at C={C:g} stopped at max_iter={max_iter} before converging (tol={tol:g})")
    th = th.cpu().numpy()
    return th[:-1], float(th[-1])


def accuracy(X, y, w, b):
    return float(((np.asarray(X, dtype=np.float64) @ w + b > 0) == (np.asarray(y) == 1)).mean())


def standardize(train, *others):
    """Scale every split by train's mean and std (std 0 -> 1)."""
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return [(x - mu) / sd for x in (train, *others)]


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


# ---------------------------------------------------------------- outputs a person looks at


def write_file(path, text):
    """Write `text` to `path` whole or not at all: a temporary file, then an atomic rename."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def heatmap_html(byte_strings, activations, path=None, title="", vmax=None):
    """HTML page, one block per text, every character coloured by the value at its (last) byte: green
    positive, red negative, full colour at |value| = vmax (default: the largest |value|). Returns the page."""
    if len(byte_strings) != len(activations):
        raise ValueError(f"{len(byte_strings)} texts but {len(activations)} activation rows")
    vals = [np.asarray(a, dtype=np.float64).reshape(-1) for a in activations]
    for i, (b, v) in enumerate(zip(byte_strings, vals)):
        if len(b) != len(v):
            raise ValueError(f"text {i}: {len(b)} bytes but {len(v)} values")
    vmax = vmax or max([float(np.abs(v).max()) for v in vals if len(v)] + [1e-12])
    blocks = []
    for b, v in zip(byte_strings, vals):
        dec, spans = codecs.getincrementaldecoder("utf-8")("replace"), []
        for j in range(len(b)):
            ch = dec.decode(b[j : j + 1])
            if ch:
                s = max(-1.0, min(1.0, v[j] / vmax))
                col = f"rgba(0,170,0,{s:.3f})" if s > 0 else f"rgba(230,0,0,{-s:.3f})"
                spans.append(f'<span style="background:{col}" title="{v[j]:.4g}">'
                             f'{html.escape(ch.replace(chr(10), chr(0x21B5)))}</span>')
        blocks.append('<div class="t">' + "".join(spans) + "</div>")
    page = ('<!doctype html><meta charset="utf-8"><title>{0}</title><style>body{{font-family:monospace;'
            'max-width:70em}} .t{{margin:1em 0;white-space:pre-wrap;line-height:1.7}}</style><h3>{0}</h3>'
            '<p>green positive, red negative; full colour at |value| = {1:.4g}; hover for values</p>\n{2}\n'
            ).format(html.escape(title), vmax, "\n".join(blocks))
    if path:
        write_file(path, page)
    return page


@torch.inference_mode()
def unit_trace(model, byte_string, unit, feature="cell"):
    """The value of one unit after every byte of one text ([len] float array): cell state, or hidden."""
    x = torch.tensor(list(byte_string), dtype=torch.int64, device=model.wh.device)[None]
    hs, cs, _ = model.rnn(x, return_cells=True)
    return (hs if feature == "hidden" else cs)[0, :, unit].float().cpu().numpy()


def histogram_text(values, labels, bins=20, width=30):
    counts = [np.histogram(values[labels == k], bins=bins, range=(values.min(), values.max() + 1e-9))
              for k in (0, 1)]
    edges, top = counts[0][1], max(max(c[0].max() for c in counts), 1)
    lines = [f"{'value':>9}  {'negative':<{width + 6}}  positive"]
    for i in range(bins):
        n0, n1 = counts[0][0][i], counts[1][0][i]
        lines.append(f"{edges[i]:9.3f}  {n0:5d} {'#' * round(width * n0 / top):<{width}}  "
                     f"{n1:5d} {'#' * round(width * n1 / top)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the experiment


def run(a, log=print):
    """The whole experiment for parsed arguments `a`; returns the results dict (also written as JSON)."""
    if a.task == "sst2":
        splits = load_sst2(a.data_dir)
    elif a.task == "imdb":
        splits = load_imdb(a.data_dir, a.val_frac, a.seed)
    else:
        splits = load_files(a.train, a.val, a.test, a.text_column, a.label_column, a.val_frac, a.seed)
    for name, (texts, labels) in splits.items():
        if a.limit and len(texts) > a.limit:
            splits[name] = carve(texts, labels, a.limit / len(texts), a.seed)[1]
        if len(set(splits[name][1].tolist())) < 2:
            raise DataError(f"{name} split: only one class present ({len(splits[name][1])} rows)")
    model, config = mlstm.load_pretrained(a.checkpoint, a.device)
    if a.dtype is None:  # the checkpoint's dtype on a GPU; fp32 on CPU, where half precision is slow
        a.dtype = config.get("dtype", "fp32") if a.device.startswith("cuda") else "fp32"
        a.dtype = a.dtype if a.dtype in DTYPES else "fp32"
    model = model.to(dtype=DTYPES[a.dtype]).eval()
    log(f"transfer: {a.checkpoint} (H={model.hidden}) on {a.device} {a.dtype}; "
        + ", ".join(f"{s} {len(t)}" for s, (t, _) in splits.items()))
    X, y, B, stats = {}, {}, {}, {}
    for s in ("train", "val", "test"):
        B[s], y[s] = [data.normalize(t) for t in splits[s][0]], splits[s][1]
        t0 = time.time()
        X[s], hit = cached_features(model, a.checkpoint, s, B[s], a.cache_dir, a.feature, a.dtype,
                                    batch_size=a.batch_size, chunk=a.chunk)
        el, nb = time.time() - t0, sum(map(len, B[s]))
        stats[s] = dict(texts=len(B[s]), bytes=nb, seconds=round(el, 3), cached=hit,
                        texts_per_s=round(len(B[s]) / el, 1), bytes_per_s=round(nb / el))
    Ztr, Zva, Zte = standardize(X["train"], X["val"], X["test"])
    fits, ws, t0 = {}, {}, time.time()
    for pen in ("l1", "l2"):
        t1 = time.time()
        r = fit_select(Ztr, y["train"], Zva, y["val"], pen, device=a.device)
        fits[pen] = dict(C=r["C"], nonzero=r["nonzero"], train_acc=accuracy(Ztr, y["train"], r["w"], r["b"]),
                         val_acc=r["val_acc"], test_acc=accuracy(Zte, y["test"], r["w"], r["b"]),
                         seconds=round(time.time() - t1, 2), path=r["path"])
        ws[pen] = r["w"]
    # the sentiment neuron: the unit of the largest L1 weight; an L1 fit that kept no unit (features no better than
    # the majority class at the chosen C) leaves the choice to the L2 fit, rather than to unit 0 of an all-zero w
    neuron_fit = "l1" if np.any(ws["l1"]) else "l2"
    if neuron_fit == "l2":
        log("note: the L1 fit kept no unit at the chosen C; the neuron is the L2 fit's largest weight")
    unit = int(np.argmax(np.abs(ws[neuron_fit])))
    sign = 1.0 if ws[neuron_fit][unit] >= 0 else -1.0
    thr, neuron_train = threshold_fit(Ztr[:, unit], y["train"], sign)
    neuron_acc = {s: float(((sign * Z[:, unit] > thr) == (y[s] == 1)).mean())
                  for s, Z in (("val", Zva), ("test", Zte))}
    t1, base = time.time(), None
    if a.bow_vocab:  # the baseline does not depend on the checkpoint: --bow-vocab 0 skips it (a sweep fits it once)
        bows = standardize(*bag_of_words(*(splits[s][0] for s in ("train", "val", "test")), vocab=a.bow_vocab))
        rb = fit_select(bows[0], y["train"], bows[1], y["val"], a.penalty, device=a.device)
        base = dict(C=rb["C"], nonzero=rb["nonzero"], train_acc=accuracy(bows[0], y["train"], rb["w"], rb["b"]),
                    val_acc=rb["val_acc"], test_acc=accuracy(bows[2], y["test"], rb["w"], rb["b"]),
                    seconds=round(time.time() - t1, 2))
    main = fits[a.penalty]
    res = dict(task=a.task or "files", checkpoint=os.path.abspath(a.checkpoint), hidden=model.hidden,
               feature=a.feature, penalty=a.penalty, device=a.device, dtype=a.dtype,
               test_acc=main["test_acc"], val_acc=main["val_acc"], train_acc=main["train_acc"], C=main["C"],
               nonzero=main["nonzero"], neuron=unit, neuron_fit=neuron_fit, neuron_sign=int(sign),
               neuron_threshold=thr,
               neuron_train_acc=neuron_train, neuron_val_acc=neuron_acc["val"], neuron_test_acc=neuron_acc["test"],
               baseline_test_acc=base["test_acc"] if base else None, baseline=base, fits=fits, featurize=stats,
               solver_seconds=round(time.time() - t0, 2))
    rows = [(f"mLSTM {a.feature} + L1", fits["l1"]), (f"mLSTM {a.feature} + L2", fits["l2"]),
            (f"neuron {unit} ({'+' if sign > 0 else '-'}) alone",
             dict(C=float("nan"), nonzero=1, train_acc=neuron_train, **{k + "_acc": v for k, v in neuron_acc.items()}))]
    rows += [(f"bag of {a.bow_vocab} words + {a.penalty.upper()}", base)] if base else []
    log(f"\n{'classifier':<30}{'C':>10}{'nonzero':>9}{'train':>8}{'val':>8}{'test':>8}")
    for name, r in rows:
        log(f"{name:<30}{r['C']:>10.4g}{r['nonzero']:>9}{r['train_acc']:>8.4f}{r['val_acc']:>8.4f}{r['test_acc']:>8.4f}")
    # Results last, each file whole: a run that fails on the way leaves no results.json beside older pictures.
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
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.figure(figsize=(6, 3.5))
        for k, name in ((0, "negative"), (1, "positive")):
            plt.hist(sign * X["test"][y["test"] == k, unit], bins=40, alpha=0.6, label=name)
        plt.xlabel(f"neuron {unit} final {a.feature} value"), plt.legend(), plt.tight_layout()
        png = os.path.join(a.out, "histogram.png")
        plt.savefig(png + ".tmp", format="png", dpi=120)
        plt.close()
        os.replace(png + ".tmp", png)
    except ImportError:
        pass
    for path in (os.path.join(a.out, "results.json"), a.json):
        if path:
            write_file(path, json.dumps(res, indent=1))
    log(f"\nwrote {a.out}/results.json, heatmap.html, histogram.txt" + (f" and {a.json}" if a.json else ""))
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sentiment transfer from a pretrained byte mLSTM (see the docstring).")
    p.add_argument("--checkpoint", default=os.path.relpath(mlstm.RELEASED),
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
    for name in ("limit", "batch_size", "chunk", "heatmap_bytes"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= a.seed < 2**63:
        p.error("--seed must be in [0, 2^63)")
    if a.bow_vocab < 0:
        p.error("--bow-vocab must be >= 0 (0: no baseline)")
    if a.heatmap < 0:
        p.error("--heatmap must be >= 0 (0: no texts in heatmap.html)")
    if not 0 < a.val_frac < 1:
        p.error("--val-frac must be in (0, 1)")
    if why := distributed.device_problem(a.device, DEVICES):
        p.error(why)
    if not os.path.isfile(a.checkpoint):
        p.error(f"--checkpoint {a.checkpoint}: no such file")
    ckpt_dir = os.path.dirname(os.path.abspath(a.checkpoint))
    a.cache_dir = a.cache_dir or os.path.join(ckpt_dir, "features")
    a.out = a.out or os.path.join(ckpt_dir, f"transfer-{a.task or 'files'}")
    existing = os.path.abspath(a.out)  # checked now, not after the featurising and fitting; created by run()
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not writable(existing):
        p.error(f"--out {a.out}: {existing} is not a writable folder")
    if a.json and (os.path.isdir(a.json) or not writable(os.path.dirname(os.path.abspath(a.json)))):
        p.error(f"--json {a.json}: not a file name in an existing, writable folder")
    return a


def writable(folder):
    return os.path.isdir(folder) and os.access(folder, os.W_OK)


if __name__ == "__main__":
    args = parse_args()
    try:
        run(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:
        if not distributed.out_of_memory(e):
            raise
        sys.exit(f"error: out of memory ({str(e).strip()[:300]}); lower --batch-size or --chunk")
    except KeyboardInterrupt:  # the outputs are written at the end: an earlier run's are as they were
        print("interrupted: no results written; the features cached so far are reused next time", file=sys.stderr)
        sys.exit(130)

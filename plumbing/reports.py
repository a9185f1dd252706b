"""What transfer.py writes for a person to look at: the results table, the neuron per byte as HTML with each
text's label and prediction, the neuron's histogram by class, and results.json.

Every file is written whole or not at all (a temporary file, then an atomic rename).
"""
import codecs
import html
import json
import os

import numpy as np

from plumbing import output_model


def write_file(path, text):
    """Write `text` to `path` whole or not at all: a temporary file, then an atomic rename."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def heatmap_html(byte_strings, activations, path=None, title="", vmax=None, captions=None):
    """HTML page, one block per text, every character coloured by the value at its (last) byte: green
    positive, red negative, full colour at |value| = vmax (default: the largest |value|); each block under its
    caption when `captions` are given (e.g. a text's true label and the prediction). Returns the page."""
    if len(byte_strings) != len(activations):
        raise ValueError(f"{len(byte_strings)} texts but {len(activations)} activation rows")
    vals = [np.asarray(a, dtype=np.float64).reshape(-1) for a in activations]
    for i, (b, v) in enumerate(zip(byte_strings, vals)):
        if len(b) != len(v):
            raise ValueError(f"text {i}: {len(b)} bytes but {len(v)} values")
    vmax = vmax or max([float(np.abs(v).max()) for v in vals if len(v)] + [1e-12])
    blocks = []
    for k, (b, v) in enumerate(zip(byte_strings, vals)):
        dec, spans = codecs.getincrementaldecoder("utf-8")("replace"), []
        for j in range(len(b)):
            ch = dec.decode(b[j : j + 1])
            if ch:
                s = max(-1.0, min(1.0, v[j] / vmax))
                col = f"rgba(0,170,0,{s:.3f})" if s > 0 else f"rgba(230,0,0,{-s:.3f})"
                spans.append(f'<span style="background:{col}" title="{v[j]:.4g}">'
                             f'{html.escape(ch.replace(chr(10), chr(0x21B5)))}</span>')
        caption = f'<div class="c">{html.escape(captions[k])}</div>' if captions else ""
        blocks.append(caption + '<div class="t">' + "".join(spans) + "</div>")
    page = ('<!doctype html><meta charset="utf-8"><title>{0}</title><style>body{{font-family:monospace;'
            'max-width:70em}} .t{{margin:0 0 1em;white-space:pre-wrap;line-height:1.7}} .c{{margin-top:1em;color:#555}}'
            '</style><h3>{0}</h3>'
            '<p>green positive, red negative; full colour at |value| = {1:.4g}; hover for values</p>\n{2}\n'
            ).format(html.escape(title), vmax, "\n".join(blocks))
    if path:
        write_file(path, page)
    return page


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


def histogram_png(values, labels, xlabel, path):
    """The histogram of `values` per class as a PNG, where matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    plt.figure(figsize=(6, 3.5))
    for k, name in ((0, "negative"), (1, "positive")):
        plt.hist(values[labels == k], bins=40, alpha=0.6, label=name)
    plt.xlabel(xlabel), plt.legend(), plt.tight_layout()
    plt.savefig(path + ".tmp", format="png", dpi=120)
    plt.close()
    os.replace(path + ".tmp", path)


def table(per, baseline, bow_vocab, penalty):
    """The classifiers' table: per feature (transfer.fit_feature's results) its L1 and L2 fits and its neuron
    alone, then the baseline -> text."""
    rows = []
    for f, r in per.items():
        rows += [(f"mLSTM {f} + L1", r["fits"]["l1"]), (f"mLSTM {f} + L2", r["fits"]["l2"])]
        if n := r["neuron"]:
            accs = {f"{s}_acc": n[f"neuron_{s}_acc"] for s in ("train", "val", "test")}
            alone = dict(C=float("nan"), nonzero=1, **accs)
            rows.append((f"neuron {n['neuron']} ({'+' if n['neuron_sign'] > 0 else '-'}) alone", alone))
    if baseline:
        rows.append((f"bag of {bow_vocab} words + {penalty.upper()}", baseline))
    lines = [f"\n{'classifier':<32}{'C':>10}{'nonzero':>9}{'train':>8}{'val':>8}{'test':>8}"]
    for name, r in rows:
        if r is None:  # every C of this fit failed (its lines are above)
            lines.append(f"{name:<32}{'failed':>10}")
            continue
        lines.append(f"{name:<32}{r['C']:>10.4g}{r['nonzero']:>9}{r['train_acc']:>8.4f}{r['val_acc']:>8.4f}"
                     f"{r['test_acc']:>8.4f}")
    return "\n".join(lines)


def neuron_pictures(out, shown, traces, labels, logits, value, y, what, log):
    """heatmap.html: the neuron's traces over the `shown` texts, captioned with their true labels and the
    predictions of `logits`; histogram.txt (+ .png): its `value` on every test text by class `y`."""
    name = lambda k: "positive" if k else "negative"  # noqa: E731
    captions = [f"true: {name(k)}; predicted: {name(z > 0)} (p = {1 / (1 + np.exp(-z)):.3f})"
                for k, z in zip(labels, logits)]
    heatmap_html(shown, traces, os.path.join(out, "heatmap.html"), f"sentiment {what}", captions=captions)
    hist = histogram_text(value, y)
    write_file(os.path.join(out, "histogram.txt"), f"{what}, times its sign, on test, by class\n{hist}\n")
    log(f"\n{what}, times its sign, on test:\n{hist}")
    histogram_png(value, y, what, os.path.join(out, "histogram.png"))


def write_all(a, res, per, clf, texts, X, y, trace, log):
    """Everything transfer.run writes: the results table on the log, the output model `clf`, the pictures of
    the neuron (its value per byte, trace(bytes, unit, state), on a few test texts: half of each class, an odd
    one positive, with each text's true label and the output model's prediction; its value per class), and
    results.json last."""
    log(table(per, res["baseline"], a.bow_vocab, a.penalty) + f"\noutput model: mLSTM {res['feature']} + "
        f"{a.penalty.upper()} (the best on validation) -> {a.classifier}")
    os.makedirs(a.out, exist_ok=True)
    output_model.save(a.classifier, clf)
    unit, state, sign = res["neuron_unit"], res["neuron_state"], res["neuron_sign"]
    pick = [i for k, m in ((1, (a.heatmap + 1) // 2), (0, a.heatmap // 2)) for i in np.flatnonzero(y == k)[:m]]
    logits, value = output_model.decide(clf, X)
    shown = [texts[i][: a.heatmap_bytes] for i in pick]
    neuron_pictures(a.out, shown, [sign * trace(b, unit, state) for b in shown], y[pick], logits[pick], value, y,
                    f"neuron {unit} (sign {sign:+d}) of the {res['neuron_pool']} "
                    f"{'cell' if state == 'c' else 'hidden'} state", log)
    write_results(a.out, a.json, res, log)


def write_results(out, extra, res, log):
    """results.json in `out` (and at `extra`, when given): the last file a run writes."""
    for path in (os.path.join(out, "results.json"), extra):
        if path:
            write_file(path, json.dumps(res, indent=1))
    log(f"\nwrote {out}/results.json, classifier.pt, heatmap.html, histogram.txt" + (f" and {extra}" if extra else ""))

"""Featurisation speed (transfer.featurize, so also classify.py), against what the machine allows.

For each hidden size and dtype, three rates in bytes of text per second, on the same texts and machine:
  ours     transfer.featurize of the texts (the cell-state feature), at --batch-size rows (default: the batch
           fast/inference.settings chooses for the dtype on this device);
  ceiling  the step's two recurrent matrix products alone (h W_mh, then m W_h) at the same batch, every row busy:
           the rate no implementation of the step can pass; ours/ceiling is the share of it reached;
  plain    the obvious loop: texts sorted by length in batches padded to their longest, the input products of a
           whole batch at once, then mlstm.cell per step over every row, nothing kept (the final state only).
The weights are random (the speed does not depend on them) unless --checkpoint names a model file.

    python tools/bench_featurize.py                                     # 1024 and 4096 units, fp32 and bf16
    python tools/bench_featurize.py --hidden 1024 --dtypes bf16 --batch-size 512 --texts 2000
    python tools/bench_featurize.py --checkpoint models/mlstm1024-imdb.pt --json out/bench_featurize.json
"""
import argparse
import copy
import csv
import gzip
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch

import data
import transfer
from fast import inference
from fp16 import DTYPES
from mlstm import MLSTM, cell, input_products
from plumbing import cli
from plumbing.checkpoints import load_pretrained

SST2_TEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "sst2",
                         "test.csv")
REVIEWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "reviews.txt.gz")


def load_texts(path, n):
    """The first n texts of a CSV's sentence/text column or of a text file (one per line), framed as transfer's."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        if path.endswith(".csv"):
            rows = csv.DictReader(f)
            texts = [r.get("sentence") or r.get("text") or "" for _, r in zip(range(n), rows)]
        else:
            texts = [line for _, line in zip(range(n), f)]
    return [data.normalize(t) for t in texts]


@torch.inference_mode()
def plain(model, byte_strings, batch):
    """The plain per-step loop (see the docstring): returns nothing, only its time matters."""
    wx, wh, wmx, wmh = model.weights()
    longest_first = sorted(byte_strings, key=len, reverse=True)
    for s in range(0, len(longest_first), batch):
        x, _ = transfer.padded(longest_first[s : s + batch], model.wh.device)
        xm, xz = input_products(model.embed(x.t()), wx, model.b, wmx)  # [T, B, H], [T, B, 4H]
        h, c = model.zero_state(len(x))
        for xm_t, xz_t in zip(xm, xz):
            h, c = cell(xm_t, xz_t, h, c, wh, wmh)


@torch.inference_mode()
def ceiling(model, batch, steps=20):
    """Bytes per second of the recurrent products alone at `batch` rows (a warm-up step first)."""
    _, wh, _, wmh = model.weights()
    h = torch.randn(batch, model.hidden, device=model.wh.device).to(wh.dtype)
    (h @ wmh) @ wh
    t0 = time.perf_counter()
    for _ in range(steps):
        (h @ wmh) @ wh
    return batch * steps / (time.perf_counter() - t0)


def rate(fn, nbytes):
    t0 = time.perf_counter()
    fn()
    return nbytes / (time.perf_counter() - t0)


def main(a):
    texts = load_texts(a.texts, a.limit)
    nbytes = sum(map(len, texts))
    cpu = f"{torch.get_num_threads()} threads, bf16 matrix units: {', '.join(inference.bf16_matrix_units()) or 'none'}"
    print(f"{a.device} ({cpu}) | torch {torch.__version__} | {len(texts)} texts of {a.texts}, {nbytes / 1e3:.0f} kB",
          flush=True)
    rows = []
    for hidden in a.hidden:
        torch.manual_seed(0)
        base = load_pretrained(a.checkpoint)[0] if a.checkpoint else MLSTM(hidden=hidden)
        for dtype in a.dtypes:
            model = copy.deepcopy(base).to(a.device, DTYPES[dtype]).eval()
            batch = inference.settings(a.device, dtype, a.batch_size)[1]
            transfer.featurize(model, texts[:batch], batch_size=batch)  # warm-up: the allocator, oneDNN's plans
            r = dict(hidden=model.hidden, dtype=dtype, batch=batch,
                     ours=rate(lambda: transfer.featurize(model, texts, batch_size=batch), nbytes),
                     ceiling=ceiling(model, batch), plain=rate(lambda: plain(model, texts, batch), nbytes),
                     peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
            r.update(share=r["ours"] / r["ceiling"], over_plain=r["ours"] / r["plain"])
            rows.append(r)
            print(f"hidden {r['hidden']:5d} {dtype:4s} batch {batch:4d} | ours {r['ours'] / 1e3:8.2f} kB/s | "
                  f"ceiling {r['ceiling'] / 1e3:8.2f} kB/s | ours/ceiling {r['share']:.0%} | plain "
                  f"{r['plain'] / 1e3:8.2f} kB/s | ours/plain {r['over_plain']:.2f}x | "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        if a.checkpoint:
            break
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=a.device, cpu=cpu, torch=torch.__version__, texts=a.texts, n=len(texts),
                           bytes=nbytes, rows=rows), f, indent=1)
        print(f"wrote {a.json}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Featurisation bytes/s against the recurrent products alone and the "
                                "plain loop (see the docstring).", formatter_class=cli.Help)
    p.add_argument("--hidden", default="1024,4096", help="hidden sizes, comma-separated")
    p.add_argument("--dtypes", default="fp32,bf16", help="dtypes, comma-separated")
    p.add_argument("--batch-size", type=int, help="rows read at once (default: fast/inference.settings')")
    p.add_argument("--texts", default=SST2_TEST if os.path.isfile(SST2_TEST) else REVIEWS,
                   help="a CSV (sentence or text column) or a text file, one text per line")
    p.add_argument("--limit", type=int, default=2000, help="texts read")
    p.add_argument("--checkpoint", help="a model file to read with, instead of random weights of --hidden")
    p.add_argument("--device", default="cpu", help="cpu, cuda")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    try:
        a.hidden = [int(h) for h in a.hidden.split(",")]
    except ValueError:
        p.error(f"--hidden {a.hidden}: expected comma-separated integers")
    a.dtypes = a.dtypes.split(",")
    if set(a.dtypes) - set(DTYPES):
        p.error(f"--dtypes: expected names from {', '.join(DTYPES)}")
    cli.require(p, a, ("batch_size", "limit"), lambda v: v >= 1, ">= 1")
    if why := cli.device_problem(a.device):
        p.error(why)
    if not os.path.isfile(a.texts):
        p.error(f"--texts {a.texts}: no such file")
    cli.check_output_file(p, "--json", a.json)
    return a


if __name__ == "__main__":
    args = parse_args()
    cli.main_guard(lambda: main(args))

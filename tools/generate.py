"""Sample reviews from a pretrained byte mLSTM, steer them with the sentiment neuron, watch it fire.

Radford et al. 2017 (arXiv 1704.01444) sections 4-5, "generating with the sentiment neuron": the model
writes a review byte by byte; holding the sentiment unit of the cell state at a fixed value at every step
makes the review positive or negative on demand. One sign convention, whatever the unit's own: a positive
--value means positive sentiment. The unit and its sign come from transfer.py's results.json (--results:
`neuron_unit`, `neuron_sign`), or are given (--neuron N --sign 1|-1); the cell state is held at sign x value.

    python tools/generate.py --prime "This movie"          # the released model, models/mlstm1024-imdb.pt (the default)
    python tools/generate.py --checkpoint out/demo/ckpt.pt --prime "This movie" --length 300 --temperature 0.8
    python tools/generate.py --checkpoint CKPT --num-samples 4 --top-k 40 --seed 3
    python tools/generate.py --checkpoint CKPT --results out/demo/transfer-imdb-ckpt/results.json --value 2   # +
    python tools/generate.py --checkpoint CKPT --results out/demo/transfer-imdb-ckpt/results.json --value -2  # -
    python tools/generate.py --neuron 1016 --sign -1 --value 3 --prime "This movie"   # the released model's best
                                                   # IMDB unit (sign -): held at -3, leaning positive (docs/RESULTS.md)
    python tools/generate.py --checkpoint CKPT --neuron 2388 --sign 1 --text "Great film, awful end." --heatmap h.html

The prime is framed like a corpus document (data.normalize without the closing space, so the model
continues the review; --raw feeds it as is). Any bytes are a valid prime: the model reads bytes. One
sample streams to stdout as it is written; the output is decoded as UTF-8, invalid bytes replaced.
"""
import argparse
import codecs
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch

import data
from mlstm import sample
from plumbing import cli, checkpoints
from plumbing.reports import heatmap_html
from fp16 import DTYPES
from transfer import DEVICES, unit_trace


def frame(prime):
    """data.normalize's framing of a byte string, minus the closing space that would end the document."""
    text = prime.decode("utf-8", "surrogateescape")  # invalid bytes survive the round trip unchanged
    return data.normalize(text, errors="surrogateescape")[:-1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample (and steer) reviews from a byte mLSTM (see the docstring).",
                                formatter_class=cli.Help)
    p.add_argument("--checkpoint", default=os.path.relpath(checkpoints.RELEASED),
                   help="train.py checkpoint or released model (.pt); default: the released model, %(default)s")
    p.add_argument("--prime", default="", help="text the review starts with, framed like the corpus "
                                                "(data.normalize): '\\n ' + text")
    p.add_argument("--raw", action="store_true", help="feed --prime as is, without the corpus framing")
    p.add_argument("--length", type=int, default=300, help="bytes to sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0: greedy argmax)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely bytes (0: all 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--num-samples", type=int, default=1, help="samples generated together as a batch")
    p.add_argument("--neuron", type=int, help="unit of the cell state to hold (--value) or show (--heatmap)")
    p.add_argument("--sign", type=int, choices=(1, -1), help="with --neuron: the unit's sign (transfer.py's "
                   "neuron_sign: +1 if it rises with positive sentiment, -1 if it falls); needed with --value and "
                   "--heatmap")
    p.add_argument("--results", help="transfer.py results.json: take the neuron and its sign from it")
    p.add_argument("--value", type=float, help="hold the neuron at sign x value at every step: positive = positive "
                                               "sentiment, whatever the unit's sign; |value| <= 1e4")
    p.add_argument("--heatmap", help="write the neuron per byte, read freely (not held), to this HTML file")
    p.add_argument("--text", help="with --heatmap: show the neuron over this text (framed by data.normalize) "
                                  "instead of sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: the checkpoint's dtype on cuda, fp32 on cpu")
    a = p.parse_args(argv)
    for flag, v, ok, rule in (("length", a.length, a.length >= 0, ">= 0"),
                              ("num-samples", a.num_samples, a.num_samples >= 1, ">= 1"),
                              ("temperature", a.temperature, a.temperature >= 0, ">= 0 (0: greedy)"),  # NaN fails
                              ("top-k", a.top_k, 0 <= a.top_k <= 256, "in 0..256 (0: all bytes)"),
                              ("seed", a.seed, 0 <= a.seed < 2**63, "in [0, 2^63)")):
        if not ok:
            p.error(f"--{flag} must be {rule}, not {v}")
    if why := cli.device_problem(a.device, DEVICES):
        p.error(why)
    try:  # argv carries non-UTF-8 bytes as surrogates (PEP 383): os.fsencode gives the raw bytes back
        a.prime = os.fsencode(a.prime) if a.raw else frame(os.fsencode(a.prime))
        if a.text is not None:  # as the corpus reads its files: invalid UTF-8 replaced, then normalised
            a.text = data.normalize(os.fsencode(a.text).decode("utf-8", "replace"))
    except UnicodeEncodeError as e:
        p.error(f"--prime/--text is not encodable text ({e.reason} at position {e.start})")
    if not a.prime:
        p.error("--prime is empty: the model needs at least one byte to start from (drop --raw)")
    if a.neuron is not None and a.results:
        p.error("give --neuron or --results, not both")
    if a.sign is not None and a.neuron is None:
        p.error("--sign goes with --neuron (--results brings its own)")
    a.results_model = {}
    if a.results:
        try:
            with open(a.results) as f:
                r = json.load(f)
            a.neuron, a.sign = int(r.get("neuron_unit", r["neuron"])), int(r["neuron_sign"])
            a.results_model = {k: r[k] for k in ("checkpoint", "hidden") if k in r}  # older files lack them
            if a.sign not in (1, -1):
                raise ValueError(f"neuron_sign is {a.sign}, not +1 or -1")
            # older files have no neuron_state: theirs is of the cell state unless the feature was the hidden state
            if r.get("neuron_state", "h" if r.get("feature") == "hidden" else "c") == "h":
                p.error(f"--results {a.results}: its neuron is a unit of the hidden state (transfer.py --feature "
                        "hidden); generate.py holds a unit of the cell state: use results of a cell-state feature")
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--results {a.results}: not a transfer.py results file ({type(e).__name__}: {e})")
        if a.value is None and not a.heatmap:
            p.error("--results only chooses the neuron: give --value V to hold it (positive V: positive sentiment) "
                    "or --heatmap FILE to show it")
    # A cell state stays within a few units; 1e4 also stays finite in fp16 (its largest value is 65504).
    if a.value is not None and not abs(a.value) <= 1e4:
        p.error(f"--value must be a finite number with |value| <= 1e4, not {a.value}")
    if (a.value is not None or a.heatmap) and a.neuron is None:
        p.error("--value and --heatmap need a neuron: --neuron INDEX or --results results.json")
    if a.value is not None and a.sign is None:
        p.error("--value is in the direction of positive sentiment: give the unit's sign with --sign 1|-1 "
                "(transfer.py's neuron_sign), or take both from --results results.json")
    if a.heatmap and a.sign is None:  # green is positive sentiment: the unit's values times its sign
        p.error("--heatmap colours positive sentiment green: give the unit's sign with --sign 1|-1 (transfer.py's "
                "neuron_sign), or take both from --results results.json")
    if a.text is not None and (not a.heatmap or a.value is not None):
        p.error("--text goes with --heatmap only: it shows the neuron over the text and samples nothing")
    cli.check_output_file(p, "--heatmap", a.heatmap)
    made = a.results_model.get("checkpoint")
    if made is not None and made != os.path.abspath(a.checkpoint):
        print(f"warning: --results {a.results} was made with {made}, not --checkpoint {a.checkpoint}", file=sys.stderr)
    return a


def main(argv=None):
    a = parse_args(argv)
    model, config = checkpoints.load_pretrained(a.checkpoint, a.device)
    if a.results_model.get("hidden", model.hidden) != model.hidden:
        raise SystemExit(f"error: --results {a.results} is for a model of {a.results_model['hidden']} units, "
                         f"--checkpoint {a.checkpoint} has {model.hidden}")
    if a.neuron is not None and not 0 <= a.neuron < model.hidden:
        raise SystemExit(f"error: --neuron {a.neuron} is out of range: the model has {model.hidden} units")
    dtype = a.dtype or (config.get("dtype", "fp32") if a.device.startswith("cuda") else "fp32")
    model = model.to(dtype=DTYPES[dtype]).eval()
    value = None if a.value is None else a.sign * a.value  # --value is in the neuron's positive direction
    if value is not None:
        print(f"holding cell unit {a.neuron} at {value:g} at every step (--value {a.value:g}: "
              f"{'positive' if a.value > 0 else 'negative' if a.value < 0 else 'neutral'} sentiment; the unit's sign "
              f"is {a.sign:+d})", file=sys.stderr, flush=True)
    if a.text is not None:
        texts = [a.text]
    else:
        out, dec = sys.stdout, codecs.getincrementaldecoder("utf-8")("replace")  # a character may span bytes
        if hasattr(out, "reconfigure"):
            out.reconfigure(errors="replace")  # a non-UTF-8 terminal gets '?', not an exception

        def stream(x):
            out.write(dec.decode(bytes([int(x[0])])))
            out.flush()

        one = a.num_samples == 1
        if one:
            out.write(dec.decode(a.prime))
        t0 = time.time()
        texts = sample(model, a.prime, a.length, a.temperature, a.top_k, a.num_samples, a.seed,
                       None if value is None else a.neuron, value, stream if one else None)
        el = max(time.time() - t0, 1e-9)
        if one:
            out.write(dec.decode(b"", final=True) + "\n")
        else:
            for i, t in enumerate(texts):
                out.write(f"=== sample {i + 1}/{a.num_samples} ===\n{t.decode('utf-8', 'replace')}\n")
        out.flush()  # before the timing line on stderr
        print(f"{a.num_samples} x {a.length} bytes in {el:.2f}s: {1000 * el / max(a.length, 1):.2f} ms per step, "
              f"{a.num_samples * a.length / el:.0f} bytes/s ({model.hidden} units, {a.device} {dtype})",
              file=sys.stderr)
    if a.heatmap:
        held = "" if value is None else f", held at {value:g} while sampling"
        heatmap_html(texts, [a.sign * unit_trace(model, t, a.neuron) for t in texts], a.heatmap,
                     f"neuron {a.neuron} (sign {a.sign:+d}), cell state{held}")
        print(f"wrote {a.heatmap}", file=sys.stderr)


if __name__ == "__main__":
    cli.main_guard(main, oom="lower --length or --num-samples")

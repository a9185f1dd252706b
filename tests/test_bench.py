"""bench.py: the rows' structure, the FLOP formula against direct counts, the plain loop computes our model."""
import importlib.util
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tools import bench
import distributed
from mlstm import MLSTM, loss_fn

B, T, H = 3, 5, 8


# Triton's interpreter runs the fused rows on a CPU; without Triton (any platform but Linux) they are left out.
HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_rows_have_every_field_and_ratios(tmp_path, capsys):
    for kind in (k for k in bench.KINDS if HAS_TRITON or "triton" not in k):
        row = bench.measure(kind, H, B, T, steps=2, warmup=1)
        assert row["error"] is None and row["skipped"] == 0 and row["mfu"] is None  # no peak known on CPU
        assert row["ms_per_step"] > 0 and row["peak_mem_mib"] is not None
        assert row["chars_per_s"] == pytest.approx(B * T / (row["ms_per_step"] / 1e3))
        assert row["tflops"] == pytest.approx(row["flops_per_char"] * row["chars_per_s"] / 1e12)
    row = bench.measure("ours", H, B, T, steps=2, warmup=0, peak=0.5)  # --peak-tflops on CPU
    assert row["mfu"] == pytest.approx(row["tflops"] / 0.5) and row["peak_tflops"] == 0.5

    out = tmp_path / "new" / "bench.json"
    bench.main(bench.parse_args(["--hidden", str(H), "--batch-size", str(B), "--seq-len", str(T), "--steps", "2",
                                 "--warmup-steps", "0", "--device", "cpu", "--json", str(out)]))
    printed = capsys.readouterr().out
    assert all(k in printed for k in ("ours/row FLOP/s", "plain", "lstm", "n/a"))
    assert "MFU of peak" not in printed, "a peak printed where none is known"
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["ours", "recompute", "plain", "lstm"]  # graph, Triton: CUDA only
    assert rows[0]["ours_over_row_chars"] == 1.0 and rows[0]["ours_over_row_flops"] == 1.0
    lstm = rows[3]
    assert lstm["ours_over_row_chars"] == pytest.approx(rows[0]["chars_per_s"] / lstm["chars_per_s"])
    assert lstm["ours_over_row_flops"] == pytest.approx(rows[0]["tflops"] / lstm["tflops"])


def test_the_cuda_device_is_pinned_to_an_index_as_set_device_needs():
    """bench.py --device cuda once failed on the GPU in torch.cuda.set_device, which takes no index-less device.
    Checked without a GPU with the index lookup set_device starts with."""
    index = torch.cuda._utils._get_device_index
    with pytest.raises(ValueError):
        index(torch.device("cuda"))
    assert index(distributed.pinned("cuda")) == 0 and index(distributed.pinned("cuda:1")) == 1
    assert distributed.pinned("cpu") == torch.device("cpu")


def test_a_row_out_of_memory_is_reported_not_raised(monkeypatch):
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    ours = bench.measure("ours", H, B, T, steps=1, warmup=0)
    monkeypatch.setattr(bench, "train_step", oom)
    rows = bench.add_ratios([ours, bench.measure("plain", H, B, T, steps=1, warmup=0)])
    assert rows[1]["error"] == "out of memory" and rows[1]["ours_over_row_chars"] is None
    assert bench.table(rows).splitlines()[2].split()[:3] == ["plain", "-", "-"]

    def bug(*args):
        raise RuntimeError("shape mismatch")  # not a memory error: raised, not a table row
    monkeypatch.setattr(bench, "train_step", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.measure("ours", H, B, T, steps=1, warmup=0)


def test_bad_flags_are_refused_with_a_message(capsys):
    for argv, msg in ((["--hidden", "huge"], "--hidden must be"), (["--steps", "0"], "--steps must be"),
                      (["--recompute", "0"], "--recompute must be"),
                      (["--only", "ours,cudnn"], "--only takes"), (["--only", "ours,ours"], "--only takes"),
                      (["--peak-tflops", "-1"], "--peak-tflops"), (["--peak-tflops", "nan"], "--peak-tflops"),
                      (["--device", "tpu"], "--device"), (["--json", "."], "--json .: not a file name"),
                      (["--json", f"{__file__}/x.json"], f"--json {__file__}/x.json: cannot create its folder"),
                      (["--device", f"cuda:{torch.cuda.device_count()}"], "no such CUDA device here"),
                      (["--dtype", "fp8"], "invalid choice"),
                      (["--only", "ours,graph", "--device", "cpu"], "--only graph: CUDA graphs and Triton"),
                      (["--only", "triton", "--device", "cpu"], "--only triton: CUDA graphs and Triton kernels need")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert msg in capsys.readouterr().err


def test_peaks_are_matched_from_the_gpu_name(monkeypatch):
    cuda = torch.device("cuda")
    for name, dtype, tf32, peak in (
            ("NVIDIA H100 80GB HBM3", "bf16", False, 989), ("NVIDIA H100 PCIe", "fp16", False, 756),
            ("NVIDIA H200", "fp32", True, 494), ("NVIDIA H100 80GB HBM3", "fp32", False, 67),
            ("NVIDIA A100-SXM4-80GB", "bf16", False, 312), ("Tesla V100-SXM2-32GB", "fp32", True, 15.7),
            ("Tesla V100-SXM2-32GB", "bf16", False, None), ("NVIDIA GeForce GTX 1080", "fp16", False, None),
            ("NVIDIA H200 NVL", "fp16", False, 835), ("NVIDIA GH200 480GB", "bf16", False, 989),
            ("Tesla V100-PCIE-16GB", "fp16", False, 112), ("Tesla V100S-PCIE-32GB", "fp32", False, 16.4)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert bench.peak_tflops(cuda, dtype, tf32) == peak, name
    assert bench.peak_tflops(torch.device("cpu"), "fp32", False) is None


def test_skipped_counts_the_timed_steps_only(monkeypatch):
    real = bench.fp16.MixedPrecision
    monkeypatch.setattr(bench.fp16, "MixedPrecision", lambda model, dtype: real(model, dtype, 2.0**40))
    # from 2^40 the scale halves on each fp16 overflow: the first ~20 steps are skipped
    assert bench.measure("ours", H, B, T, "fp16", steps=2, warmup=0)["skipped"] == 2
    assert bench.measure("ours", H, B, T, "fp16", steps=2, warmup=40)["skipped"] == 0


def test_flop_formula_equals_direct_counts():
    # The paper's ~0.5 GFLOP per character for the 4096-d model.
    assert bench.flops_per_char("ours", 4096) == pytest.approx(0.5e9, rel=0.05)
    for kind in bench.KINDS:
        torch.manual_seed(0)
        model = bench.MODELS[kind](H)
        # Every weight matrix (not the embedding, a lookup) does one multiply-add per byte: 6 FLOPs in training.
        matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed")
                       and not n.endswith("original0"))  # (the plain loop's weight-norm gains are [out, 1])
        assert bench.flops_per_char(kind, H) == 6 * matrices, kind
        if kind == "lstm" or not (HAS_TRITON or "triton" not in kind):  # on CPU nn.LSTM runs oneDNN's fused RNN
            continue  # kernel, opaque to FlopCounterMode; the fused rows need Triton (or its interpreter)
        x, y = torch.randint(0, 256, (2, B, T))
        loop = bench.loop_of(kind, 0)  # train.py's loop for the row (segments: the formula counts one forward)
        with FlopCounterMode(display=False) as counter:
            state = (torch.zeros(B, H), torch.zeros(B, H))
            logits, _ = model(x, state, loop=loop) if loop else model(x, state)
            loss_fn(logits, y).backward()
        # Exact, but for one product: with the carried state detached (as in training) autograd skips the
        # gradient of h_0 in h_0 @ W_mh, 2*B*H*H FLOPs the formula counts. Elementwise gate math, weight norm,
        # softmax and embedding are neither in the formula nor in the counter (matmuls only).
        assert counter.get_total_flops() == bench.flops_per_char(kind, H) * B * T - 2 * B * H * H, kind


def test_plain_loop_computes_our_model():
    torch.manual_seed(1)
    ours = MLSTM(hidden=H)
    with torch.no_grad():  # gains away from the columns' norms, so both weight norms really act
        for n in ("gx", "gh", "gmx", "gmh"):
            getattr(ours, n).mul_(torch.rand_like(getattr(ours, n)) + 0.5)
        ours.b.normal_()
    plain = bench.PlainMLSTM(H).load_mlstm(ours)
    x, y = torch.randint(0, 256, (2, B, T))
    state = (torch.randn(B, H), torch.randn(B, H))
    a, (ha, ca) = ours(x, state)
    b, (hb, cb) = plain(x, state)
    assert math.isclose(loss_fn(a, y).item(), loss_fn(b, y).item(), abs_tol=1e-5)
    for name, u, v in (("logits", a, b), ("h", ha, hb), ("c", ca, cb)):
        err = (u - v).abs().max().item()
        assert err < 1e-5, f"{name}: max |diff| {err}"

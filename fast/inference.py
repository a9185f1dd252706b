"""The mLSTM step for reading text without gradients (transfer.featurize, so also classify.py and finetune.py's
evaluation), made fast: mlstm.cell's equations with fewer passes over memory, tested equal to them
(tests/test_transfer.py), and the precision and batch that suit the machine.

On a CPU the two recurrent matrix products of a step are fast in bf16 where the CPU has bf16 matrix units
(Intel AMX, AVX-512 BF16: ~5x fp32's rate on 2 cores of a Xeon); the gate math around them is not, and in bf16
torch's tanh is 4x slower than in float32. So the step runs the products in the model's dtype and the gate math
in float32, with the cell state kept in float32 (also the more accurate):

    python transfer.py --task sst2 --data-dir ../shared/data/sst2          # dtype and batch chosen here
    python tools/bench.py --featurize                                      # bytes/s against the products alone
"""
import torch


def step(xm_all, xz_all, ids, h, c, wh, wmh):
    """One step of mlstm.cell for byte ids [B] from the input products of all 256 bytes (xm_all = E W_mx [256, H],
    xz_all = E W_x + b [256, 4H]): h [B, H] in the model's dtype, c [B, H] float32 -> (h, c)."""
    H = h.shape[1]
    # m_t = (W_mx x_t) * (W_mh h_{t-1}): a row gather (index_select: 4x faster than x[ids]), multiplied in place
    m = torch.index_select(xm_all, 0, ids).mul_(h @ wmh)
    # z_t = W_x x_t + b + W_h m_t: the gathered rows are the GEMM's addend, not another pass; then float32
    z = torch.addmm(torch.index_select(xz_all, 0, ids), m, wh).float()  # [B, 4H]
    z[:, : 3 * H].sigmoid_()  # i, f, o
    z[:, 3 * H :].tanh_()  # u
    i, f, o, u = z.chunk(4, 1)  # [B, H] views
    # c_t = f * c_{t-1} + i * u;  h_t = o * tanh(c_t), both written into z's own buffers
    c = f.mul_(c).addcmul_(i, u)
    return o.mul_(torch.tanh(c)).to(h.dtype), c


def bf16_matrix_units():
    """The CPU's bf16 matrix instructions (AMX, AVX-512 BF16) that make bf16 products fast, from /proc/cpuinfo
    (Linux); [] where there are none or it cannot tell."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16")) if flag in flags]


def settings(device, dtype=None, batch_size=None, model_dtype="fp32"):
    """(dtype, batch_size, why): what featurize runs with on `device` where they are not given. A GPU: the
    model's training precision `model_dtype`, batch 256. A CPU: bf16 at batch 256 where it has bf16 matrix
    units, else fp32 at batch 128 (the fastest in tools/bench.py --featurize: BENCHMARKS.md)."""
    cpu = torch.device(device).type == "cpu"
    if dtype:
        why = "as given"
    elif not cpu:
        dtype, why = model_dtype, "the model's training precision, on a GPU"
    elif units := bf16_matrix_units():
        dtype, why = "bf16", f"this CPU has bf16 matrix units: {', '.join(units)}"
    else:
        dtype, why = "fp32", "this CPU has no bf16 matrix units"
    batch = batch_size or (128 if cpu and dtype == "fp32" else 256)
    return dtype, batch, f"{dtype} ({why}), batch {batch}" + ("" if batch_size else " (its default)")

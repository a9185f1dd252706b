"""distributed.py with 2 CPU processes on gloo: hand-reduced gradients vs DistributedDataParallel, a 2-process
run vs a 1-process run, fp16 communication, overflow agreement, broadcast, resume, a rank that dies or hangs.

Each test spawns fresh processes (the spawn start method: no state inherited from pytest) that join a gloo
group on a free port; a process still running after the deadline is killed, so a failure never hangs."""
import copy
import json
import os
import random
import socket
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import distributed
import fp16
import train
from mlstm import MLSTM, loss_fn

WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entry(rank, fn, args, port, timeout_s, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on two cores
    distributed.setup("cpu", timeout_s)  # train.main's own setup() then finds the group made
    try:
        result = fn(rank, *args)
    except BaseException as e:  # train.main ends with SystemExit on its own errors
        torch.save({"error": f"{type(e).__name__}: {e}"}, os.path.join(out, f"rank{rank}.pt"))
        raise
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    distributed.cleanup()


def launch(tmp_path, fn, *args, timeout_s=30, grace_s=None, deadline_s=60):
    """Run fn(rank, *args) in WORLD processes whose group has a timeout of timeout_s; once one fails, the
    others have grace_s to end by themselves, then are killed (as torchrun would). Returns (exit codes,
    each rank's result or {'error': message}, seconds)."""
    out = tempfile.mkdtemp(dir=tmp_path)
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=entry, args=(r, fn, args, port, timeout_s, out)) for r in range(WORLD)]
    t0 = time.time()
    for p in procs:
        p.start()
    deadline = t0 + deadline_s
    while time.time() < deadline and any(p.is_alive() for p in procs):
        if any(p.exitcode for p in procs):
            deadline = min(deadline, time.time() + (timeout_s + 5 if grace_s is None else grace_s))
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    files = [os.path.join(out, f"rank{r}.pt") for r in range(WORLD)]
    results = [torch.load(f, weights_only=True) if os.path.exists(f) else None for f in files]
    return [p.exitcode for p in procs], results, time.time() - t0


def launch_ok(tmp_path, fn, *args):
    codes, results, _ = launch(tmp_path, fn, *args)
    assert codes == [0] * WORLD, f"exit codes {codes}; errors {[r and r.get('error') for r in results]}"
    return results


def max_diff(a, b):
    return max(((x.float() - y.float()).abs().max().item() for x, y in zip(a, b)), default=0.0)


# --- one backward on a tiny mLSTM ----------------------------------------------------------------------------


class Net(nn.Module):
    """A tiny mLSTM plus a byte bias used on rank 0 only and a parameter no rank uses."""

    def __init__(self):
        super().__init__()
        self.lm = MLSTM(hidden=16, embed=8)
        self.bias = nn.Parameter(torch.zeros(256))
        self.unused = nn.Parameter(torch.zeros(3))
        self.use_bias = False

    def forward(self, x):
        logits, _ = self.lm(x)
        return logits + self.bias if self.use_bias else logits


def batch(rank):
    """This rank's rows (x, y): every rank sees other bytes."""
    x = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(100 + rank))
    return x[:, :-1], x[:, 1:]


def ddp_worker(rank, bucket_mbs):
    torch.manual_seed(0)
    net = Net()
    ddp = DistributedDataParallel(copy.deepcopy(net), find_unused_parameters=True)
    ddp.module.use_bias = rank == 0
    x, y = batch(rank)
    loss_fn(ddp(x), y).backward()
    reference = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ddp.module.parameters()]
    ours = {}
    for mb in bucket_mbs:
        m = copy.deepcopy(net)
        m.use_bias = rank == 0
        loss_fn(m(x), y).backward()
        params = list(m.parameters())
        for p in params:  # as MixedPrecision.step does: a parameter without gradient sends zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        reducer = distributed.GradReducer(mb)
        n_buckets = len(reducer.buckets([p.grad for p in params]))
        reducer(params)
        ours[mb] = (max_diff([p.grad for p in params], reference), n_buckets)
    return {"ours": ours, "grads": reference}


def test_hand_reduced_gradients_equal_ddp(tmp_path):
    # 1e-6 MB: every tensor alone, the buckets smaller than one tensor; 0.004 MB (~1000 floats): uneven groups;
    # 25 MB: one bucket.
    mbs = (1e-6, 0.004, 25.0)
    results = launch_ok(tmp_path, ddp_worker, mbs)
    n_params = len(list(Net().parameters()))
    for rank, r in enumerate(results):
        assert max_diff(r["grads"], results[0]["grads"]) == 0.0, "DDP's replicas disagree"
        buckets = {mb: n for mb, (_, n) in r["ours"].items()}
        assert buckets[1e-6] == n_params and 1 < buckets[0.004] < n_params and buckets[25.0] == 1, buckets
        for mb, (diff, _) in r["ours"].items():
            # Exact: both sum the same two float32 values, and halving is exact in binary floating point.
            assert diff == 0.0, f"rank {rank}, buckets of {mb} MB: max |ours - DDP| = {diff}"
    grads = dict(zip([n for n, _ in Net().named_parameters()], results[0]["grads"]))
    assert grads["bias"].abs().max() > 0 and grads["unused"].abs().max() == 0


def fp16_worker(rank):
    """This rank's gradients, and their mean reduced in float32 and in fp16, for a float32 model (fp16 on
    the wire) and for a half model (its own dtype on the wire)."""
    out = {}
    for dtype, wire in ((torch.float32, torch.float16), (torch.float16, None)):
        torch.manual_seed(0)
        model = MLSTM(hidden=16, embed=8).to(dtype)
        x, y = batch(rank)
        loss_fn(model(x)[0], y).backward()
        params = list(model.parameters())
        local = [p.grad.clone() for p in params]
        distributed.GradReducer(comm_dtype=torch.float32)(params)
        exact = [p.grad.clone() for p in params]
        for p, g in zip(params, local):
            p.grad = g.clone()
        distributed.GradReducer(comm_dtype=wire)(params)
        out[str(dtype)] = {"local": local, "fp32": exact, "fp16": [p.grad for p in params]}
    # fp16 gradients whose sum overflows fp16 (2 x 40000 > 65504) though their mean does not
    big = nn.Parameter(torch.zeros(3, dtype=torch.float16))
    for wire in (None, torch.float32):
        big.grad = torch.full((3,), 40000.0, dtype=torch.float16)
        distributed.GradReducer(comm_dtype=wire)([big])
        out["overflow", str(wire)] = big.grad.float()
    return out


def test_fp16_communication_matches_float32(tmp_path):
    r0, r1 = launch_ok(tmp_path, fp16_worker)
    # --comm-fp32's reason: an fp16 model's gradients summed on an fp16 wire can overflow; in float32 they do not
    assert torch.isinf(r0["overflow", "None"]).all(), f"fp16 wire: {r0['overflow', 'None']}"
    assert (r0["overflow", "torch.float32"] == 40000.0).all(), f"float32 wire: {r0['overflow', 'torch.float32']}"
    for dtype in ("torch.float32", "torch.float16"):
        for a, b, exact, half in zip(r0[dtype]["local"], r1[dtype]["local"], r0[dtype]["fp32"], r0[dtype]["fp16"]):
            a, b, exact, half = a.float(), b.float(), exact.float(), half.float()
            # fp16 rounds each rank's value and the sum (unit roundoff 2^-11 each) and halving is exact, so the
            # mean is off by at most 2^-11 (|a| + |b|); below 2^-14 each rounding is to a step of 2^-24 instead.
            bound = 2.0**-11 * (a.abs() + b.abs()) * 1.01 + 2.0**-23
            err = (half - exact).abs()
            assert (err <= bound).all(), f"{dtype}: max |fp16 - fp32| {err.max():.3g}, err/bound {(err / bound).max():.3g}"
        assert max_diff(r0[dtype]["fp16"], r1[dtype]["fp16"]) == 0.0, f"{dtype}: ranks differ after fp16 reduce"
    # the float32 model's fp16 wire did round: each mean times 2 is an fp16 value, and not all equal float32's
    sums = [2 * g.float() for g in r0["torch.float32"]["fp16"]]
    assert all((s == s.half().float()).all() for s in sums), "float32 model: the fp16 wire did not round the sum"
    assert max_diff(r0["torch.float32"]["fp16"], r0["torch.float32"]["fp32"]) > 0, "fp16 wire equals float32's"


def overflow_worker(rank):
    torch.manual_seed(0)
    model = MLSTM(hidden=16, embed=8)
    mp16 = fp16.MixedPrecision(model, "fp16", init_scale=2.0**10)
    opt = torch.optim.Adam(mp16.masters, lr=1e-2)
    reduce, (x, y) = distributed.GradReducer(), batch(rank)
    taken, masters = [], []
    for step in range(3):
        mp16.backward(loss_fn(model(x)[0], y))
        if step == 1 and rank == 1:
            model.wh.grad[0, 0] = float("inf")  # this rank alone overflows
        taken.append(bool(mp16.step(opt, 1.0, reduce)[1]))
        masters.append([m.detach().clone() for m in mp16.masters])
    return {"taken": taken, "masters": masters, **mp16.state_dict()}


def test_overflow_on_one_rank_skips_the_step_on_all(tmp_path):
    results = launch_ok(tmp_path, overflow_worker)
    for rank, r in enumerate(results):
        assert r["taken"] == [True, False, True], f"rank {rank} took steps {r['taken']}"
        assert (r["scale"], r["skipped"]) == (2.0**9, 1), f"rank {rank}: scale {r['scale']}, skipped {r['skipped']}"
        diff = max_diff(r["masters"][1], r["masters"][0])
        assert diff == 0.0, f"rank {rank}: the skipped step moved the weights by {diff}"
    for step in range(3):
        diff = max_diff(results[0]["masters"][step], results[1]["masters"][step])
        assert diff == 0.0, f"after step {step} the replicas differ by {diff}"


def broadcast_worker(rank):
    torch.manual_seed(rank)  # every rank draws other weights
    model = MLSTM(hidden=16, embed=8)
    before = [p.detach().clone() for p in model.parameters()]
    distributed.broadcast_params(model)
    return {"before": before, "after": [p.detach().clone() for p in model.parameters()]}


def test_broadcast_makes_replicas_identical(tmp_path):
    r0, r1 = launch_ok(tmp_path, broadcast_worker)
    assert max_diff(r0["before"], r1["before"]) > 0
    for rank, r in enumerate((r0, r1)):
        diff = max_diff(r["after"], r0["before"])
        assert diff == 0.0, f"rank {rank} differs from rank 0's initial weights by {diff}"


# --- training with train.py ------------------------------------------------------------------------------------


def train_worker(rank, argv, fail=None):
    """train.main on this rank; returns its final weights. fail='dies' / 'hangs': rank 1 stops at step 3."""
    models, broadcast = [], distributed.broadcast_params
    distributed.broadcast_params = lambda model: (models.append(model), broadcast(model))  # catch the model
    if fail and rank == 1:
        real, calls = train.loss_fn, []

        def failing(logits, y):
            calls.append(1)
            if len(calls) == 3:
                os._exit(3) if fail == "dies" else time.sleep(60)
            return real(logits, y)

        train.loss_fn = failing
    train.main(train.parse_args(argv))
    return [p.detach().clone() for p in models[0].parameters()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-process and a 2-process run of 8 steps, global batch 4; the 2-process run with small buckets. The lr is
    scaled by --lr-rule sqrt to the global batch (peak 0.0566 x sqrt(4/128) = 0.01), not to a rank's 2 rows."""
    tmp = tmp_path_factory.mktemp("runs")
    rng = random.Random(0)
    words = "the movie was good bad great awful plot actor scene fun boring and but very not".split()
    (tmp / "corpus.txt").write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(5, 30))) for _ in range(400)))

    def argv(out, *flags):
        return ["--data", str(tmp / "corpus.txt"), "--cache-dir", str(tmp / "cache"), "--out", str(tmp / out),
                "--hidden", "16", "--embed", "8", "--batch-size", "4", "--seq-len", "16", "--iters", "8",
                "--lr", "0.0566", "--lr-rule", "sqrt", "--log-every", "1", "--save-every", "4", "--eval-every", "1000", "--eval-iters", "2",
                "--sample-chars", "0", "--device", "cpu", "--bucket-mb", "0.001", *flags]

    train.main(train.parse_args(argv("one")))
    two = launch_ok(tmp, train_worker, argv("two"))
    return tmp, argv, two


def metrics(out):
    with open(out / "metrics.jsonl") as f:
        events = [json.loads(line) for line in f]
    return [e["loss"] for e in events if "loss" in e], [e["val_bpc"] for e in events if "val_bpc" in e]


def final_weights(out):
    return list(torch.load(out / "ckpt.pt", weights_only=True)["model"].values())


def test_two_processes_follow_one_process_with_the_same_global_batch(runs):
    tmp, _, two = runs
    (loss1, val1), (loss2, val2) = metrics(tmp / "one"), metrics(tmp / "two")
    assert len(loss1) == len(loss2) == 8 and len(val1) == len(val2) == 1
    # Only the order of the float32 sums differs (rows summed per rank, then across ranks): measured
    # differences are ~1 float32 ulp (losses 7e-7, weights 2e-7); the tolerance is 1e-5 absolute.
    diff = max(abs(a - b) for a, b in zip(loss1 + val1, loss2 + val2))
    assert diff < 1e-5, f"losses {loss1} vs {loss2}, val bpc {val1} vs {val2}: max |diff| {diff}"
    diff = max_diff(final_weights(tmp / "one"), final_weights(tmp / "two"))
    assert diff < 1e-5, f"final weights of 1 vs 2 processes differ by {diff}"
    diff = max_diff(two[0], two[1])
    assert diff == 0.0, f"the two replicas' weights differ by {diff}"


def test_two_process_resume_continues_like_the_uninterrupted_run(runs):
    tmp, argv, _ = runs
    launch_ok(tmp, train_worker, argv("resumed", "--stop-at", "4"))
    launch_ok(tmp, train_worker, argv("resumed", "--resume"))
    (straight, _), (resumed, _) = metrics(tmp / "two"), metrics(tmp / "resumed")
    assert resumed == straight, f"resumed losses {resumed} vs uninterrupted {straight}"
    diff = max_diff(final_weights(tmp / "two"), final_weights(tmp / "resumed"))
    assert diff == 0.0, f"final weights differ by {diff}"


@pytest.mark.parametrize("fail", ["dies", "hangs"])
def test_a_failing_rank_ends_the_others_with_a_message(runs, fail):
    tmp, argv, _ = runs
    timeout = 30 if fail == "dies" else 5
    codes, results, seconds = launch(tmp, train_worker, argv(f"fail-{fail}"), fail, timeout_s=timeout,
                                     grace_s=timeout + 5 if fail == "dies" else 1)
    error = results[0] and results[0].get("error", "")
    # A dead peer closes its sockets: rank 0 learns at its next collective, long before the timeout.
    # A live but stuck peer is only detected by the timeout.
    expect = ["peer", "remote worker"] if fail == "dies" else ["timed out", "timeout"]  # gloo words it variously
    assert codes[0] not in (0, None) and any(w in error.lower() for w in expect), \
        f"rank 0: exit code {codes[0]}, error {error!r}"
    if fail == "dies":
        # the closed socket, not the timeout: no wall-clock bound (noisy machines), the message tells
        assert codes[1] == 3 and "timed out" not in error.lower(), f"exit codes {codes}, error {error!r}"


@pytest.mark.parametrize("comm_dtype", [None, torch.float32])
def test_buckets_stay_within_the_cap_and_are_filled_in_order(comm_dtype):
    """GradReducer.buckets against a re-statement of its rule, on random tensor sizes, dtypes and caps: the buckets
    hold every gradient once, in order; one of several tensors never exceeds the cap (in the communicated dtype's
    bytes), one of a single tensor only when that tensor alone does; a bucket is cut only where the next tensor
    would overflow it or changes dtype."""
    rng = random.Random(0)
    for trial in range(200):
        grads = [torch.empty(rng.choice([1, 7, 100, 1000, 5000]),
                             dtype=rng.choice([torch.float16, torch.float32]) if trial % 2 else torch.float32)
                 for _ in range(rng.randint(1, 30))]
        reducer = distributed.GradReducer(rng.choice([1e-6, 1e-3, 0.004, 0.02, 25.0]), comm_dtype)
        cap = reducer.bucket_bytes
        size = lambda g: g.numel() * (comm_dtype.itemsize if comm_dtype else g.element_size())  # noqa: E731
        buckets = reducer.buckets(grads)
        flat = [g for b in buckets for g in b]
        assert len(flat) == len(grads) and all(a is b for a, b in zip(flat, grads)), "not every gradient once, in order"
        for k, b in enumerate(buckets):
            total = sum(map(size, b))
            assert len(b) == 1 or total <= cap, f"trial {trial}: a bucket of {len(b)} tensors holds {total} B > {cap} B"
            assert len({g.dtype for g in b}) == 1, f"trial {trial}: dtypes mixed in one bucket"
            if k + 1 < len(buckets):
                nxt = buckets[k + 1][0]
                assert total + size(nxt) > cap or nxt.dtype != b[0].dtype, \
                    f"trial {trial}: bucket {k} ({total} B) cut although the next tensor ({size(nxt)} B) fits in {cap} B"

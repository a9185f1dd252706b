"""Data-parallel training: one process per GPU, gradients averaged by a hand-written bucketed all-reduce.

Puri et al. 2018 (arXiv 1808.01371), "Multi-GPU training" and "Distributed data parallel scaling":
every process holds a replica, reads its own rows of the global batch, and after backward the
gradients are summed across processes (NCCL on GPUs, gloo on CPU) and divided by the world size,
so each replica takes the same step. torchrun launches the processes and sets RANK, WORLD_SIZE
and LOCAL_RANK; without it everything here is a no-op and no process group is made.

    python train.py ...                                               # one process
    torchrun --standalone --nproc_per_node=8 train.py ...             # one node, 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...
"""
import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def setup(device="auto", timeout_s=600):
    """Read torchrun's environment, pin this process to its GPU, join the process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = pinned(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # A rank that dies leaves the others blocked in a collective: the timeout ends them.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local_rank, device)


def pinned(device, index=0):
    """torch.device(device), a CUDA one with an index ("cuda" is cuda:`index`): torch.cuda.set_device takes no other."""
    device = torch.device(device)
    return torch.device("cuda", index) if device.type == "cuda" and device.index is None else device


def broadcast_params(model):
    """Make every replica start from rank 0's weights."""
    if dist.is_initialized():
        for p in model.parameters():
            dist.broadcast(p.data, 0)


def all_reduce_mean(t):
    """Mean of a tensor over processes (the loss, before it is logged)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class GradReducer:
    """Averages the gradients of `params` across processes, in flat buckets of about bucket_mb MB.

    Each bucket is packed (one copy), all-reduced asynchronously so buckets pipeline on the wire,
    then unpacked and divided by the world size. comm_dtype=None communicates in the gradients'
    own dtype (fp16 gradients: half the bytes of fp32, as in the paper); float32 is exact-er.
    """

    def __init__(self, bucket_mb=25.0, comm_dtype=None):
        self.bucket_bytes, self.comm_dtype = int(bucket_mb * 2**20), comm_dtype

    def buckets(self, grads):
        """Consecutive groups of gradients of one dtype, each at most bucket_bytes (or one tensor)."""
        out, cur, size = [], [], 0
        for g in grads:
            nbytes = g.numel() * (self.comm_dtype.itemsize if self.comm_dtype else g.element_size())
            if cur and (size + nbytes > self.bucket_bytes or g.dtype != cur[0].dtype):
                out.append(cur)
                cur, size = [], 0
            cur.append(g)
            size += nbytes
        return out + [cur] if cur else out

    @torch.no_grad()
    def __call__(self, params):
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        grads = [p.grad for p in params]
        pending = []
        for bucket in self.buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])  # [sum of numels]
            if self.comm_dtype is not None:
                flat = flat.to(self.comm_dtype)
            pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
        for bucket, flat, work in pending:
            work.wait()
            flat /= world
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather_rows(t):
    """Concatenate every rank's rows of t along dim 0 (the carried state, for the checkpoint)."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def cleanup():
    if dist.is_initialized():
        # gloo's worker threads free the last collectives' tensors a moment after they complete, and that
        # takes the GIL: one still waiting for it when the interpreter exits aborts the process ("terminate
        # called without an active exception", SIGABRT) after a successful run. Sleeping releases the GIL.
        time.sleep(0.1)
        dist.destroy_process_group()

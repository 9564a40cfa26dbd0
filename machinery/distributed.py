"""Several processes (torchrun), each its own batch: DDP averages the gradients, rank 0 alone
evaluates, logs and saves, and L_NSP takes negatives from every process (gather_candidates)."""

import os

import torch
import torch.distributed as dist
# before any group exists: imported later, it keeps the group's threads alive (an abort at exit)
import torch.distributed.nn  # noqa: F401
from torch.nn.parallel import DistributedDataParallel

from machinery.cli import UserError


def setup(device):
    """Join the process group if torchrun started us. Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    kind = device.split(":")[0]
    if kind == "mps":
        raise UserError("several processes need --device cpu or cuda, not mps")
    if kind == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return dist.get_rank(), world, device


def teardown(together=False):
    """Leave the process group, if in one; together: wait for all first (gloo can abort else)."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def wrap(model, device, find_unused=False):
    """DDP for several processes; find_unused: seq_head has no gradient before L_NSP joins."""
    if world_size() == 1:
        return model
    device_ids = [device] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids, find_unused_parameters=find_unused)


def any_rank(*flags, device="cpu"):
    """Each flag, True if it is True in any process: so that all processes stop at the same step."""
    if world_size() == 1:
        return flags
    t = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(f) for f in t.tolist())


def total(n, device="cpu"):
    """The sum of the integer n over all processes."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t)


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (any picklable object)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's obj, in every process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather_rows(t):
    """Every process's t in rank order, no gradient; first dimensions may differ (padded, cut)."""
    size = torch.tensor([len(t)], device=t.device)
    sizes = [torch.empty_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[:len(t)] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [o[:int(n)] for o, n in zip(out, sizes)]


def gather_candidates(queries, embeddings, target_row, candidate_ids, neighbours):
    """The five arguments of all processes, for one L_NSP over their W batches: each candidate
    once (its first copy), ids sorted. Only this process's part has gradient, so the processes'
    gradients sum to L_NSP's (train.py weights L_NSP by W against DDP's averaging)."""
    rank = dist.get_rank()
    all_queries = _all_gather_rows(queries.detach())
    all_embeddings = _all_gather_rows(embeddings.detach())
    all_queries[rank], all_embeddings[rank] = queries, embeddings  # this process's, with gradient
    all_ids = torch.cat(_all_gather_rows(candidate_ids))
    targets = torch.cat(_all_gather_rows(candidate_ids[target_row]))  # each query's target's id
    ids, inverse = torch.unique(all_ids, return_inverse=True)
    # the first row of each distinct id: the smallest row index among those with that id
    rows = torch.arange(len(all_ids), device=all_ids.device)
    first = torch.full_like(ids, len(all_ids)).scatter_reduce_(0, inverse, rows, "amin")
    return (torch.cat(all_queries), torch.cat(all_embeddings)[first],
            torch.searchsorted(ids, targets), ids, torch.cat(_all_gather_rows(neighbours)))

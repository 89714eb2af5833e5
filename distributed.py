"""Running under torchrun: joining the process group, each rank's share of a batch, the one host sync of a step,
and the wrapping of the network for DDP. Plain `python train.py` is rank 0 of 1 and touches none of it."""
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from device import resolve_device

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # torch's default for a collective of the training steps
PREPARE_TIMEOUT = datetime.timedelta(hours=3)  # the other ranks' wait while rank 0 renders, decodes, trains the judge


def setup_distributed(device_name: str):
    """Under torchrun (RANK is set, even with one process): join the process group and pick this rank's device.
    Returns (rank, world_size, device, prep_group); plain `python train.py` is rank 0 of 1 and touches nothing.
    prep_group: a gloo group with a long timeout, for the wait while rank 0 prepares the data (the default group's
    10 minutes is too short for a first run that renders the set and trains the judge on a slow host)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(device_name), None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return rank, world, device, dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)


def shard(perm: torch.Tensor, batch: int, per_rank: int, rank: int, world: int) -> torch.Tensor:
    """This rank's part of global batch number `batch`: the global batch of per_rank * world images is cut into
    world contiguous slices, so the ranks together see every image of the epoch exactly once."""
    start = batch * per_rank * world + rank * per_rank
    return perm[start:start + per_rank]


def agree(loss: torch.Tensor, signal: bool, world: int, clock: float = 0.0):
    """The one host sync of a step. Under torchrun every rank learns the mean loss, whether any rank's loss is not
    finite, whether any rank got a signal, and rank 0's clock (the others pass 0), which the time budget and a
    time-budgeted learning rate follow: all ranks act alike on the same step, for the same reason, and none is left
    waiting in a collective. Returns (mean loss, or nan if any rank's is not finite; any signal; rank 0's clock)."""
    v = torch.tensor([0.0, 0.0, float(signal), clock], device=loss.device)
    v[:2] = torch.stack([loss.detach().float(), (~torch.isfinite(loss.detach())).float()])
    if dist.is_initialized():
        dist.all_reduce(v)  # sums: any rank's flag makes the sum positive
    loss_sum, not_finite, signals, clock = v.tolist()
    return (loss_sum / world if not not_finite else float("nan")), signals > 0, clock


def wrap(model: nn.Module, compile: bool, device: torch.device) -> nn.Module:
    """What the steps run: the plain module (which checkpoints save), compiled and/or under DDP."""
    net = torch.compile(model) if compile else model
    # BatchNorm statistics over the global batch, as one process has them
    if dist.is_initialized() and device.type == "cuda":
        return DDP(nn.SyncBatchNorm.convert_sync_batchnorm(net), device_ids=[device.index])
    # SyncBatchNorm is GPU-only: on CPU each process normalizes over its own share of the batch
    if dist.is_initialized():
        return DDP(net)
    return net

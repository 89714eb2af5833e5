"""torchrun-style data parallel training on CPU with the gloo backend: two processes, one tiny epoch."""
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "16", "--n-feat", "8", "--batch-size", "12", "--T", "20", "--sample-every", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, data, out, record):
    """One rank, as torchrun would start it; records which images it trained on and its final weights."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen = []
    real_make_batch = train.make_batch
    train.make_batch = lambda images, idx, hflip: (seen.extend(idx.tolist()), real_make_batch(images, idx, hflip))[1]
    model = train.train(train.get_args(["--data-dir", data, "--out-dir", out, *TINY, "--epochs", "1"]))
    torch.save({"seen": seen, "state": model.state_dict()}, os.path.join(record, f"rank{rank}.pt"))


def test_two_gloo_processes_share_each_epoch_and_end_identical(tiny_data, tmp_path):
    out, record = str(tmp_path / "run"), str(tmp_path)
    mp.spawn(worker, args=(2, free_port(), tiny_data, out, record), nprocs=2, join=True)
    r0, r1 = (torch.load(os.path.join(record, f"rank{r}.pt")) for r in (0, 1))
    params = [name for name in r0["state"] if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for name in params:  # BatchNorm running statistics are per process on CPU (SyncBatchNorm is GPU-only)
        assert torch.equal(r0["state"][name], r1["state"][name]), f"ranks differ in {name}"
    assert not set(r0["seen"]) & set(r1["seen"])  # disjoint shards ...
    assert sorted(r0["seen"] + r1["seen"]) == list(range(36))  # ... that together cover the set exactly once
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["epoch"] == 1 and len(ckpt["rng"]["ranks"]) == 2
    p = subprocess.run([sys.executable, "sample.py", "--ckpt", os.path.join(out, "ckpt.pt"), "--split", "test",
                        "--sampler", "ddim", "--steps", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(os.listdir(os.path.join(out, "samples", "test"))) == 32


def test_shards_of_a_permutation_are_disjoint_and_complete():
    perm = torch.randperm(48)
    parts = [train.shard(perm, b, 4, r, 3) for b in range(4) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(48))

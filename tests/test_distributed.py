"""torchrun-style data parallel training on CPU with the gloo backend: two processes, one tiny epoch."""
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp

import train
from conftest import TINY
from settings import decide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    model = train.train(decide(["--data-dir", data, "--out-dir", out, *TINY, "--epochs", "1"]))
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


DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
import train
torch.set_num_threads(1)
calls = [0]
if int(os.environ["RANK"]) == 1 and {fault!r} == "nan":  # this rank alone sees a non-finite loss, at its first step
    import schedule
    real_mse = schedule.F.mse_loss
    schedule.F.mse_loss = lambda a, b: real_mse(a, b) * float("nan")
if int(os.environ["RANK"]) == 1 and {fault!r} == "sigterm":  # this rank alone gets SIGTERM, during its 4th step
    real_update = train.ema_update
    def update(*args):
        real_update(*args)
        calls[0] += 1
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
    train.ema_update = update
if {fault!r} == "slow_prepare":  # a short collective timeout (NCCL's 10 minutes, scaled) and a slow first run on rank 0
    import datetime, time
    real_init = train.dist.init_process_group
    train.dist.init_process_group = lambda *a, **k: real_init(*a, **{{**k, "timeout": datetime.timedelta(seconds=4)}})
    if int(os.environ["RANK"]) == 0:
        import prepare
        real_prepare = prepare.prepare_data
        prepare.prepare_data = lambda s: (time.sleep(10), real_prepare(s))[1]
sys.argv = ["train.py"] + {argv!r}
train.main()
"""


def launch(argv, fault=None, world=2):
    """Start `world` train.py processes as torchrun would (gloo on CPU); returns [(returncode, stdout, stderr)]."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        code = DRIVER.format(root=ROOT, fault=fault, argv=argv)
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]


def test_a_nan_on_one_rank_stops_both_with_the_error_and_keeps_the_checkpoint(tiny_data, tmp_path):
    args = ["--data-dir", tiny_data, "--out-dir", str(tmp_path), *TINY]
    assert [rc for rc, _, _ in launch(args + ["--epochs", "1"])] == [0, 0]
    before = (tmp_path / "ckpt.pt").read_bytes()
    results = launch(args + ["--epochs", "2", "--resume"], fault="nan")
    for rc, out, err in results:  # neither waits forever in an all-reduce: both name the step and exit 2
        assert rc == 2, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: loss became nan at epoch 2, step 4;") and "Traceback" not in err, err[-2000:]
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_the_resume_is_bit_exact(tiny_data, tmp_path):
    from test_reliability import assert_same_state
    args = ["--data-dir", tiny_data, *TINY, "--epochs", "2"]
    assert [rc for rc, _, _ in launch(args + ["--out-dir", str(tmp_path / "a")])] == [0, 0]
    results = launch(args + ["--out-dir", str(tmp_path / "b")], fault="sigterm")
    assert [rc for rc, _, _ in results] == [0, 0], results[1][2][-2000:]
    assert "another process stopped: saved" in results[0][1] and "--resume" in results[0][1]
    stopped = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert (stopped["epoch"], stopped["batch"], stopped["step"]) == (1, 2, 5)  # rank 1's signal, agreed at step 5
    assert len(stopped["rng"]["ranks"]) == 2
    assert [rc for rc, _, _ in launch(args + ["--out-dir", str(tmp_path / "b"), "--resume"])] == [0, 0]
    straight, resumed = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("a", "b"))
    assert_same_state(straight, resumed)


def test_the_other_ranks_wait_as_long_as_rank_0_prepares_the_data(tiny_data, tmp_path):
    # rank 0 renders the set and trains the judge on a first run: minutes, beyond the collectives' timeout
    results = launch(["--data-dir", tiny_data, "--out-dir", str(tmp_path), *TINY, "--epochs", "1"],
                     fault="slow_prepare")
    assert [rc for rc, _, _ in results] == [0, 0], results[1][2][-2000:]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["epoch"] == 1

"""A run folder belongs to one run: a resume reads and writes where it is told, a second run never replaces the
first, a stop on an epoch's last batch resumes into the next epoch, and a checkpoint finds its data from anywhere."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train
from cli import UserError
from conftest import TINY, tiny_run
from settings import Settings, decide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def test_a_moved_run_resumes_and_saves_where_its_checkpoint_now_is(tiny_data, tmp_path, monkeypatch):
    tiny_run(tiny_data, tmp_path / "a", "--epochs", "1")
    before = (tmp_path / "a" / "ckpt.pt").read_bytes()
    (tmp_path / "out").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt.pt", tmp_path / "out" / "ckpt.pt")  # a run brought back from elsewhere
    monkeypatch.chdir(tmp_path)
    train.train(decide(["--resume", "--epochs", "2"]))  # the README's resume, in the default out/
    assert (tmp_path / "a" / "ckpt.pt").read_bytes() == before  # the folder it came from is not touched
    assert sorted(os.listdir(tmp_path / "a")) == ["ckpt.pt", "curves.png", "metrics.jsonl"]
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["epoch"] == 2
    assert os.path.isfile(tmp_path / "out" / "metrics.jsonl")


def test_a_new_run_in_a_folder_that_holds_a_run_is_refused_naming_both_ways_out_and_nothing_is_touched(tiny_data,
                                                                                                          tmp_path):
    run = tmp_path / "r"
    tiny_run(tiny_data, run, "--epochs", "1")
    before = {name: (run / name).read_bytes() for name in os.listdir(run)}
    p = subprocess.run([sys.executable, "train.py", "--data-dir", tiny_data, "--out-dir", str(run), *TINY,
                        "--n-feat", "16", "--epochs", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {run}: holds another run (ckpt.pt, metrics.jsonl)")
    assert f"python train.py --resume --out-dir {run}" in line and "new --out-dir" in line
    assert {name: (run / name).read_bytes() for name in os.listdir(run)} == before


def test_budget_is_decided_on_rank_0s_clock_not_a_ranks_own():
    """train_step's stop for --minutes follows the clock agreed at the step's sync: rank 0's. A rank whose own clock
    has run past the budget keeps going until rank 0's has (without a process group, the others' clock reads 0)."""
    settings = Settings(hflip=0, minutes=1.0, lr=1e-3, ema_decay=0.9, n_feat=8, image_size=8, batch_size=4, T=10,
                        seed=0)
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    cond = torch.zeros(8, 24)
    cond[:, 3] = 1
    r = train.make_trainer(settings, torch.device("cpu"), "fp32", False, False, images, cond)
    idx = torch.arange(4)
    assert train.train_step(r, idx, 0, clock=59.0)[1:] == (False, False)
    assert train.train_step(r, idx, 1, clock=61.0)[1:] == (False, True)  # rank 0: its clock is the shared one
    r.rank = 1
    assert train.train_step(r, idx, 2, clock=61.0)[1:] == (False, False)  # another rank: its own clock is not
    assert train.train_step(r, idx, 3, signal=True)[1:] == (True, False)


def test_a_stop_on_an_epochs_last_batch_resumes_into_the_next_epoch_with_no_empty_row(tiny_data, tmp_path, monkeypatch):
    from test_reliability import assert_same_state
    straight = tiny_run(tiny_data, tmp_path / "a", "--epochs", "2")
    real_update, calls = train.ema_update, {"n": 0}

    def update_then_sigterm_at_step_2(*args):
        real_update(*args)
        calls["n"] += 1
        if calls["n"] == 2:  # agreed at step 3's sync: the last of epoch 1's 3 batches
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "ema_update", update_then_sigterm_at_step_2)
    stopped = tiny_run(tiny_data, tmp_path / "b", "--epochs", "2")
    assert (stopped["epoch"], stopped["batch"], stopped["step"], stopped["perm"]) == (1, 0, 3, None)
    monkeypatch.setattr(train, "ema_update", real_update)
    resumed = tiny_run(tiny_data, tmp_path / "b", "--resume")
    assert_same_state(straight, resumed)
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [row["epoch"] for row in rows] == [1, 2] and all(row["loss"] > 0 and row["images_per_s"] > 0 for row in rows)


def test_a_stop_on_the_runs_very_last_step_says_it_is_done_and_names_the_sampling_command(tiny_data, tmp_path,
                                                                                          monkeypatch, capsys):
    real_update, calls = train.ema_update, {"n": 0}

    def update_then_sigterm_at_step_2(*args):
        real_update(*args)
        calls["n"] += 1
        if calls["n"] == 2:  # agreed at step 3's sync: the last batch of the only epoch
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "ema_update", update_then_sigterm_at_step_2)
    stopped = tiny_run(tiny_data, tmp_path, "--epochs", "1")
    assert (stopped["epoch"], stopped["batch"], stopped["step"]) == (1, 0, 3)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "(1 epochs done: the run is complete)" in last and "--resume" not in last
    assert last.endswith(f"next: python sample.py --ckpt {tmp_path}/ckpt.pt")


def test_a_checkpoint_written_at_an_epochs_end_by_an_older_version_resumes_into_the_next_epoch(tiny_data, tmp_path):
    ckpt = tiny_run(tiny_data, tmp_path, "--epochs", "1")
    ckpt.update(epoch=0, batch=3)  # as 61e9c3d saved a stop on the last batch: epoch 1 of 1 done, at its end
    torch.save(ckpt, tmp_path / "ckpt.pt")
    resumed = tiny_run(tiny_data, tmp_path, "--epochs", "2", "--resume")
    assert (resumed["epoch"], resumed["step"]) == (2, 6)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(row["loss"] > 0 for row in rows)


def test_a_relative_data_folder_is_found_again_from_another_folder(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(tiny_data))
    ckpt = tiny_run(os.path.basename(tiny_data), tmp_path / "run", "--epochs", "1")
    assert ckpt["config"]["data_dir"] == os.path.abspath(tiny_data) == ckpt["config"]["train"]["data_dir"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(tmp_path / "run" / "ckpt.pt"),
                        "--split", "test", "--sampler", "ddim", "--steps", "2"], cwd=elsewhere, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(os.listdir(tmp_path / "run" / "samples" / "test")) == 32


def test_a_checkpoint_whose_data_folder_is_gone_says_pass_data_dir(tiny_data, tmp_path):
    ckpt = tiny_run(tiny_data, tmp_path, "--epochs", "1")
    ckpt["config"]["data_dir"] = str(tmp_path / "gone")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    for script in ("sample.py", "evaluate.py"):
        p = subprocess.run([sys.executable, script, "--ckpt", str(tmp_path / "ckpt.pt")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert p.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'gone'}: the data folder ")
        assert "pass --data-dir" in p.stderr


def test_every_checkpoint_read_says_the_same_for_a_file_that_is_not_one(tmp_path):
    import evaluate
    import sample
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a usable checkpoint of this project"):
        sample.load_model(str(bad), torch.device("cpu"))
    with pytest.raises(UserError, match="not a usable checkpoint of this project"):
        decide(["--resume", "--out-dir", str(tmp_path)])
    with pytest.raises(UserError, match="not a usable checkpoint of this project"):
        evaluate.find_data_dir(evaluate.get_args(["--ckpt", str(bad)]))

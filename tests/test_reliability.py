"""No lost work and exact resume: atomic checkpoints, clean stops on signals, bit-identical resumes, NaN guards."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as model_module
import train
from dataset import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "16", "--n-feat", "8", "--batch-size", "12", "--T", "20", "--sample-every", "0"]


def train_run(data, out, *extra):
    train.train(train.get_args(["--data-dir", data, "--out-dir", str(out), *TINY, *extra]))
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)


def assert_same_state(a, b):
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), f"optimizer state {ka}.{name} differs"
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert torch.equal(a["rng"]["ranks"][0]["cpu"], b["rng"]["ranks"][0]["cpu"])
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])


def test_two_epochs_straight_equal_one_epoch_then_resume_bit_for_bit(tiny_data, tmp_path):
    straight = train_run(tiny_data, tmp_path / "a", "--epochs", "2")
    train_run(tiny_data, tmp_path / "b", "--epochs", "1")
    resumed = train_run(tiny_data, tmp_path / "b", "--epochs", "2", "--resume")
    assert_same_state(straight, resumed)


def test_a_stop_in_the_middle_of_an_epoch_resumes_bit_for_bit(tiny_data, tmp_path, monkeypatch):
    straight = train_run(tiny_data, tmp_path / "a", "--epochs", "2")
    real_update = train.ema_update
    calls = {"n": 0}

    def update_then_sigterm_at_step_4(*args):
        real_update(*args)
        calls["n"] += 1
        if calls["n"] == 4:  # step 4 is the middle of epoch 2 (3 steps an epoch)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "ema_update", update_then_sigterm_at_step_4)
    stopped = train_run(tiny_data, tmp_path / "b", "--epochs", "2")
    assert (stopped["epoch"], stopped["batch"], stopped["step"]) == (1, 1, 4)
    monkeypatch.setattr(train, "ema_update", real_update)
    resumed = train_run(tiny_data, tmp_path / "b", "--resume")
    assert_same_state(straight, resumed)


def test_resume_with_a_different_model_setting_is_refused_by_name(tiny_data, tmp_path):
    train_run(tiny_data, tmp_path, "--epochs", "1")
    with pytest.raises(UserError, match="--n-feat 16 differs from the checkpoint's 8"):
        train.train(train.get_args(["--data-dir", tiny_data, "--out-dir", str(tmp_path), *TINY, "--n-feat", "16",
                                    "--epochs", "2", "--resume"]))


def test_a_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    train_run(tiny_data, tmp_path, "--epochs", "1")
    before = (tmp_path / "ckpt.pt").read_bytes()
    real_mse = train.F.mse_loss
    monkeypatch.setattr(train.F, "mse_loss", lambda a, b: real_mse(a, b) * float("nan"))
    with pytest.raises(UserError, match=r"loss became nan at epoch 2, step 4"):
        train_run(tiny_data, tmp_path, "--epochs", "2", "--resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    model_module.save_checkpoint({"step": 1}, path)

    def write_half_then_die(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_module.torch, "save", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        model_module.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1


def start_training(data, out):
    return subprocess.Popen([sys.executable, "train.py", "--data-dir", data, "--out-dir", str(out), *TINY,
                             "--epochs", "100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out, proc, timeout=120):
    t0 = time.time()
    while not os.path.isfile(os.path.join(out, "ckpt.pt")):
        assert proc.poll() is None and time.time() - t0 < timeout, "training did not start"
        time.sleep(0.2)


def test_sigterm_saves_and_exits_zero_with_a_resume_hint_and_kill_9_leaves_a_loadable_checkpoint(tiny_data, tmp_path):
    proc = start_training(tiny_data, tmp_path / "term")
    wait_for_checkpoint(tmp_path / "term", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-1000:]
    assert "SIGTERM: saved" in out and "python train.py --resume" in out
    torch.load(tmp_path / "term" / "ckpt.pt", weights_only=False)

    proc = start_training(tiny_data, tmp_path / "kill")
    wait_for_checkpoint(tmp_path / "kill", proc)
    for delay in (0.37, 0.21, 0.53):  # checkpoints are written several times a second here
        time.sleep(delay)
        ckpt = torch.load(tmp_path / "kill" / "ckpt.pt", weights_only=False)
        assert ckpt["epoch"] >= 1
    proc.kill()
    proc.wait()
    assert torch.load(tmp_path / "kill" / "ckpt.pt", weights_only=False)["epoch"] >= 1

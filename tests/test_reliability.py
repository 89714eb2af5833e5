"""No lost work and exact resume: atomic checkpoints, clean stops on signals, bit-identical resumes, NaN guards."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import rundir
import schedule
import train
from cli import UserError
from conftest import TINY, tiny_run
from settings import decide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



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
    straight = tiny_run(tiny_data, tmp_path / "a", "--epochs", "2")
    tiny_run(tiny_data, tmp_path / "b", "--epochs", "1")
    resumed = tiny_run(tiny_data, tmp_path / "b", "--epochs", "2", "--resume")
    assert_same_state(straight, resumed)


def test_a_stop_in_the_middle_of_an_epoch_resumes_bit_for_bit(tiny_data, tmp_path, monkeypatch):
    straight = tiny_run(tiny_data, tmp_path / "a", "--epochs", "2")
    real_update = train.ema_update
    calls = {"n": 0}

    def update_then_sigterm_at_step_4(*args):
        real_update(*args)
        calls["n"] += 1
        if calls["n"] == 4:  # step 4 is the middle of epoch 2 (3 steps an epoch)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "ema_update", update_then_sigterm_at_step_4)
    stopped = tiny_run(tiny_data, tmp_path / "b", "--epochs", "2")
    # the stop is agreed at the next step's sync (all processes stop on the same step), so step 5 completes too
    assert (stopped["epoch"], stopped["batch"], stopped["step"]) == (1, 2, 5)
    monkeypatch.setattr(train, "ema_update", real_update)
    resumed = tiny_run(tiny_data, tmp_path / "b", "--resume")
    assert_same_state(straight, resumed)


def test_resume_with_a_different_model_setting_is_refused_by_name(tiny_data, tmp_path):
    tiny_run(tiny_data, tmp_path, "--epochs", "1")
    with pytest.raises(UserError, match="--n-feat 16 differs from the checkpoint's 8"):
        train.train(decide(["--data-dir", tiny_data, "--out-dir", str(tmp_path), *TINY, "--n-feat", "16",
                                    "--epochs", "2", "--resume"]))


def test_a_preset_checkpoint_from_before_a_network_option_resumes_with_the_network_it_was_trained_with(tiny_data,
                                                                                                      tmp_path):
    # the preset now turns --cross-attn on; a checkpoint saved before that option existed has no cross_attn in its
    # config, and its network has none: the resume must build that network, not the preset's
    preset = ["--preset", "cpu", "--minutes", "0", "--eval-every", "0"]
    ckpt = tiny_run(tiny_data, tmp_path, *preset, "--cross-attn", "0", "--epochs", "1")
    for key in ("cross_attn", "adagn", "cond_embed"):
        del ckpt["config"]["train"][key]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    resumed = tiny_run(tiny_data, tmp_path, *preset, "--epochs", "2", "--resume")
    assert resumed["epoch"] == 2 and "cross_attn" not in resumed["config"]["model"]
    assert resumed["config"]["train"]["cross_attn"] == 0


def test_a_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    tiny_run(tiny_data, tmp_path, "--epochs", "1")
    before = (tmp_path / "ckpt.pt").read_bytes()
    real_mse = schedule.F.mse_loss
    monkeypatch.setattr(schedule.F, "mse_loss", lambda a, b: real_mse(a, b) * float("nan"))
    with pytest.raises(UserError, match=r"loss became nan at epoch 2, step 4"):
        tiny_run(tiny_data, tmp_path, "--epochs", "2", "--resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    rundir.save_checkpoint({"step": 1}, path)

    def write_half_then_die(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir.torch, "save", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1


def start_training(data, out):
    return subprocess.Popen([sys.executable, "train.py", "--data-dir", data, "--out-dir", str(out), *TINY,
                             "--epochs", "100000", "--save-every", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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


def test_the_ema_entry_holds_batchnorm_statistics_of_the_ema_weights(tiny_data, tmp_path):
    """Against torch's own update_bn on the same inputs: the statistics belong to the EMA weights, not the raw ones."""
    from torch.optim.swa_utils import update_bn
    from dataset import load_train
    from model import ContextUnet
    from schedule import Diffusion
    # float32, as update_bn runs (on an AMX CPU auto would be bf16, whose statistics differ by about 1%)
    ckpt = tiny_run(tiny_data, tmp_path, "--epochs", "2", "--ema-decay", "0.5", "--precision", "fp32")
    ema = ContextUnet(**ckpt["config"]["model"])
    ema.load_state_dict(ckpt["ema"])
    images, cond = load_train(tiny_data, image_size=16)
    batches = list(train.bn_batches(images, cond, Diffusion(T=20), 0.1, 42 + ckpt["step"], 36, 12))

    class Wrapped(torch.nn.Module):  # update_bn calls model(batch[0])
        def __init__(self):
            super().__init__()
            self.net = ema

        def forward(self, batch):
            return self.net(*batch)

    reference = Wrapped()
    update_bn([[b] for b in batches], reference)
    for name, value in ema.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(ckpt["ema"][name], value, rtol=1e-4, atol=1e-6)
            assert not torch.allclose(ckpt["ema"][name], ckpt["model"][name], rtol=1e-3), name  # not copied


def test_a_checkpoint_saved_in_nchw_resumes_in_channels_last_with_the_optimizer_state_laid_out_alike(tiny_data,
                                                                                                     tmp_path):
    tiny_run(tiny_data, tmp_path, "--epochs", "1", "--channels-last", "0")
    resumed = tiny_run(tiny_data, tmp_path, "--epochs", "2", "--resume", "--channels-last", "1", "--fused-adam", "1")
    params = dict(resumed["model"])
    weights = [k for k, v in params.items() if v.dim() == 4]
    for i, name in enumerate(k for k, _ in train.ContextUnet(3, 8, 24, 16).named_parameters()):
        if name in weights:
            assert params[name].is_contiguous(memory_format=torch.channels_last), name
            for moment in ("exp_avg", "exp_avg_sq"):
                assert resumed["optimizer"]["state"][i][moment].stride() == params[name].stride(), (name, moment)
    assert resumed["step"] == 6 and all(torch.isfinite(v).all() for v in params.values() if v.is_floating_point())


def test_minutes_stops_at_a_step_boundary_saves_and_resumes_exactly(tiny_data, tmp_path):
    preset = ["--preset", "cpu", "--data-dir", tiny_data, "--sample-every", "0", "--T", "20", "--eval-every", "0"]
    p = subprocess.run([sys.executable, "train.py", *preset, "--out-dir", str(tmp_path / "b"), "--epochs", "100000",
                        "--minutes", "0.1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "time budget: saved" in p.stdout and f"python train.py --resume --out-dir {tmp_path / 'b'}" in p.stdout
    last = p.stdout.strip().splitlines()[-1]  # the preset's planned end: the README's next step comes first
    assert f"next: python sample.py --ckpt {tmp_path / 'b' / 'ckpt.pt'} --w " in last
    assert p.stdout.count("on this CPU: about") == 1 and "the 0.1-minute budget trains about" in p.stdout  # said once
    stopped = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert 0 < stopped["step"] and stopped["epoch"] < 100000
    assert rows[-1]["elapsed_s"] < 6 + rows[-1]["epoch_s"] + 5  # 0.1 min, then at most the epoch in progress
    epochs = stopped["epoch"] + 2  # finish the epoch it stopped in, and one more
    straight = train.train(decide([*preset, "--out-dir", str(tmp_path / "a"), "--epochs", str(epochs)]))
    resumed = train.train(decide(["--resume", "--out-dir", str(tmp_path / "b"), "--epochs", str(epochs),
                                          "--minutes", "0"]))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("a", "b"))
    assert_same_state(a, b)
    assert all(torch.equal(straight.state_dict()[k], resumed.state_dict()[k]) for k in straight.state_dict())


def test_the_cosine_learning_rate_follows_its_closed_form_by_steps_or_by_the_clock():
    import math
    from types import SimpleNamespace
    args = SimpleNamespace(lr=1e-3, lr_schedule="cosine", warmup_steps=10, minutes=0)
    assert math.isclose(train.learning_rate(args, 100, 0, 0.0), 1e-4)  # warm-up: (0 + 1) / 10 of the cosine's start
    assert math.isclose(train.learning_rate(args, 100, 50, 999.0), 5e-4)  # half way by steps: the clock is ignored
    assert train.learning_rate(args, 100, 100, 0.0) < 1e-12
    args.minutes = 2  # a time budget: the clock decides, half of 2 minutes is half way
    assert (math.isclose(train.learning_rate(args, 100, 30, 60.0), 5e-4)
            and train.learning_rate(args, 100, 30, 500.0) < 1e-12)
    args.lr_schedule, args.warmup_steps = "constant", 0
    assert train.learning_rate(args, 100, 77, 60.0) == 1e-3  # report C


def test_a_cosine_run_resumes_bit_for_bit_and_ends_near_zero(tiny_data, tmp_path, monkeypatch):
    import math
    cosine = ["--lr-schedule", "cosine", "--warmup-steps", "2", "--epochs", "2"]
    straight = tiny_run(tiny_data, tmp_path / "a", *cosine)
    real_update, calls = train.ema_update, {"n": 0}

    def update_then_sigterm_at_step_3(*args):
        real_update(*args)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "ema_update", update_then_sigterm_at_step_3)
    assert tiny_run(tiny_data, tmp_path / "b", *cosine)["step"] == 4
    monkeypatch.setattr(train, "ema_update", real_update)
    resumed = tiny_run(tiny_data, tmp_path / "b", "--resume")  # the schedule and its length come from the checkpoint
    assert_same_state(straight, resumed)
    last = resumed["optimizer"]["param_groups"][0]["lr"]  # step 5 of 6: 1e-4 * (1 + cos(pi 5/6)) / 2
    assert math.isclose(last, 1e-4 * (1 + math.cos(math.pi * 5 / 6)) / 2, rel_tol=1e-9)


@pytest.mark.parametrize("seconds_a_step,saved_after_epochs", [(50, [1, 2, 3, 4]), (20, [2, 4]), (5, [4])])
def test_checkpoints_are_written_by_the_shared_clock_and_at_the_end(tiny_data, tmp_path, monkeypatch,
                                                                   seconds_a_step, saved_after_epochs):
    # 3 steps an epoch; --save-every 2 minutes on the clock the ranks agree on (here a scripted one): saved when two
    # minutes have passed since the last save, and always after the last epoch
    real_agree, steps, saved = train.agree, [0], []
    def scripted_clock(loss, signal, world, clock=0.0):
        steps[0] += 1
        return real_agree(loss, signal, world, steps[0] * seconds_a_step)
    monkeypatch.setattr(train, "agree", scripted_clock)
    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint",
                        lambda state, path: (saved.append(state["epoch"]), real_save(state, path)))
    ckpt = tiny_run(tiny_data, tmp_path, "--epochs", "4", "--save-every", "2", "--eval-every", "0")
    assert saved == saved_after_epochs and ckpt["epoch"] == 4

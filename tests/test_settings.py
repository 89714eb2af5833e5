"""A run's settings come from one function, in one order: the defaults, the preset, the checkpoint on --resume, the
flags typed."""
import pytest
import torch

from cli import UserError
from conftest import tiny_run
from settings import DEFAULTS, PRESETS, decide


def test_the_defaults_are_report_cs():
    s = decide([])
    assert ((s.image_size, s.n_feat, s.epochs, s.batch_size, s.lr, s.T, s.drop_prob)
            == (64, 128, 300, 128, 1e-4, 400, 0.1))
    assert (s.beta1, s.beta2, s.schedule, s.prediction, s.cross_attn, s.min_snr) == (1e-4, 0.02, "linear", "eps", 0, 0)


def test_the_preset_fills_the_defaults_and_typed_flags_win():
    s = decide(["--preset", "cpu", "--epochs", "3"])
    assert s.epochs == 3  # typed: the preset must not overwrite it
    for key in ("image_size", "n_feat", "batch_size", "lr", "cross_attn", "minutes", "val_w"):
        assert getattr(s, key) == PRESETS["cpu"][key] != getattr(DEFAULTS, key), key


def test_a_resume_takes_the_checkpoints_settings_over_the_defaults_and_the_typed_flags_over_both(tiny_data, tmp_path):
    run = tmp_path / "run"
    tiny_run(tiny_data, run, "--epochs", "1", "--lr", "3e-3", "--val-w", "1.5", "--ema-decay", "0.9")
    s = decide(["--resume", "--out-dir", str(run), "--epochs", "2", "--ema-decay", "0.8"])
    assert (s.image_size, s.n_feat, s.T) == (16, 8, 20)  # the checkpoint's network, not the defaults'
    assert (s.lr, s.val_w) == (3e-3, 1.5)  # the checkpoint's
    assert (s.epochs, s.ema_decay) == (2, 0.8)  # typed: they win
    assert s.out_dir == str(run) and s.resume  # where the checkpoint is read from, never where it says it was


def test_a_resumed_preset_run_keeps_its_checkpoints_values_where_the_preset_differs(tiny_data, tmp_path):
    run = tmp_path / "run"
    tiny_run(tiny_data, run, "--preset", "cpu", "--epochs", "1", "--minutes", "0", "--eval-every", "0",
             "--cross-attn", "0", "--cond-bottleneck", "0", "--lr", "5e-4")
    ckpt = torch.load(run / "ckpt.pt", weights_only=False)
    for key in ("val_w", "val_draws"):
        del ckpt["config"]["train"][key]  # as a checkpoint saved before the setting existed
    torch.save(ckpt, run / "ckpt.pt")
    s = decide(["--resume", "--out-dir", str(run)])
    assert s.preset == "cpu" and s.lr == 5e-4 and s.cross_attn == 0 and s.minutes == 0  # the run's, not the preset's
    assert s.val_w == PRESETS["cpu"]["val_w"] != DEFAULTS.val_w  # not in the checkpoint: the preset's
    assert s.val_draws == 1 != PRESETS["cpu"]["val_draws"]  # but such a run validated with one draw, and goes on so


def test_a_typed_network_setting_that_differs_from_the_checkpoint_is_refused(tiny_data, tmp_path):
    run = tmp_path / "run"
    tiny_run(tiny_data, run, "--epochs", "1")
    with pytest.raises(UserError, match="--n-feat 16 differs from the checkpoint's 8"):
        decide(["--resume", "--out-dir", str(run), "--n-feat", "16"])
    assert decide(["--resume", "--out-dir", str(run), "--n-feat", "8"]).n_feat == 8  # the same value is fine


@pytest.mark.parametrize("argv,message", [
    (["--beta1", "0.03"], "--beta1 0.03: must be below --beta2 0.02"),
    (["--zero-snr", "1"], "add --prediction v"),
    (["--logsnr-draw", "0"], "--logsnr-draw 0: must be MEAN,STD with STD > 0"),
    (["--logsnr-draw", "0,-1"], "--logsnr-draw 0,-1: must be MEAN,STD with STD > 0"),
    (["--logsnr-draw", "50,0.01"], r"--logsnr-draw 50,0.01: MEAN 50 is outside the schedule's log-SNR range "
                                   r"\[-4.03, 9.21\]; choose a MEAN inside it"),
    (["--resume", "--out-dir", "/nonexistent/run"], "nothing to resume"),
])
def test_settings_that_cannot_work_are_one_clear_error(argv, message):
    with pytest.raises(UserError, match=message):
        decide(argv)


def test_a_runs_logsnr_draw_reaches_the_loss_and_its_checkpoint(tiny_data, tmp_path, monkeypatch):
    import schedule
    draws, noisy = [], schedule.Diffusion.noisy

    def spy(self, *args, logsnr_draw=None, **kw):
        draws.append(logsnr_draw)
        return noisy(self, *args, logsnr_draw=logsnr_draw, **kw)
    monkeypatch.setattr(schedule.Diffusion, "noisy", spy)
    ckpt = tiny_run(tiny_data, tmp_path / "run", "--epochs", "1", "--logsnr-draw", "3,0.5")
    assert draws.count([3.0, 0.5]) == 3  # each of the epoch's 3 training steps
    assert ckpt["config"]["train"]["logsnr_draw"] == [3.0, 0.5]


def test_an_epoch_drawn_by_objects_draws_each_image_in_proportion_to_its_objects():
    import train
    cond = torch.zeros(3000, 24)
    for k in (1, 2, 3):
        cond[(k - 1) * 1000:k * 1000, :k] = 1  # a thousand images each of 1, 2 and 3 objects
    order = train.epoch_order(cond, 1, torch.Generator().manual_seed(0))
    n_objects = cond[order].sum(1)
    assert len(order) == 3000
    assert [(n_objects == k).float().mean().item() for k in (1, 2, 3)] == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.03)
    assert sorted(train.epoch_order(cond, 0, torch.Generator().manual_seed(0)).tolist()) == list(range(3000))


def test_a_runs_draw_by_objects_orders_its_epochs_and_reaches_its_checkpoint(tiny_data, tmp_path, monkeypatch):
    import train
    calls, order = [], train.epoch_order
    monkeypatch.setattr(train, "epoch_order", lambda cond, by_objects, gen: (calls.append(by_objects),
                                                                             order(cond, by_objects, gen))[1])
    ckpt = tiny_run(tiny_data, tmp_path / "run", "--epochs", "2", "--draw-by-objects", "1")
    assert calls == [1, 1]
    assert ckpt["config"]["train"]["draw_by_objects"] == 1

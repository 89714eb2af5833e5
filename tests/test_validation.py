"""Honest model selection: a validation list that never meets the test lists, best.pt following the validation
maximum (through a resume too), and the curves picture."""
import json
import os
import time

import pytest
import torch
from PIL import Image

import evaluate
import prepare
import train
from conftest import SHARED_ICLEVR, TINY
from console import first_run_plan
from dataset import draw_val
from settings import decide



def sets(path):
    with open(path) as f:
        return {frozenset(c) for c in json.load(f)}


def test_synthetic_val_never_shares_an_object_set_with_test_or_new_test(tiny_data):
    val = sets(os.path.join(tiny_data, "val.json"))
    assert val and not val & (sets(os.path.join(tiny_data, "test.json"))
                              | sets(os.path.join(tiny_data, "new_test.json")))
    with open(os.path.join(tiny_data, "train.json")) as f:
        assert val <= {frozenset(c) for c in json.load(f).values()}  # drawn like test: sets of training images
    assert len(os.listdir(os.path.join(tiny_data, "truth", "val"))) == 2 * len(val)  # its ground-truth renders


@pytest.mark.skipif(not os.path.isdir(SHARED_ICLEVR), reason="the course's JSON files are not beside the checkout")
def test_val_drawn_from_the_course_train_json_has_64_sets_none_in_test_or_new_test():
    with open(os.path.join(SHARED_ICLEVR, "train.json")) as f:
        train_lists = list(json.load(f).values())
    tests = [json.load(open(os.path.join(SHARED_ICLEVR, f"{s}.json"))) for s in ("test", "new_test")]
    val = draw_val(train_lists, tests)
    assert len(val) == 64 and len({frozenset(c) for c in val}) == 64
    banned = {frozenset(c) for lists in tests for c in lists}
    assert not {frozenset(c) for c in val} & banned
    assert {len(c) for c in val} == {1, 2, 3} and val == draw_val(train_lists, tests)  # fixed seed, same list


class ScriptedJudge:
    """A stand-in classifier whose validation accuracies are given in advance."""

    def __init__(self, scores):
        self.scores = list(scores)

    def eval(self, images, labels):
        assert images.shape[-1] == 64 and len(images) == len(labels)
        return self.scores.pop(0)


def run(tiny_data, out, monkeypatch, scores, *extra):
    monkeypatch.setattr(prepare, "find_judge", lambda s, data_dir, device: ScriptedJudge(scores))
    train.train(decide(["--data-dir", tiny_data, "--out-dir", str(out), *TINY, "--eval-every", "1", *extra]))
    return torch.load(os.path.join(out, "best.pt"), weights_only=False)


def test_best_pt_follows_the_validation_maximum_and_a_tie_keeps_the_later(tiny_data, tmp_path, monkeypatch):
    best = run(tiny_data, tmp_path, monkeypatch, [0.2, 0.5, 0.5, 0.3], "--epochs", "4")
    assert best["epoch"] == 3 and best["best_val"] == 0.5 and best["val_acc"] == 0.5
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["val_acc"] for r in rows] == [0.2, 0.5, 0.5, 0.3]
    last = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert last["epoch"] == 4 and last["best_val"] == 0.5


def test_a_resume_keeps_the_earlier_best(tiny_data, tmp_path, monkeypatch):
    run(tiny_data, tmp_path, monkeypatch, [0.6, 0.2], "--epochs", "2")
    best = run(tiny_data, tmp_path, monkeypatch, [0.3, 0.5], "--epochs", "4", "--resume")
    assert best["epoch"] == 1 and best["best_val"] == 0.6
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["best_val"] == 0.6


def test_curves_png_has_its_size_and_changes_when_an_epoch_is_logged(tiny_data, tmp_path, monkeypatch):
    run(tiny_data, tmp_path, monkeypatch, [0.1, 0.3], "--epochs", "2")
    png = tmp_path / "curves.png"
    with Image.open(png) as im:
        assert im.size == (720, 400)
        assert len(im.convert("RGB").getcolors(maxcolors=10 ** 6)) > 3  # axes, text and two coloured curves
    before = png.read_bytes()
    run(tiny_data, tmp_path, monkeypatch, [0.4], "--epochs", "3", "--resume")
    assert png.read_bytes() != before
    os.remove(png)
    evaluate.run(evaluate.get_args(["--curves", str(tmp_path)]))  # the same picture from any run folder
    assert png.read_bytes() != before and os.path.getsize(png) > 0


def test_on_the_courses_data_without_its_classifier_training_says_so_once_and_carries_on(tiny_data, tmp_path, capsys):
    # no synthetic.json: the course's data, whose only judge is the course's checkpoint.pth, so none is trained
    import shutil
    data = tmp_path / "course"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("synthetic.json", "checkpoint.pth"))
    train.train(decide(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *TINY, "--eval-every", "1",
                                "--epochs", "2"]))
    assert capsys.readouterr().out.count("no classifier at") == 1
    assert not (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "ckpt.pt").exists()
    assert not (data / "checkpoint.pth").exists()


def test_a_spent_time_budget_scores_the_last_state_and_can_keep_it_as_best(tiny_data, tmp_path, monkeypatch):
    # the preset's planned end is its time budget, inside an epoch: that state is scored too (with a cosine
    # learning rate it is usually the best), and logged with its fraction of an epoch
    best = run(tiny_data, tmp_path, monkeypatch, [0.7], "--minutes", "0.02", "--epochs", "100000",
               "--eval-every", "1000")
    assert best["val_acc"] == 0.7 and best["step"] > 0
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["val_acc"] == 0.7 and rows[-1]["step"] == best["step"]
    assert all("val_acc" not in row for row in rows[:-1])


def test_a_first_run_says_its_steps_and_their_times_before_it_starts(tiny_data, tmp_path, monkeypatch):
    import synthetic
    from evaluator import CLASSIFIER_TIME
    monkeypatch.chdir(tmp_path)  # no data/synthetic here: the set would be rendered, then its judge trained
    plan = first_run_plan(decide(["--preset", "cpu"]), torch.device("cpu"), validates=True)
    assert plan.startswith("first run here, once before training: 1) render the synthetic set into data/synthetic")
    assert synthetic.RENDER_TIME in plan and "2) train its classifier" in plan and CLASSIFIER_TIME["cpu"] in plan
    assert "classifier" not in first_run_plan(decide([]), torch.device("cpu"), validates=False)
    with_judge = ["--data-dir", tiny_data, "--classifier", "judge.pth"]  # rendered, and a judge given: nothing to do
    assert first_run_plan(decide(with_judge), torch.device("cpu"), validates=True) is None
    plan = first_run_plan(decide(["--data-dir", tiny_data]), torch.device("cpu"), validates=True)
    assert plan.startswith("first run here, once before training: 1) train its classifier")


class RecordingJudge:
    """A stand-in classifier that keeps the images it is shown; it reads them as the scores given, else 0.5."""

    def __init__(self, scores=()):
        self.images, self.scores = [], list(scores)

    def eval(self, images, labels):
        self.images.append(images.clone())
        return self.scores.pop(0) if self.scores else 0.5


@pytest.mark.parametrize("process", [[], ["--prediction", "v", "--zero-snr", "1"]], ids=["eps", "v,zero-snr"])
def test_validation_draws_what_the_printed_sampling_command_draws(process, tiny_data, tmp_path, monkeypatch, capsys):
    # validated by DDPM (the default), best.pt is chosen on the images the user's next command will make: same
    # sampler, same w, same seed, and the same noise process and prediction, which sample.py reads from the checkpoint
    import sample
    judge = RecordingJudge()
    monkeypatch.setattr(prepare, "find_judge", lambda s, data_dir, device: judge)
    out = tmp_path / "run"
    train.train(decide(["--data-dir", tiny_data, "--out-dir", str(out), *TINY, "--epochs", "1", "--eval-every",
                                "1", "--val-sampler", "ddpm", "--val-w", "3", "--precision", "fp32", *process]))
    next_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert next_line.endswith(f"next: python sample.py --ckpt {out}/best.pt --w 3")
    objects = evaluate.load_objects(tiny_data)
    drawn = {}
    for name, how in {"printed": ["--w", "3"], "ddim": ["--w", "0.5", "--sampler", "ddim"]}.items():
        sample.run(sample.get_args(["--ckpt", str(out / "best.pt"), "--split", "val", *how, "--precision", "fp32",
                                    "--out-dir", str(tmp_path / name)]))
        drawn[name] = evaluate.load_samples(str(tmp_path / name), "val", objects)[0]
    validated = judge.images[-1]
    assert (drawn["printed"] - validated).abs().mean() < 0.01  # PNG rounding and folded BatchNorm apart, the same
    assert (drawn["ddim"] - validated).abs().mean() > 0.05  # the old validation's DDIM at w 0.5 draws other images


def test_val_draws_scores_the_mean_of_that_many_draws_and_the_printed_command_samples_by_ddpm(tiny_data, tmp_path,
                                                                                              monkeypatch, capsys):
    # the preset's validation: several draws of a fast sampler rank the checkpoints; what the user samples next is
    # still DDPM at the validated w
    judge = RecordingJudge([0.2, 0.5, 0.9, 0.1, 0.3, 0.5])  # two validations of three draws each
    monkeypatch.setattr(prepare, "find_judge", lambda s, data_dir, device: judge)
    out = tmp_path / "run"
    train.train(decide(["--data-dir", tiny_data, "--out-dir", str(out), *TINY, "--epochs", "2", "--eval-every", "1",
                        "--val-sampler", "dpm", "--val-steps", "5", "--val-draws", "3", "--val-w", "3"]))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["val_acc"] for r in rows] == pytest.approx([1.6 / 3, 0.3])
    assert torch.load(out / "best.pt", weights_only=False)["epoch"] == 1
    first = judge.images[:3]
    assert all((a - b).abs().mean() > 0.05 for a, b in [(first[0], first[1]), (first[1], first[2])])  # other seeds
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"next: python sample.py --ckpt {out}/best.pt "
                                                                     "--w 3")


class SkippingClock:
    """train.py's `time`, where a validation's seconds are skipped over instead of slept: the test takes no longer
    than its training steps, whatever a step costs on the machine."""

    def __init__(self):
        self.skipped = 0.0

    def time(self):
        return time.time() + self.skipped


@pytest.mark.parametrize("val_s, scores", [(15, "several"), (40, "one"), (70, "one")])
def test_a_validation_that_leaves_less_budget_than_it_took_ends_the_run(val_s, scores, tiny_data, tmp_path,
                                                                          monkeypatch):
    # a 60 s budget: after the first epoch's 3 steps and a 40 s validation under 20 s are left, which would buy a few
    # steps and another 40 s validation, so the run ends there, as it does where a 70 s validation spent the budget;
    # a 15 s validation leaves room to train on
    clock, scored = SkippingClock(), []

    def validation(r):
        clock.skipped += val_s
        scored.append(r.step)
        return 0.5
    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(train, "validate", validation)
    best = run(tiny_data, tmp_path, monkeypatch, [], "--minutes", "1", "--epochs", "100000")
    if scores == "one":
        assert scored == [3] and best["step"] == 3
    else:
        assert len(scored) >= 2 and scored == sorted(set(scored))
    last = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert last["step"] == scored[-1]  # the run ended on a scored state: no step after the last validation

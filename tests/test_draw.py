"""What a user asks sample.py to draw: objects named on the command line, K draws of every condition (scored by
evaluate.py), the denoising strip on request; the course's single draw stays the default."""
import json
import os

import pytest

import evaluate
import sample
from cli import UserError
from conftest import tiny_run

FAST = ["--sampler", "dpm", "--steps", "5", "--precision", "fp32"]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A 1-epoch cross-attention checkpoint (at most 3 object tokens) on the tiny set."""
    out = tmp_path_factory.mktemp("draw") / "run"
    tiny_run(tiny_data, out, "--epochs", "1", "--cross-attn", "1")
    return str(out / "ckpt.pt")


def draw(*argv):
    return sample.run(sample.get_args(list(argv)))


def test_objects_named_on_the_command_line_are_drawn_n_times_in_a_grid(run, tmp_path):
    draw("--ckpt", run, "--out-dir", str(tmp_path), "--objects", "red cube", "blue sphere", "--n", "6", *FAST)
    folder = tmp_path / "red_cube+blue_sphere"
    assert sorted(os.listdir(folder)) == [f"{i}.png" for i in range(6)]
    assert (tmp_path / "red_cube+blue_sphere_grid.png").is_file() and (tmp_path / "denoise_strip.png").is_file()
    assert json.loads((tmp_path / "red_cube+blue_sphere.json").read_text()) == [["red cube", "blue sphere"]] * 6
    assert not (tmp_path / "test").exists()  # no split was drawn


def test_a_misspelled_object_gets_the_did_you_mean_line(run, tmp_path):
    with pytest.raises(UserError,
                       match=r"--objects: entry 0: unknown object name 'red cubes'; did you mean 'red cube'"):
        draw("--ckpt", run, "--out-dir", str(tmp_path), "--objects", "red cubes", *FAST)


def test_more_objects_than_the_network_has_tokens_is_refused(run, tmp_path):
    with pytest.raises(UserError, match="entry 0 has 4 objects; this checkpoint's network reads at most 3"):
        draw("--ckpt", run, "--out-dir", str(tmp_path), "--objects", "red cube", "blue sphere", "gray cylinder",
             "cyan cube", *FAST)


def test_objects_with_a_list_option_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        sample.get_args(["--objects", "red cube", "--n-per-condition", "2"])
    assert e.value.code == 2 and "does not take --conditions or --n-per-condition" in capsys.readouterr().err


def test_k_draws_are_each_scored_and_their_mean_is_the_mean_of_k_single_draws(run, tiny_data, tmp_path):
    judge = os.path.join(tiny_data, "..", "judge_for_draws.pth")
    import torch
    from evaluator import build_classifier
    from rundir import save_checkpoint
    torch.manual_seed(0)
    save_checkpoint({"model": build_classifier().state_dict()}, judge)  # any judge: the arithmetic is the point
    many, single = tmp_path / "many", tmp_path / "single"
    draw("--ckpt", run, "--out-dir", str(many), "--split", "test", "--n-per-condition", "3", "--strip", "0", *FAST)
    assert not (many / "denoise_strip.png").exists()  # --strip 0
    assert json.loads((many / "test_draws.json").read_text())["seeds"] == [0, 1, 2]
    scores = []
    for seed in (0, 1, 2):  # each draw alone, as the default single draw with that seed
        out = single / str(seed)
        draw("--ckpt", run, "--out-dir", str(out), "--split", "test", "--seed", str(seed), "--strip", "0", *FAST)
        scores.append(evaluate.run(evaluate.get_args(["--ckpt", run, "--samples-dir", str(out), "--split", "test",
                                                      "--classifier", judge]))["test"]["accuracy"])
    r = evaluate.run(evaluate.get_args(["--ckpt", run, "--samples-dir", str(many), "--split", "test",
                                        "--classifier", judge]))["test"]
    assert r["draws"] == pytest.approx(scores, abs=1e-12)  # draw k is the single draw of seed k
    assert r["accuracy"] == scores[0]  # the course's figure: draw 0
    assert sum(r["draws"]) / 3 == pytest.approx(sum(scores) / 3)


def test_the_default_is_one_draw_and_the_strip(run, tmp_path):
    draw("--ckpt", run, "--out-dir", str(tmp_path), "--split", "test", *FAST)
    assert (tmp_path / "denoise_strip.png").is_file()
    assert all("_" not in name for name in os.listdir(tmp_path / "test"))  # only <i>.png
    assert json.loads((tmp_path / "test_draws.json").read_text())["seeds"] == [0]

"""The noise-process object and the settings function changed no behaviour: against the code of commit 99be55e (the
last one before them, read from git), a checkpoint it saved samples the same images bit for bit, and the CPU
preset's first 50 steps give the same losses. Skipped where the clone has no history."""
import json
import os
import subprocess
import sys

import pytest

from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "99be55e"


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("before")
    try:
        archive = subprocess.run(["git", "-C", ROOT, "archive", BEFORE], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"commit {BEFORE} is not in this clone's history")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return str(folder)


def python(tree, *argv):
    env = {**os.environ, "ICLEVR_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, *argv], cwd=tree, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_a_checkpoint_saved_before_samples_the_same_images_bit_for_bit(old_tree, tiny_data, tmp_path):
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    python(old_tree, "train.py", "--data-dir", tiny_data, "--out-dir", str(tmp_path / "run"), *TINY, "--epochs", "2",
           "--cross-attn", "1", "--cond-bottleneck", "1", "--min-snr", "1")
    for how in (["--sampler", "ddpm"], ["--sampler", "ddim", "--steps", "7", "--w", "2"]):
        for tree, out in ((old_tree, "before"), (ROOT, "after")):
            python(tree, "sample.py", "--ckpt", ckpt, "--out-dir", str(tmp_path / out), "--split", "test",
                   "--precision", "fp32", "--seed", "3", *how)
        for name in ["test_grid.png", "denoise_strip.png"] + [f"test/{i}.png" for i in range(4)]:
            before, after = ((tmp_path / out / name).read_bytes() for out in ("before", "after"))
            assert before == after, (how, name)


RECORD = """
import json, sys
sys.path.insert(0, {tree!r})
import train
losses, real_step = [], train.train_step
def recorded(*a, **k):
    out = real_step(*a, **k)
    losses.append(out[0])
    return out
train.train_step = recorded
argv = {argv!r}
if hasattr(train, "get_args"):
    train.train(train.get_args(argv))
else:
    from settings import decide
    train.train(decide(argv))
json.dump(losses, open({out!r}, "w"))
"""


def test_the_cpu_presets_first_50_steps_give_the_same_losses(old_tree, tiny_data, tmp_path):
    losses = {}
    for tree, name in ((old_tree, "before"), (ROOT, "after")):
        argv = ["--preset", "cpu", "--data-dir", tiny_data, "--out-dir", str(tmp_path / name), "--epochs", "25",
                "--minutes", "0", "--eval-every", "0", "--sample-every", "0", "--precision", "fp32",
                "--channels-last", "0"]  # 36 images in batches of 16: 2 steps an epoch
        python(tree, "-c", RECORD.format(tree=tree, argv=argv, out=str(tmp_path / f"{name}.json")))
        losses[name] = json.load(open(tmp_path / f"{name}.json"))
    assert len(losses["before"]) == 50 and losses["after"] == losses["before"]

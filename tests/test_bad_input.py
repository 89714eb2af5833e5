"""Every user mistake: one line naming the file or value and the fix, exit status 2, no traceback, nothing harmed."""
import json
import os
import shutil
import sys

import pytest
import torch

import bench
import evaluate
import evaluator
import sample
import synthetic
import settings
import train
from cli import Number, Numbers
from conftest import TINY
from settings import decide



@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A copy of the tiny data and a 1-epoch checkpoint trained on it."""
    root = tmp_path_factory.mktemp("bad")
    data = str(root / "data")
    shutil.copytree(tiny_data, data)
    out = str(root / "run")
    train.train(decide(["--data-dir", data, "--out-dir", out, *TINY, "--epochs", "1"]))
    return data, out


def fails(script, argv, capsys, monkeypatch, expect):
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *argv])
    with pytest.raises(SystemExit) as e:
        script.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert "Traceback" not in err
    line = err.splitlines()[-1]  # progress bars may come before it
    assert line.startswith("error: ") and err.count("error: ") == 1, err
    assert expect in line, line
    return line


def write(path, content):
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_sampling_mistakes(trained, tmp_path, capsys, monkeypatch):
    data, out = trained
    ckpt = f"{out}/ckpt.pt"
    fails(sample, ["--ckpt", ckpt, "--conditions", write(tmp_path / "c.json", [["red sphere", "bleu cube"]])],
          capsys, monkeypatch, "unknown object name 'bleu cube'; did you mean 'blue cube'?")
    fails(sample, ["--ckpt", ckpt, "--conditions", write(tmp_path / "e.json", [[]])], capsys, monkeypatch,
          "entry 0 is []")
    fails(sample, ["--ckpt", ckpt, "--conditions", write(tmp_path / "r.json", [["red cube", "red cube"]])],
          capsys, monkeypatch, "'red cube' appears twice")
    fails(sample, ["--ckpt", ckpt, "--conditions", write(tmp_path / "m.json", "[[\"red cube\"")], capsys,
          monkeypatch, "m.json: malformed JSON")
    fails(sample, ["--ckpt", ckpt, "--split", "valid"], capsys, monkeypatch, "--split valid: no such split")
    fails(sample, ["--ckpt", ckpt, "--w", "-1"], capsys, monkeypatch, "--w -1: must be a guidance weight >= 0")
    fails(sample, ["--ckpt", str(tmp_path / "none.pt")], capsys, monkeypatch, "checkpoint not found")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(open(ckpt, "rb").read()[:5000])
    fails(sample, ["--ckpt", str(truncated)], capsys, monkeypatch, "not a usable checkpoint")
    other = torch.load(ckpt, weights_only=False)
    other["config"]["model"]["n_feat"] = 16  # weights of one configuration under another's name
    torch.save(other, tmp_path / "other.pt")
    fails(sample, ["--ckpt", str(tmp_path / "other.pt")], capsys, monkeypatch, "not a usable checkpoint")
    a_file = write(tmp_path / "file", "x")
    fails(sample, ["--ckpt", ckpt, "--out-dir", f"{a_file}/sub"], capsys, monkeypatch, "cannot be written")
    if not torch.cuda.is_available():
        fails(sample, ["--ckpt", ckpt, "--device", "cuda"], capsys, monkeypatch, "CUDA is not available")


def test_training_mistakes(trained, tmp_path, capsys, monkeypatch):
    data, out = trained
    args = ["--out-dir", str(tmp_path / "t"), *TINY, "--epochs", "1"]
    fails(train, ["--data-dir", str(tmp_path / "nowhere"), *args], capsys, monkeypatch, "data folder not found")
    fails(train, ["--data-dir", data, *args, "--logsnr-draw", "-1,2"], capsys, monkeypatch,
          "--logsnr-draw: expected one argument (a value that starts with '-' is written --logsnr-draw=VALUE")
    fails(train, ["--data-dir", data, *args, "--logsnr-draw", "-.5,2"], capsys, monkeypatch, "--logsnr-draw=VALUE")
    fails(train, ["--data-dir", data, *args, "--image-size", "30"], capsys, monkeypatch,
          "--image-size 30: must be a multiple of 4 (the network halves it twice)")
    fails(train, ["--data-dir", data, "--image-dir", str(tmp_path / "noimg"), *args], capsys, monkeypatch,
          "image folder not found")
    bad = tmp_path / "baddata"
    shutil.copytree(data, bad)
    for f in bad.glob("cache_*"):
        f.unlink()
    train_json = json.loads((bad / "train.json").read_text())
    first = next(iter(train_json))
    os.remove(bad / "iclevr" / first)
    fails(train, ["--data-dir", str(bad), *args], capsys, monkeypatch, f"{first}: image file not found")
    (bad / "iclevr" / first).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    fails(train, ["--data-dir", str(bad), *args], capsys, monkeypatch, f"{first}: unreadable or truncated PNG")
    train_json[first] = ["red cubes"]
    write(bad / "train.json", train_json)
    fails(train, ["--data-dir", str(bad), *args], capsys, monkeypatch, "unknown object name 'red cubes'")
    before = open(f"{out}/ckpt.pt", "rb").read()
    fails(train, ["--data-dir", data, "--out-dir", out, "--n-feat", "32", "--resume"], capsys, monkeypatch,
          "--n-feat 32 differs from the checkpoint's 8")
    assert open(f"{out}/ckpt.pt", "rb").read() == before  # nothing on disk touched


def test_evaluation_mistakes(trained, tmp_path, capsys, monkeypatch):
    data, out = trained
    fails(evaluate, ["--ckpt", f"{out}/ckpt.pt", "--split", "test"], capsys, monkeypatch, "no sampled split 'test'")
    samples = tmp_path / "s"
    os.makedirs(samples / "test")
    write(samples / "test.json", [["red cube"]])
    fails(evaluate, ["--ckpt", f"{out}/ckpt.pt", "--samples-dir", str(samples), "--split", "test"], capsys,
          monkeypatch, "0.png: image missing")
    from PIL import Image
    Image.new("RGB", (32, 32)).save(samples / "test" / "0.png")
    fails(evaluate, ["--ckpt", f"{out}/ckpt.pt", "--samples-dir", str(samples), "--split", "test"], capsys,
          monkeypatch, "image is 32x32, the classifier needs 64x64")
    Image.new("RGB", (64, 64)).save(samples / "test" / "0.png")
    fails(evaluate, ["--ckpt", f"{out}/ckpt.pt", "--samples-dir", str(samples), "--split", "test",
                     "--classifier", str(tmp_path / "none.pth")], capsys, monkeypatch, "classifier weights not found")


PARSERS = {settings: settings.make_parser, sample: sample.make_parser, evaluate: evaluate.make_parser,
           evaluator: evaluator.make_parser, synthetic: synthetic.make_parser, bench: bench.make_parser}


def out_of_range(number: Number) -> list:
    """Values each numeric option must refuse: not a number, not finite, just outside each bound, off the multiple."""
    step = 1 if number.kind is int else 0.5
    bad = ["abc", "nan", "inf"] if number.kind is float else ["abc", "1.5"]
    if number.lo is not None:
        bad.append(str(number.kind(number.lo if number.lo_open else number.lo - step)))
    if number.hi is not None:
        bad.append(str(number.kind(number.hi if number.hi_open else number.hi + step)))
    if number.multiple > 1:
        bad.append(str(number.lo + 1))
    return [f"0,{v}" for v in bad] if isinstance(number, Numbers) else bad


def test_every_numeric_option_of_every_script_has_a_checked_range(capsys):
    for script, make_parser in PARSERS.items():
        parser = make_parser()
        numeric = [a for a in parser._actions if a.option_strings and a.nargs != 0 and (
            a.type in (int, float) or isinstance(a.type, Number) or type(a.default) in (int, float))]
        assert numeric, script.__name__
        for action in numeric:  # an option added later as a plain type=int or type=float fails here
            flag = action.option_strings[0]
            assert isinstance(action.type, Number), f"{script.__name__}.py {flag}: a number without a checked range"
            default = (getattr(parser.defaults, action.dest, None) if action.default == "==SUPPRESS=="
                       else action.default)
            if default is not None:  # train.py's defaults live in Settings
                assert all(map(action.type.ok, default if isinstance(action.type, Numbers) else [default])), flag
            for value in out_of_range(action.type):
                with pytest.raises(SystemExit) as e:
                    make_parser().parse_args([flag, value])
                err = capsys.readouterr().err.strip().splitlines()
                assert e.value.code == 2 and len(err) == 1, (flag, value, err)
                assert err[0].startswith(f"error: {flag} {value}: ") and "must be" in err[0], err[0]


@pytest.mark.parametrize("script,argv,expect", [
    (train, ["--batch-size", "0"], "--batch-size 0: must be a positive integer (default 128)"),
    (train, ["--lr", "-1"], "--lr -1: must be a number > 0"),
    (train, ["--T", "0"], "--T 0: must be an integer >= 2"),
    (train, ["--n-feat", "0"], "--n-feat 0: must be a multiple of 8"),
    (train, ["--n-feat", "12"], "--n-feat 12: must be a multiple of 8 (the network's GroupNorms have 8 groups), "
                                "such as 128 (default 128)"),
    (train, ["--drop-prob", "1.5"], "--drop-prob 1.5: must be a probability in [0, 1] (default 0.1)"),
    (train, ["--ema-decay", "1.5"], "--ema-decay 1.5: must be a decay in [0, 1) (default 0.999)"),
    (train, ["--beta2", "2"], "--beta2 2: must be a noise variance in (0, 1)"),
    (train, ["--beta1", "0.05"], "--beta1 0.05: must be below --beta2 0.02"),
    (train, ["--minutes", "-1"], "--minutes -1: must be a number >= 0"),
    (train, ["--eval-every", "-3"], "--eval-every -3: must be an integer >= 0"),
    (sample, ["--steps", "0", "--sampler", "ddim"], "--steps 0: must be a positive integer"),
    (sample, ["--w", "nan"], "--w nan: must be a guidance weight >= 0"),
    (sample, ["--w-interval", "0.8,0.2"], "--w-interval 0.8,0.2: must be two fractions LO,HI with LO <= HI"),
    (sample, ["--w-interval", "0.2,1.5"], "--w-interval 0.2,1.5: each value must be a fraction of T in [0, 1]"),
    (train, ["--cross-attn", "3"], "--cross-attn 3: must be 0, 1 or 2 (default 0)"),
    (train, ["--zero-snr", "1"], "--zero-snr 1 with --prediction eps: at zero SNR the noise is x_T itself"),
    (evaluate, ["--sweep", "0,abc"], "--sweep 0,abc: each value must be a guidance weight >= 0 ('abc' is not)"),
    (evaluator, ["--train", "--epochs", "0"], "--epochs 0: must be a positive integer"),
    (synthetic, ["--scenes", "0"], "--scenes 0: must be a positive integer"),
    (bench, ["--batch-size", "-4"], "--batch-size -4: must be a positive integer"),
])
def test_the_numbers_a_new_user_mistypes(script, argv, expect, capsys, monkeypatch):
    fails(script, argv, capsys, monkeypatch, expect)


def test_ddim_steps_above_t_are_clipped_with_a_notice(trained, tmp_path, capsys, monkeypatch):
    data, out = trained
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", f"{out}/ckpt.pt", "--out-dir", str(tmp_path), "--split",
                                      "test", "--sampler", "ddim", "--steps", "100000"])
    sample.main()
    assert "note: --steps 100000 is more than the checkpoint's T = 20: ddim takes 20 steps" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "test")) == 32


def test_more_objects_than_the_networks_object_tokens_is_refused_by_entry(trained, tmp_path, capsys, monkeypatch):
    data, _ = trained
    out = str(tmp_path / "attn")
    train.train(decide(["--data-dir", data, "--out-dir", out, *TINY, "--epochs", "1", "--cross-attn", "1"]))
    four = tmp_path / "four.json"
    four.write_text(json.dumps([["red cube"], ["red cube", "blue cube", "gray sphere", "cyan cylinder"]]))
    fails(sample, ["--ckpt", f"{out}/ckpt.pt", "--conditions", str(four), "--out-dir", str(tmp_path / "s")], capsys,
          monkeypatch, f"{four}: entry 1 has 4 objects; this checkpoint's network reads at most 3 (one token each)")

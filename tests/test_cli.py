"""The three commands end to end on a tiny synthetic folder, on CPU, as a user runs them."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, ok=True):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def test_train_sample_evaluate_end_to_end(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    run("train.py", "--data-dir", tiny_data, "--out-dir", out, "--epochs", "1", "--image-size", "16",
        "--n-feat", "16", "--batch-size", "12", "--T", "20", "--sample-every", "1")
    assert os.path.isfile(f"{out}/ckpt.pt") and os.path.isfile(f"{out}/progress/epoch_0001.png")
    with open(f"{out}/metrics.jsonl") as f:
        assert json.loads(f.readline())["epoch"] == 1
    p = run("sample.py", "--ckpt", f"{out}/ckpt.pt", "--w", "0.5")
    for split in ("test", "new_test"):
        assert len(os.listdir(f"{out}/samples/{split}")) == 32
        assert os.path.isfile(f"{out}/samples/{split}_grid.png")
    assert os.path.isfile(f"{out}/samples/denoise_strip.png") and "done:" in p.stdout
    run("evaluator.py", "--train", "--data-dir", tiny_data, "--epochs", "1", "--batch-size", "16",
        "--out", str(tmp_path / "clf.pth"))
    p = run("evaluate.py", "--split", "both", "--ckpt", f"{out}/ckpt.pt", "--classifier", str(tmp_path / "clf.pth"))
    summary = p.stdout.strip().splitlines()[-1]
    assert summary.startswith("summary: test ") and "new_test" in summary
    assert 0 <= float(summary.split()[2]) <= 1
    assert "Frechet distance to ground-truth renders" in p.stdout  # the tiny set has ground-truth renders
    run("sample.py", "--ckpt", f"{out}/ckpt.pt", "--split", "val", "--sampler", "ddim", "--steps", "5")
    with open(os.path.join(tiny_data, "val.json")) as f:
        assert len(os.listdir(f"{out}/samples/val")) == len(json.load(f))
    p = run("evaluate.py", "--split", "val", "--ckpt", f"{out}/ckpt.pt", "--classifier", str(tmp_path / "clf.pth"))
    assert p.stdout.strip().splitlines()[-1].startswith("summary: val ")
    p = run("evaluate.py", "--ckpt", f"{out}/ckpt.pt", "--classifier", str(tmp_path / "clf.pth"),
            "--sweep", "0,2", "--seeds", "0,1", "--steps", "5", "--split", "val")
    with open(f"{out}/samples/sweep_ddim5.json") as f:
        assert [row["w"] for row in json.load(f)] == [0.0, 2.0] and "val" in p.stdout
    p = run("evaluate.py", "--ckpt", f"{out}/ckpt.pt", "--classifier", str(tmp_path / "clf.pth"),
            "--sweep", "0,2", "--seeds", "0,1", "--steps", "5")
    with open(f"{out}/samples/sweep_ddim5.json") as f:
        table = json.load(f)
    assert [row["w"] for row in table] == [0.0, 2.0]
    assert all(len(row[s]["per_seed"]) == 2 and row[s]["frechet"] >= 0 for row in table for s in ("test", "new_test"))
    assert "guidance sweep" in p.stdout


def test_the_preset_is_what_the_readme_says():
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().split("# --preset cpu is:", 1)[1].splitlines()
    line = lines[0] + " " + " ".join(l[1:] for l in lines[1:] if l.startswith("#   "))  # its continued lines
    from settings import decide
    spelled_out, preset = vars(decide(line.split())), vars(decide(["--preset", "cpu"]))
    for key in preset:
        if key != "preset":
            assert spelled_out[key] == preset[key], key


def readme_cpu_block() -> list:
    """The commands of the README's "On a CPU: the preset" block, in order, as written (comments dropped)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("## On a CPU: the preset", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("python ")]


def test_the_readme_cpu_block_runs_as_written_on_a_fresh_folder(tiny_data, tmp_path):
    # a fresh machine: the synthetic set at its default place and no classifier yet. The block's words are run as
    # they are; only size and time are made tiny, by flags appended to the training line (explicit flags win)
    import shlex
    import shutil
    shutil.copytree(tiny_data, tmp_path / "data" / "synthetic", ignore=shutil.ignore_patterns("checkpoint.pth"))
    tiny = ["--image-size", "16", "--n-feat", "8", "--T", "20", "--batch-size", "12", "--epochs", "2",
            "--eval-every", "1"]
    commands = readme_cpu_block()
    assert [c.split()[1] for c in commands] == ["train.py", "sample.py", "evaluate.py"]
    outputs = []
    for command in commands:
        argv = shlex.split(command)[1:]
        argv = [os.path.join(ROOT, argv[0]), *argv[1:], *(tiny if argv[0] == "train.py" else [])]
        p = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, command + "\n" + p.stdout[-2000:] + p.stderr[-2000:]
        outputs.append(p.stdout)
    assert "no classifier at data/synthetic/checkpoint.pth: the data is synthetic, so training one" in outputs[0]
    assert outputs[0].strip().splitlines()[-1].endswith(f"next: {commands[1]}")  # training names the block's next line
    assert "ckpt out/best.pt" in commands[1] and "out/best.pt (epoch" in outputs[1]  # the checkpoint the user named
    assert outputs[2].strip().splitlines()[-1].startswith("summary: test ")


def test_the_readme_pictures_come_from_a_run_and_each_stays_under_150_kb(tiny_data, tmp_path):
    out, docs = str(tmp_path / "run"), tmp_path / "docs"
    os.makedirs(docs)
    run("train.py", "--data-dir", tiny_data, "--out-dir", out, "--epochs", "1", "--image-size", "16", "--n-feat", "8",
        "--batch-size", "12", "--T", "20", "--sample-every", "0")
    run("sample.py", "--ckpt", f"{out}/ckpt.pt", "--sampler", "ddim", "--steps", "5")
    run("sample.py", "--ckpt", f"{out}/ckpt.pt", "--objects", "red cube", "blue sphere", "yellow cylinder", "--n", "16",
        "--sampler", "dpm", "--steps", "5", "--strip", "0")
    p = run("evaluate.py", "--ckpt", f"{out}/ckpt.pt", "--pictures", out, "--docs", str(docs))
    import evaluate
    assert sorted(os.listdir(docs)) == sorted(evaluate.README_PICTURES) and "wrote" in p.stdout
    assert all(0 < os.path.getsize(docs / name) <= 150_000 for name in evaluate.README_PICTURES)

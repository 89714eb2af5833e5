"""A first run on a GPU machine, as one command that finishes within its --minutes and leaves every figure even
where a step fails: the environment, the CUDA tests, the synthetic set and its judge, bench.py, then report C's
recipe and the GPU preset, each trained for a share of the time left, its w chosen on val, then sampled and scored
on test and new_test once.

    PYTHONUNBUFFERED=1 python gpu_run.py --out $OUT --minutes 9.5     # on the lent GPU machine
    python gpu_run.py --out /tmp/tiny --tiny                          # the same steps in a minute on a CPU

OUT gets log.txt (every step's output under a header), summary.json and summary.md (each step's status, seconds
and figures), rewritten after every step and figure; give a new OUT each time (a run folder holds one run).
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
WS = "0.5,1,2,3"  # guidance weights tried on val


def recipes(tiny: bool) -> dict:
    """Training flags of the two runs; --tiny replaces both with a network that trains in seconds on a CPU."""
    if tiny:
        small = ["--image-size", "16", "--n-feat", "8", "--batch-size", "12", "--T", "20", "--epochs", "2",
                 "--eval-every", "1", "--sample-every", "0", "--device", "cpu"]
        return {"report_c": small, "gpu_preset": small + ["--cross-attn", "1", "--val-sampler", "dpm",
                                                          "--val-steps", "5"]}
    return {"report_c": ["--epochs", "1000", "--eval-every", "5"], "gpu_preset": ["--preset", "gpu"]}


class Campaign:
    def __init__(self, out: str, deadline: float):
        self.out, self.deadline, self.steps, self.figures = out, deadline, [], {}
        os.makedirs(out, exist_ok=True)
        self.log = open(os.path.join(out, "log.txt"), "a")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, argv: list, cap: float = None, needs: list = ()) -> str:
        """Run one step as a subprocess, its output teed into log.txt; returns its output ('' if it did not run).
        A step whose inputs are missing is skipped; one that fails or runs out of time is recorded and the next
        one goes on."""
        missing = [p for p in needs if not os.path.exists(p)]
        cap = max(1.0, min(cap or self.left(), self.left()))
        if missing or self.left() < 5:
            self.record(name, "skipped", 0.0, f"missing {', '.join(missing)}" if missing else "no time left")
            return ""
        header = f"\n===== {name}: {' '.join(argv)} (at most {cap:.0f} s)\n"
        self.log.write(header)
        print(header, end="", flush=True)
        t0, lines = time.monotonic(), []
        # a session of its own, so that a step's worker processes (render pool, compile workers) go with it
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        reader = threading.Thread(target=self.tee, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            status = "ok" if proc.wait(timeout=cap) == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:  # a silent hang too: the cap does not wait for a line
            os.killpg(proc.pid, signal.SIGTERM)  # train.py saves on SIGTERM
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = "timed out"
        reader.join(timeout=5)
        self.record(name, status, time.monotonic() - t0)
        return "".join(lines)

    def tee(self, stream, lines: list) -> None:
        for line in stream:  # a line at a time: the log holds what a killed step said
            lines.append(line)
            self.log.write(line)
            print(line, end="", flush=True)

    def record(self, name: str, status: str, seconds: float, why: str = "") -> None:
        self.steps.append({"step": name, "status": status, "seconds": round(seconds, 1), "why": why})
        self.save()

    def save(self) -> None:
        """summary.json and summary.md as they stand: written after every step and every figure."""
        self.log.flush()
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump({"steps": self.steps, "figures": self.figures}, f, indent=1)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write("| step | status | seconds |\n| --- | --- | --- |\n")
            f.writelines(f"| {s['step']} | {s['status']} {s['why']} | {s['seconds']} |\n" for s in self.steps)
            f.writelines(f"\n{k}: {json.dumps(v)}" for k, v in self.figures.items())


def read_rows(path: str) -> list:
    """metrics.jsonl's rows; none where the run wrote none, and not a line cut off by a kill."""
    rows = []
    for line in open(path) if os.path.isfile(path) else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def train_and_score(c: Campaign, name: str, flags: list, minutes: float, data: str, py: list, device: str) -> None:
    """Train for `minutes`, choose w on val with DDPM 400, the sampler that draws the reported images, then score
    test and new_test once at that w."""
    run_dir = os.path.join(c.out, "runs", name)
    c.run(f"{name}: train", [*py, "train.py", "--data-dir", data, "--out-dir", run_dir, *flags, "--minutes",
                             f"{minutes:.2f}"], cap=60 * minutes + 120)
    rows = read_rows(os.path.join(run_dir, "metrics.jsonl"))
    c.figures[name] = {"epochs": rows[-1]["epoch"], "steps": rows[-1]["step"],
                       "images_per_s": [round(r["images_per_s"]) for r in rows[1:4] or rows],
                       "val_acc": [(r["epoch"], r["val_acc"]) for r in rows if "val_acc" in r]} if rows else {}
    c.save()
    ckpt = os.path.join(run_dir, "best.pt")
    ckpt = ckpt if os.path.isfile(ckpt) else os.path.join(run_dir, "ckpt.pt")
    sampler = ["--sampler", "ddpm"]
    ws, seeds = ("0.5,2", "0") if device == "cpu" else (WS, "0,1")  # the tiny walk: fewer draws
    sweep = c.run(f"{name}: w on val", [*py, "evaluate.py", "--ckpt", ckpt, "--split", "val", "--sweep", ws,
                                        "--seeds", seeds, *sampler, "--device", device], needs=[ckpt])
    table = [(float(m[0]), float(m[1])) for m in re.findall(r"^\s*([\d.]+)\s+([\d.]+) \+-", sweep, re.M)]
    if not table:
        return
    w = max(table, key=lambda row: row[1])[0]  # chosen on val only
    c.figures[name].update({"val_by_w": table, "w": w})
    c.save()
    c.run(f"{name}: sample", [*py, "sample.py", "--ckpt", ckpt, "--w", str(w), *sampler, "--device", device,
                              "--n-per-condition", "2"], needs=[ckpt])
    scored = c.run(f"{name}: score", [*py, "evaluate.py", "--ckpt", ckpt, "--split", "both", "--device", device])
    found = re.search(r"summary: test ([\d.]+)\s+new_test ([\d.]+)", scored)
    draws = re.findall(r"over (\d+) draws of each condition: ([\d.]+) \+- ([\d.]+)", scored)
    if found:
        c.figures[name].update({"test": float(found[1]), "new_test": float(found[2]), "draws_mean_sd": draws})
        c.save()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where log.txt and the summaries go")
    p.add_argument("--minutes", type=float, default=9.5, help="the whole campaign's time")
    p.add_argument("--data-dir", default="data/synthetic", help="rendered here (16 processes) unless it has train.json")
    p.add_argument("--c-share", type=float, default=0.5, help="report C's share of the training time left")
    p.add_argument("--tiny", action="store_true", help="a tiny set, network and judge on the CPU: tests the flow")
    args = p.parse_args(argv)
    c = Campaign(args.out, time.monotonic() + 60 * args.minutes)
    py, device = [sys.executable], "cpu" if args.tiny else "cuda"
    data = os.path.abspath(args.data_dir)
    c.run("environment", [*py, "-c", "import os, subprocess, torch; print('torch', torch.__version__, 'cuda', "
          "torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', "
          "os.cpu_count(), 'CPUs, commit', subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], "
          "capture_output=True, text=True).stdout.strip())"], cap=60)
    if not args.tiny:
        c.run("CUDA tests", [*py, "-m", "pytest", "-q", "-x", "tests/test_cuda.py"], cap=150)
    if not os.path.isfile(os.path.join(data, "train.json")):
        scenes = ["--scenes", "12"] if args.tiny else []
        c.run("render", [*py, "synthetic.py", "--out", data, "--workers", "1" if args.tiny else "16", *scenes], cap=180)
    c.run("judge", [*py, "evaluator.py", "--train", "--data-dir", data, "--device", device,
                    *(["--epochs", "1", "--batch-size", "16"] if args.tiny else [])], cap=180,
          needs=[os.path.join(data, "train.json")])
    if not args.tiny:  # bench.py has its own test
        c.figures["bench"] = c.run("bench", [*py, "bench.py", "--train-steps", "10", "--compile", "1"],
                                   cap=90).splitlines()[-16:]
    flags = recipes(args.tiny)
    training = max(0.2, (c.left() - 180) / 60 - 1.5)  # what is left after fixed costs: 3 minutes of sampling, scoring
    for name, minutes in (("report_c", lambda: training * args.c_share), ("gpu_preset", lambda: (c.left() - 90) / 60)):
        try:  # a surprise in one run's outputs must not cost the other run
            train_and_score(c, name, flags[name], max(0.1, minutes()), data, py, device)
        except Exception as e:
            c.record(f"{name}: reading its outputs", f"crashed ({type(e).__name__}: {e})", 0.0)
    c.record("end", "ok", 0.0)
    return {"steps": c.steps, "figures": c.figures}


if __name__ == "__main__":
    main()

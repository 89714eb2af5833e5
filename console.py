"""What a training run says: its plan before it starts, its first line, the time a CPU will take, each epoch's line
(and metrics.jsonl row), and the last line with the next command. Only rank 0 speaks."""
import json
import os
import time

import torch
from tqdm import tqdm

from model import count_params
from rundir import BEST, CKPT, plot_curves

DEFAULT_DATA_DIR = "data/synthetic"


def first_run_plan(s, device: torch.device, validates: bool) -> str:
    """What a first run does once before it trains, said before it starts, with each step's time measured on the
    2-core CPU (docs/RESULTS.md), so that a user knows the wait before it begins; None when there is nothing to do."""
    import synthetic
    from evaluator import CLASSIFIER_TIME, will_train_judge
    render = not s.data_dir and not os.path.isfile(os.path.join(DEFAULT_DATA_DIR, "train.json"))
    judge = validates and will_train_judge(s.data_dir or DEFAULT_DATA_DIR, s.classifier, rendering=render)
    steps = ([f"render the synthetic set into {DEFAULT_DATA_DIR} ({synthetic.RENDER_TIME})"] if render else []) + \
            ([f"train its classifier, which scores the validation list ({CLASSIFIER_TIME[device.type]})"] if judge
             else [])
    if not steps:
        return None
    return ("first run here, once before training: " + "; then ".join(f"{i + 1}) {s}" for i, s in enumerate(steps)) +
            "; each shows its time left as it goes")


def cpu_time_line(s, per_step: float, steps: int, n_batches: int, compiled: bool = False) -> str:
    """Said before a CPU run starts: what the --minutes budget buys, or how long a run without one takes (full-size
    settings take days on a CPU: better said up front than by a slow bar), and what to run instead. None for a
    run under half an hour. per_step is an eager step's time, which a compiled run beats after its compile."""
    eager = "; timed eager: compiled, it trains more after the compile" if compiled else ""
    if s.minutes and 60 * s.minutes < per_step * steps:
        buys = int(60 * s.minutes / per_step)
        return (f"on this CPU: about {per_step:.3f}s per step, so the {s.minutes:g}-minute budget trains about {buys} "
                f"steps ({buys / n_batches:.1f} epochs){eager}")
    if not s.minutes and per_step * steps > 1800:
        return (f"on this CPU: about {per_step:.2f}s per step, so these {steps} steps take about "
                f"{per_step * steps / 3600:.1f} h; stop with Ctrl-C (it saves), and on a CPU run python train.py "
                f"--preset cpu instead (25 minutes), or add --minutes M; the full run is for a GPU{eager}")
    return None


def describe(s, r, device: torch.device, n_batches: int, compiled: bool = False) -> str:
    """The run's first line: the network, the data, the step, the device and its switches."""
    return (f"ContextUnet: {count_params(r.model) / 1e6:.2f}M parameters, {s.image_size}px, n_feat {s.n_feat}; "
            f"{len(r.images)} images from {s.data_dir}; {n_batches} steps/epoch of {r.bs * r.world}"
            f"{f' ({r.world} processes x {r.bs})' if r.world > 1 else ''}; device {device}, {r.precision}"
            f"{', channels_last' if r.channels_last else ''}{', fused Adam' if r.opt.param_groups[0]['fused'] else ''}"
            f"{', compiled (the first step waits a minute or two for it; --compile 0: eager)' if compiled else ''}"
            f"{f', stops after {s.minutes:g} min' if s.minutes else ''}")


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def time_left(s, t_start: float, steps_done: int, steps_left: int) -> float:
    """Seconds this invocation has left: the steps still to train at the rate so far, cut by --minutes."""
    elapsed = time.time() - t_start
    left = elapsed / max(steps_done, 1) * steps_left
    return min(left, 60 * s.minutes - elapsed) if s.minutes else left


def log_epoch(r, log, epoch: float, seconds: float, loss: float, steps: int, t_start: float, val_acc, left: float,
              saved: bool = True) -> None:
    """One line of metrics.jsonl, the curves picture, and the epoch's line on the console (epoch: epochs done, with
    a fraction where a stop ends the run inside one)."""
    s = r.cfg
    row = {"epoch": round(epoch, 3), "step": r.step, "loss": loss, "images_per_s": steps * r.bs * r.world / seconds,
           "epoch_s": round(seconds, 2), "elapsed_s": round(time.time() - t_start, 1),
           **({"val_acc": val_acc} if val_acc is not None else {})}
    log.write(json.dumps(row) + "\n")
    log.flush()
    plot_curves(s.out_dir)
    tqdm.write(f"epoch {epoch:g}/{s.epochs}  loss {loss:.4f}  {row['images_per_s']:.0f} img/s"
               f"{f'  val {val_acc:.3f} (best {r.best_val:.3f})' if val_acc is not None else ''}  "
               f"{fmt_time(left)} left{f'  saved {os.path.join(s.out_dir, CKPT)}' if saved else ''}")


def next_command(s) -> str:
    """The README's next step after training: sample the best checkpoint where validation kept one, at the w it was
    validated with, by sample.py's DDPM 400 (a faster --val-sampler only ranks checkpoints; sample.py's default w
    is 0.5)."""
    best = os.path.join(s.out_dir, BEST)
    ckpt = best if os.path.isfile(best) else os.path.join(s.out_dir, CKPT)
    return f"python sample.py --ckpt {ckpt}" + (f" --w {s.val_w:g}" if s.val_w != 0.5 else "")


def stop_message(s, r, why: str) -> str:
    """The last line of a stopped run: a signal means 'not finished' (resume); a spent time budget is the end that
    the preset plans, so the next step of the README's flow comes first."""
    resume = f"python train.py --resume --out-dir {s.out_dir}"
    where = f"{r.epoch} epochs done" + (f", {r.batch} batches into the next" if r.batch else "")
    said = f"\n{why}: saved {os.path.join(s.out_dir, CKPT)} at step {r.step} ({where}"
    if r.epoch >= s.epochs:  # the stop fell on the run's very last step: nothing is left to resume
        return f"{said}: the run is complete); next: {next_command(s)}"
    return f"{said}); " + (f"next: {next_command(s)} (or train on: {resume})" if why == "time budget"
                           else f"continue with: {resume}")

"""A run's folder: the one place that knows which files a run keeps there, the one reader of a checkpoint and its
atomic writer, and the metrics log's curves.

A run's files live where its checkpoint is read from (the --out-dir of train.py, the folder of sample.py's --ckpt),
never where a checkpoint says it was written: a run folder moved to another disk resumes, samples and scores in
place. A folder holds one run: a new run is refused where another one's files are (resume that one instead).
"""
import json
import math
import os

import torch
from PIL import Image, ImageDraw

from cli import UserError

CKPT, BEST, METRICS, CURVES, VAL = "ckpt.pt", "best.pt", "metrics.jsonl", "curves.png", "val.json"
RUN_FILES = (CKPT, BEST, METRICS)  # what makes a folder a run's: a new run there would replace or mix them
SAMPLES = "samples"  # what sample.py writes, inside the folder of the checkpoint it read


def run_dir_of(ckpt_path: str) -> str:
    """The run folder of a checkpoint: the folder it is read from."""
    return os.path.dirname(ckpt_path) or "."


def samples_dir_of(ckpt_path: str) -> str:
    """Where sample.py writes a checkpoint's images (and evaluate.py reads them) unless told otherwise."""
    return os.path.join(run_dir_of(ckpt_path), SAMPLES)


def claim(run_dir: str, resume: bool) -> None:
    """A new run starts only in a folder that holds no run: its checkpoints, log and curves would be replaced or mixed
    with the new run's. A resume goes on with the run that is there (read_checkpoint says if there is none)."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(run_dir, name))]
    if found and not resume:
        raise UserError(f"{run_dir}: holds another run ({', '.join(found)}); continue it with python train.py --resume "
                        f"--out-dir {run_dir}, or start this one in a new --out-dir")


def read_checkpoint(path: str, missing: str) -> dict:
    """Every read of a checkpoint of this project: the dict train.py saved, or one line naming the file and the fix
    (missing: what to say when there is no file)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: {missing}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        absent = [k for k in ("model", "ema", "config", "epoch", "step") if k not in ckpt]
        if absent:
            raise KeyError(f"no {', '.join(absent)}")
    except Exception as e:  # truncated file, foreign pickle, another project's dict
        raise UserError(f"{path}: not a usable checkpoint of this project ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:150] if str(e) else ''}); retrain or point --ckpt at another file")
    return ckpt


def data_dir_of(ckpt: dict, ckpt_path: str, data_dir: str = None) -> str:
    """The data folder to use with a checkpoint: --data-dir where given, else the one it was trained on (stored as an
    absolute path; a checkpoint of an older version may hold a relative one, read from the current folder)."""
    folder = data_dir or ckpt["config"]["data_dir"]
    if not os.path.isfile(os.path.join(folder, "objects.json")):
        whose = "--data-dir" if data_dir else f"the data folder {ckpt_path} was trained on"
        raise UserError(f"{folder}: {whose} has no objects.json; pass --data-dir with the folder that holds "
                        f"objects.json and the split files")
    return folder


def save_checkpoint(state: dict, path: str) -> None:
    """Write to a temporary file in the same folder, then rename: a run killed at any instant leaves either the old
    checkpoint or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_curves(run_dir: str, width: int = 720, height: int = 400) -> str:
    """RUN_DIR/curves.png from RUN_DIR/metrics.jsonl: training loss (left axis) and validation accuracy (right
    axis, 0 to 1) against epoch, drawn with Pillow. Returns the path."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no metrics log; pass the folder train.py wrote (its --out-dir)")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = list({r["epoch"]: r for r in rows}.values())  # a resumed run may log an epoch again: the last one counts
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 60, 30, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    epochs = [r["epoch"] for r in rows] or [1]
    e0, e1 = min(epochs), max(max(epochs), min(epochs) + 1)
    losses = [r["loss"] for r in rows]
    l0, l1 = (min(losses), max(losses)) if losses else (0.0, 1.0)
    l1 = l1 if l1 > l0 else l0 + 1e-3
    x = lambda e: left + (e - e0) / (e1 - e0) * (right - left)
    y = lambda v, lo, hi: bottom - (v - lo) / (hi - lo) * (bottom - top)
    first, last = math.ceil(e0), math.floor(e1)  # a run stopped inside an epoch logs a fraction
    for e in range(first, last + 1, max(1, -(-(last - first) // 6))):  # whole epochs below
        draw.line([x(e), bottom, x(e), bottom + 4], fill="black")
        draw.text((x(e) - 8, bottom + 6), str(e), fill="black")
    for i in range(6):  # loss on the left, accuracy on the right
        v, a = l0 + i * (l1 - l0) / 5, i / 5
        draw.text((4, y(v, l0, l1) - 5), f"{v:.4f}", fill=(31, 119, 180))
        draw.text((right + 6, y(a, 0, 1) - 5), f"{a:.1f}", fill=(214, 39, 40))
    draw.text(((left + right) // 2 - 15, height - 16), "epoch", fill="black")
    loss_pts = [(x(r["epoch"]), y(r["loss"], l0, l1)) for r in rows]
    val_pts = [(x(r["epoch"]), y(r["val_acc"], 0, 1)) for r in rows if r.get("val_acc") is not None]
    for pts, colour in ((loss_pts, (31, 119, 180)), (val_pts, (214, 39, 40))):
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    draw.text((left + 8, 8), "training loss (left axis)", fill=(31, 119, 180))
    best = max((r["val_acc"] for r in rows if r.get("val_acc") is not None), default=None)
    draw.text((left + 220, 8), "validation accuracy (right axis)" + (f", best {best:.3f}" if best is not None else
                                                                     ": none measured"), fill=(214, 39, 40))
    out = os.path.join(run_dir, CURVES)
    img.save(out + ".tmp.png")
    os.replace(out + ".tmp.png", out)
    return out

"""Before training: the data folder (the synthetic set rendered where none is given), the validation list and
the judge that scores it. Rank 0 prepares while the other ranks wait; then every rank loads the set."""
import json
import os

import torch
import torch.distributed as dist

from cli import UserError
from console import DEFAULT_DATA_DIR, first_run_plan
from dataset import draw_val, load_conditions, load_objects, load_train, read_json
from evaluator import ensure_classifier, evaluation_model
from rundir import VAL


def prepare_data(s) -> str:
    """The data folder to use; with none given and none at the default place, render the synthetic set there."""
    if s.data_dir:
        if not os.path.isdir(s.data_dir):
            raise UserError(f"{s.data_dir}: data folder not found; pass --data-dir with the course's files, "
                            f"or leave it out to use the synthetic set")
        return s.data_dir
    if not os.path.isfile(os.path.join(DEFAULT_DATA_DIR, "train.json")):
        import synthetic
        print(f"no --data-dir given and no data at {DEFAULT_DATA_DIR}: rendering the synthetic i-CLEVR set there "
              f"(once: {synthetic.RENDER_TIME})")
        synthetic.render_dataset(DEFAULT_DATA_DIR)
    return DEFAULT_DATA_DIR


def load_val(data_dir: str, out_dir: str, objects: dict, resume: bool):
    """The validation list: DATA_DIR/val.json (the synthetic set writes one), else 64 object sets drawn from
    train.json with a fixed seed and written to OUT_DIR/val.json (in-distribution: they are training sets) when a
    run starts; a resumed run reads its own."""
    path = os.path.join(out_dir, VAL)
    if not os.path.isfile(os.path.join(data_dir, VAL)) and not (resume and os.path.isfile(path)):
        exclude = [read_json(os.path.join(data_dir, f"{s}.json"), "condition list") for s in ("test", "new_test")
                   if os.path.isfile(os.path.join(data_dir, f"{s}.json"))]
        val = draw_val(list(read_json(os.path.join(data_dir, "train.json"), "train.json").values()), exclude)
        with open(path + ".tmp", "w") as f:
            json.dump(val, f)
        os.replace(path + ".tmp", path)
    return load_conditions(data_dir, "val", objects, run_dir=out_dir)  # the same lookup sample.py makes


def find_judge(s, data_dir: str, device: torch.device):
    """The classifier that scores the validation list: --classifier, else DATA_DIR/checkpoint.pth, trained there
    first on the synthetic set if it is missing (selection on val needs a judge); None if there is none."""
    path = ensure_classifier(data_dir, s.classifier, str(device))
    if not os.path.isfile(path):
        print(f"note: no classifier at {path}: validation accuracy is not measured and best.pt not kept "
              f"(put the course's checkpoint.pth there, or pass --classifier)")
        return None
    return evaluation_model(path, device)


def prepare(s, rank: int, device: torch.device, prep_group, eval_every: int):
    """Rank 0 renders the synthetic set if needed, fills the decode cache, writes the validation list and finds (or
    trains) the judge, while the other ranks wait; then every rank loads the set (from the cache).
    Returns the device-resident images (N, 3, S, S) uint8 and conditions (N, 24), val_cond (V, 24) and the judge."""
    loaded, val_cond, judge = None, None, None
    if rank == 0:
        plan = first_run_plan(s, device, bool(eval_every) and eval_every <= s.epochs)
        if plan:
            print(plan)
        s.data_dir = prepare_data(s)
        loaded = load_train(s.data_dir, s.image_dir, s.image_size)  # decodes the PNGs once, into the cache
        _, val_cond = load_val(s.data_dir, s.out_dir, load_objects(s.data_dir), s.resume)
        judge = find_judge(s, s.data_dir, device) if eval_every and eval_every <= s.epochs else None
    if prep_group is not None:
        dist.barrier(group=prep_group)
    if rank != 0:
        s.data_dir = prepare_data(s)  # the folder rank 0 found or rendered
    images, cond = loaded or load_train(s.data_dir, s.image_dir, s.image_size)  # the other ranks: the cache
    return images.to(device), cond.to(device), val_cond, judge  # the whole set on the device: no loader, no decode

"""Score the images sample.py wrote with the classifier: top-k accuracy per split, and where it goes wrong.

    python evaluate.py --split new_test
    python evaluate.py --split val               # choose w and the checkpoint here, never on test or new_test
    python evaluate.py --curves out              # out/curves.png: loss and validation accuracy against epoch

Reads OUT/samples/<split>/<i>.png and OUT/samples/<split>.json, and the classifier weights (default:
DATA_DIR/checkpoint.pth). On the synthetic set the classifier is this project's own, trained on it (trained here
first if missing); on the course's data, put the course's checkpoint.pth in the data folder or pass --classifier.
"""
import json
import os
import time
from collections import Counter

import torch
from PIL import Image

from cli import FRACTIONS_OF_T, POSITIVE_INT, Numbers, Parser, UserError, run_cli
from dataset import COLORS, SHAPES, encode, load_objects, read_image, read_json, to_float
from device import resolve_device
from rundir import data_dir_of, plot_curves, read_checkpoint, samples_dir_of
from schedule import SAMPLERS
from evaluator import ensure_classifier, evaluation_model, frechet_distance, load_truth, topk_hits


def draws_of(samples_dir: str, split: str) -> int:
    """How many draws of each condition sample.py wrote for a split (OUT/<split>_draws.json; 1 where none)."""
    path = os.path.join(samples_dir, f"{split}_draws.json")
    if not os.path.isfile(path):
        return 1
    record = read_json(path, "draws record")
    seeds = record.get("seeds") if isinstance(record, dict) else None
    if not isinstance(seeds, list) or not seeds:
        raise UserError(f"{path}: not a draws record of sample.py (no list of seeds); run python sample.py again")
    return len(seeds)


def load_samples(samples_dir: str, split: str, objects: dict, draw: int = 0):
    """The PNGs and conditions of one draw of a sampled split: ((N, 3, 64, 64) in [-1, 1], (N, 24), list of name
    lists). Draw 0 is <i>.png, draw k > 0 is <i>_<k>.png."""
    cond_path = os.path.join(samples_dir, f"{split}.json")
    if not os.path.isfile(cond_path):
        raise UserError(f"{cond_path}: no sampled split {split!r} in {samples_dir}; run python sample.py "
                        f"--split {split} first, or pass --samples-dir")
    conditions = read_json(cond_path, "condition list")
    cond = encode(conditions, objects, cond_path)
    images = []
    for i in range(len(conditions)):
        path = os.path.join(samples_dir, split, f"{i}.png" if draw == 0 else f"{i}_{draw}.png")
        if not os.path.isfile(path):
            raise UserError(f"{path}: image missing ({len(conditions)} expected); run python sample.py again"
                            + (f" with --n-per-condition {draws_of(samples_dir, split)}" if draw else ""))
        images.append(torch.from_numpy(read_image(path, 64, exact=True)).permute(2, 0, 1))  # each PNG opened once
    return to_float(torch.stack(images)), cond, conditions


def breakdown(probs: torch.Tensor, cond: torch.Tensor, conditions: list, names: list) -> dict:
    """Accuracy by object count, colour and shape, the object names missed most, and the worst conditions."""
    hits, ks = topk_hits(probs, cond)
    by = {}
    def add(key, h, k):
        a = by.setdefault(key, [0, 0])
        a[0], a[1] = a[0] + h, a[1] + k
    missed = Counter()
    for p, y, h, k, names_i in zip(probs, cond, hits, ks, conditions):
        add(f"{k} object{'s' if k > 1 else ''}", h, k)
        top = set(p.topk(k).indices.tolist())
        for name in names_i:
            colour, shape = name.split(" ")
            hit = int(names.index(name) in top)
            add(colour, hit, 1)
            add(shape, hit, 1)
            if not hit:
                missed[name] += 1
    worst = sorted([(h / k, i) for i, (h, k) in enumerate(zip(hits, ks)) if h < k])
    return {"accuracy": sum(hits) / sum(ks), "count": dict(Counter(ks)),
            "by": {key: round(h / k, 4) for key, (h, k) in by.items()},
            "missed_names": missed.most_common(),
            "worst": [(round(a, 3), conditions[i]) for a, i in worst]}


def score_split(judge, samples_dir: str, split: str, objects: dict, names: list, truth_feats=None):
    """The breakdown of draw 0 of a sampled split (the course's single-draw figure, with its Frechet distance where
    truth features are given) and the classifier features of its images; where sample.py wrote K draws of each
    condition, r["draws"] holds the accuracy of each."""
    images, cond, conditions = load_samples(samples_dir, split, objects)
    r = breakdown(judge.predict(images), cond, conditions, names)
    feats = judge.features(images)
    if truth_feats is not None:
        r["frechet"] = frechet_distance(feats, truth_feats)
    k = draws_of(samples_dir, split)
    if k > 1:
        r["draws"] = [r["accuracy"]] + [judge.eval(*load_samples(samples_dir, split, objects, d)[:2])
                                        for d in range(1, k)]
    return r, feats


def truth_features(judge, data_dir: str, split: str, objects: dict):
    """Classifier features of every ground-truth render of a split (synthetic set only), or None."""
    truth = load_truth(data_dir, split, objects, all_renders=True)
    return None if truth is None else judge.features(truth[0])


def sweep(args, judge, data_dir, objects, names, splits) -> None:
    """Sample every split for each w and seed with identical noise, score each draw, print one table."""
    import sample
    ws, seeds = args.sweep, args.seeds  # lists, checked by the parser
    truth = {s: truth_features(judge, data_dir, s, objects) for s in splits}
    tag = "ddpm" if args.sampler == "ddpm" else f"{args.sampler}{args.steps}"  # sweeps of two samplers kept apart
    if args.w_interval != [0, 1]:
        tag += f"_interval{args.w_interval[0]:g}-{args.w_interval[1]:g}"
    table = []
    for w in ws:
        accs, feats = {s: [] for s in splits}, {s: [] for s in splits}
        for seed in seeds:
            out = os.path.join(args.samples_dir, "sweep", f"{tag}_w{w:g}_seed{seed}")
            sample.run(sample.get_args(["--ckpt", args.ckpt, "--data-dir", data_dir, "--out-dir", out, "--w", str(w),
                                        "--split", args.split,
                                        "--seed", str(seed), "--sampler", args.sampler, "--steps", str(args.steps),
                                        "--device", args.device, "--w-interval", ",".join(map(str, args.w_interval)),
                                        "--strip", "0"]))
            for s in splits:
                r, f = score_split(judge, out, s, objects, names)
                accs[s].append(r["accuracy"])
                feats[s].append(f)
        row = {"w": w}
        for s in splits:
            a = torch.tensor(accs[s])
            row[s] = {"mean": a.mean().item(), "std": a.std().item() if len(a) > 1 else 0.0, "per_seed": accs[s]}
            if truth[s] is not None:  # all seeds pooled: several samples per condition
                row[s]["frechet"] = frechet_distance(torch.cat(feats[s]), truth[s])
        table.append(row)
    print(f"\nguidance sweep: {args.sampler}{' ' + str(args.steps) if args.sampler != 'ddpm' else ''}, seeds {seeds}, "
          f"classifier {args.classifier or os.path.join(data_dir, 'checkpoint.pth')}")
    print(f"{'w':>6s}" + "".join(f"  {s + ' acc':>18s}  {'FD':>7s}" for s in splits))
    for row in table:
        print(f"{row['w']:6.2f}" + "".join(f"  {row[s]['mean']:10.4f} +- {row[s]['std']:.4f}  "
                                           f"{row[s].get('frechet', float('nan')):7.2f}" for s in splits))
    with open(os.path.join(args.samples_dir, f"sweep_{tag}.json"), "w") as f:
        json.dump(table, f, indent=1)


README_PICTURES = {  # docs/ name: where it comes from (the run folder, or the data folder for the contact sheet)
    "preset_test.png": "samples/test_grid.png", "preset_new_test.png": "samples/new_test_grid.png",
    "preset_denoise_strip.png": "samples/denoise_strip.png", "preset_curves.png": "curves.png",
    "synthetic_contact_sheet.png": "DATA/contact_sheet.png",
    "preset_objects.png": "samples/red_cube+blue_sphere+yellow_cylinder_grid.png"}


def readme_pictures(run_dir: str, data_dir: str, out_dir: str = "docs", max_bytes: int = 150_000) -> list:
    """The README's pictures from a run: its sample grids, denoising strip and curves, and the data's contact sheet,
    written to OUT_DIR as 256-colour PNGs (halved until under max_bytes). Returns the paths written."""
    written = []
    for name, source in README_PICTURES.items():
        path = source.replace("DATA", data_dir, 1) if source.startswith("DATA") else os.path.join(run_dir, source)
        if not os.path.isfile(path):
            raise UserError(f"{path}: not found; --pictures wants a run that sample.py has sampled (both splits, and "
                            f"--objects \"red cube\" \"blue sphere\" \"yellow cylinder\" --n 16)")
        img = Image.open(path).convert("RGB")
        while True:
            img.quantize(256, method=Image.Quantize.MEDIANCUT).save(os.path.join(out_dir, name), optimize=True)
            if os.path.getsize(os.path.join(out_dir, name)) <= max_bytes:
                break
            img = img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)
        written.append(os.path.join(out_dir, name))
    return written


def make_parser():
    p = Parser(description=__doc__)
    p.add_argument("--split", default="both", help="test, new_test, both, val, or the name of any sampled split")
    p.add_argument("--samples-dir", default=None,
                   help="what sample.py wrote (default: the checkpoint's folder/samples)")
    p.add_argument("--ckpt", default="out/ckpt.pt",
                   help="the generator's checkpoint, read only to find its data folder")
    p.add_argument("--data-dir", default=None, help="folder with objects.json (default: the checkpoint's)")
    p.add_argument("--classifier", default=None, help="classifier weights (default: DATA_DIR/checkpoint.pth)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--sweep", type=Numbers(float, lo=0, what="a guidance weight >= 0"), default=None,
                   help="comma-separated guidance weights: sample and score each (e.g. 0,0.5,1,2)")
    p.add_argument("--seeds", type=Numbers(int, lo=0, what="a seed >= 0"), default=[0, 1, 2],
                   help="with --sweep: comma-separated noise seeds, the same for every w (default: 0,1,2)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="with --sweep: the sampler (choose w with the "
                                                                       "one you deploy)")
    p.add_argument("--steps", type=POSITIVE_INT, default=50, help="with --sweep: DDIM or DPM-Solver++ steps")
    p.add_argument("--w-interval", type=FRACTIONS_OF_T, default=[0.0, 1.0],
                   help="with --sweep: LO,HI, guide only where LO <= t / T <= HI (as sample.py)")
    p.add_argument("--curves", default=None, metavar="RUN_DIR", help="draw RUN_DIR/curves.png from its metrics.jsonl "
                                                                     "(loss and validation accuracy) and stop")
    p.add_argument("--pictures", default=None, metavar="RUN_DIR",
                   help="write the README's pictures to docs/ from "
                        "RUN_DIR (sampled) and its data folder, and stop")
    p.add_argument("--docs", default="docs", help="with --pictures: where they go")
    return p


def get_args(argv=None):
    return make_parser().parse_args(argv)


def find_data_dir(args) -> str:
    """--data-dir, else the folder the checkpoint was trained on."""
    if args.data_dir:
        return data_dir_of(None, args.ckpt, args.data_dir)
    missing = "checkpoint not found, so the data folder is unknown; pass --data-dir (or --ckpt)"
    return data_dir_of(read_checkpoint(args.ckpt, missing), args.ckpt)


def run(args) -> dict:
    if args.curves:
        return print(f"wrote {plot_curves(args.curves)}")
    if args.pictures:
        return print("wrote " + ", ".join(readme_pictures(args.pictures, find_data_dir(args), args.docs)))
    device = resolve_device(args.device)
    args.samples_dir = args.samples_dir or samples_dir_of(args.ckpt)
    data_dir = find_data_dir(args)
    # trained first on the synthetic set if missing
    classifier = ensure_classifier(data_dir, args.classifier, args.device)
    judge = evaluation_model(classifier, device)
    objects = load_objects(data_dir)
    names = sorted(objects, key=objects.get)
    splits = ["test", "new_test"] if args.split == "both" else [args.split]
    if args.sweep:
        return sweep(args, judge, data_dir, objects, names, splits)
    results = {}
    for split in splits:
        r, _ = score_split(judge, args.samples_dir, split, objects, names,
                           truth_features(judge, data_dir, split, objects))
        results[split] = r
        order = [k for k in ["1 object", "2 objects", "3 objects"] + COLORS + SHAPES if k in r["by"]]
        fd = f", Frechet distance to ground-truth renders {r['frechet']:.2f}" if "frechet" in r else ""
        print(f"\n{split}: accuracy {r['accuracy']:.4f} over {sum(r['count'].values())} images{fd}")
        if "draws" in r:
            a = torch.tensor(r["draws"])
            print(f"  over {len(a)} draws of each condition: {a.mean():.4f} +- {a.std():.4f} (draw 0 above is the "
                  f"course's single-draw figure)")
        print("  " + "  ".join(f"{k} {r['by'][k]:.2f}" for k in order))
        if r["missed_names"]:
            print("  most missed: " + ", ".join(f"{n} x{c}" for n, c in r["missed_names"][:6]))
        for a, c in r["worst"][:5]:
            print(f"  missed: {a:.2f}  {c}")
    with open(os.path.join(args.samples_dir, "eval.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "classifier": classifier,
                            **{s: {k: results[s][k] for k in ("accuracy", "frechet", "draws") if k in results[s]}
                               for s in results}}) + "\n")
    print("\nsummary: " + "  ".join(f"{s} {results[s]['accuracy']:.4f}" for s in results)
          + f"  (classifier {classifier})")
    return results


def main():
    run_cli(run, get_args())


if __name__ == "__main__":
    main()

"""Generate images for condition lists with a trained ContextUnet and classifier-free guidance.

    python sample.py --w 0.5                                 # both splits, 400-step DDPM, as report C
    python sample.py --sampler dpm --steps 20                # DPM-Solver++(2M): the fast path
    python sample.py --objects "red cube" "blue sphere" --n 16 --sampler dpm --steps 20   # a scene you name

Guidance: eps = (1 + w) * eps(x, c) - w * eps(x, null); w = 0 is plain conditional sampling. Writes
OUT/<split>/<i>.png (64x64; with --n-per-condition K, draw k > 0 as <i>_<k>.png), OUT/<split>_grid.png (8 per row),
OUT/<split>.json (the conditions, for evaluate.py), OUT/<split>_draws.json (the seed of each draw) and
OUT/denoise_strip.png (noise to image for red sphere, cyan cylinder, cyan cube, or for the --objects named).
"""
import json
import os
import time

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from cli import COUNT, FRACTIONS_OF_T, POSITIVE_INT, SWITCH, Number, Parser, UserError, ensure_writable, run_cli
from dataset import STRIP_CONDITION, encode, load_conditions, load_objects, to_uint8
from device import PRECISIONS, resolve_device, resolve_precision, setup_backends
from model import ContextUnet, fold_batchnorm
from rundir import data_dir_of, read_checkpoint, run_dir_of, samples_dir_of
from schedule import SAMPLERS, Diffusion


def to_64(x: torch.Tensor) -> torch.Tensor:
    """The classifier and the course expect 64x64; a model trained smaller is upsampled bilinearly."""
    return x if x.shape[-1] == 64 else F.interpolate(x, size=64, mode="bilinear", align_corners=False).clamp(-1, 1)


def save_png(x: torch.Tensor, path: str) -> None:
    """x (3, H, W) in [-1, 1] -> PNG."""
    Image.fromarray(to_uint8(x).permute(1, 2, 0).numpy()).save(path)


def save_grid(x: torch.Tensor, path: str, nrow: int = 8) -> None:
    grid = torchvision.utils.make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    save_png(grid, path)


def load_model(ckpt_path: str, device: torch.device, use_ema: bool = True):
    """Rebuild the network and its noise process from a checkpoint alone. Returns (model, diffusion, checkpoint)."""
    ckpt = read_checkpoint(ckpt_path, "checkpoint not found; train first (python train.py) or pass --ckpt PATH")
    try:
        model = ContextUnet(**ckpt["config"]["model"])
        model.load_state_dict(ckpt["ema" if use_ema else "model"])
    except Exception as e:  # weights of another configuration
        raise UserError(f"{ckpt_path}: not a usable checkpoint of this project ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:150]}); retrain or point --ckpt at another file")
    model = fold_batchnorm(model.to(device).eval())  # sampling never trains it again
    # channels_last: faster convolutions on GPUs, and on CPUs too (measured 1.6x for the CPU preset's sampling)
    model = model.to(memory_format=torch.channels_last)
    return model, Diffusion.from_config(ckpt["config"]), ckpt


def check_object_count(model: ContextUnet, conditions: list, cond: torch.Tensor, where: str) -> None:
    """A cross-attention network has one token per object, as many as its training set held: more is refused."""
    most = model.config.get("max_objects", 3) if model.config.get("cross_attn") else None
    if most and cond.sum(1).max() > most:
        i = int(cond.sum(1).argmax())
        raise UserError(f"{where}: entry {i} has {len(conditions[i])} objects; this checkpoint's network reads at "
                        f"most {most} (one token each): give at most {most} per condition, or sample another "
                        f"checkpoint")


def make_parser():
    p = Parser(description=__doc__)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--out-dir", default=None, help="where images go (default: the checkpoint's folder/samples)")
    p.add_argument("--data-dir", default=None, help="folder with objects.json and the split files "
                                                    "(default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="both", help="test, new_test, both, or val (to choose w and the checkpoint)")
    p.add_argument("--conditions", default=None, help="a JSON file of condition lists to sample instead of a split")
    p.add_argument("--objects", nargs="+", default=None, metavar="NAME", help='one condition named on the command '
                   'line, e.g. "red cube" "blue sphere": --n draws of it instead of a split')
    p.add_argument("--n", type=POSITIVE_INT, default=16, help="with --objects: how many draws of that condition")
    p.add_argument("--n-per-condition", type=POSITIVE_INT, default=1, help="K draws of every condition of a split "
                   "(seeds SEED..SEED+K-1; draw 0 is the course's single draw), each scored by evaluate.py")
    p.add_argument("--strip", type=SWITCH, default=1, help="1: also draw the denoising strip; 0: skip it")
    p.add_argument("--w", type=Number(float, lo=0, what="a guidance weight >= 0 (0 is plain conditional sampling)"),
                   default=0.5, help="guidance weight: eps = (1+w) eps_c - w eps_null; 0 = none")
    p.add_argument("--w-interval", type=FRACTIONS_OF_T, default=[0.0, 1.0],
                   help="LO,HI: guide only the steps with LO <= t / T <= HI, plain conditional steps elsewhere")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS, help="ancestral DDPM (all T steps), deterministic "
                                                                        "DDIM, or DPM-Solver++(2M), with --steps")
    p.add_argument("--steps", type=POSITIVE_INT, default=50, help="DDIM or DPM-Solver++ steps, at most T (DDPM always "
                                                                  "takes all T steps)")
    p.add_argument("--clip-x0", action="store_true", help="DDPM: the posterior mean around the x0 prediction clipped "
                                                          "to [-1, 1] (DDIM and DPM-Solver++ always clip)")
    p.add_argument("--cuda-graph", type=SWITCH, default=0, help="1: on CUDA, replay each step's forward from a CUDA "
                                                                "graph (the same images, far fewer kernel launches)")
    p.add_argument("--seed", type=COUNT, default=0, help="noise seed; same seed, same images")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their moving average")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 or fp16 on a GPU; bf16 on a CPU with AMX, else fp32")
    return p


def get_args(argv=None):
    args = make_parser().parse_args(argv)
    if len(args.w_interval) != 2 or args.w_interval[0] > args.w_interval[1]:
        make_parser().error(f"--w-interval {','.join(f'{v:g}' for v in args.w_interval)}: must be two fractions LO,HI "
                            f"with LO <= HI, such as 0.2,0.8")
    if args.objects and (args.conditions or args.n_per_condition > 1):
        make_parser().error("--objects draws --n images of one condition; it does not take --conditions or "
                            "--n-per-condition (those are for lists)")
    return args


def what_to_draw(args, data_dir: str, objects: dict, run_dir: str) -> list:
    """[(name, conditions, cond (N, 24), where they come from)]: the typed condition --n times, the --conditions
    file, or the splits."""
    if args.objects:
        cond = encode([args.objects], objects, "--objects")
        name = "+".join(o.replace(" ", "_") for o in args.objects)
        return [(name, [args.objects] * args.n, cond.repeat(args.n, 1), "--objects")]
    if args.conditions:
        splits = [args.conditions]
    elif args.split in ("test", "new_test", "val", "both"):
        splits = ["test", "new_test"] if args.split == "both" else [args.split]
    else:
        raise UserError(f"--split {args.split}: no such split; use test, new_test, both or val (or --conditions FILE)")
    return [(os.path.splitext(os.path.basename(s))[0], *load_conditions(data_dir, s, objects, run_dir=run_dir),
             s if s.endswith(".json") else f"{s}.json") for s in splits]


def run(args) -> None:
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    setup_backends(device, precision)
    model, diffusion, ckpt = load_model(args.ckpt, device, use_ema=not args.no_ema)
    data_dir = data_dir_of(ckpt, args.ckpt, args.data_dir)
    out_dir = args.out_dir or samples_dir_of(args.ckpt)
    ensure_writable(out_dir, "--out-dir")
    objects = load_objects(data_dir)
    if args.sampler != "ddpm" and args.steps > diffusion.T:
        print(f"note: --steps {args.steps} is more than the checkpoint's T = {diffusion.T}: {args.sampler} takes "
              f"{diffusion.T} steps")
        args.steps = diffusion.T
    jobs = what_to_draw(args, data_dir, objects, run_dir_of(args.ckpt))
    for _, conditions, cond, where in jobs:
        check_object_count(model, conditions, cond, where)
    how = f"{args.sampler} {args.steps if args.sampler != 'ddpm' else diffusion.T} steps"
    how += ", x0 clipped" if args.clip_x0 and args.sampler == "ddpm" else ""
    lo, hi = args.w_interval
    how += f", guided where {lo:g} <= t/T <= {hi:g}" if args.w_interval != [0, 1] else ""
    print(f"sampling with {'EMA' if not args.no_ema else 'raw'} weights of {args.ckpt} (epoch {ckpt['epoch']}), "
          f"{how}, w={args.w}, seed {args.seed}, on {device} ({precision})")
    draw = lambda cond, seed, **kw: diffusion.sample(model, cond, args.w, args.sampler, args.steps, seed,
                                                     precision=precision, clip_x0=args.clip_x0,
                                                     w_interval=args.w_interval, **kw)
    for name, conditions, cond, _ in jobs:
        seeds = [args.seed + k for k in range(args.n_per_condition)]
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        record = os.path.join(out_dir, f"{name}_draws.json")
        if os.path.exists(record):  # an interrupted run must not leave an older run's record over new draws
            os.remove(record)
        t0 = time.time()
        for k, seed in enumerate(seeds):  # draw k of every condition; draw 0 is the course's single draw
            x0, _ = draw(cond, seed, progress=True, cuda_graph=bool(args.cuda_graph))
            x0 = to_64(x0)
            for i, img in enumerate(x0):
                save_png(img, os.path.join(out_dir, name, f"{i}.png" if k == 0 else f"{i}_{k}.png"))
            if k == 0:
                save_grid(x0, os.path.join(out_dir, f"{name}_grid.png"))
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(conditions, f)
        with open(record, "w") as f:  # evaluate.py scores exactly these draws
            json.dump({"seeds": seeds, "sampler": args.sampler, "w": args.w, "ckpt": os.path.abspath(args.ckpt),
                       "steps": args.steps if args.sampler != "ddpm" else diffusion.T}, f)
        print(f"{name}: {len(seeds) * len(cond)} images in {time.time() - t0:.1f}s -> {out_dir}/{name}/, "
              f"{out_dir}/{name}_grid.png")
    if args.strip:
        strip_cond = encode([args.objects or STRIP_CONDITION], objects, "the denoising strip")
        _, frames = draw(strip_cond, args.seed, n_frames=8)
        save_grid(to_64(torch.cat(frames)), os.path.join(out_dir, "denoise_strip.png"), nrow=len(frames))
        print(f"denoising strip -> {out_dir}/denoise_strip.png")
    names = ", ".join(job[0] for job in jobs)
    print(f"done: {names} sampled" + ("" if args.objects else
                                      f"; score with: python evaluate.py --samples-dir {out_dir}"))


def main():
    run_cli(run, get_args())


if __name__ == "__main__":
    main()

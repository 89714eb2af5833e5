"""Generate images for condition lists with a trained ContextUnet and classifier-free guidance.

    python sample.py --w 0.5                      # both splits, 400-step DDPM, as report C
    python sample.py --sampler ddim --steps 50    # the fast path

Guidance: eps = (1 + w) * eps(x, c) - w * eps(x, null); w = 0 is plain conditional sampling. Writes
OUT/<split>/<i>.png (64x64), OUT/<split>_grid.png (8 per row), OUT/<split>.json (the conditions, for evaluate.py)
and OUT/denoise_strip.png (noise to image for red sphere, cyan cylinder, cyan cube).
"""
import json
import os
import time

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from tqdm import tqdm

from cli import COUNT, FRACTIONS_OF_T, POSITIVE_INT, SWITCH, Number, Parser, UserError, ensure_writable, run_cli
from dataset import STRIP_CONDITION, encode, load_conditions, load_objects, to_uint8
from device import DTYPES, PRECISIONS, autocast, resolve_device, resolve_precision, setup_backends
from model import ContextUnet, fold_batchnorm
from rundir import data_dir_of, read_checkpoint, run_dir_of, samples_dir_of
from schedule import ddim_step, ddpm_schedules, ddpm_step, from_v, guided_eps, timesteps


def graphed(model: ContextUnet, device: torch.device, precision: str):
    """model(x, cond, t) on CUDA with each input shape captured once in a CUDA graph and then replayed: the
    sampler's fixed-shape forward becomes one launch instead of about a hundred small kernels."""
    graphs = {}

    def forward(x, cond, t):
        key = (tuple(x.shape), tuple(cond.shape))
        if key not in graphs:
            static = [x.clone(), cond.clone(), t.clone()]
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), autocast(device, precision):  # warm-up: cuDNN picks its kernels here
                for _ in range(2):
                    model(*static)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # the autocast cache would hold casts made during capture; captured graphs must not rely on it
            with torch.cuda.graph(graph), torch.autocast("cuda", dtype=DTYPES[precision], enabled=precision != "fp32",
                                                         cache_enabled=False):
                out = model(*static)
            graphs[key] = graph, static, out
        graph, static, out = graphs[key]
        for buffer, value in zip(static, (x, cond, t)):
            buffer.copy_(value)
        graph.replay()
        return out.clone()  # the graph's output buffer is overwritten by the next replay

    return forward


@torch.inference_mode()
def sample_images(model: ContextUnet, cond: torch.Tensor, sched: dict, w: float = 0.5, sampler: str = "ddpm",
                  steps: int = 50, seed: int = 0, n_frames: int = 0, batched_guidance: bool = True,
                  precision: str = "auto", clip_x0: bool = False, progress: bool = False, w_interval=(0.0, 1.0),
                  cuda_graph: bool = False, prediction: str = "eps"):
    """Draw one image per row of cond (N, 24). Returns x0 (N, 3, S, S) in [-1, 1] and, if n_frames > 0, that many
    snapshots of x_t from pure noise to the result. The noise comes from its own generator seeded with `seed`, so
    the output does not depend on what else ran before; the same seed gives the same x_T on every device.
    w_interval (lo, hi): guidance only where lo <= t / T <= hi, plain conditional steps elsewhere (guidance in an
    interval, arXiv 2404.07724). cuda_graph: on CUDA, each step's forward replayed from a CUDA graph (the same
    arithmetic, far fewer kernel launches). prediction: what the network was trained to predict, eps or v (guidance
    is linear, so it is the same whether applied to v or to the eps that v implies)."""
    device = next(model.parameters()).device
    T = len(sched["beta_t"]) - 1
    sched = {k: v.to(device) for k, v in sched.items()}
    size = model.config["image_size"]
    gen = torch.Generator(device).manual_seed(seed)  # DDPM's per-step noise, drawn where the model runs
    # x_T always comes from a CPU generator, so DDIM (deterministic after x_T) gives the same images on any device
    start = gen if device.type == "cpu" else torch.Generator().manual_seed(seed)
    n = cond.shape[0]
    cond = cond.to(device)
    null = torch.zeros_like(cond)  # all zeros is "no condition", as in training
    x_t = torch.randn(n, model.config["in_channels"], size, size, generator=start).to(device)
    ts = timesteps(T, sampler, steps)
    record = {round(i * (len(ts) - 1) / (n_frames - 1)) for i in range(n_frames)} if n_frames > 1 else set()
    frames = [x_t.float().cpu()] if 0 in record else []
    precision = resolve_precision(precision, device)
    net = graphed(model, device, precision) if cuda_graph and device.type == "cuda" else model
    for i, (t, t_prev) in enumerate(tqdm(list(zip(ts[:-1], ts[1:])), desc=f"sampling ({sampler})",
                                         disable=not progress, leave=False)):
        t_in = torch.full((n,), t / T, device=device)  # the net sees t scaled to [0, 1]
        guided = w != 0 and w_interval[0] <= t / T <= w_interval[1]
        with autocast(device, precision):
            if not guided:
                out = net(x_t, cond, t_in).float()
            elif batched_guidance:  # conditional and unconditional halves in one forward pass of 2N
                out_c, out_u = net(torch.cat([x_t, x_t]), torch.cat([cond, null]), t_in.repeat(2)).float().chunk(2)
                out = guided_eps(out_c, out_u, w)
            else:
                out = guided_eps(net(x_t, cond, t_in).float(), net(x_t, null, t_in).float(), w)
        x0, eps = from_v(x_t, out, t, sched) if prediction == "v" else (None, out)
        if sampler == "ddpm":
            z = torch.randn(x_t.shape, generator=gen, device=device) if t > 1 else torch.zeros_like(x_t)
            x_t = ddpm_step(x_t, eps, t, z, sched, clip_x0, x0)
        else:
            x_t = ddim_step(x_t, eps, t, t_prev, sched, x0)
        if i + 1 in record:
            frames.append(x_t.float().cpu())
    return x_t.float().clamp(-1, 1).cpu(), frames


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
    """Rebuild the network from a checkpoint alone. Returns (model, checkpoint dict)."""
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
    return model, ckpt


def make_parser():
    p = Parser(description=__doc__)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--out-dir", default=None, help="where images go (default: the checkpoint's folder/samples)")
    p.add_argument("--data-dir", default=None, help="folder with objects.json and the split files "
                                                    "(default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="both", help="test, new_test, both, or val (to choose w and the checkpoint)")
    p.add_argument("--conditions", default=None, help="a JSON file of condition lists to sample instead of a split")
    p.add_argument("--w", type=Number(float, lo=0, what="a guidance weight >= 0 (0 is plain conditional sampling)"),
                   default=0.5, help="guidance weight: eps = (1+w) eps_c - w eps_null; 0 = none")
    p.add_argument("--w-interval", type=FRACTIONS_OF_T, default=[0.0, 1.0],
                   help="LO,HI: guide only the steps with LO <= t / T <= HI, plain conditional steps elsewhere")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="ancestral DDPM or deterministic DDIM")
    p.add_argument("--steps", type=POSITIVE_INT, default=50, help="DDIM steps, at most T (DDPM always takes all T steps)")
    p.add_argument("--clip-x0", action="store_true", help="DDPM: the posterior mean around the x0 prediction clipped to "
                                                          "[-1, 1] (DDIM always clips)")
    p.add_argument("--cuda-graph", type=SWITCH, default=0, help="1: on CUDA, replay each step's forward from a CUDA "
                                                                "graph (the same images, far fewer kernel launches)")
    p.add_argument("--seed", type=COUNT, default=0, help="noise seed; same seed, same images")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their moving average")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 or fp16 on a GPU; bf16 on a CPU with AMX, else fp32")
    return p


def get_args(argv=None):
    args = make_parser().parse_args(argv)
    if len(args.w_interval) != 2 or args.w_interval[0] > args.w_interval[1]:
        make_parser().error(f"--w-interval {','.join(f'{v:g}' for v in args.w_interval)}: must be two fractions LO,HI "
                            f"with LO <= HI, such as 0.2,0.8")
    return args


def run(args) -> None:
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    setup_backends(device, precision)
    model, ckpt = load_model(args.ckpt, device, use_ema=not args.no_ema)
    cfg = ckpt["config"]
    data_dir = data_dir_of(ckpt, args.ckpt, args.data_dir)
    out_dir = args.out_dir or samples_dir_of(args.ckpt)
    ensure_writable(out_dir, "--out-dir")
    objects = load_objects(data_dir)
    if args.conditions:
        splits = [args.conditions]
    elif args.split == "both":
        splits = ["test", "new_test"]
    elif args.split in ("test", "new_test", "val"):
        splits = [args.split]
    else:
        raise UserError(f"--split {args.split}: no such split; use test, new_test, both or val (or --conditions FILE)")
    sched = ddpm_schedules(cfg["beta1"], cfg["beta2"], cfg["T"], cfg["schedule"], bool(cfg.get("zero_snr", 0)))
    prediction = cfg.get("prediction", "eps")  # checkpoints from before the option predict eps
    if args.sampler == "ddim" and args.steps > cfg["T"]:
        print(f"note: --steps {args.steps} is more than the checkpoint's T = {cfg['T']}: DDIM takes {cfg['T']} steps")
        args.steps = cfg["T"]
    how = f"{args.sampler}" + (f" {args.steps} steps" if args.sampler == "ddim" else f" {cfg['T']} steps")
    how += ", x0 clipped" if args.clip_x0 and args.sampler == "ddpm" else ""
    how += f", guided where {args.w_interval[0]:g} <= t/T <= {args.w_interval[1]:g}" if args.w_interval != [0, 1] else ""
    print(f"sampling with {'EMA' if not args.no_ema else 'raw'} weights of {args.ckpt} (epoch {ckpt['epoch']}), "
          f"{how}, w={args.w}, seed {args.seed}, on {device} ({precision})")
    for split in splits:
        conditions, cond = load_conditions(data_dir, split, objects, run_dir=run_dir_of(args.ckpt))
        most = model.config.get("max_objects", 3) if model.config.get("cross_attn") else None
        if most and cond.sum(1).max() > most:
            i = int(cond.sum(1).argmax())
            where = split if split.endswith(".json") else f"{split}.json"
            raise UserError(f"{where}: entry {i} has {len(conditions[i])} objects; this checkpoint's network reads at most "
                            f"{most} (one token each): give at most {most} per condition, or sample another checkpoint")
        name = os.path.splitext(os.path.basename(split))[0]
        t0 = time.time()
        x0, _ = sample_images(model, cond, sched, args.w, args.sampler, args.steps, args.seed, precision=precision,
                              clip_x0=args.clip_x0, progress=True, w_interval=args.w_interval, cuda_graph=bool(args.cuda_graph),
                              prediction=prediction)
        seconds = time.time() - t0
        x0 = to_64(x0)
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        for i, img in enumerate(x0):
            save_png(img, os.path.join(out_dir, name, f"{i}.png"))
        save_grid(x0, os.path.join(out_dir, f"{name}_grid.png"))
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(conditions, f)
        print(f"{name}: {len(x0)} images in {seconds:.1f}s -> {out_dir}/{name}/, {out_dir}/{name}_grid.png")
    strip_cond = encode([STRIP_CONDITION], objects, "the denoising strip")
    _, frames = sample_images(model, strip_cond, sched, args.w, args.sampler, args.steps, args.seed, n_frames=8,
                              precision=precision, clip_x0=args.clip_x0, w_interval=args.w_interval, prediction=prediction)
    save_grid(to_64(torch.cat(frames)), os.path.join(out_dir, "denoise_strip.png"), nrow=len(frames))
    print(f"done: {', '.join(os.path.splitext(os.path.basename(s))[0] for s in splits)} sampled; "
          f"denoising strip -> {out_dir}/denoise_strip.png; score with: python evaluate.py --samples-dir {out_dir}")


def main():
    run_cli(run, get_args())


if __name__ == "__main__":
    main()

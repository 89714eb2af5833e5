"""Train a conditional ContextUnet DDPM on i-CLEVR with classifier-free guidance (DDPM arXiv 2006.11239,
CFG arXiv 2207.12598). Defaults are report C's: n_feat 128, 64x64, linear betas 1e-4..0.02 over T = 400,
condition dropped with probability 0.1 per sample, batch 128, Adam lr 1e-4, 300 epochs, seed 42.

    python train.py --epochs 300                    # synthetic set, rendered first if data/synthetic is missing
    python train.py --data-dir ~/lab --epochs 300   # the course's files (objects.json, train.json, iclevr/*.png)
    python train.py --preset cpu                    # a small model that learns the condition on a CPU
    python train.py --resume                        # continue OUT_DIR/ckpt.pt exactly where it stopped
"""
import argparse
import copy
import json
import math
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from dataset import HelpFormatter, ensure_writable, run_cli, UserError, load_conditions, load_objects, load_train, make_batch
from evaluator import resolve_device
from model import ContextUnet, count_params, save_checkpoint
from sample import sample_images, save_grid, to_64
from schedule import ddpm_schedules, q_sample

DEFAULT_DATA_DIR = "data/synthetic"
# settings that change the network or the noise process: a checkpoint is only valid with the same ones
MODEL_KEYS = ("image_size", "n_feat", "T", "beta1", "beta2", "schedule")
PRESETS = {
    # A CPU has few optimizer steps to spend, and the condition is learned with steps, not epochs: a 32x32 image,
    # a net of width 16 (2.2x the images/s of width 32, and higher accuracy in the same half hour), batches of 16
    # (as many images per second as 32 on a CPU, twice the steps) and a higher learning rate buy 22500 of them.
    # Samples are upsampled to 64x64, as the classifier saw a quarter of its training images.
    "cpu": dict(image_size=32, n_feat=16, batch_size=16, lr=1e-3, epochs=20, sample_every=5),
}


def make_parser(with_defaults: bool = True):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                argument_default=None if with_defaults else argparse.SUPPRESS)
    d = (lambda v: v) if with_defaults else (lambda v: argparse.SUPPRESS)
    p.add_argument("--data-dir", default=d(None), help=f"i-CLEVR folder (default: {DEFAULT_DATA_DIR}, rendered if absent)")
    p.add_argument("--image-dir", default=d(None), help="training PNGs (default: DATA_DIR/iclevr)")
    p.add_argument("--out-dir", default=d("out"), help="checkpoint, metrics log and progress grids")
    p.add_argument("--preset", default=d(None), choices=list(PRESETS), help="a bundle of defaults (explicit flags win)")
    p.add_argument("--epochs", type=int, default=d(300), help="total epochs to train")
    p.add_argument("--batch-size", type=int, default=d(128), help="images per optimizer step, global: under torchrun "
                                                                  "each of N processes takes batch-size / N")
    p.add_argument("--lr", type=float, default=d(1e-4), help="Adam learning rate")
    p.add_argument("--image-size", type=int, default=d(64), help="training resolution, divisible by 4")
    p.add_argument("--n-feat", type=int, default=d(128), help="ContextUnet base width")
    p.add_argument("--T", type=int, default=d(400), help="diffusion steps")
    p.add_argument("--beta1", type=float, default=d(1e-4), help="first beta of the schedule")
    p.add_argument("--beta2", type=float, default=d(0.02), help="last beta of the schedule")
    p.add_argument("--schedule", default=d("linear"), choices=["linear", "cosine"], help="noise schedule")
    p.add_argument("--drop-prob", type=float, default=d(0.1), help="probability of dropping a sample's condition")
    p.add_argument("--ema-decay", type=float, default=d(0.999), help="EMA decay of the weights used for sampling")
    p.add_argument("--hflip", type=int, default=d(1), help="1: random horizontal flips (labels are sets of objects)")
    p.add_argument("--sample-every", type=int, default=d(25), help="epochs between progress grids (0: never)")
    p.add_argument("--seed", type=int, default=d(42), help="random seed")
    p.add_argument("--device", default=d("auto"), help="auto, cpu or cuda")
    p.add_argument("--compile", type=int, default=d(0), help="1: torch.compile the network (slower start, faster steps)")
    p.add_argument("--resume", action="store_true", default=d(False), help="continue from OUT_DIR/ckpt.pt")
    return p


def get_args(argv=None):
    args = make_parser().parse_args(argv)
    explicit = vars(make_parser(with_defaults=False).parse_args(argv))
    if args.preset:
        for k, v in PRESETS[args.preset].items():
            if k not in explicit:
                setattr(args, k, v)
    args.explicit = sorted(explicit)
    return args


def prepare_data(args) -> str:
    """The data folder to use; with none given and none at the default place, render the synthetic set there."""
    if args.data_dir:
        if not os.path.isdir(args.data_dir):
            raise UserError(f"{args.data_dir}: data folder not found; pass --data-dir with the course's files, "
                            f"or leave it out to use the synthetic set")
        return args.data_dir
    if not os.path.isfile(os.path.join(DEFAULT_DATA_DIR, "train.json")):
        import synthetic
        print(f"no --data-dir given and no data at {DEFAULT_DATA_DIR}: rendering the synthetic i-CLEVR set there (once)")
        synthetic.render_dataset(DEFAULT_DATA_DIR)
    return DEFAULT_DATA_DIR


def resume_state(args, ckpt_path: str):
    """Load the checkpoint to resume; settings not given on the command line come from it."""
    if not os.path.isfile(ckpt_path):
        raise UserError(f"{ckpt_path}: nothing to resume; drop --resume to start, or pass the run's --out-dir")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = ckpt["config"]
    except Exception as e:
        raise UserError(f"{ckpt_path}: unreadable checkpoint ({type(e).__name__}); it cannot be resumed")
    for k, v in saved["train"].items():
        if k in args.explicit and k in MODEL_KEYS and getattr(args, k) != v:
            raise UserError(f"{ckpt_path}: --{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's "
                            f"{v}; drop the flag to resume, or use a new --out-dir to start over")
        if k not in args.explicit and k != "resume":
            setattr(args, k, v)
    return ckpt


def diffusion_loss(model: torch.nn.Module, x0: torch.Tensor, cond: torch.Tensor, sched: dict, drop_prob: float,
                   use_bf16: bool) -> torch.Tensor:
    """The DDPM objective ||eps - eps_pred(x_t, c, t)||^2 with classifier-free condition dropout.
    x0 (B, C, S, S) in [-1, 1]; cond (B, 24) multi-hot; every sample draws its own t and its own coin for the drop."""
    bs, T = x0.shape[0], len(sched["beta_t"]) - 1
    keep = (torch.rand(bs, device=x0.device) >= drop_prob).to(cond.dtype)
    c = cond * keep[:, None]                                        # dropped rows become zeros: "no condition"
    t = torch.randint(1, T + 1, (bs,), device=x0.device)           # t = 1 is one noising step
    eps = torch.randn_like(x0)
    x_t = q_sample(x0, t, eps, sched)
    if x0.is_cuda:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x0.device.type, torch.bfloat16, enabled=use_bf16):
        eps_pred = model(x_t, c, t.float() / T)                     # the net sees t scaled to [0, 1]
    return F.mse_loss(eps_pred.float(), eps)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        e, m = list(ema.parameters()), list(model.parameters())
        torch._foreach_lerp_(e, m, 1 - decay)
        for eb, mb in zip(ema.buffers(), model.buffers()):  # BatchNorm statistics are copied, not averaged
            eb.copy_(mb)


def setup_distributed(device_name: str):
    """Under torchrun (WORLD_SIZE > 1): join the process group and pick this rank's device. Returns
    (rank, world_size, device); plain `python train.py` is rank 0 of 1 and touches nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def shard(perm: torch.Tensor, batch: int, per_rank: int, rank: int, world: int) -> torch.Tensor:
    """This rank's part of global batch number `batch`: the global batch of per_rank * world images is cut into
    world contiguous slices, so the ranks together see every image of the epoch exactly once."""
    start = batch * per_rank * world + rank * per_rank
    return perm[start:start + per_rank]


def train(args) -> ContextUnet:
    """Train as args say; returns the trained network (the plain module, as in the checkpoint)."""
    rank, world, device = setup_distributed(args.device)
    main_rank = rank == 0  # only rank 0 writes checkpoints, logs and grids
    say = print if main_rank else (lambda *a, **k: None)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = resume_state(args, ckpt_path) if args.resume else None
    if args.image_size % 4:
        raise UserError(f"--image-size {args.image_size}: must be divisible by 4 (the net halves it twice); try 64")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size}: the global batch must divide among {world} processes")
    ensure_writable(args.out_dir, "--out-dir")
    if not main_rank:
        dist.barrier()  # the other ranks wait while rank 0 renders the synthetic set or fills the decode cache
    data_dir = args.data_dir = prepare_data(args)
    images, cond = load_train(data_dir, args.image_dir, args.image_size)  # (N, 3, S, S) uint8, (N, 24) multi-hot
    if main_rank and world > 1:
        dist.barrier()
    torch.manual_seed(args.seed + rank)  # noise, t and condition drops differ per rank ...
    data_gen = torch.Generator().manual_seed(args.seed)  # ... the epoch order is the same on every rank
    images, cond = images.to(device), cond.to(device)  # the whole set lives on the device: no loader, no decode
    _, test_cond = load_conditions(data_dir, "test", load_objects(data_dir))

    model = ContextUnet(3, args.n_feat, cond.shape[1], args.image_size).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    sched = {k: v.to(device) for k, v in ddpm_schedules(args.beta1, args.beta2, args.T, args.schedule).items()}
    if device.type == "cuda":
        model, ema = model.to(memory_format=torch.channels_last), ema.to(memory_format=torch.channels_last)
    config = {"model": model.config, "data_dir": data_dir, "T": args.T, "beta1": args.beta1, "beta2": args.beta2,
              "schedule": args.schedule,
              "train": {k: v for k, v in vars(args).items() if k not in ("explicit", "resume", "device")}}
    epoch, batch, step, perm = 0, 0, 0, None
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        epoch, batch, step, perm = ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["perm"]
        data_gen.set_state(ckpt["rng"]["data"])
        if len(ckpt["rng"]["ranks"]) == world:  # each rank's own noise stream (reseeded if the world size changed)
            torch.set_rng_state(ckpt["rng"]["ranks"][rank]["cpu"])
            if device.type == "cuda" and ckpt["rng"]["ranks"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["ranks"][rank]["cuda"])
        say(f"resuming {ckpt_path} at epoch {epoch}, batch {batch}, step {step}")

    def checkpoint(epoch, batch, perm):
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
        ranks = [None] * world
        if world > 1:
            dist.all_gather_object(ranks, rng)  # every rank's RNG, so a resume continues each stream exactly
        else:
            ranks = [rng]
        if main_rank:
            save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                             "epoch": epoch, "batch": batch, "step": step, "perm": perm, "config": config,
                             "rng": {"data": data_gen.get_state(), "ranks": ranks}}, ckpt_path)

    stop = {"signal": None}  # Ctrl-C / SIGTERM finish the current step, save, and exit cleanly
    on_signal = lambda signum, frame: stop.update(signal=signal.Signals(signum).name)
    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    n, bs = len(images), min(args.batch_size, len(images)) // world  # bs: this rank's share of the global batch
    n_batches = n // (bs * world)  # the ragged last batch is dropped: BatchNorm dislikes tiny batches
    say(f"ContextUnet: {count_params(model) / 1e6:.2f}M parameters, {args.image_size}px, n_feat {args.n_feat}; "
        f"{n} images from {data_dir}; {n_batches} steps/epoch of {bs * world}"
        f"{f' ({world} processes x {bs})' if world > 1 else ''}; device {device}")
    log = open(os.path.join(args.out_dir, "metrics.jsonl"), "a") if main_rank else None
    use_bf16 = device.type == "cuda"
    net = torch.compile(model) if args.compile else model  # checkpoints always save the plain module
    if world > 1 and device.type == "cuda":  # BatchNorm statistics over the global batch, as one process has them
        net = DDP(nn.SyncBatchNorm.convert_sync_batchnorm(net), device_ids=[device.index])
    elif world > 1:  # SyncBatchNorm is GPU-only: on CPU each process normalizes over its own share of the batch
        net = DDP(net)
    t_start, loss_sum, loss_count = time.time(), 0.0, 0
    try:
        while epoch < args.epochs:
            if perm is None:
                perm = torch.randperm(n, generator=data_gen).to(device)
            bar = tqdm(range(batch, n_batches), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=not main_rank)
            t_epoch, loss_sum, loss_count = time.time(), 0.0, 0
            for batch in bar:
                idx = shard(perm, batch, bs, rank, world)
                x0 = make_batch(images, idx, args.hflip)                       # (B, 3, S, S) in [-1, 1]
                loss = diffusion_loss(net, x0, cond[idx], sched, args.drop_prob, use_bf16)
                loss_value = loss.item()
                if not math.isfinite(loss_value):  # checked before the update, so no weight is touched by it
                    raise UserError(f"loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; {ckpt_path} still "
                                    f"holds the last good state: lower --lr and resume with --resume")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))  # warm-up for short runs
                loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
                bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}")
                if loss_count == 3 and main_rank and device.type == "cpu":
                    estimate_cpu_time(time.time() - t_epoch, n_batches * args.epochs, bar)
                if stop["signal"]:
                    checkpoint(epoch, batch + 1, perm)
                    say(f"\n{stop['signal']}: saved {ckpt_path} at epoch {epoch + 1}, step {step}; "
                        f"continue with: python train.py --resume --out-dir {args.out_dir}")
                    return model
            epoch, batch, perm = epoch + 1, 0, None
            checkpoint(epoch, 0, None)
            if main_rank:
                seconds = time.time() - t_epoch
                row = {"epoch": epoch, "step": step, "loss": loss_sum / max(loss_count, 1),
                       "images_per_s": loss_count * bs * world / seconds, "epoch_s": round(seconds, 2),
                       "elapsed_s": round(time.time() - t_start, 1)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                tqdm.write(f"epoch {epoch}/{args.epochs}  loss {row['loss']:.4f}  {row['images_per_s']:.0f} img/s  "
                           f"saved {ckpt_path}")
            if main_rank and args.sample_every and (epoch % args.sample_every == 0 or epoch == args.epochs):
                # a quick DDIM grid of the test conditions, with its own RNG: training randomness is untouched
                x0, _ = sample_images(ema, test_cond, sched, w=0.5, sampler="ddim", steps=50, seed=0)
                os.makedirs(os.path.join(args.out_dir, "progress"), exist_ok=True)
                save_grid(to_64(x0), os.path.join(args.out_dir, "progress", f"epoch_{epoch:04d}.png"))
    finally:  # leave the process as we found it (tests call train() in-process)
        if log:
            log.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if world > 1:
            dist.destroy_process_group()
    say(f"done: {epoch} epochs, {step} steps in {(time.time() - t_start) / 60:.1f} min, final loss "
        f"{loss_sum / max(loss_count, 1):.4f}; checkpoint {ckpt_path}; next: python sample.py --ckpt {ckpt_path}")
    return model


def estimate_cpu_time(seconds_for_3_steps: float, total_steps: int, bar) -> None:
    """Full-size settings on a CPU take days: say so up front rather than let a bar say it slowly."""
    per_step = seconds_for_3_steps / 3
    if per_step * total_steps > 1800:
        bar.write(f"on this CPU: about {per_step:.2f}s per step, so this run takes about "
                  f"{per_step * total_steps / 3600:.1f} h (a GPU, or --preset cpu, is much faster)")


def main():
    run_cli(train, get_args())


if __name__ == "__main__":
    main()

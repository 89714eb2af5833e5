"""Train a conditional ContextUnet DDPM on i-CLEVR with classifier-free guidance (DDPM arXiv 2006.11239, CFG arXiv
2207.12598): the loop, the state and its checkpoint. The settings and their defaults (report C's) are settings.py's,
the noise process and its loss schedule.Diffusion's; `python train.py --help` lists the options with examples.
"""
import copy
import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from cli import UserError, ensure_writable, run_cli
from console import cpu_time_line, describe, fmt_time, log_epoch, next_command, stop_message, time_left
from dataset import ICLEVR_TRAIN_IMAGES, make_batch, to_float
from device import (autocast, grad_scaler, resolve_channels_last, resolve_compile, resolve_precision, resolve_switch,
                    setup_backends)
from distributed import agree, setup_distributed, shard, wrap
from model import ContextUnet
from prepare import prepare
from rundir import BEST, CKPT, METRICS, claim, read_checkpoint, save_checkpoint
from sample import save_grid, to_64
from schedule import Diffusion
from settings import Settings, decide, saved_settings


@dataclass
class Trainer:
    """The training state, one explicit type: what train_step reads and moves on, and what a checkpoint holds
    (to_checkpoint) and brings back (restore). make_trainer builds it; bench.py builds it the same way."""
    cfg: Settings                   # the run's settings: lr and its schedule, drop_prob, hflip, ema_decay, min_snr, ...
    diffusion: Diffusion            # the noise process: its table, T, what the network predicts, the loss
    model: nn.Module                # the plain network: what checkpoints save
    ema: nn.Module                  # the moving average of its weights, used for sampling
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler    # fp16's loss scaling; a disabled no-op otherwise
    images: torch.Tensor            # (N, 3, S, S) uint8, on the device
    cond: torch.Tensor              # (N, 24) multi-hot, on the device
    precision: str                  # fp32, bf16 or fp16: the autocast of the steps
    channels_last: bool
    net: nn.Module = None           # what the steps run: the model, compiled and/or under DDP (the model until wrap)
    rank: int = 0
    world: int = 1
    bs: int = 0                     # this rank's share of a global batch
    total_steps: int = 0            # of the whole run, for a learning rate scheduled by steps
    data_gen: torch.Generator = None  # the epochs' data order, the same on every rank
    val_cond: torch.Tensor = None   # (V, 24) the validation list
    judge: object = None            # the classifier that scores it (None: not measured)
    # where the run is, saved in every checkpoint
    epoch: int = 0                  # epochs done
    batch: int = 0                  # batches of the current epoch done
    step: int = 0                   # optimizer steps done
    perm: torch.Tensor = None       # the current epoch's order (None: drawn when the epoch starts)
    best_val: float = None          # the best validation accuracy so far (best.pt's)
    clock: float = 0.0              # seconds since this invocation started training, rank 0's, agreed at the last step

    def next_epoch(self) -> None:
        """The current epoch is done: the next one starts at its first batch, in an order drawn when it starts."""
        self.epoch, self.batch, self.perm = self.epoch + 1, 0, None

    def to_checkpoint(self, ranks: list, val_acc) -> dict:
        """The checkpoint of this state, with what rebuilds the network and the noise process (config); ranks holds
        every rank's RNG states."""
        config = {"model": self.model.config, "data_dir": os.path.abspath(self.cfg.data_dir), **self.diffusion.config,
                  "train": saved_settings(self.cfg)}
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "batch": self.batch, "step": self.step,
                "perm": None if self.perm is None else self.perm.cpu(),  # on the CPU: a CUDA checkpoint loads anywhere
                "best_val": self.best_val, "val_acc": val_acc, "config": config,
                "rng": {"data": self.data_gen.get_state(), "ranks": ranks}}

    def restore(self, ckpt: dict) -> None:
        """Continue where the checkpoint stopped: weights, EMA, Adam, the scaler, the position and every RNG. Adam
        keeps the flavour this run resolved (fused or not): load_state_dict would bring back the saved run's, and
        the strides it was saved with."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        flavour = [{k: g[k] for k in ("fused", "foreach", "capturable", "differentiable") if k in g}
                   for g in self.opt.param_groups]
        self.opt.load_state_dict({**ckpt["optimizer"], "param_groups": [
            {**saved, **now} for saved, now in zip(ckpt["optimizer"]["param_groups"], flavour)]})
        for p in (p for group in self.opt.param_groups for p in group["params"]):  # moments laid out like p: a CPU
            for k, v in self.opt.state.get(p, {}).items():  # checkpoint's NCHW ones would stop fused Adam on CUDA
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    self.opt.state[p][k] = torch.empty_like(p).copy_(v)  # empty_like keeps p's memory format
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batch, self.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        self.best_val = ckpt.get("best_val")
        self.perm = None if ckpt["perm"] is None else ckpt["perm"].to(self.images.device)
        self.data_gen.set_state(ckpt["rng"]["data"])
        if len(ckpt["rng"]["ranks"]) == self.world:  # each rank's own noise stream (reseeded if the world size changed)
            own = ckpt["rng"]["ranks"][self.rank]
            torch.set_rng_state(own["cpu"])
            if self.images.device.type == "cuda" and own["cuda"] is not None:
                torch.cuda.set_rng_state(own["cuda"])


def build_model(s: Settings, cond: torch.Tensor) -> ContextUnet:
    """The network the settings describe; object tokens: i-CLEVR's 3, or more where the training set has more."""
    max_objects = max(3, int(cond.sum(1).max()))
    return ContextUnet(3, s.n_feat, cond.shape[1], s.image_size, bool(s.cond_bottleneck), s.cross_attn,
                       bool(s.adagn), s.cond_embed, max_objects, bool(s.self_attn))


def make_trainer(s: Settings, device: torch.device, precision: str, channels_last: bool, fused: bool,
                 images: torch.Tensor, cond: torch.Tensor) -> Trainer:
    """The state at step 0, built the way train.py builds it (bench.py builds it here too): the network, its EMA
    copy, Adam, the fp16 gradient scaler, the device-resident uint8 images (N, 3, S, S) and conditions (N, 24)."""
    model = build_model(s, cond).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    diffusion = Diffusion(s.T, s.beta1, s.beta2, s.schedule, bool(s.zero_snr), s.prediction)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, fused=fused)
    return Trainer(cfg=s, diffusion=diffusion, model=model, ema=ema, opt=opt, scaler=grad_scaler(device, precision),
                   images=images, cond=cond, precision=precision, channels_last=channels_last, net=model,
                   bs=min(s.batch_size, len(images)), data_gen=torch.Generator().manual_seed(s.seed))


def epoch_order(cond: torch.Tensor, by_objects: int, gen: torch.Generator) -> torch.Tensor:
    """An epoch's image indices: a permutation, or with by_objects as many draws with replacement, each image drawn in
    proportion to its number of objects, so that every object rather than every image weighs the same."""
    if by_objects:
        return torch.multinomial(cond.sum(1).float().cpu(), len(cond), replacement=True, generator=gen)
    return torch.randperm(len(cond), generator=gen)


def learning_rate(s: Settings, total_steps: int, step: int, clock: float) -> float:
    """This step's lr: constant (report C), or a cosine from --lr down to 0 over the run (over --minutes of this
    invocation's clock where a time budget is set, else over total_steps), after --warmup-steps of linear warm-up."""
    lr = s.lr * min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps else s.lr
    if s.lr_schedule == "cosine":
        progress = clock / (60 * s.minutes) if s.minutes else step / total_steps
        lr *= 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lr


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Weights only: the EMA network's BatchNorm statistics are recomputed for its own weights before each save."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def train_step(r: Trainer, idx: torch.Tensor, step: int, signal: bool = False, clock: float = 0.0):
    """One optimizer step as train.py runs it (bench.py times this same function): gather this rank's batch, the
    loss, the agreement between ranks, backward (scaled in fp16), Adam, EMA. No weight moves when any rank's loss
    is not finite; a step the fp16 scaler skips (inf gradients) is not that: the scaler lowers its scale and goes on.
    signal: this rank got one; clock: seconds since training started (rank 0's is the one that counts). Returns
    (mean loss over ranks, whether a signal reached any rank, whether --minutes is spent on rank 0's clock)."""
    s = r.cfg
    x0 = make_batch(r.images, idx, s.hflip)  # (B, 3, S, S) in [-1, 1]
    loss = r.diffusion.loss(r.net, x0, r.cond[idx], s.drop_prob, s.min_snr, r.precision, r.channels_last,
                            s.logsnr_draw)
    loss_value, signalled, r.clock = agree(loss, signal, r.world, clock if r.rank == 0 else 0.0)
    time_up = bool(s.minutes) and r.clock >= 60 * s.minutes  # the shared clock: every rank decides alike
    if not math.isfinite(loss_value):
        return loss_value, signalled, time_up
    for group in r.opt.param_groups:
        group["lr"] = learning_rate(s, r.total_steps, step, r.clock)
    r.opt.zero_grad(set_to_none=True)
    r.scaler.scale(loss).backward()
    r.scaler.step(r.opt)
    r.scaler.update()
    ema_update(r.ema, r.model, min(s.ema_decay, (2 + step) / (11 + step)))  # warm-up for short runs
    return loss_value, signalled, time_up


def bn_batches(images: torch.Tensor, cond: torch.Tensor, diffusion: Diffusion, drop_prob: float, seed: int,
               n_images: int, batch_size: int):
    """Inputs drawn as in training but with t uniform on 1..T, as sampling visits every t, from a generator of their
    own (training randomness is untouched): yields (x_t, cond, t / T) batches covering n_images."""
    gen = torch.Generator(images.device).manual_seed(seed)
    for _ in range(max(1, n_images // batch_size)):
        idx = torch.randint(len(images), (batch_size,), device=images.device, generator=gen)
        x_t, c, t, _ = diffusion.noisy(to_float(images[idx]), cond[idx], drop_prob, gen)
        yield x_t, c, t.float() / diffusion.T


@torch.no_grad()
def refresh_bn_stats(net: nn.Module, batches, precision: str, channels_last: bool) -> None:
    """Recompute every BatchNorm's running statistics as the plain average over the batches (as SWA's update_bn
    does). The EMA weights need statistics of their own: the raw network's belong to the raw weights, and gave a
    worse denoiser than the raw network itself (docs/RESULTS.md)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative average over all batches seen
    net.train()
    for x_t, c, t in batches:
        with autocast(x_t.device, precision):
            net(x_t.contiguous(memory_format=torch.channels_last) if channels_last else x_t, c, t)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    net.eval()


def validate(r: Trainer) -> float:
    """Top-k accuracy of the EMA network on val by --val-sampler at --val-w, the mean over --val-draws draws (seeds
    0, 1, ...); draw 0 by DDPM is what `sample.py --split val` draws at that w."""
    s, accs = r.cfg, []
    for seed in range(s.val_draws):
        x0, _ = r.diffusion.sample(r.ema, r.val_cond, w=s.val_w, sampler=s.val_sampler, steps=s.val_steps, seed=seed,
                                   precision=r.precision)
        accs.append(r.judge.eval(to_64(x0), r.val_cond))
    return sum(accs) / len(accs)


def progress_grid(r: Trainer) -> None:
    """A quick DDIM grid of the first 32 validation conditions, with its own RNG: training is untouched."""
    x0, _ = r.diffusion.sample(r.ema, r.val_cond[:32], w=r.cfg.val_w, sampler="ddim", steps=50, seed=0,
                               precision=r.precision)
    os.makedirs(os.path.join(r.cfg.out_dir, "progress"), exist_ok=True)
    save_grid(to_64(x0), os.path.join(r.cfg.out_dir, "progress", f"epoch_{r.epoch:04d}.png"))


def checkpoint(r: Trainer, evaluate: bool = False):
    """Save r's state at its position (r.epoch, r.batch, r.step, r.perm): every rank's RNG, the EMA's own BatchNorm
    statistics, the validation score (with evaluate), then an atomic write; best.pt too when val is the best so far.
    Every rank calls it; returns the validation accuracy (None if not measured) on rank 0."""
    device = r.images.device
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    ranks = [None] * r.world
    if dist.is_initialized():
        dist.all_gather_object(ranks, rng)  # every rank's RNG, so a resume continues each stream exactly
    else:
        ranks = [rng]
    if r.rank != 0:
        return None
    refresh_bn_stats(r.ema, bn_batches(r.images, r.cond, r.diffusion, r.cfg.drop_prob, r.cfg.seed + r.step,
                                       min(1024, len(r.images)), r.bs * r.world), r.precision, r.channels_last)
    val_acc = validate(r) if evaluate and r.judge else None
    is_best = val_acc is not None and (r.best_val is None or val_acc >= r.best_val)  # a tie keeps the later
    r.best_val = val_acc if is_best else r.best_val
    state = r.to_checkpoint(ranks, val_acc)
    save_checkpoint(state, os.path.join(r.cfg.out_dir, CKPT))
    if is_best:
        save_checkpoint(state, os.path.join(r.cfg.out_dir, BEST))
    return val_acc


def at_boundary(r: Trainer, eval_every: int, epoch_done: bool, why: str, saved_at: float):
    """The one rule for the end of an epoch and for a stop (why: a signal or the time budget): whether to validate,
    draw a progress grid, save. Validation every eval_every epochs and the last one, and at a spent time budget (the
    preset's planned end is scored too); a grid every --sample-every epochs, not at a stop; a save wherever either
    needs the EMA statistics, at the end, at every stop, and every --save-every minutes on the shared clock."""
    s = r.cfg
    every = lambda n: bool(n) and epoch_done and (r.epoch % n == 0 or r.epoch == s.epochs)
    evaluate = every(eval_every) or (bool(eval_every) and why == "time budget")
    grid = every(s.sample_every) and not why
    save = evaluate or grid or bool(why) or r.epoch == s.epochs or r.clock - saved_at >= 60 * s.save_every
    return evaluate, grid, save


def time_a_step(s: Settings, device: torch.device, precision: str, channels_last: bool) -> float:
    """Seconds per optimizer step of these settings here, from one forward and backward pass of a throwaway copy of
    the network on 8 random images, scaled to the batch: a CPU can say how long a run takes before it starts."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(s, torch.eye(24)[:3].sum(0, keepdim=True)).to(device)  # i-CLEVR's 3 object tokens
        x = torch.randn(min(8, s.batch_size), 3, s.image_size, s.image_size, device=device)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        cond, t = torch.zeros(len(x), 24, device=device), torch.rand(len(x), device=device)
        for repeat in range(2):  # the first pass warms up the kernels
            t0 = time.time()
            with autocast(device, precision):
                model(x, cond, t).float().square().mean().backward()
    return (time.time() - t0) * s.batch_size / len(x)


def train(s: Settings) -> ContextUnet:
    """Train as the settings say; returns the trained network (the plain module, as in the checkpoint)."""
    rank, world, device, prep_group = setup_distributed(s.device)
    say = print if rank == 0 else (lambda *a, **k: None)  # only rank 0 speaks and writes checkpoints, logs and grids
    claim(s.out_dir, s.resume)  # a folder holds one run: nothing is written over another
    if s.batch_size % world:
        raise UserError(f"--batch-size {s.batch_size}: the global batch must divide among {world} processes")
    precision, channels_last = resolve_precision(s.precision, device), resolve_channels_last(s.channels_last, device)
    fused, compile = resolve_switch(s.fused_adam, device, "--fused-adam"), resolve_compile(s.compile, device, precision)
    eval_every = (10 if device.type == "cuda" else 0) if s.eval_every is None else s.eval_every
    setup_backends(device, precision, s.deterministic)
    ensure_writable(s.out_dir, "--out-dir")
    if device.type == "cpu" and rank == 0 and not s.resume:  # said before any data is rendered or judged
        n_batches = ICLEVR_TRAIN_IMAGES // s.batch_size
        line = cpu_time_line(s, time_a_step(s, device, precision, channels_last), s.epochs * n_batches, n_batches,
                             compile)
        if line:
            say(line)
    images, cond, val_cond, judge = prepare(s, rank, device, prep_group, eval_every)
    torch.manual_seed(s.seed + rank)  # noise, t and condition drops differ per rank; the epoch order does not
    r = make_trainer(s, device, precision, channels_last, fused, images, cond)
    r.rank, r.world, r.bs, r.val_cond, r.judge = rank, world, r.bs // world, val_cond, judge
    n_batches = len(images) // (r.bs * world)  # the ragged last batch is dropped: BatchNorm dislikes tiny batches
    r.total_steps = s.epochs * n_batches
    if s.resume:
        r.restore(read_checkpoint(os.path.join(s.out_dir, CKPT), "nothing to resume"))
        if r.batch >= n_batches:  # saved on an epoch's last batch (by an older version): that epoch is done
            r.next_epoch()
        say(f"resuming {os.path.join(s.out_dir, CKPT)} at epoch {r.epoch}, batch {r.batch}, step {r.step}")
    r.net = wrap(r.model, compile, device)
    say(describe(s, r, device, n_batches, compile))
    stop = {"signal": None}
    previous_handlers = {sig: signal.signal(sig, lambda signum, frame: stop.update(signal=signal.Signals(signum).name))
                         for sig in (signal.SIGINT, signal.SIGTERM)}  # Ctrl-C / SIGTERM: finish the step, save, exit
    log = open(os.path.join(s.out_dir, METRICS), "a") if rank == 0 else None
    t_start, step0, loss_sum, loss_count, saved_at = time.time(), r.step, 0.0, 0, 0.0
    try:
        while r.epoch < s.epochs:
            if r.perm is None:
                r.perm = epoch_order(cond, s.draw_by_objects, r.data_gen).to(device)  # the same on every rank
            bar = tqdm(range(r.batch, n_batches), desc=f"epoch {r.epoch + 1}/{s.epochs}", leave=False,
                       disable=rank != 0)
            t_epoch, loss_sum, loss_count, why = time.time(), 0.0, 0, None
            for batch in bar:
                loss_value, signalled, time_up = train_step(r, shard(r.perm, batch, r.bs, rank, world), r.step,
                                                            bool(stop["signal"]), time.time() - t_start)
                if not math.isfinite(loss_value):  # checked before the update, on every rank: no weight is touched
                    raise UserError(f"loss became {loss_value} at epoch {r.epoch + 1}, step {r.step + 1}; {s.out_dir}/"
                                    f"ckpt.pt still holds the last good state: lower --lr and resume with --resume")
                r.batch, r.step, loss_sum, loss_count = batch + 1, r.step + 1, loss_sum + loss_value, loss_count + 1
                bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}",
                                run_left=fmt_time(time_left(s, t_start, r.step - step0, r.total_steps - r.step)))
                if signalled or time_up:
                    why = "time budget" if time_up else stop["signal"] or "another process stopped"
                    break
            epoch_done = r.batch == n_batches
            if epoch_done:  # a stop on an epoch's last batch saves the epoch as done: the resume starts the next
                r.next_epoch()
            evaluate, grid, save = at_boundary(r, eval_every, epoch_done, why, saved_at)
            t_saving = time.time()
            val_acc = checkpoint(r, evaluate) if save else None
            saved_at = r.clock if save else saved_at
            if evaluate and not why and s.minutes:  # a validation that left less of the budget than it took is the
                # run's last: the steps left would be scored all over again, for longer than they train (rank 0's
                # clock, agreed, so that every rank stops here)
                now = time.time()
                _, _, clock_after_another = agree(torch.zeros((), device=device), False, world,
                                                  (now - t_start) + (now - t_saving) if rank == 0 else 0.0)
                why = "time budget" if clock_after_another >= 60 * s.minutes else None
            if rank == 0:
                left = 0 if why else time_left(s, t_start, r.step - step0, (s.epochs - r.epoch) * n_batches)
                epoch = r.epoch + r.batch / n_batches if r.batch else r.epoch  # a fraction only inside an epoch
                log_epoch(r, log, epoch, time.time() - t_epoch, loss_sum / max(loss_count, 1), loss_count, t_start,
                          val_acc, left, save)
            if rank == 0 and grid:
                progress_grid(r)
            if why:
                say(stop_message(s, r, why))
                return r.model
    finally:  # leave the process as we found it (tests call train() in-process)
        if log:
            log.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    say(f"done: {r.epoch} epochs, {r.step} steps in {(time.time() - t_start) / 60:.1f} min, final loss "
        f"{loss_sum / max(loss_count, 1):.4f}; checkpoint {os.path.join(s.out_dir, CKPT)}; next: {next_command(s)}")
    return r.model


def main():
    run_cli(lambda argv: train(decide(argv)), None)


if __name__ == "__main__":
    main()

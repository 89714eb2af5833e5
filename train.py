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
import datetime
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cli import (COUNT, IMAGE_SIZE, POSITIVE, POSITIVE_INT, PROBABILITY, SWITCH, Number, Parser, UserError,
                 ensure_writable, run_cli)
from dataset import draw_val, load_conditions, load_objects, load_train, make_batch, read_json, to_float
from device import (PRECISIONS, autocast, grad_scaler, resolve_channels_last, resolve_compile, resolve_device,
                    resolve_precision, resolve_switch, setup_backends)
from evaluator import ensure_classifier, evaluation_model
from model import ContextUnet, count_params
from rundir import BEST, CKPT, METRICS, VAL, claim, plot_curves, read_checkpoint, save_checkpoint
from sample import sample_images, save_grid, to_64
from schedule import ddpm_schedules, q_sample, v_target

DEFAULT_DATA_DIR = "data/synthetic"
# settings that change the network or the noise process: a checkpoint is only valid with the same ones
MODEL_KEYS = ("image_size", "n_feat", "T", "beta1", "beta2", "schedule", "zero_snr", "prediction", "cond_bottleneck",
              "cross_attn", "adagn", "cond_embed")
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # torch's default for a collective of the training steps
PREPARE_TIMEOUT = datetime.timedelta(hours=3)  # the other ranks' wait while rank 0 renders, decodes, trains the judge
BETA = Number(float, 0, 1, lo_open=True, hi_open=True, what="a noise variance in (0, 1)")
N_FEAT = Number(int, lo=8, multiple=8, what="a multiple of 8 (the network's GroupNorms have 8 groups), such as 128")
PATHS = ("data_dir", "image_dir", "classifier")  # stored absolute: a checkpoint finds its inputs from any folder
PRESETS = {
    # A CPU has few optimizer steps to spend, so the preset buys steps (32x32 images, batches of 16, lr 1e-3) and
    # spends them where the condition is decided: Min-SNR with g = 1 takes the weight off the nearly clean steps, the
    # condition also shapes the bottleneck, and each object is a token that the S/4 and S/2 feature maps attend to
    # (in 10-minute rows: val 0.53 -> 0.71, three-object scenes the most). Width 32 (capacity, not steps, held width
    # 16 back). Budgeted by time: a faster machine trains more steps, and a CPU with AMX trains about twice as many
    # (auto precision is bf16 there, with channels_last). best.pt is chosen by the sampler and w of the README's next
    # line (DDPM 400, --val-w). Samples are upsampled to 64x64, as the classifier saw a quarter of its training
    # images. Measured in docs/RESULTS.md.
    "cpu": dict(image_size=32, n_feat=32, batch_size=16, lr=1e-3, min_snr=1.0, cond_bottleneck=1, cross_attn=2,
                minutes=25.0, epochs=1000, eval_every=10, sample_every=5, val_sampler="ddpm", val_w=2.0),
}


def make_parser(with_defaults: bool = True):
    p = Parser(description=__doc__, argument_default=None if with_defaults else argparse.SUPPRESS)
    d = (lambda v: v) if with_defaults else (lambda v: argparse.SUPPRESS)
    p.add_argument("--data-dir", default=d(None), help=f"i-CLEVR folder (default: {DEFAULT_DATA_DIR}, rendered if absent)")
    p.add_argument("--image-dir", default=d(None), help="training PNGs (default: DATA_DIR/iclevr)")
    p.add_argument("--out-dir", default=d("out"), help="checkpoint, metrics log and progress grids")
    p.add_argument("--preset", default=d(None), choices=list(PRESETS), help="a bundle of defaults (explicit flags win)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=d(300), help="total epochs to train")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=d(128), help="images per optimizer step, global: under "
                                                                          "torchrun each of N processes takes batch-size / N")
    p.add_argument("--lr", type=POSITIVE, default=d(1e-4), help="Adam learning rate")
    p.add_argument("--lr-schedule", default=d("constant"), choices=["constant", "cosine"],
                   help="constant (report C), or cosine: from --lr to 0 over --minutes where set, else over --epochs")
    p.add_argument("--warmup-steps", type=COUNT, default=d(0), help="steps of linear learning-rate warm-up")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=d(64), help="training resolution, divisible by 4")
    p.add_argument("--n-feat", type=N_FEAT, default=d(128), help="ContextUnet base width")
    p.add_argument("--T", type=Number(int, lo=2, what="an integer >= 2"), default=d(400), help="diffusion steps")
    p.add_argument("--beta1", type=BETA, default=d(1e-4), help="first beta of the schedule (below --beta2)")
    p.add_argument("--beta2", type=BETA, default=d(0.02), help="last beta of the schedule")
    p.add_argument("--schedule", default=d("linear"), choices=["linear", "cosine"], help="noise schedule")
    p.add_argument("--zero-snr", type=SWITCH, default=d(0), help="1: the schedule rescaled so that x_T is pure noise, "
                   "as sampling assumes (needs --prediction v)")
    p.add_argument("--prediction", default=d("eps"), choices=["eps", "v"], help="what the network predicts: the "
                   "noise eps (report C) or v = sqrt(alphabar) eps - sqrt(1 - alphabar) x0")
    p.add_argument("--cond-bottleneck", type=SWITCH, default=d(0), help="1: the condition also multiplies the "
                                                                        "bottleneck vector (c_e * h + t_e there too)")
    p.add_argument("--cross-attn", type=Number(int, 0, 2, what="0, 1 or 2"), default=d(0), help="1: one token per object and "
                   "cross-attention from the feature map to them at S/4; 2: at S/4 and S/2; 0: none, as report C")
    p.add_argument("--adagn", type=SWITCH, default=d(0), help="1: GroupNorm with scale and shift from the time and "
                                                              "condition embedding in every residual block, instead of BatchNorm")
    p.add_argument("--cond-embed", default=d("mlp"), choices=["mlp", "linear"], help="the condition's embedding: "
                   "Linear-GELU-Linear (report C) or one Linear layer")
    p.add_argument("--min-snr", type=Number(float, lo=0), default=d(0), help="Min-SNR loss weighting min(SNR, g) / SNR "
                   "(/ (SNR + 1) with --prediction v) with this g (5 in the paper); 0: plain MSE, as report C")
    p.add_argument("--drop-prob", type=PROBABILITY, default=d(0.1), help="probability of dropping a sample's condition")
    p.add_argument("--ema-decay", type=Number(float, 0, 1, hi_open=True, what="a decay in [0, 1)"), default=d(0.999),
                   help="EMA decay of the weights used for sampling")
    p.add_argument("--hflip", type=SWITCH, default=d(1), help="1: random horizontal flips (labels are sets of objects)")
    p.add_argument("--sample-every", type=COUNT, default=d(25), help="epochs between progress grids of the validation "
                                                                     "list (0: never)")
    p.add_argument("--seed", type=COUNT, default=d(42), help="random seed")
    p.add_argument("--minutes", type=Number(float, lo=0), default=d(0), help="stop after this many minutes of training "
                                                                             "(at a step boundary), save, print the next command; 0: no limit")
    p.add_argument("--save-every", type=Number(float, lo=0), default=d(2.0), help="minutes between checkpoints, "
                   "written at the end of an epoch; also at every validation, at the end and at every stop; 0: every epoch")
    p.add_argument("--eval-every", type=COUNT, default=d(None), help="epochs between validation scores and best.pt "
                                                                     "(default: 10 on a GPU, 0 = never on a CPU)")
    p.add_argument("--val-w", type=Number(float, lo=0, what="a guidance weight >= 0"), default=d(0.5),
                   help="guidance weight of the validation samples, and of the sampling command printed at the end")
    p.add_argument("--val-sampler", default=d("ddim"), choices=["ddpm", "ddim"], help="sampler of the validation "
                   "samples: ddpm (all T steps, as sample.py by default) or ddim with --val-steps")
    p.add_argument("--val-steps", type=POSITIVE_INT, default=d(50), help="DDIM steps of validation (with --val-sampler ddim)")
    p.add_argument("--classifier", default=d(None), help="judge for validation (default: DATA_DIR/checkpoint.pth; on the "
                                                         "synthetic set trained there first if missing)")
    p.add_argument("--device", default=d("auto"), help="auto, cpu or cuda")
    p.add_argument("--precision", default=d("auto"), choices=PRECISIONS,
                   help="auto: bf16 on GPUs that have it, fp16 + gradient scaling on older GPUs; bf16 on CPUs with "
                        "AMX, else fp32")
    p.add_argument("--channels-last", default=d("auto"), choices=["auto", "1", "0"], help="NHWC memory layout (auto: on CUDA and AMX CPUs)")
    p.add_argument("--fused-adam", default=d("auto"), choices=["auto", "1", "0"], help="one fused Adam kernel (auto: on CUDA)")
    p.add_argument("--compile", default=d("auto"), choices=["auto", "1", "0"], help="torch.compile the network (slower "
                   "start, faster steps; auto: on CUDA where a C compiler is found, off on a CPU)")
    p.add_argument("--deterministic", type=SWITCH, default=d(0), help="1: deterministic kernels only, for bit-exact "
                                                                      "resumes on CUDA (slower)")
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
    if args.beta1 >= args.beta2:
        make_parser().error(f"--beta1 {args.beta1:g}: must be below --beta2 {args.beta2:g} (the betas rise with t)")
    if args.zero_snr and args.prediction == "eps":
        make_parser().error("--zero-snr 1 with --prediction eps: at zero SNR the noise is x_T itself and says nothing "
                            "of the image; add --prediction v")
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
        print(f"no --data-dir given and no data at {DEFAULT_DATA_DIR}: rendering the synthetic i-CLEVR set there "
              f"(once: {synthetic.RENDER_TIME})")
        synthetic.render_dataset(DEFAULT_DATA_DIR)
    return DEFAULT_DATA_DIR


def first_run_plan(args, device: torch.device, validates: bool) -> str:
    """What a first run does once before it trains, said before it starts, with each step's time measured on the
    2-core CPU (docs/RESULTS.md), so that a user knows the wait before it begins; None when there is nothing to do."""
    import synthetic
    from evaluator import CLASSIFIER_TIME, will_train_judge
    render = not args.data_dir and not os.path.isfile(os.path.join(DEFAULT_DATA_DIR, "train.json"))
    judge = validates and will_train_judge(args.data_dir or DEFAULT_DATA_DIR, args.classifier, rendering=render)
    steps = ([f"render the synthetic set into {DEFAULT_DATA_DIR} ({synthetic.RENDER_TIME})"] if render else []) + \
            ([f"train its classifier, which scores the validation list ({CLASSIFIER_TIME[device.type]})"] if judge else [])
    if not steps:
        return None
    return ("first run here, once before training: " + "; then ".join(f"{i + 1}) {s}" for i, s in enumerate(steps)) +
            "; each shows its time left as it goes")


def resume_state(args, ckpt_path: str) -> dict:
    """Load the checkpoint to resume; settings not given on the command line come from it (a network setting it
    predates takes its default, not a preset's), except where the run's files go: that is the folder the checkpoint
    is read from (a moved run goes on where it now is)."""
    ckpt = read_checkpoint(ckpt_path, "nothing to resume; drop --resume to start, or pass the run's --out-dir")
    for k in MODEL_KEYS:  # a setting newer than the checkpoint: its network was built with the setting's default
        if k not in ckpt["config"]["train"] and k not in args.explicit:
            setattr(args, k, make_parser().get_default(k))
    for k, v in ckpt["config"]["train"].items():
        if k in args.explicit and k in MODEL_KEYS and getattr(args, k) != v:
            raise UserError(f"{ckpt_path}: --{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's "
                            f"{v}; drop the flag to resume, or use a new --out-dir to start over")
        if k not in args.explicit and k not in ("resume", "out_dir"):
            setattr(args, k, v)
    return ckpt


def noisy_batch(x0: torch.Tensor, cond: torch.Tensor, sched: dict, drop_prob: float, gen=None):
    """What the network is trained on: x_t ~ q(x_t | x0) at a t drawn per sample from 1..T, and the condition with
    a per-sample coin for classifier-free dropout. x0 (B, C, S, S) in [-1, 1]; cond (B, 24) multi-hot.
    Returns (x_t, cond with dropped rows zeroed, integer t (B,), eps); gen: a generator of its own, or the global one.
    The network is given t / T, in [0, 1]."""
    bs, T = x0.shape[0], len(sched["beta_t"]) - 1
    keep = (torch.rand(bs, device=x0.device, generator=gen) >= drop_prob).to(cond.dtype)
    t = torch.randint(1, T + 1, (bs,), device=x0.device, generator=gen)  # t = 1 is one noising step
    eps = torch.randn(x0.shape, device=x0.device, generator=gen)
    return q_sample(x0, t, eps, sched), cond * keep[:, None], t, eps


def diffusion_loss(model: torch.nn.Module, x0: torch.Tensor, cond: torch.Tensor, sched: dict, drop_prob: float,
                   precision: str = "fp32", channels_last: bool = False, min_snr: float = 0.0,
                   prediction: str = "eps") -> torch.Tensor:
    """The DDPM objective ||eps - eps_pred(x_t, c, t)||^2 with classifier-free condition dropout (with prediction
    "v", ||v - v_pred||^2). With min_snr = g, each sample's error is weighted by min(SNR_t, g) / SNR_t (Min-SNR,
    arXiv 2303.09556): the nearly clean steps, where the image already says everything, stop dominating the
    gradient. For v the weight is min(SNR_t, g) / (SNR_t + 1), the same weight on the error of the implied x0."""
    x_t, c, t, eps = noisy_batch(x0, cond, sched, drop_prob)
    target = eps if prediction == "eps" else v_target(x0, t, eps, sched)
    if channels_last:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    with autocast(x0.device, precision):
        pred = model(x_t, c, t.float() / (len(sched["beta_t"]) - 1))
    if not min_snr:
        return F.mse_loss(pred.float(), target)
    alphabar = sched["alphabar_t"][t]
    snr = alphabar / (1 - alphabar)
    per_sample = (pred.float() - target).square().mean(dim=(1, 2, 3))
    return (per_sample * snr.clamp(max=min_snr) / (snr if prediction == "eps" else snr + 1)).mean()


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Weights only: the EMA network's BatchNorm statistics are recomputed for its own weights before each save."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def bn_batches(images: torch.Tensor, cond: torch.Tensor, sched: dict, drop_prob: float, seed: int, n_images: int,
               batch_size: int):
    """Inputs drawn as in training, from a generator of their own (training randomness is untouched): yields
    (x_t, cond, t / T) batches covering n_images."""
    gen = torch.Generator(images.device).manual_seed(seed)
    for _ in range(max(1, n_images // batch_size)):
        idx = torch.randint(len(images), (batch_size,), device=images.device, generator=gen)
        x_t, c, t, _ = noisy_batch(to_float(images[idx]), cond[idx], sched, drop_prob, gen)
        yield x_t, c, t.float() / (len(sched["beta_t"]) - 1)


@torch.no_grad()
def refresh_bn_stats(net: torch.nn.Module, batches, precision: str, channels_last: bool) -> None:
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


def match_optimizer_layout(opt: torch.optim.Optimizer) -> None:
    """A loaded optimizer state keeps the strides it was saved with; lay each tensor out like its parameter (a CPU
    checkpoint's NCHW moments under channels_last CUDA weights would stop fused Adam)."""
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p).copy_(v)  # empty_like keeps p's memory format


def agree(loss: torch.Tensor, signal: bool, world: int, clock: float = 0.0):
    """The one host sync of a step. Under torchrun every rank learns the mean loss, whether any rank's loss is not
    finite, whether any rank got a signal, and rank 0's clock (the others pass 0), which the time budget and a
    time-budgeted learning rate follow: all ranks act alike on the same step, for the same reason, and none is left
    waiting in a collective. Returns (mean loss, or nan if any rank's is not finite; any signal; rank 0's clock)."""
    v = torch.tensor([0.0, 0.0, float(signal), clock], device=loss.device)
    v[:2] = torch.stack([loss.detach().float(), (~torch.isfinite(loss.detach())).float()])
    if dist.is_initialized():
        dist.all_reduce(v)  # sums: any rank's flag makes the sum positive
    loss_sum, not_finite, signals, clock = v.tolist()
    return (loss_sum / world if not not_finite else float("nan")), signals > 0, clock


def learning_rate(args, total_steps: int, step: int, clock: float) -> float:
    """This step's lr: constant (report C), or a cosine from --lr down to 0 over the run (over --minutes of this
    invocation's clock where a time budget is set, else over its total_steps), after --warmup-steps of linear warm-up."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
    if args.lr_schedule == "cosine":
        progress = clock / (60 * args.minutes) if args.minutes else step / total_steps
        lr *= 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lr


@dataclass
class Trainer:
    """The training state, one explicit type: what train_step reads and moves on, and what a checkpoint holds
    (to_checkpoint) and brings back (restore). make_trainer builds it; bench.py builds it the same way."""
    args: argparse.Namespace        # the run's settings: lr and its schedule, drop_prob, hflip, ema_decay, min_snr, minutes
    model: nn.Module                # the plain network: what checkpoints save
    ema: nn.Module                  # the moving average of its weights, used for sampling
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler    # fp16's loss scaling; a disabled no-op otherwise
    images: torch.Tensor            # (N, 3, S, S) uint8, on the device
    cond: torch.Tensor              # (N, 24) multi-hot, on the device
    sched: dict                     # the ddpm_schedules table, on the device
    precision: str                  # fp32, bf16 or fp16: the autocast of the steps
    channels_last: bool
    net: nn.Module = None           # what the steps run: the model, compiled and/or under DDP (the model until wrap)
    rank: int = 0
    world: int = 1
    bs: int = 0                     # this rank's share of a global batch
    total_steps: int = 0            # of the whole run, for a learning rate scheduled by steps
    data_gen: torch.Generator = None  # the epochs' data order, the same on every rank
    config: dict = None             # what a checkpoint records of the run (run_config)
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
        """The checkpoint of this state: ranks holds every rank's RNG states."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "batch": self.batch, "step": self.step,
                "perm": None if self.perm is None else self.perm.cpu(),  # on the CPU: a CUDA checkpoint loads anywhere
                "best_val": self.best_val, "val_acc": val_acc, "config": self.config,
                "rng": {"data": self.data_gen.get_state(), "ranks": ranks}}

    def restore(self, ckpt: dict) -> None:
        """Continue where the checkpoint stopped: weights, EMA, Adam, the scaler, the position and every RNG. Adam
        keeps the flavour this run resolved (fused or not): load_state_dict would bring back the saved run's."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        flavour = [{k: g[k] for k in ("fused", "foreach", "capturable", "differentiable") if k in g}
                   for g in self.opt.param_groups]
        self.opt.load_state_dict({**ckpt["optimizer"], "param_groups": [
            {**saved, **now} for saved, now in zip(ckpt["optimizer"]["param_groups"], flavour)]})
        match_optimizer_layout(self.opt)
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batch, self.step, self.best_val = ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt.get("best_val")
        self.perm = None if ckpt["perm"] is None else ckpt["perm"].to(self.images.device)
        self.data_gen.set_state(ckpt["rng"]["data"])
        if len(ckpt["rng"]["ranks"]) == self.world:  # each rank's own noise stream (reseeded if the world size changed)
            own = ckpt["rng"]["ranks"][self.rank]
            torch.set_rng_state(own["cpu"])
            if self.images.device.type == "cuda" and own["cuda"] is not None:
                torch.cuda.set_rng_state(own["cuda"])


def make_trainer(args, device: torch.device, precision: str, channels_last: bool, fused: bool, images: torch.Tensor,
                 cond: torch.Tensor, sched: dict) -> Trainer:
    """The state at step 0, built the way train.py builds it (bench.py builds it here too): the network, its EMA
    copy, Adam, the fp16 gradient scaler, the device-resident uint8 images (N, 3, S, S) and conditions (N, 24)."""
    max_objects = max(3, int(cond.sum(1).max()))  # object tokens: i-CLEVR's 3, or more where the training set has more
    model = ContextUnet(3, args.n_feat, cond.shape[1], args.image_size, bool(args.cond_bottleneck), args.cross_attn,
                        bool(args.adagn), args.cond_embed, max_objects).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    return Trainer(args=args, model=model, ema=ema, opt=torch.optim.Adam(model.parameters(), lr=args.lr, fused=fused),
                   scaler=grad_scaler(device, precision), images=images, cond=cond, sched=sched, precision=precision,
                   channels_last=channels_last, net=model, bs=min(args.batch_size, len(images)),
                   data_gen=torch.Generator().manual_seed(args.seed))


def train_step(r: Trainer, idx: torch.Tensor, step: int, signal: bool = False, clock: float = 0.0):
    """One optimizer step as train.py runs it (bench.py times this same function): gather this rank's batch, the
    loss, the agreement between ranks, backward (scaled in fp16), Adam, EMA. No weight moves when any rank's loss
    is not finite; a step the fp16 scaler skips (inf gradients) is not that: the scaler lowers its scale and goes on.
    signal: this rank got one; clock: seconds since training started (rank 0's is the one that counts). Returns
    (mean loss over ranks, whether a signal reached any rank, whether --minutes is spent on rank 0's clock)."""
    x0 = make_batch(r.images, idx, r.args.hflip)  # (B, 3, S, S) in [-1, 1]
    loss = diffusion_loss(r.net, x0, r.cond[idx], r.sched, r.args.drop_prob, r.precision, r.channels_last,
                          r.args.min_snr, r.args.prediction)
    loss_value, signalled, r.clock = agree(loss, signal, r.world, clock if r.rank == 0 else 0.0)
    time_up = bool(r.args.minutes) and r.clock >= 60 * r.args.minutes  # the shared clock: every rank decides alike
    if not math.isfinite(loss_value):
        return loss_value, signalled, time_up
    for group in r.opt.param_groups:
        group["lr"] = learning_rate(r.args, r.total_steps, step, r.clock)
    r.opt.zero_grad(set_to_none=True)
    r.scaler.scale(loss).backward()
    r.scaler.step(r.opt)
    r.scaler.update()
    ema_update(r.ema, r.model, min(r.args.ema_decay, (2 + step) / (11 + step)))  # warm-up for short runs
    return loss_value, signalled, time_up


def setup_distributed(device_name: str):
    """Under torchrun (RANK is set, even with one process): join the process group and pick this rank's device.
    Returns (rank, world_size, device, prep_group); plain `python train.py` is rank 0 of 1 and touches nothing.
    prep_group: a gloo group with a long timeout, for the wait while rank 0 prepares the data (the default group's
    10 minutes is too short for a first run that renders the set and trains the judge on a slow host)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(device_name), None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return rank, world, device, dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)


def shard(perm: torch.Tensor, batch: int, per_rank: int, rank: int, world: int) -> torch.Tensor:
    """This rank's part of global batch number `batch`: the global batch of per_rank * world images is cut into
    world contiguous slices, so the ranks together see every image of the epoch exactly once."""
    start = batch * per_rank * world + rank * per_rank
    return perm[start:start + per_rank]


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


def find_judge(args, data_dir: str, device: torch.device):
    """The classifier that scores the validation list: --classifier, else DATA_DIR/checkpoint.pth, trained there
    first on the synthetic set if it is missing (selection on val needs a judge); None if there is none."""
    path = ensure_classifier(data_dir, args.classifier, str(device))
    if not os.path.isfile(path):
        print(f"note: no classifier at {path}: validation accuracy is not measured and best.pt not kept "
              f"(put the course's checkpoint.pth there, or pass --classifier)")
        return None
    return evaluation_model(path, device)


def prepare(args, rank: int, device: torch.device, prep_group, eval_every: int):
    """Rank 0 renders the synthetic set if needed, fills the decode cache, writes the validation list and finds (or
    trains) the judge, while the other ranks wait; then every rank loads the set (from the cache).
    Returns the device-resident images (N, 3, S, S) uint8 and conditions (N, 24), val_cond (V, 24) and the judge."""
    loaded, val_cond, judge = None, None, None
    if rank == 0:
        plan = first_run_plan(args, device, bool(eval_every) and eval_every <= args.epochs)
        if plan:
            print(plan)
        args.data_dir = prepare_data(args)
        loaded = load_train(args.data_dir, args.image_dir, args.image_size)  # decodes the PNGs once, into the cache
        _, val_cond = load_val(args.data_dir, args.out_dir, load_objects(args.data_dir), args.resume)
        judge = find_judge(args, args.data_dir, device) if eval_every and eval_every <= args.epochs else None
    if prep_group is not None:
        dist.barrier(group=prep_group)
    if rank != 0:
        args.data_dir = prepare_data(args)  # the folder rank 0 found or rendered
    images, cond = loaded or load_train(args.data_dir, args.image_dir, args.image_size)  # the other ranks: the cache
    return images.to(device), cond.to(device), val_cond, judge  # the whole set on the device: no loader, no decode


def validate(r: Trainer) -> float:
    """Top-k accuracy of the EMA network's samples of the validation list, one per condition, seed 0, drawn with
    --val-sampler at --val-w: best.pt is chosen by what the printed sampling command will run, or by a cheaper proxy."""
    a = r.args
    x0, _ = sample_images(r.ema, r.val_cond, r.sched, w=a.val_w, sampler=a.val_sampler, steps=a.val_steps, seed=0,
                          precision=r.precision, prediction=a.prediction)
    return r.judge.eval(to_64(x0), r.val_cond)


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
    refresh_bn_stats(r.ema, bn_batches(r.images, r.cond, r.sched, r.args.drop_prob, r.args.seed + r.step,
                                       min(1024, len(r.images)), r.bs * r.world), r.precision, r.channels_last)
    val_acc = validate(r) if evaluate and r.judge else None
    is_best = val_acc is not None and (r.best_val is None or val_acc >= r.best_val)  # a tie keeps the later
    r.best_val = val_acc if is_best else r.best_val
    state = r.to_checkpoint(ranks, val_acc)
    save_checkpoint(state, os.path.join(r.args.out_dir, CKPT))
    if is_best:
        save_checkpoint(state, os.path.join(r.args.out_dir, BEST))
    return val_acc


def wrap(model: ContextUnet, compile: bool, device: torch.device) -> nn.Module:
    """What the steps run: the plain module (which checkpoints save), compiled and/or under DDP."""
    net = torch.compile(model) if compile else model
    if dist.is_initialized() and device.type == "cuda":  # BatchNorm statistics over the global batch, as one process has them
        return DDP(nn.SyncBatchNorm.convert_sync_batchnorm(net), device_ids=[device.index])
    if dist.is_initialized():  # SyncBatchNorm is GPU-only: on CPU each process normalizes over its own share of the batch
        return DDP(net)
    return net


def catch_signals(stop: dict) -> dict:
    """Ctrl-C / SIGTERM set stop['signal']: the current step finishes, the run saves and exits cleanly. Returns the
    previous handlers, for release_signals."""
    on_signal = lambda signum, frame: stop.update(signal=signal.Signals(signum).name)
    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


def release_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def log_epoch(r: Trainer, log, epoch: float, seconds: float, loss: float, steps: int, t_start: float, val_acc,
              left: float, saved: bool = True):
    """One line of metrics.jsonl, the curves picture, and the epoch's line on the console (epoch: epochs done, with
    a fraction where a stop ends the run inside one)."""
    row = {"epoch": round(epoch, 3), "step": r.step, "loss": loss, "images_per_s": steps * r.bs * r.world / seconds,
           "epoch_s": round(seconds, 2), "elapsed_s": round(time.time() - t_start, 1),
           **({"val_acc": val_acc} if val_acc is not None else {})}
    log.write(json.dumps(row) + "\n")
    log.flush()
    plot_curves(r.args.out_dir)
    tqdm.write(f"epoch {epoch:g}/{r.args.epochs}  loss {loss:.4f}  {row['images_per_s']:.0f} img/s"
               f"{f'  val {val_acc:.3f} (best {r.best_val:.3f})' if val_acc is not None else ''}  "
               f"{fmt_time(left)} left{f'  saved {os.path.join(r.args.out_dir, CKPT)}' if saved else ''}")


def progress_grid(r: Trainer) -> None:
    """A quick DDIM grid of the first 32 validation conditions, with its own RNG: training is untouched."""
    x0, _ = sample_images(r.ema, r.val_cond[:32], r.sched, w=r.args.val_w, sampler="ddim", steps=50, seed=0,
                          precision=r.precision, prediction=r.args.prediction)
    os.makedirs(os.path.join(r.args.out_dir, "progress"), exist_ok=True)
    save_grid(to_64(x0), os.path.join(r.args.out_dir, "progress", f"epoch_{r.epoch:04d}.png"))


def time_left(args, t_start: float, steps_done: int, steps_left: int) -> float:
    """Seconds this invocation has left: the steps still to train at the rate so far, cut by --minutes."""
    elapsed = time.time() - t_start
    left = elapsed / max(steps_done, 1) * steps_left
    return min(left, 60 * args.minutes - elapsed) if args.minutes else left


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def warn_cpu_time(args, bar, per_step: float, steps_left: int, n_batches: int) -> None:
    """Said once, early in a CPU run: what the --minutes budget buys, or how long a run without one takes (full-size
    settings take days on a CPU: better said up front than by a slow bar). Nothing for a short run."""
    if args.minutes and 60 * args.minutes < per_step * steps_left:
        steps = int(60 * args.minutes / per_step)
        bar.write(f"on this CPU: about {per_step:.3f}s per step, so the {args.minutes:g}-minute budget trains about "
                  f"{steps} steps ({steps / n_batches:.1f} epochs)")
    elif not args.minutes and per_step * steps_left > 1800:
        bar.write(f"on this CPU: about {per_step:.2f}s per step, so this run takes about {per_step * steps_left / 3600:.1f} h "
                  f"(a GPU, or --preset cpu, is much faster)")


def next_command(args) -> str:
    """The README's next step after training: sample the best checkpoint where validation kept one, at the w it was
    validated with (sample.py's default is 0.5)."""
    best = os.path.join(args.out_dir, BEST)
    ckpt = best if os.path.isfile(best) else os.path.join(args.out_dir, CKPT)
    return f"python sample.py --ckpt {ckpt}" + (f" --w {args.val_w:g}" if args.val_w != 0.5 else "")


def stop_message(args, r: Trainer, why: str) -> str:
    """The last line of a stopped run: a signal means 'not finished' (resume); a spent time budget is the end that
    the preset plans, so the next step of the README's flow comes first."""
    resume = f"python train.py --resume --out-dir {args.out_dir}"
    where = f"{r.epoch} epochs done" + (f", {r.batch} batches into the next" if r.batch else "")
    said = f"\n{why}: saved {os.path.join(args.out_dir, CKPT)} at step {r.step} ({where}"
    if r.epoch >= args.epochs:  # the stop fell on the run's very last step: nothing is left to resume
        return f"{said}: the run is complete); next: {next_command(args)}"
    return f"{said}); " + (f"next: {next_command(args)} (or train on: {resume})" if why == "time budget"
                           else f"continue with: {resume}")


def train(args) -> ContextUnet:
    """Train as args say; returns the trained network (the plain module, as in the checkpoint)."""
    rank, world, device, prep_group = setup_distributed(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)  # only rank 0 speaks and writes checkpoints, logs and grids
    claim(args.out_dir, args.resume)  # a folder holds one run: nothing is written over another
    ckpt = resume_state(args, os.path.join(args.out_dir, CKPT)) if args.resume else None
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size}: the global batch must divide among {world} processes")
    precision = resolve_precision(args.precision, device)
    channels_last = resolve_channels_last(args.channels_last, device)
    fused = resolve_switch(args.fused_adam, device, "--fused-adam")
    compile = resolve_compile(args.compile, device)
    eval_every = (10 if device.type == "cuda" else 0) if args.eval_every is None else args.eval_every
    setup_backends(device, precision, args.deterministic)
    ensure_writable(args.out_dir, "--out-dir")
    images, cond, val_cond, judge = prepare(args, rank, device, prep_group, eval_every)
    torch.manual_seed(args.seed + rank)  # noise, t and condition drops differ per rank; the epoch order does not
    sched = {k: v.to(device) for k, v in ddpm_schedules(args.beta1, args.beta2, args.T, args.schedule,
                                                                  bool(args.zero_snr)).items()}
    r = make_trainer(args, device, precision, channels_last, fused, images, cond, sched)
    r.rank, r.world, r.bs, r.val_cond, r.judge = rank, world, r.bs // world, val_cond, judge
    n_batches = len(images) // (r.bs * world)  # the ragged last batch is dropped: BatchNorm dislikes tiny batches
    r.total_steps, r.config = args.epochs * n_batches, run_config(args, r)
    if ckpt:
        r.restore(ckpt)
        if r.batch >= n_batches:  # saved on an epoch's last batch (by an older version): that epoch is done
            r.next_epoch()
        say(f"resuming {os.path.join(args.out_dir, CKPT)} at epoch {r.epoch}, batch {r.batch}, step {r.step}")
    r.net = wrap(r.model, compile, device)
    say(describe(args, r, device, n_batches, compile))
    stop = {"signal": None}
    previous_handlers = catch_signals(stop)
    log = open(os.path.join(args.out_dir, METRICS), "a") if rank == 0 else None
    t_start, step0, loss_sum, loss_count, saved_at = time.time(), r.step, 0.0, 0, 0.0
    every = lambda n: bool(n) and (r.epoch % n == 0 or r.epoch == args.epochs)  # every n epochs, and the last one
    try:
        while r.epoch < args.epochs:
            if r.perm is None:
                r.perm = torch.randperm(len(images), generator=r.data_gen).to(device)  # the same on every rank
            bar = tqdm(range(r.batch, n_batches), desc=f"epoch {r.epoch + 1}/{args.epochs}", leave=False, disable=rank != 0)
            t_epoch, loss_sum, loss_count = time.time(), 0.0, 0
            for batch in bar:
                loss_value, signalled, time_up = train_step(r, shard(r.perm, batch, r.bs, rank, world), r.step,
                                                            bool(stop["signal"]), time.time() - t_start)
                if not math.isfinite(loss_value):  # checked before the update, on every rank: no weight is touched
                    raise UserError(f"loss became {loss_value} at epoch {r.epoch + 1}, step {r.step + 1}; "
                                    f"{args.out_dir}/ckpt.pt still holds the last good state: lower --lr and resume with --resume")
                r.batch, r.step, loss_sum, loss_count = batch + 1, r.step + 1, loss_sum + loss_value, loss_count + 1
                bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}",
                                run_left=fmt_time(time_left(args, t_start, r.step - step0, args.epochs * n_batches - r.step)))
                if r.step - step0 == 3 and rank == 0 and device.type == "cpu":  # said once, after a few steps
                    warn_cpu_time(args, bar, (time.time() - t_start) / 3, args.epochs * n_batches - r.step, n_batches)
                if signalled or time_up:  # at a spent time budget (the preset's planned end) the last state is scored too
                    epoch_done = r.batch == n_batches  # then the resume starts the next epoch, not an empty one
                    if epoch_done:
                        r.next_epoch()
                    val_acc = checkpoint(r, evaluate=bool(eval_every) and time_up or epoch_done and every(eval_every))
                    if rank == 0:
                        log_epoch(r, log, r.epoch + r.batch / n_batches, time.time() - t_epoch, loss_sum / loss_count,
                                  loss_count, t_start, val_acc, 0)
                    say(stop_message(args, r, "time budget" if time_up else stop["signal"] or "another process stopped"))
                    return r.model
            r.next_epoch()
            # a checkpoint (EMA statistics, a write of the whole state) every --save-every minutes on the shared clock,
            # not every few seconds on a fast GPU, and wherever a validation, a progress grid (both need the EMA
            # statistics) or the end needs one
            scored, grid = every(eval_every), every(args.sample_every)
            save = scored or grid or r.epoch == args.epochs or r.clock - saved_at >= 60 * args.save_every
            val_acc = checkpoint(r, evaluate=scored) if save else None
            saved_at = r.clock if save else saved_at
            if rank == 0:
                log_epoch(r, log, r.epoch, time.time() - t_epoch, loss_sum / max(loss_count, 1), loss_count, t_start, val_acc,
                          time_left(args, t_start, r.step - step0, (args.epochs - r.epoch) * n_batches), save)
            if rank == 0 and grid:
                progress_grid(r)
    finally:  # leave the process as we found it (tests call train() in-process)
        if log:
            log.close()
        release_signals(previous_handlers)
        if dist.is_initialized():
            dist.destroy_process_group()
    say(f"done: {r.epoch} epochs, {r.step} steps in {(time.time() - t_start) / 60:.1f} min, final loss "
        f"{loss_sum / max(loss_count, 1):.4f}; checkpoint {os.path.join(args.out_dir, CKPT)}; next: {next_command(args)}")
    return r.model


def run_config(args, r: Trainer) -> dict:
    """What a checkpoint records of the run: the network's constructor arguments, the noise process, every setting.
    Input paths are stored absolute, so that sample.py and evaluate.py find the data from any folder; out_dir is
    recorded but never read back (a run's files are where its checkpoint is)."""
    train = {k: v for k, v in vars(args).items() if k not in ("explicit", "resume", "device")}
    train.update({k: os.path.abspath(train[k]) for k in PATHS if train.get(k)})
    return {"model": r.model.config, "data_dir": train["data_dir"], "T": args.T, "beta1": args.beta1,
            "beta2": args.beta2, "schedule": args.schedule, "zero_snr": args.zero_snr, "prediction": args.prediction,
            "train": train}


def describe(args, r: Trainer, device: torch.device, n_batches: int, compiled: bool = False) -> str:
    """The run's first line: the network, the data, the step, the device and its switches."""
    return (f"ContextUnet: {count_params(r.model) / 1e6:.2f}M parameters, {args.image_size}px, n_feat {args.n_feat}; "
            f"{len(r.images)} images from {args.data_dir}; {n_batches} steps/epoch of {r.bs * r.world}"
            f"{f' ({r.world} processes x {r.bs})' if r.world > 1 else ''}; device {device}, {r.precision}"
            f"{', channels_last' if r.channels_last else ''}{', fused Adam' if r.opt.param_groups[0]['fused'] else ''}"
            f"{', compiled' if compiled else ''}{f', stops after {args.minutes:g} min' if args.minutes else ''}")


def main():
    run_cli(train, get_args())


if __name__ == "__main__":
    main()

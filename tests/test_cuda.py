"""The CUDA paths, ready for the first GPU run: each precision against fp32, CUDA checkpoints on the CPU and CPU
checkpoints on CUDA, the judge on both devices, same seed same images, exact resume, torchrun with NCCL.
Skipped where there is no GPU."""
import os
import signal
import subprocess
import sys

import numpy as np

import pytest
import torch
from PIL import Image

import train
from model import ContextUnet
from schedule import Diffusion
from settings import decide

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "16", "--n-feat", "8", "--batch-size", "12", "--T", "20", "--sample-every", "0",
        "--eval-every", "0", "--compile", "0"]  # validation and compile are on by default on a GPU: tested on their own
CUDA = torch.device("cuda")


def step_on_cuda(precision, channels_last=True):
    torch.manual_seed(0)
    model = ContextUnet(n_feat=32, image_size=32).to(CUDA)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(16, 3, 32, 32, generator=g) * 2 - 1).to(CUDA)
    cond = (torch.rand(16, 24, generator=g) < 0.1).float().to(CUDA)
    torch.manual_seed(2)
    loss = Diffusion(T=50).loss(model, x0, cond, 0.1, 0.0, precision, channels_last)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()])


@pytest.fixture(autouse=True)
def backends_restored():
    """Each test leaves the global switches (TF32, cuDNN, deterministic mode) as it found them."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.deterministic) = saved[:4]
        torch.use_deterministic_algorithms(saved[4])


def test_the_card_is_what_the_precision_rule_says():
    # the first line to read on a new machine: name, capability, what auto picks, and torch's own view of bf16
    from device import has_bf16, resolve_precision
    cap = torch.cuda.get_device_capability()
    print(f"{torch.cuda.get_device_name()} capability {cap}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"is_bf16_supported {torch.cuda.is_bf16_supported()} / without emulation "
          f"{torch.cuda.is_bf16_supported(including_emulation=False)}")
    assert has_bf16(CUDA) == (cap >= (8, 0)) == torch.cuda.is_bf16_supported(including_emulation=False)
    assert resolve_precision("auto", CUDA) == ("bf16" if cap >= (8, 0) else "fp16")


@pytest.mark.parametrize("precision,tol", [("bf16", 0.05), ("fp16", 0.01)])
def test_one_cuda_training_step_in_each_precision_agrees_with_fp32(precision, tol):
    from device import has_bf16
    if precision == "bf16" and not has_bf16(CUDA):
        pytest.skip("this GPU has no bf16")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # the reference is float32 proper
    loss32, grad32 = step_on_cuda("fp32", channels_last=False)
    loss, grad = step_on_cuda(precision)  # channels_last, as training runs on CUDA; the head included
    assert abs(loss - loss32) / loss32 < tol
    assert torch.nn.functional.cosine_similarity(grad, grad32, dim=0).item() > 1 - tol


def test_bf16_on_cuda_keeps_neighbouring_timesteps_apart():
    model = ContextUnet(n_feat=8, image_size=16).to(CUDA).eval()
    x = torch.randn(1, 3, 16, 16, device=CUDA).repeat(2, 1, 1, 1)
    with torch.autocast("cuda", torch.bfloat16):
        out = model(x, torch.zeros(2, 24, device=CUDA), torch.tensor([398 / 400, 399 / 400], device=CUDA))
    assert not torch.equal(out[0], out[1])


def run(*args):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def test_a_cuda_checkpoint_samples_on_the_cpu_and_a_cpu_checkpoint_resumes_on_cuda(tiny_data, tmp_path):
    run("train.py", "--data-dir", tiny_data, "--out-dir", str(tmp_path / "g"), *TINY, "--epochs", "1",
        "--device", "cuda")
    run("sample.py", "--ckpt", str(tmp_path / "g" / "ckpt.pt"), "--split", "test", "--sampler", "ddim", "--steps", "5",
        "--device", "cpu")
    assert len(os.listdir(tmp_path / "g" / "samples" / "test")) == 32
    run("train.py", "--data-dir", tiny_data, "--out-dir", str(tmp_path / "c"), *TINY, "--epochs", "1",
        "--device", "cpu")
    run("train.py", "--out-dir", str(tmp_path / "c"), "--epochs", "2", "--resume", "--device", "cuda")  # NCHW moments
    ckpt = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=False)  # under channels_last weights, fused Adam
    assert ckpt["step"] == 6


def test_the_judge_gives_the_same_accuracy_on_cuda_and_cpu(tmp_path):
    from evaluator import build_classifier, evaluation_model
    torch.manual_seed(0)
    torch.save({"model": build_classifier().state_dict()}, tmp_path / "clf.pth")
    g = torch.Generator().manual_seed(1)
    images = torch.rand(64, 3, 64, 64, generator=g) * 2 - 1
    labels = torch.zeros(64, 24)
    for i in range(64):
        labels[i, torch.randperm(24, generator=g)[: 1 + i % 3]] = 1
    cpu, gpu = evaluation_model(str(tmp_path / "clf.pth"), "cpu"), evaluation_model(str(tmp_path / "clf.pth"), "cuda")
    torch.testing.assert_close(gpu.predict(images), cpu.predict(images), rtol=1e-3, atol=1e-4)
    assert gpu.eval(images, labels) == cpu.eval(images, labels)


def test_the_same_seed_gives_the_same_images_twice_on_cuda():
    torch.manual_seed(0)
    model = ContextUnet(n_feat=16, image_size=16).to(CUDA).eval()
    cond = (torch.rand(8, 24) < 0.1).float()
    a, _ = Diffusion(T=50).sample(model, cond, sampler="ddpm", seed=3)
    b, _ = Diffusion(T=50).sample(model, cond, sampler="ddpm", seed=3)
    assert torch.equal(a, b)


def test_a_short_cuda_run_resumes_to_the_same_state_with_deterministic_kernels(tiny_data, tmp_path):
    # without --deterministic 1, cuDNN may pick nondeterministic backward kernels (atomic adds in the weight
    # gradients of convolutions): a resume is then close, not bit-exact. The log-SNR draw of t runs on the device too
    from test_reliability import assert_same_state
    common = ["--data-dir", tiny_data, *TINY, "--device", "cuda", "--deterministic", "1", "--logsnr-draw", "3,2"]
    train.train(decide([*common, "--out-dir", str(tmp_path / "a"), "--epochs", "2"]))
    train.train(decide([*common, "--out-dir", str(tmp_path / "b"), "--epochs", "1"]))
    train.train(decide([*common, "--out-dir", str(tmp_path / "b"), "--epochs", "2", "--resume"]))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("a", "b"))
    assert_same_state(a, b)


def test_torchrun_with_nccl_trains_one_epoch(tiny_data, tmp_path):
    p = run("-m", "torch.distributed.run", "--nproc_per_node=1", "train.py", "--data-dir", tiny_data,
            "--out-dir", str(tmp_path), *TINY, "--epochs", "1")
    assert "device cuda:0" in p.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["epoch"] == 1


def test_fp16_trains_an_epoch_and_resumes_with_fused_adam(tiny_data, tmp_path):
    # the fp16 gradient scaler hands its scale to fused Adam; a resume must not bring back an unfused Adam
    common = ["--data-dir", tiny_data, "--out-dir", str(tmp_path), *TINY, "--device", "cuda", "--precision", "fp16"]
    run("train.py", *common, "--epochs", "1", "--fused-adam", "0")
    p = run("train.py", *common, "--epochs", "2", "--fused-adam", "1", "--resume")
    assert "fp16" in p.stdout and "fused Adam" in p.stdout
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 6 and all(g["fused"] for g in ckpt["optimizer"]["param_groups"])
    assert ckpt["scaler"]["scale"] > 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                               if v.is_floating_point())


def test_compiled_training_on_cuda_alone_and_under_torchrun(tiny_data, tmp_path):
    args = ["--data-dir", tiny_data, *TINY, "--epochs", "1", "--compile", "1"]
    p = run("train.py", *args, "--out-dir", str(tmp_path / "a"), "--device", "cuda")
    q = run("-m", "torch.distributed.run", "--nproc_per_node=1", "train.py", *args, "--out-dir", str(tmp_path / "b"))
    assert "device cuda" in p.stdout and "device cuda:0" in q.stdout and ", compiled" in p.stdout
    for d in ("a", "b"):
        ckpt = torch.load(tmp_path / d / "ckpt.pt", weights_only=False)
        assert ckpt["epoch"] == 1 and not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def pngs(folder):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i}.png")), dtype=np.float32) for i in range(32)])


@pytest.mark.parametrize("precision,max_mean_diff", [("fp32", 0.5), ("auto", 6.0)])
def test_sampling_on_cuda_draws_what_the_cpu_draws_from_the_same_checkpoint_and_seed(tiny_data, tmp_path, precision,
                                                                                       max_mean_diff):
    # x_T comes from the CPU generator on every device, so DDIM differs only by arithmetic: folded BatchNorm,
    # channels_last, cuDNN kernels and (auto) bf16. Tolerance in 8-bit levels of the written PNGs: fp32 differs by
    # rounding (under half a level on average), bf16 (8-bit mantissa) by a few levels
    run("train.py", "--data-dir", tiny_data, "--out-dir", str(tmp_path), *TINY, "--epochs", "2", "--device", "cuda")
    draw = ["sample.py", "--ckpt", str(tmp_path / "ckpt.pt"), "--split", "test", "--sampler", "ddim", "--steps", "10",
            "--seed", "3"]
    run(*draw, "--device", "cpu", "--out-dir", str(tmp_path / "cpu"))
    p = run(*draw, "--device", "cuda", "--precision", precision, "--out-dir", str(tmp_path / "gpu"))
    assert "on cuda" in p.stdout
    cpu, gpu = pngs(tmp_path / "cpu" / "test"), pngs(tmp_path / "gpu" / "test")
    diff = np.abs(cpu - gpu)
    print(f"{precision}: mean {diff.mean():.3f}, max {diff.max():.0f} levels")
    # and the tolerance is far below how much two different images of the split differ
    assert diff.mean() < max_mean_diff and np.abs(cpu - cpu[::-1]).mean() > 4 * max_mean_diff


def test_the_time_budget_and_sigterm_stop_a_cuda_run_cleanly_and_it_resumes(tiny_data, tmp_path):
    from test_reliability import wait_for_checkpoint
    common = ["--data-dir", tiny_data, *TINY, "--device", "cuda", "--epochs", "100000"]
    p = run("train.py", *common, "--out-dir", str(tmp_path / "m"), "--minutes", "0.3")
    assert "time budget: saved" in p.stdout and "next: python sample.py" in p.stdout
    stopped = torch.load(tmp_path / "m" / "ckpt.pt", weights_only=False)
    assert 0 < stopped["step"] and stopped["perm"].device.type == "cpu"  # a mid-epoch CUDA checkpoint loads anywhere
    proc = subprocess.Popen([sys.executable, "train.py", *common, "--out-dir", str(tmp_path / "s")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(tmp_path / "s", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM: saved" in out, err[-2000:]
    step = torch.load(tmp_path / "s" / "ckpt.pt", weights_only=False)["step"]
    run("train.py", "--out-dir", str(tmp_path / "s"), "--resume", "--epochs", str(step // 3 + 2))
    assert torch.load(tmp_path / "s" / "ckpt.pt", weights_only=False)["step"] == 3 * (step // 3 + 2)


def test_sampling_from_cuda_graphs_draws_the_same_images_as_plain_launches():
    torch.manual_seed(0)
    from model import fold_batchnorm
    model = fold_batchnorm(ContextUnet(n_feat=16, image_size=16).to(CUDA).eval()).to(memory_format=torch.channels_last)
    cond = torch.zeros(6, 24)
    cond[:, 4] = 1
    diffusion = Diffusion(T=30)
    for sampler, precision in (("ddim", "fp32"), ("ddpm", "bf16")):
        plain, _ = diffusion.sample(model, cond, w=2.0, sampler=sampler, steps=10, seed=5, precision=precision)
        graphed, _ = diffusion.sample(model, cond, w=2.0, sampler=sampler, steps=10, seed=5, precision=precision,
                                      cuda_graph=True)
        torch.testing.assert_close(graphed, plain, rtol=0, atol=1e-5 if precision == "fp32" else 2e-2)
        # unbatched guidance: two forwards a step share one graph; the first's output must survive the second
        separate, _ = diffusion.sample(model, cond, w=2.0, sampler=sampler, steps=10, seed=5, precision=precision,
                                       cuda_graph=True, batched_guidance=False)
        torch.testing.assert_close(separate, plain, rtol=0, atol=1e-4 if precision == "fp32" else 5e-2)

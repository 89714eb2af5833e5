"""The CUDA paths, ready for the first GPU run: each precision against fp32, CUDA checkpoints on the CPU and CPU
checkpoints on CUDA, the judge on both devices, same seed same images, exact resume, torchrun with NCCL.
Skipped where there is no GPU."""
import os
import subprocess
import sys

import pytest
import torch

import train
from model import ContextUnet
from sample import sample_images
from schedule import ddpm_schedules

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "16", "--n-feat", "8", "--batch-size", "12", "--T", "20", "--sample-every", "0"]
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
    loss = train.diffusion_loss(model, x0, cond, {k: v.to(CUDA) for k, v in ddpm_schedules(T=50).items()}, 0.1,
                                precision, channels_last)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()])


@pytest.mark.parametrize("precision,tol", [("bf16", 0.05), ("fp16", 0.01)])
def test_one_cuda_training_step_in_each_precision_agrees_with_fp32(precision, tol):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.backends.cudnn.allow_tf32 = False  # the reference is float32 proper
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
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def test_a_cuda_checkpoint_samples_on_the_cpu_and_a_cpu_checkpoint_resumes_on_cuda(tiny_data, tmp_path):
    run("train.py", "--data-dir", tiny_data, "--out-dir", str(tmp_path / "g"), *TINY, "--epochs", "1", "--device", "cuda")
    run("sample.py", "--ckpt", str(tmp_path / "g" / "ckpt.pt"), "--split", "test", "--sampler", "ddim", "--steps", "5",
        "--device", "cpu")
    assert len(os.listdir(tmp_path / "g" / "samples" / "test")) == 32
    run("train.py", "--data-dir", tiny_data, "--out-dir", str(tmp_path / "c"), *TINY, "--epochs", "1", "--device", "cpu")
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
    a, _ = sample_images(model, cond, ddpm_schedules(T=50), sampler="ddpm", seed=3)
    b, _ = sample_images(model, cond, ddpm_schedules(T=50), sampler="ddpm", seed=3)
    assert torch.equal(a, b)


def test_a_short_cuda_run_resumes_to_the_same_state_with_deterministic_kernels(tiny_data, tmp_path):
    # without --deterministic 1, cuDNN may pick nondeterministic backward kernels (atomic adds in the weight
    # gradients of convolutions): a resume is then close, not bit-exact
    from test_reliability import assert_same_state
    common = ["--data-dir", tiny_data, *TINY, "--device", "cuda", "--deterministic", "1"]
    train.train(train.get_args([*common, "--out-dir", str(tmp_path / "a"), "--epochs", "2"]))
    train.train(train.get_args([*common, "--out-dir", str(tmp_path / "b"), "--epochs", "1"]))
    train.train(train.get_args([*common, "--out-dir", str(tmp_path / "b"), "--epochs", "2", "--resume"]))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("a", "b"))
    assert_same_state(a, b)
    torch.use_deterministic_algorithms(False)


def test_torchrun_with_nccl_trains_one_epoch(tiny_data, tmp_path):
    p = run("-m", "torch.distributed.run", "--nproc_per_node=1", "train.py", "--data-dir", tiny_data,
            "--out-dir", str(tmp_path), *TINY, "--epochs", "1")
    assert "device cuda:0" in p.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["epoch"] == 1

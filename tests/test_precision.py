"""Every precision and speed switch executed on the CPU: bf16 and fp16 (with its gradient scaler) against fp32,
channels_last, fused Adam, and the one place that chooses them for a device."""
import copy
import os

import pytest
import torch

import device as device_module
import train
from device import autocast, resolve_precision
from model import ContextUnet
from schedule import Diffusion
from cli import UserError
from conftest import TINY, tiny_run
from settings import decide

CPU = torch.device("cpu")


def one_step_grads(precision, channels_last=False):
    """Loss and gradients of one training step of a fixed tiny network on a fixed batch."""
    torch.manual_seed(0)
    model = ContextUnet(n_feat=16, image_size=16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x0, cond = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, (torch.rand(8, 24, generator=g) < 0.1).float()
    torch.manual_seed(2)  # the same t, eps and condition drops in every precision
    loss = Diffusion(T=50).loss(model, x0, cond, 0.1, 0.0, precision, channels_last)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("precision,tol", [("bf16", 0.05), ("fp16", 0.01)])
def test_a_training_step_in_half_precision_agrees_with_fp32(precision, tol):
    loss32, grad32 = one_step_grads("fp32")
    loss, grad = one_step_grads(precision)
    assert abs(loss - loss32) / loss32 < tol, (loss, loss32)  # bf16 has 8 mantissa bits, fp16 11
    cosine = torch.nn.functional.cosine_similarity(grad, grad32, dim=0).item()
    assert cosine > 1 - tol, cosine


def test_channels_last_gives_the_same_step_as_nchw():
    loss_a, grad_a = one_step_grads("fp32")
    loss_b, grad_b = one_step_grads("fp32", channels_last=True)
    assert abs(loss_a - loss_b) < 1e-5
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-3, atol=1e-5)


def test_fused_adam_moves_the_weights_as_for_each_adam():
    torch.manual_seed(0)
    a = ContextUnet(n_feat=8, image_size=16)
    b = copy.deepcopy(a)
    opts = [torch.optim.Adam(a.parameters(), lr=1e-3), torch.optim.Adam(b.parameters(), lr=1e-3, fused=True)]
    start = [p.detach().clone() for p in a.parameters()]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same gradients for both: only the optimizer's code path differs
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=g)
            pb.grad = pa.grad.clone()
        for opt in opts:
            opt.step()
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), start):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
        assert (pb - p0).abs().max() > 1e-3  # both really stepped (3 steps of lr 1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_on_a_tiny_set_has_a_finite_falling_loss(precision, tiny_data, tmp_path):
    args = decide(["--data-dir", tiny_data, "--out-dir", str(tmp_path), *TINY, "--epochs", "6",
                           "--precision", precision, "--lr", "3e-3"])
    train.train(args)
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in open(tmp_path / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def test_fp16_scaler_state_survives_a_resume_bit_for_bit(tiny_data, tmp_path):
    from test_reliability import assert_same_state
    straight = tiny_run(tiny_data, tmp_path / "a", "--epochs", "2", "--precision", "fp16")
    tiny_run(tiny_data, tmp_path / "b", "--epochs", "1", "--precision", "fp16")
    resumed = tiny_run(tiny_data, tmp_path / "b", "--epochs", "2", "--resume")  # fp16 comes from the checkpoint
    assert straight["scaler"]["scale"] > 0 and straight["scaler"] == resumed["scaler"]
    assert straight["config"]["train"]["precision"] == resumed["config"]["train"]["precision"] == "fp16"
    assert_same_state(straight, resumed)


def test_a_step_the_fp16_scaler_skips_is_not_a_nan_stop(tiny_data, tmp_path, monkeypatch):
    # a scale of 2^100 overflows every fp16 gradient: each step is skipped, the scale halves, training goes on
    monkeypatch.setattr(train, "grad_scaler", lambda device, precision: torch.amp.GradScaler(
        device.type, init_scale=2.0 ** 100, enabled=precision == "fp16"))
    model = train.train(decide(["--data-dir", tiny_data, "--out-dir", str(tmp_path), *TINY, "--epochs", "1",
                                        "--precision", "fp16"]))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["scaler"]["scale"] == 2.0 ** 97  # three skips, three halvings
    torch.manual_seed(42)  # the seed train.py starts from: the weights are still the initial ones
    initial = ContextUnet(3, 8, 24, 16)
    for name, p in initial.named_parameters():
        assert torch.equal(model.state_dict()[name], p), name


def test_channels_last_and_fused_adam_train_and_are_saved_in_that_layout(tiny_data, tmp_path):
    train.train(decide(["--data-dir", tiny_data, "--out-dir", str(tmp_path), *TINY, "--epochs", "1",
                                "--channels-last", "1", "--fused-adam", "1"]))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    w = ckpt["model"]["init_conv.conv1.0.weight"]
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_sampling_agrees_with_fp32(precision):
    torch.manual_seed(0)
    model = ContextUnet(n_feat=8, image_size=16).eval()
    cond = torch.zeros(4, 24)
    cond[:, 5] = 1
    ref, _ = Diffusion(T=20).sample(model, cond, sampler="ddim", steps=5, precision="fp32")
    out, _ = Diffusion(T=20).sample(model, cond, sampler="ddim", steps=5, precision=precision)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().mean() < 0.05 and not torch.equal(out, ref)  # the half-precision path really ran


@pytest.mark.parametrize("capability,expected",
                         [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_follows_the_cards_compute_capability(monkeypatch, capability, expected):
    # V100 7.0 and T4 / RTX 20xx 7.5 have no bf16 tensor cores, though torch's is_bf16_supported() counts emulation
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    assert resolve_precision("auto", gpu) == expected
    if expected == "fp16":
        with pytest.raises(device_module.UserError, match="Tesla T4 has no bf16; use fp16 or auto"):
            resolve_precision("bf16", gpu)
    else:
        assert resolve_precision("bf16", gpu) == "bf16"
    assert resolve_precision("fp16", CPU) == "fp16"  # every precision runs on the CPU too


@pytest.mark.parametrize("amx,avx512_bf16,vendor,bf16", [(True, True, "GenuineIntel", True),
                                                       (False, True, "AuthenticAMD", True),
                                                       (False, True, "GenuineIntel", False),
                                                       (False, False, "AuthenticAMD", False),
                                                       (False, False, "", False)])
def test_auto_on_a_cpu_means_bf16_where_measured_faster_and_channels_last_only_with_amx(monkeypatch, amx, avx512_bf16,
                                                                                        vendor, bf16, tiny_data,
                                                                                        tmp_path, capsys):
    # torch's own probes and the vendor decide; a training run then says what it resolved to on its first line
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(device_module, "cpu_vendor", lambda: vendor)
    assert resolve_precision("auto", CPU) == ("bf16" if bf16 else "fp32")
    assert device_module.resolve_channels_last("auto", CPU) is amx
    assert device_module.resolve_switch("auto", CPU, "--fused-adam") is False  # never measured on a CPU: off
    train.train(decide(["--data-dir", tiny_data, "--out-dir", str(tmp_path), *TINY, "--epochs", "1"]))
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ContextUnet:"))
    assert ("device cpu, bf16" if bf16 else "device cpu, fp32") in first
    assert ("channels_last" in first) is amx
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert not device_module.cpu_bf16_fast()  # a build without the private probes counts as neither


def test_the_cpu_vendor_is_read_from_cpuinfo_and_is_empty_without_one(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n\nprocessor\t: 1\n"
                       "vendor_id\t: AuthenticAMD\n")
    assert device_module.cpu_vendor(str(cpuinfo)) == "AuthenticAMD"
    assert device_module.cpu_vendor(str(tmp_path / "absent")) == ""  # macOS, Windows: fp32 unless AMX


def test_autocast_is_off_for_fp32_and_casts_for_half():
    x = torch.randn(2, 4)
    lin = torch.nn.Linear(4, 4)
    with autocast(CPU, "fp32"):
        assert lin(x).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert lin(x).dtype == torch.bfloat16


def test_compiled_training_matches_eager_training(tiny_data, tmp_path, monkeypatch):
    # torch.compile (inductor, a C++ compiler on the CPU) of the tiny network's forward and backward: about 20 s
    import torch._dynamo
    monkeypatch.delenv("TORCH_COMPILE_DISABLE")  # the suite's switch, read once where torch._dynamo was imported
    monkeypatch.setattr(torch._dynamo.config, "disable", False)
    eager = train.train(decide(["--data-dir", tiny_data, "--out-dir", str(tmp_path / "e"), *TINY, "--epochs", "1",
                                "--compile", "0"]))
    torch._dynamo.reset()  # a graph compiled by an earlier test would be reused, and counted no more
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = train.train(decide(["--data-dir", tiny_data, "--out-dir", str(tmp_path / "c"), *TINY,
                                   "--epochs", "1", "--compile", "1"]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # really compiled, not run eager
    ckpt = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=False)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])  # the plain module is saved
    loss = lambda run: float(open(tmp_path / run / "metrics.jsonl").readline().split('"loss": ')[1].split(",")[0])
    assert abs(loss("c") - loss("e")) < 1e-4 * loss("e")  # the same losses, step for step, to rounding
    for name, p in eager.named_parameters():  # Adam turns rounding-sized gradients of biases into lr-sized steps
        torch.testing.assert_close(compiled.state_dict()[name], p.detach(), rtol=0, atol=1e-3)


def test_cpu_tests_stay_on_the_cpu_where_cuda_looks_available(monkeypatch):
    # conftest's fixture: on a GPU machine, --device auto in this suite (here and in any process it starts) is the CPU
    import subprocess
    import sys
    from device import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == CPU
    driver = ("import torch; torch.cuda.is_available = lambda: True; "
              "import distributed, sample, evaluator, bench; print(distributed.resolve_device('auto'), "
              "sample.resolve_device('auto'), evaluator.resolve_device('auto'), bench.resolve_device('auto'))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", driver], cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.split() == ["cpu"] * 4, p.stdout[-2000:] + p.stderr[-2000:]


def test_a_resume_runs_the_adam_this_run_asks_for_not_the_checkpoints(tiny_data, tmp_path):
    # the checkpoint's param groups say fused=False; loaded as they were, the fp16 scaler would hand its scale to
    # unfused Adam ("Expected grad_scale and found_inf to be None")
    common = ["--data-dir", tiny_data, "--out-dir", str(tmp_path), *TINY, "--precision", "fp16"]
    train.train(decide([*common, "--epochs", "1", "--fused-adam", "0"]))
    train.train(decide([*common, "--epochs", "2", "--fused-adam", "1", "--resume"]))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 6 and all(g["fused"] and not g["foreach"] for g in ckpt["optimizer"]["param_groups"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    train.train(decide([*common, "--epochs", "3", "--fused-adam", "0", "--resume"]))  # and back again
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 9 and not any(g["fused"] for g in ckpt["optimizer"]["param_groups"])


def test_compile_auto_is_on_where_a_compiler_builds_the_kernels_and_off_elsewhere(monkeypatch):
    import device
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("TORCH_COMPILE_DISABLE")
    monkeypatch.setattr(device.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(device, "cpu_compile_error", lambda: "")  # inductor built its probe
    assert device.resolve_compile("auto", cuda) and device.resolve_compile("auto", cpu)
    assert not device.resolve_compile("auto", cpu, "bf16")  # measured compiled in fp32 only
    assert device.resolve_compile("1", cpu, "bf16") and not device.resolve_compile("0", cuda)
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")  # torch's own off switch
    assert not device.resolve_compile("auto", cpu) and not device.resolve_compile("auto", cuda)
    with pytest.raises(UserError, match="--compile 1: TORCH_COMPILE_DISABLE is set, which turns torch.compile off"):
        device.resolve_compile("1", cuda)  # it would say compiled and run eager
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "0")
    assert device.resolve_compile("auto", cpu)
    monkeypatch.delenv("TORCH_COMPILE_DISABLE")
    monkeypatch.setattr(device.shutil, "which", lambda name: None)  # Triton could not build its launcher
    monkeypatch.setattr(device, "cpu_compile_error", lambda: "InvalidCxxCompiler: no working C++ compiler")
    assert not device.resolve_compile("auto", cuda) and not device.resolve_compile("auto", cpu)
    assert device.resolve_compile("1", cuda)
    with pytest.raises(UserError, match=r"--compile 1: torch.compile cannot build CPU kernels here "
                                        r"\(InvalidCxxCompiler: no working C\+\+ compiler\); it needs a C\+\+"):
        device.resolve_compile("1", cpu)


def test_without_the_compiler_torch_would_use_the_probe_fails_and_auto_trains_eager(monkeypatch):
    import torch._inductor.config as inductor
    import device
    monkeypatch.delenv("TORCH_COMPILE_DISABLE")
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    device.cpu_compile_error.cache_clear()  # probe here, and again after the test
    torch._dynamo.reset()  # dynamo keeps the probe's compiled frame from an earlier probe in this process
    try:
        assert device.cpu_compile_error()  # a reason, such as "InvalidCxxCompiler: ..."
        assert not device.resolve_compile("auto", torch.device("cpu"))
    finally:
        device.cpu_compile_error.cache_clear()

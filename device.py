"""Where and in what precision the scripts run: one place decides the device, the autocast dtype, and the backend
switches that go with them, so train.py, sample.py, bench.py and evaluator.py always agree.

precision "auto": bf16 on GPUs that support it (Ampere and later), fp16 with a gradient scaler on older GPUs (T4,
V100, RTX 20xx); on a CPU, bf16 where it was measured faster than fp32 (cpu_bf16_fast), else fp32. Every precision
also runs on the CPU, so the tests execute each path.
"""
import functools
import os
import shutil

import torch

from cli import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """'auto' is cuda where there is a GPU, else the CPU; ICLEVR_DEVICE=cpu (or cuda) overrides what 'auto' means, for
    a shared GPU machine and for the test suite, which runs every test outside tests/test_cuda.py on the CPU."""
    if name == "auto":
        name = os.environ.get("ICLEVR_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N")


def has_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 (Ampere) or newer. Not torch.cuda.is_bf16_supported(), which also
    counts emulation, and says True on a T4 or V100, where bf16 convolutions are slow or missing."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_has_amx() -> bool:
    """AMX matrix units (Intel Xeon from Sapphire Rapids on): there oneDNN runs bf16 convolutions at about twice fp32's
    speed (measured in docs/RESULTS.md)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own probe; private, so absent means no
    return bool(probe and probe())


@functools.lru_cache(maxsize=None)
def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor_id in Linux's cpuinfo (GenuineIntel, AuthenticAMD); '' where there is no such file."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def cpu_bf16_fast() -> bool:
    """Whether bf16 trains faster than fp32 on this CPU, as measured (docs/RESULTS.md): with AMX (about 2x), and on an
    AMD CPU with AVX-512's bf16 instructions (Zen 4 on: 1.4x the compiled fp32 step, the classifier's 1.6x).
    An Intel CPU with those instructions but no AMX measured no faster than fp32, and other CPUs emulate bf16."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return cpu_has_amx() or (bool(probe and probe()) and cpu_vendor() == "AuthenticAMD")


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16, fp16 or fp32 as the device allows; an explicit choice is checked against the device."""
    if name not in PRECISIONS:
        raise UserError(f"--precision {name}: not a precision; use {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type != "cuda":
            return "bf16" if device.type == "cpu" and cpu_bf16_fast() else "fp32"
        return "bf16" if has_bf16(device) else "fp16"
    if name == "bf16" and device.type == "cuda" and not has_bf16(device):
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or auto")
    return name


def resolve_switch(value, device: torch.device, flag: str, on_cpu: bool = False) -> bool:
    """A speed switch given as auto, 1 or 0: 'auto' is on for CUDA (where it pays), and on a CPU only where on_cpu
    says it was measured to pay there."""
    if str(value) == "auto":
        return device.type == "cuda" or (device.type == "cpu" and on_cpu)
    if str(value) in ("0", "1"):
        return str(value) == "1"
    raise UserError(f"{flag} {value}: use auto, 1 or 0")


@functools.lru_cache(maxsize=1)
def cpu_compile_error() -> str:
    """Why torch.compile cannot build CPU kernels here ('' where it can): inductor must find its C++ compiler ($CXX,
    else g++, clang++ on macOS) and build with it against Python's and torch's headers. Tried once per process on a
    two-element function (a few seconds), so that a broken toolchain means eager training, not a traceback."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
        return ""
    except Exception as e:  # InvalidCxxCompiler where none is found; a build error where one fails
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"


def compile_disabled() -> bool:
    """TORCH_COMPILE_DISABLE, torch's own off switch, is set (the test suite sets it: its runs last seconds)."""
    return os.environ.get("TORCH_COMPILE_DISABLE", "") not in ("", "0")


def resolve_compile(value, device: torch.device, precision: str = "fp32") -> bool:
    """--compile: auto is on for CUDA where a C compiler is on PATH (Triton builds its kernel launcher with one), and
    on a CPU in fp32 where inductor builds a kernel (cpu_compile_error; the CPU preset's fp32 step measured 1.36x
    faster compiled, docs/RESULTS.md; bf16 on AMD's Zen 4 measured slower compiled). Where it cannot, auto trains eager;
    1 is refused in one line with the reason. TORCH_COMPILE_DISABLE=1 makes auto mean eager."""
    if str(value) == "auto":
        if compile_disabled():
            return False
        if device.type == "cuda":
            return any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))
        return device.type == "cpu" and precision == "fp32" and not cpu_compile_error()
    if str(value) == "1" and compile_disabled():
        raise UserError("--compile 1: TORCH_COMPILE_DISABLE is set, which turns torch.compile off; unset it, or use "
                        "--compile 0")
    if str(value) == "1" and device.type == "cpu" and cpu_compile_error():
        raise UserError(f"--compile 1: torch.compile cannot build CPU kernels here ({cpu_compile_error()}); it needs "
                        f"a C++ compiler such as g++ (apt install g++, xcode-select --install), or use --compile 0")
    return resolve_switch(value, device, "--compile")


def resolve_channels_last(value, device: torch.device) -> bool:
    """--channels-last: auto is on for CUDA and for a CPU with AMX, where it was measured with bf16
    (docs/RESULTS.md)."""
    return resolve_switch(value, device, "--channels-last", on_cpu=cpu_has_amx())


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision: fp32 runs with autocast off."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 have fp32's range and need none (the scaler is
    then a pass-through that still offers state_dict, so checkpoints have one format)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def setup_backends(device: torch.device, precision: str, deterministic: bool = False) -> None:
    """fp32 means float32: TF32 (10-bit mantissa, on by default for cuDNN convolutions) is switched off with it.
    Shapes are fixed in training and sampling, so cuDNN may benchmark its kernels once; with deterministic, it
    must not, and every op must pick a deterministic kernel (bit-exact resumes on CUDA, at some speed)."""
    deterministic = bool(deterministic)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
    torch.use_deterministic_algorithms(deterministic)


def graphed(model, device: torch.device, precision: str):
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

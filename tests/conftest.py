# SPDX-License-Identifier: Apache-2.0
"""Central device/arch skips (tests never branch on the device themselves), seeding, and poisoned
outputs for every op call."""

import importlib.util
import os
import sys

import pytest
import torch

import fastlayers
from fastlayers import _ext
from fastlayers.ops import set_poison_outputs


def _load_test_extension(path: str):
    """FASTLAYERS_TEST_C=<path to a built _C*.so>: the suite runs against that build of the
    compiled module instead of the installed one (e.g. a CUDA emulation build, tests/cuda_emu)."""
    spec = importlib.util.spec_from_file_location("fastlayers_test_build._C", path)
    if spec is None or spec.loader is None:
        raise pytest.UsageError(f"FASTLAYERS_TEST_C={path}: not a loadable module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _ext.C, _ext.LOAD_ERROR = module, None


if os.environ.get("FASTLAYERS_TEST_C"):
    _load_test_extension(os.environ["FASTLAYERS_TEST_C"])

HAS_CUDA = torch.cuda.is_available() and _ext.has_cuda_kernels()
IS_SM90 = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
# A test build whose CUDA kernels run on the CPU (tests/cuda_emu): the "cuda_emu" device runs them.
CUDA_EMULATED = _ext.C is not None and hasattr(_ext.C, "cuda_emulated") and _ext.C.cuda_emulated()


def pytest_configure(config):
    # CI sets this: a broken build must not pass by silently testing the reference against itself.
    if os.environ.get("FASTLAYERS_REQUIRE_EXTENSION") == "1" and _ext.C is None:
        raise pytest.UsageError(f"fastlayers._C did not load: {_ext.LOAD_ERROR}")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU and fastlayers built with CUDA")
    skip_sm90 = pytest.mark.skip(reason="needs a compute capability 9.0 GPU")
    skip_emu = pytest.mark.skip(reason="needs a CUDA emulation build (tests/cuda_emu)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "cuda_emu" in item.keywords and not CUDA_EMULATED:
            item.add_marker(skip_emu)
        if "sm90" in item.keywords and not IS_SM90:
            item.add_marker(skip_sm90)


def pytest_report_header(config):
    return fastlayers._info.format_info()


@pytest.fixture(autouse=True)
def _seed_and_poison():
    torch.manual_seed(0)
    set_poison_outputs(True)
    yield
    set_poison_outputs(False)


# Every kernel test runs on each device; the cuda case carries the marker that conftest skips, and
# so does cuda_emu: the CUDA kernels run on the CPU in a CUDA emulation build.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.cuda),
    pytest.param("cuda_emu", marks=pytest.mark.cuda_emu),
]


def _emulate_cuda(monkeypatch):
    """Routes CPU tensors to the CUDA kernels of an emulation build: the ops take their CUDA path
    (``on_cuda``) and pass device code 1, which reaches the emulated launchers with host
    pointers. A small SM count keeps the emulated grids small."""
    replacements = {
        "on_cuda": lambda device: device.type in ("cpu", "cuda"),
        "on_cpu": lambda device: False,
        "device_code": lambda device: 1,
        "cuda_sm_count": lambda device: 4,
    }
    for name, module in list(sys.modules.items()):
        if name == "fastlayers" or name.startswith("fastlayers."):
            for attr, fn in replacements.items():
                if hasattr(module, attr):
                    monkeypatch.setattr(module, attr, fn)


def device_for(param, monkeypatch):
    """The torch device a test with device parameter ``param`` allocates on: "cuda_emu" routes
    the CPU tensors to the emulated CUDA kernels."""
    if param == "cuda_emu":
        _emulate_cuda(monkeypatch)
        return "cpu"
    return param


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    return device_for(request.param, monkeypatch)


@pytest.fixture(params=["cpu", DEVICES[2]])
def kernels(request, monkeypatch):
    """For the property-style suites (their tensors are built on the CPU): the CPU kernels, and
    in a CUDA emulation build the CUDA kernels too (the CPU tensors take the ops' CUDA paths)."""
    return device_for(request.param, monkeypatch)


def property_settings(default_examples: int):
    """hypothesis settings of the property-style suites: ``default_examples`` derandomized
    examples per test (CI: the same ones every run, so a failure reproduces), or with
    ``FASTLAYERS_PROPERTY_EXAMPLES=N`` N new random ones, a longer search for bad inputs."""
    from hypothesis import HealthCheck, settings

    examples = os.environ.get("FASTLAYERS_PROPERTY_EXAMPLES")
    return settings(
        max_examples=int(examples) if examples else default_examples,
        deadline=None,
        derandomize=not examples,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,  # (kernels: it patches once per test)
        ],
    )


@pytest.fixture(params=DEVICES[1:])
def cuda_device(request, monkeypatch):
    """For tests of CUDA-only paths (tensor-core kernels, CUDA shape routing): a GPU, or the CUDA
    kernels emulated on the CPU."""
    return device_for(request.param, monkeypatch)


def _cpu_isas():
    if _ext.C is None:
        return ["reference"]
    names = list(_ext.C.cpu_isa_names())  # lowest first
    return names[: names.index(_ext.C.detected_cpu_isa()) + 1]


@pytest.fixture
def amx_bf16():
    """Runs the test at the CPU kernel level amx_bf16 (Intel AMX tiles); skips it on a CPU or OS
    without them (AMX has no emulation)."""
    if _ext.C is None or _ext.C.detected_cpu_isa() != "amx_bf16":
        pytest.skip("needs a CPU with AMX-BF16 (Intel AMX) that the OS lets this process use")
    before = _ext.C.cpu_isa()
    _ext.C.set_cpu_isa("amx_bf16")
    yield
    _ext.C.set_cpu_isa(before)


@pytest.fixture(params=_cpu_isas())
def cpu_isa(request):
    """Runs the test once per CPU kernel variant this machine can execute (avx512_bf16 differs from
    avx512 in the INT4 x FP8 GEMM, the bf16 scores of varlen_attention and the bf16 row dot
    products of the FFF and PEER expert kernels only; the other kernels
    run their avx512 versions under it and are checked under it too)."""
    if _ext.C is None:
        yield request.param
        return
    before = _ext.C.cpu_isa()
    _ext.C.set_cpu_isa(request.param)
    yield request.param
    _ext.C.set_cpu_isa(before)

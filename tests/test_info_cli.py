# SPDX-License-Identifier: Apache-2.0
"""fastlayers.info(), the CLI, and the package without its compiled part."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastlayers
from fastlayers import _ext
from fastlayers._info import format_info


def _run(args, **env):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, **env),
        check=False,
    )


def test_info_reports_build_and_backends():
    d = fastlayers.info()
    assert d["version"] == fastlayers.__version__
    assert d["extension_loaded"] is (_ext.C is not None)
    assert d["cuda_compiled"] == _ext.has_cuda_kernels()
    assert d["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    if _ext.C is not None:
        assert d["cpu_isa"] in ("scalar", "avx2", "avx512", "avx512_bf16", "amx_bf16")
        assert d["cpu_isa_detected"] in _ext.C.cpu_isa_names()
    # a SIMDe test build (FASTLAYERS_EMULATE_AVX512) says so, and reports AVX512-BF16 as detected
    assert d["avx512_emulated"] is (_ext.C is not None and _ext.C.avx512_emulated())
    if d["avx512_emulated"]:
        assert d["cpu_isa_detected"] == "avx512_bf16" and "SIMDe" in format_info(d)
    # a CUDA emulation test build (tests/cuda_emu) says so and reports no real CUDA kernels
    assert d["cuda_emulated"] is (_ext.C is not None and _ext.C.cuda_emulated())
    if d["cuda_emulated"]:
        assert not d["cuda_compiled"] and "emulated on the CPU" in format_info(d)
    for op in ("rms_norm", "fused_add_rms_norm", "rms_norm_fp8", "rms_norm_backward"):
        assert d["ops"][op]["cpu"] == ("kernel" if _ext.C is not None else "reference")
        assert d["ops"][op]["cuda"] == ("kernel" if _ext.has_cuda_kernels() else "reference")
    cuda = "kernel" if _ext.has_cuda_kernels() else "reference"
    assert d["ops"]["peer_retrieve"]["cuda"] == cuda
    assert d["ops"]["peer_retrieve"]["cpu"] == ("kernel" if _ext.C is not None else "reference")
    assert d["ops"]["int4_kv_attention"]["cuda"] == cuda
    # The Hopper GEMM: a CUDA kernel when the build has the 90a objects; on the CPU, the reference.
    assert d["cuda_sm90_gemm"] == (_ext.C is not None and _ext.has_sm90_gemm())
    sm90 = "kernel" if d["cuda_sm90_gemm"] else "reference"
    assert d["ops"]["int4_fp8_gemm_sm90"] == {"cpu": "reference", "cuda": sm90}


def test_cli_info_json():
    out = _run(["-m", "fastlayers", "info", "--json"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["version"] == fastlayers.__version__


_NO_EXT = """
import warnings, torch, fastlayers
from fastlayers import reference as ref
d = fastlayers.info()
assert d["extension_loaded"] is False and "FASTLAYERS_NO_EXTENSION" in d["extension_error"], d
assert all(b == {"cpu": "reference", "cuda": "reference"} for b in d["ops"].values()), d["ops"]
x = torch.randn(3, 77, requires_grad=True); w = torch.randn(77)
y = fastlayers.rms_norm(x, w)
assert torch.equal(y, ref.rms_norm(x, w))
y.sum().backward()
assert x.grad is not None and torch.isfinite(x.grad).all()
q, s = fastlayers.rms_norm_fp8(x.detach(), w)
assert q.dtype == torch.float8_e4m3fn
out = torch.full((3, 77), float("nan"))
assert fastlayers.rms_norm(x.detach(), w, out=out) is out and torch.equal(out, ref.rms_norm(x, w))
r = torch.randn(3, 77); xi, ri = x.detach().clone(), r.clone()
fastlayers.fused_add_rms_norm_(xi, ri, w)
ye, re = ref.fused_add_rms_norm(x.detach(), r, w)
assert torch.equal(xi, ye) and torch.equal(ri, re)
print("reference-ok")
"""


def test_package_works_without_compiled_part():
    out = _run(["-c", _NO_EXT], FASTLAYERS_NO_EXTENSION="1")
    assert out.returncode == 0, out.stderr
    assert "reference-ok" in out.stdout


def test_cli_bench_quick_runs_and_prints_the_table(tmp_path):
    out = _run(["-m", "fastlayers", "bench", "--quick", "--reps", "2", "--out", str(tmp_path)])
    assert out.returncode == 0, out.stderr[-2000:]
    for col in (
        "op",
        "shape",
        "dtype",
        "backend",
        "time (us)",
        "baseline",
        "speed-up",
        "max err vs ref",
    ):
        assert col in out.stdout
    for op in ("rms_norm", "fused_add_rms_norm", "rms_norm_fp8", "rms_norm_backward"):
        assert f"\n{op} " in out.stdout
    # PEER's forward and its two kernels timed apart (where a GPU run's time goes)
    for op in ("PEER forward", "peer_retrieve (queries given)", "peer_experts (indices given)"):
        assert f"\n{op} " in out.stdout
    reports = list(tmp_path.glob("*.md"))
    assert len(reports) == 1 and "commit" in reports[0].read_text()


BENCH_ISA = str(Path(__file__).resolve().parents[1] / "bench" / "bench_isa.py")


@pytest.mark.skipif(_ext.C is None, reason="compares compiled kernel variants")
def test_bench_isa_times_variants_and_builds(tmp_path):
    """bench/bench_isa.py: one op under each ISA variant, then the loaded build against itself
    (--build twice), each a table row with a time per variant and a ratio; unknown ops refused."""
    op = ["--op", "quantize_fp8_per_token", "--reps", "2"]
    out = _run([BENCH_ISA, *op, "--out", str(tmp_path / "isa.md")])
    assert out.returncode == 0, out.stderr[-2000:]
    row = [line for line in out.stdout.splitlines() if line.startswith("| quantize_fp8_per_token")]
    assert len(row) == 1 and row[0].count("|") >= 5 and row[0].rstrip().endswith("x |")
    assert row[0] in (tmp_path / "isa.md").read_text()
    so = _ext.C.__file__
    out = _run([BENCH_ISA, *op, "--build", so, "--build", so])
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{so} (us)" in out.stdout and "| quantize_fp8_per_token" in out.stdout
    out = _run([BENCH_ISA, "--op", "no_such_op"])
    assert out.returncode == 2 and "unknown --op" in out.stderr


def test_bench_report_writes_markdown_csv_and_plot(tmp_path):
    """report.write: the markdown table, the CSV and (with matplotlib) a PNG of speed-ups."""
    pytest.importorskip("matplotlib")
    from fastlayers.benchmark import harness, report

    rows = [
        harness.Row(
            "op a", f"{m}x64", "float32", "fastlayers/x", 10.0 * m, base, 30.0 * m, 1.0, 0.5, 0.0
        )  # fmt: skip
        for m in (1, 16)
        for base in ("baseline 1", "baseline 2")
    ]
    meta = {"device": "test device, 1 thread", "commit": "abc", "fastlayers": "0"}
    md = report.write(tmp_path, meta, rows, quick=True)
    assert md.exists() and "op a" in md.read_text()
    assert (tmp_path / f"{md.stem}.csv").exists()
    png = tmp_path / f"{md.stem}.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_git_commit_counts_only_fastlayers_checkouts(tmp_path, monkeypatch):
    """report.git_commit labels results with the commit of a fastlayers checkout: an installed
    package inside another repository (pyenv's root is one) got that repository's commit."""
    from fastlayers.benchmark import report

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    monkeypatch.delenv("FASTLAYERS_COMMIT", raising=False)
    monkeypatch.setattr(report, "__file__", str(tmp_path / "site" / "report.py"))
    monkeypatch.chdir(tmp_path)
    assert report.git_commit() == "unknown"  # another repository, both as package and as cwd
    (tmp_path / "python" / "fastlayers").mkdir(parents=True)
    (tmp_path / "python" / "fastlayers" / "__init__.py").write_text("")
    git("add", "python")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "b")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert report.git_commit() == head
    (tmp_path / "a.txt").write_text("changed")
    assert report.git_commit() == head + "+dirty"
    monkeypatch.setenv("FASTLAYERS_COMMIT", "given")
    assert report.git_commit() == "given"


def test_time_interleaved_spreads_each_case_over_the_run_and_rotates_inputs():
    """time_interleaved: every case gets its reps (after its own warm-up), the calls of a case with
    fewer reps spread over the run instead of bunching at one end, no two calls in a row read the
    same input set, and the timings come back in case order."""
    import time

    from fastlayers.benchmark import harness

    calls = []

    def case(name, seconds):
        def fn(i):
            calls.append((name, i))
            time.sleep(seconds)

        return fn

    inputs = [(i,) for i in range(3)]
    t_fast, t_slow = harness.time_interleaved(
        [(case("fast", 0.0), inputs, 8), (case("slow", 0.004), inputs, 2)],
        torch.device("cpu"),
        warmup=1,
    )
    warm, timed = calls[:6], calls[6:]
    assert warm == [("fast", 0), ("fast", 1), ("fast", 2), ("slow", 0), ("slow", 1), ("slow", 2)]
    names = [n for n, _ in timed]
    assert names.count("fast") == 8 and names.count("slow") == 2
    slow_at = [j for j, n in enumerate(names) if n == "slow"]
    assert slow_at[0] in range(1, 4) and slow_at[1] in range(6, 9), names  # one per half
    assert all(a[1] != b[1] for a, b in zip(timed, timed[1:], strict=False))
    assert (t_fast.reps, t_slow.reps) == (8, 2)
    assert t_slow.median_s >= 0.004 > t_fast.median_s


def test_quick_budget_cuts_the_reps_of_slow_cases_only():
    """Under quick_budget (bench --quick on CPU), a case whose calls take longer than the budget
    allows gets fewer reps (at least QUICK_MIN_REPS) and one warm-up call per input set; fast cases
    and runs outside the budget keep their reps."""
    import time

    from fastlayers.benchmark import harness

    calls = []

    def case(name, seconds):
        def fn(i):
            calls.append(name)
            time.sleep(seconds)

        return fn

    inputs = [(i,) for i in range(2)]
    slow_s = harness.QUICK_CASE_S / 7  # fits 7 reps (of 20) in the budget
    cases = [(case("fast", 0.0), inputs, 20), (case("slow", slow_s), inputs, 20),
             (case("slower", harness.QUICK_CASE_S / 2), inputs, 20)]  # fmt: skip
    with harness.quick_budget():
        fast, slow, slower = harness.time_interleaved(cases, torch.device("cpu"))
    assert fast.reps == 20 and slower.reps == harness.QUICK_MIN_REPS
    assert harness.QUICK_MIN_REPS <= slow.reps <= 7  # (sleep overshoots: never more)
    assert calls[:6] == ["fast", "fast", "slow", "slow", "slower", "slower"]  # the warm-ups
    assert harness._case_budget_s is None  # restored
    calls.clear()
    fast, slow = harness.time_interleaved(cases[:2], torch.device("cpu"), warmup=1)
    assert (fast.reps, slow.reps) == (20, 20)


@pytest.mark.skipif(_ext.C is None, reason="needs the compiled extension")
def test_cpu_isa_names_and_selection_errors():
    # the levels lowest first, as the tests' cpu_isa fixture and bench/bench_isa.py read them
    assert _ext.C.cpu_isa_names() == ("scalar", "avx2", "avx512", "avx512_bf16", "amx_bf16")
    before = _ext.C.cpu_isa()
    with pytest.raises(
        ValueError,
        match="one of 'scalar', 'avx2', 'avx512', 'avx512_bf16', 'amx_bf16', got 'sse9'",
    ):
        _ext.C.set_cpu_isa("sse9")
    names = _ext.C.cpu_isa_names()
    above = names[names.index(_ext.C.detected_cpu_isa()) + 1 :]
    for name in above:  # a level this CPU does not run is refused, the active one kept
        with pytest.raises(ValueError, match=f"does not support '{name}'"):
            _ext.C.set_cpu_isa(name)
    assert _ext.C.cpu_isa() == before

"""The llama.cpp build (runtimes/llama_cpp/build.py): profiles that leave AMX out, a key per CPU, the smoke
check with extra buffer types on and off, and a native abort that fails one call with llama.cpp's own line."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from basel_edge.runtimes.isolation import NO_BACKTRACE_ENV, run_isolated
from basel_edge.runtimes.llama_cpp import build, patched_binding_installed
from basel_edge.runtimes.llama_cpp.smoke import compare_extra_buffer_types, make_files, run_smoke

needs_build = pytest.mark.skipif(
    not (patched_binding_installed() and build.tools_built()),
    reason="the patched llama.cpp is not built; run `python -m basel_edge.runtimes.llama_cpp.build` (make setup)",
)
x86_only = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 only")


def _macros(compiler: str, flags: list[str]) -> str:
    return subprocess.run([compiler, *flags, "-dM", "-E", "-x", "c", "-"], input="", capture_output=True,
                          text=True, check=True).stdout


@x86_only
def test_native_profiles_compile_amx_out_even_for_a_cpu_with_amx():
    """-march=native on an AMX CPU means what -march=sapphirerapids means here: with the profile's flags, before
    or after -march, ggml's AMX kernels (`#if defined(__AMX_INT8__)`) are not compiled."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    try:
        plain = _macros(compiler, ["-march=sapphirerapids"])
    except subprocess.CalledProcessError:
        pytest.skip(f"{compiler} does not know -march=sapphirerapids")
    assert "__AMX_INT8__" in plain and "__AVX512VNNI__" in plain
    for profile in build.profiles():
        if "-DGGML_NATIVE=ON" not in profile.cmake_args:
            continue
        flags = list(profile.compiler_flags)
        for order in (["-march=sapphirerapids", *flags], [*flags, "-march=sapphirerapids"]):
            macros = _macros(compiler, order)
            assert "__AMX_INT8__" not in macros, (profile.name, order)
            assert "__AVX512VNNI__" in macros  # the rest of the instruction set stays


def test_build_key_changes_with_the_cpu(monkeypatch):
    key = build.build_key(False)
    monkeypatch.setattr(build, "cpu_fingerprint", lambda: "x86_64\nmodel name=Other CPU\nflags=avx2")
    assert build.build_key(False) != key
    assert build.build_key(True) != build.build_key(False)


def test_compiler_flags_are_added_to_the_users_own():
    native = build.profile_named("native")
    env = build._compiler_env(native, {"CFLAGS": "-O2 -g", "PATH": "/bin"})
    assert env["CFLAGS"].startswith("-O2 -g ") and env["CXXFLAGS"] == " ".join(native.compiler_flags)
    assert build._compiler_env(build.profile_named("portable"), {"PATH": "/bin"}) == {"PATH": "/bin"}


def test_extra_buffer_type_comparison_catches_wrong_or_broken_logits():
    rng = np.random.default_rng(0)
    off = rng.normal(size=(40, 100)).astype(np.float32)
    assert compare_extra_buffer_types(off + 1e-4, off) is None
    assert "top-1" in compare_extra_buffer_types(rng.normal(size=(40, 100)), off)
    broken = off.copy()
    broken[3, 7] = np.nan
    assert compare_extra_buffer_types(broken, off) == "non-finite logits"


@needs_build
def test_the_selected_profile_passed_the_smoke_check_on_this_cpu():
    selected = build.selected_profile()
    assert selected["profile"] in [p.name for p in build.profiles()]
    assert set(selected["smoke_files"]) >= {"dense-q8_0", "factorized-q8_0", "dense-q4_0", "factorized-q4_0"}
    assert any("extra buffer types on/off" in check for check in selected["smoke_checks"])
    assert selected["cpu"][0] == platform.machine()
    assert build.installed_profile() == selected["profile"]


def _system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode()


@needs_build
def test_the_installed_binding_has_no_amx_kernels():
    info = run_isolated(_system_info)
    assert "CPU :" in info and "AMX_INT8 = 1" not in info


@needs_build
def test_smoke_check_runs_every_file_with_extra_buffer_types_on_and_off():
    bin_dir = build.tools_dir()
    result = run_smoke(bin_dir / "llama-completion", bin_dir / "llama-quantize", binding=True)
    assert result.ok, result.problems
    assert len(result.checks) == 8 and len(result.files) == 4


@needs_build
@x86_only
def test_repacking_is_used_for_the_factorized_q4_0_graph(tmp_path):
    """With the `native` profile the factor weights of a Q4_0 file are repacked (CPU_REPACK buffer), the
    second factors of fused q/k/v and gate/up included, and the file generates (the smoke check compares its
    logits with repacking off)."""
    if build.selected_profile()["profile"] != "native" or "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("weight repacking is not built or not used on this CPU")
    files = make_files(tmp_path, build.tools_dir() / "llama-quantize")
    proc = subprocess.run(
        [str(build.tools_dir() / "llama-completion"), "-m", str(files["factorized-q4_0"]), "-p", "def f(x):",
         "-n", "4", "--temp", "0", "-t", "2", "-no-cnv", "--simple-io", "-v"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=120, check=False,
        env={**os.environ, **NO_BACKTRACE_ENV},
    )
    assert proc.returncode == 0, proc.stderr[-600:]
    assert "CPU_REPACK model buffer size" in proc.stderr

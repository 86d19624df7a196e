"""Build the low-rank llama.cpp: the pinned llama-cpp-python sdist, patched, as tools and as the Python binding.

`python -m basel_edge.runtimes.llama_cpp.build` downloads the exactly pinned sdist from PyPI (checked against its hash),
applies `lowrank.patch` to its vendored llama.cpp, builds the CLI tools (`llama-completion`, `llama-bench`,
`llama-perplexity`, `llama-quantize`) with CMake into the basel-edge cache, builds the patched llama-cpp-python
wheel into the same cache and pip-installs it into the running environment. Everything is keyed by pin + patch (+ CUDA flag): a second run
with the same key does nothing, a changed patch rebuilds. `--cuda` builds the CUDA backend (needs nvcc).
`--stock` builds only an unpatched `llama-completion` of the same pin (cached too): what a user's stock llama.cpp
does with basel-edge's files, checked by the slow tests.

Build settings come as profiles, tried in order until one passes the post-build smoke check (smoke.py: tiny
dense and factorized GGUFs through the built tools and binding, extra buffer types on and off):
`native` (this CPU's SIMD and weight repacking, with Intel AMX compiled out: llama.cpp's AMX path crashes at
this pin, see the README), then `native-no-repack`, then `portable` (AVX2-class, no repacking). The chosen
profile and its smoke results are recorded in `<build root>/selected.json`. Native code is specific to the CPU
it was built on, so the build key includes this CPU's model and feature flags: a cache or environment carried to
another CPU is rebuilt instead of crashing with an illegal instruction.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from basel_edge.cache import cache_dir
from basel_edge.errors import UserError

PIN = "0.3.36"
PACKAGE = "llama-cpp-python"
SDIST_NAME = f"llama_cpp_python-{PIN}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PATCH = Path(__file__).with_name("lowrank.patch")
TOOLS = ("llama-completion", "llama-bench", "llama-perplexity", "llama-quantize")
COMPLETION_TOOL = "llama-completion"
STOCK_TOOL = COMPLETION_TOOL
# LLAVA_BUILD off: no multimodal library (not used, minutes of build).
BASE_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF",)
CUDA_CMAKE_ARGS = ("-DGGML_CUDA=ON",)
# ggml compiles its AMX kernels when the compiler targets AMX (-march=native on an AMX CPU; GGML_AMX_INT8=OFF is
# ignored under GGML_NATIVE). At this pin they crash: GCC <= 12 drops the tile configuration's stores (dense
# models segfault), and AMX takes weights at load time whose real mul_mat it then refuses (a factorized graph
# aborts in the scheduler). These flags leave AMX out whatever the order of -march on the command line.
NO_AMX_FLAGS = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
SELECTED_FILE = "selected.json"


@dataclass(frozen=True)
class BuildProfile:
    """One set of build settings: CMake options and compiler flags added to CFLAGS/CXXFLAGS."""

    name: str
    cmake_args: tuple[str, ...]
    compiler_flags: tuple[str, ...]
    what: str


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def profiles() -> tuple[BuildProfile, ...]:
    """The build profiles in the order they are tried."""
    no_amx = NO_AMX_FLAGS if _x86() else ()
    return (
        BuildProfile("native", ("-DGGML_NATIVE=ON",), no_amx,
                     "this CPU's instruction set, weight repacking on, AMX compiled out"),
        BuildProfile("native-no-repack", ("-DGGML_NATIVE=ON", "-DGGML_CPU_REPACK=OFF"), no_amx,
                     "this CPU's instruction set, no weight repacking, AMX compiled out"),
        BuildProfile("portable", ("-DGGML_NATIVE=OFF", "-DGGML_CPU_REPACK=OFF"), (),
                     "a generic instruction set (AVX2 on x86), no weight repacking"),
    )


def profile_named(name: str) -> BuildProfile:
    for profile in profiles():
        if profile.name == name:
            return profile
    raise UserError(f"unknown llama.cpp build profile {name!r}; known: {', '.join(p.name for p in profiles())}")


def cpu_fingerprint() -> str:
    """This CPU's architecture, model name and feature flags: what a native build depends on."""
    parts = [platform.machine()]
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    for line in info.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags", "Features", "CPU part") and ":" in line:
            parts.append(f"{key}={' '.join(sorted(line.split(':', 1)[1].split()))}")
            if len(parts) >= 3:
                break
    if len(parts) == 1:
        parts.append(platform.processor())
    return "\n".join(parts)


def _compiler_env(profile: BuildProfile, env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env)
    if profile.compiler_flags:
        flags = " ".join(profile.compiler_flags)
        for var in ("CFLAGS", "CXXFLAGS"):
            env[var] = f"{env.get(var, '')} {flags}".strip()
    return env
TOOLS_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
# written into the environment next to the installed binding, so a rebuild is detected per environment
INSTALL_STAMP = "basel-edge-llama-cpp.key"


def build_key(cuda: bool) -> str:
    """What the build depends on: the pin, its hash, the patch text, the backend, the profiles and this CPU."""
    digest = hashlib.sha256()
    parts = (PIN, SDIST_SHA256, PATCH.read_bytes().decode(), "cuda" if cuda else "cpu", *BASE_CMAKE_ARGS,
             json.dumps([asdict(p) for p in profiles()]), cpu_fingerprint())
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_root(cuda: bool = False) -> Path:
    """Cache folder of one build: `<cache>/llama_cpp/<pin>-<key>`."""
    return cache_dir() / "llama_cpp" / f"{PIN}-{build_key(cuda)}"


def selected_profile(cuda: bool = False) -> dict | None:
    """The profile that passed the smoke check for this key (name, smoke results), or None before that."""
    path = build_root(cuda) / SELECTED_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _profile_dir(profile: BuildProfile, cuda: bool) -> Path:
    return build_root(cuda) / profile.name


def tools_dir(cuda: bool = False) -> Path:
    """Where the patched llama.cpp CLI tools of the selected profile are (whether or not they are built yet)."""
    selected = selected_profile(cuda)
    return _profile_dir(profile_named(selected["profile"]) if selected else profiles()[0], cuda) / "bin"


def _tools_present(directory: Path) -> bool:
    return all((directory / tool).is_file() for tool in TOOLS)


def tools_built(cuda: bool = False) -> bool:
    """Whether tools of a profile that passed the smoke check are in the cache."""
    return selected_profile(cuda) is not None and _tools_present(tools_dir(cuda))


def _run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, env=env, cwd=cwd, check=False)
    if result.returncode != 0:
        raise UserError(f"build step failed with status {result.returncode}: {' '.join(cmd)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist() -> Path:
    """The pinned sdist from PyPI through pip, cached and verified against SDIST_SHA256."""
    target = cache_dir() / "llama_cpp" / "sdist" / SDIST_NAME
    if target.is_file() and _sha256(target) == SDIST_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"{PACKAGE}=={PIN}", "-d", tmp])
        got = Path(tmp) / SDIST_NAME
        if not got.is_file():
            raise UserError(f"pip did not produce {SDIST_NAME}")
        if _sha256(got) != SDIST_SHA256:
            raise UserError(f"{SDIST_NAME}: sha256 {_sha256(got)} does not match the pinned {SDIST_SHA256}")
        got.replace(target)
    return target


def stock_root(profile: BuildProfile) -> Path:
    """Cache folder of the unpatched build of the same pin and profile, on this CPU."""
    digest = hashlib.sha256(json.dumps([asdict(profile), cpu_fingerprint()]).encode()).hexdigest()[:12]
    return cache_dir() / "llama_cpp" / f"{PIN}-stock-{profile.name}-{digest}"


def source_tree(root: Path, patch: bool = True) -> Path:
    """The sdist unpacked under `root/src` with the low-rank patch applied, unless `patch` is False (once per root)."""
    src = root / "src"
    done = root / "src.ok"
    if done.is_file():
        return src
    shutil.rmtree(src, ignore_errors=True)
    sdist = fetch_sdist()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="src-", dir=root))
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="tar")
    (tmp / f"llama_cpp_python-{PIN}").rename(src)
    tmp.rmdir()
    if patch:
        _run(["patch", "-p1", "--forward", "--batch", "-i", str(PATCH)], cwd=src / "vendor" / "llama.cpp")
    done.touch()
    return src


def build_profile_tools(profile: BuildProfile, cuda: bool = False, jobs: int | None = None) -> Path:
    """Configure and build the CLI tools of one profile; skipped when they are already there."""
    out = _profile_dir(profile, cuda) / "bin"
    if _tools_present(out):
        return out
    root = build_root(cuda)
    _cmake_tools(source_tree(root), _profile_dir(profile, cuda) / "build", TOOLS, out, profile, cuda, jobs)
    return out


def build_stock_tool(jobs: int | None = None) -> Path:
    """The unpatched `llama-completion` of the pinned sdist (CPU) with the selected profile's settings, built
    once; returns its path."""
    selected = selected_profile(False)
    profile = profile_named(selected["profile"]) if selected else profiles()[0]
    root = stock_root(profile)
    tool = root / "bin" / STOCK_TOOL
    if tool.is_file():
        return tool
    _cmake_tools(source_tree(root, patch=False), root / "build", (STOCK_TOOL,), root / "bin", profile, False, jobs)
    return tool


def _cmake_tools(src: Path, build: Path, tools: tuple[str, ...], out: Path, profile: BuildProfile, cuda: bool,
                 jobs: int | None) -> None:
    start = time.monotonic()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    args = [*BASE_CMAKE_ARGS, *profile.cmake_args, *TOOLS_CMAKE_ARGS, *(CUDA_CMAKE_ARGS if cuda else ())]
    env = _compiler_env(profile)
    _run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), *generator, *args], env=env)
    _run(["cmake", "--build", str(build), "--target", *tools, "-j", str(jobs or os.cpu_count() or 1)], env=env)
    out.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        shutil.copy2(build / "bin" / tool, out / tool)
    print(f"built {', '.join(tools)} in {time.monotonic() - start:.0f} s -> {out}")


def installed_key() -> str | None:
    """Build key of the llama-cpp-python installed in this environment by this script, if any."""
    stamp = Path(sys.prefix) / INSTALL_STAMP
    try:
        importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    words = stamp.read_text().split() if stamp.is_file() else []
    return words[0] if words else None


def python_wheel(profile: BuildProfile, cuda: bool = False, jobs: int | None = None) -> Path:
    """The patched llama-cpp-python wheel of one profile, built once per key into `<build root>/<profile>/wheel`.

    The binding loads its shared library through ctypes, so the wheel does not depend on the Python version:
    every new environment (a fresh clone's venv, CI) installs it in seconds instead of compiling again.
    """
    root = build_root(cuda)
    wheel_dir = _profile_dir(profile, cuda) / "wheel"
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[-1]
    src = source_tree(root)
    env = _compiler_env(profile)
    env["CMAKE_ARGS"] = " ".join([*BASE_CMAKE_ARGS, *profile.cmake_args, *(CUDA_CMAKE_ARGS if cuda else ())])
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs or os.cpu_count() or 1)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", tmp, str(src)], env=env)
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if not built:
            raise UserError(f"pip wheel did not produce a {PACKAGE} wheel")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        wheel = wheel_dir / built[-1].name
        built[-1].replace(wheel)
    print(f"built patched {PACKAGE} wheel in {time.monotonic() - start:.0f} s -> {wheel}")
    return wheel


def install_python(profile: BuildProfile, cuda: bool = False, jobs: int | None = None) -> None:
    """pip-install one profile's patched llama-cpp-python wheel into this environment."""
    wheel = python_wheel(profile, cuda, jobs)
    # --no-deps + --force-reinstall: replace any stock build without touching the pinned numpy
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)])
    _run([sys.executable, "-m", "pip", "install", "--quiet", "diskcache>=5.6.1", "jinja2>=2.11.3",
          "typing-extensions>=4.5.0"])
    (Path(sys.prefix) / INSTALL_STAMP).write_text(f"{build_key(cuda)} {profile.name}\n")
    print(f"installed patched {PACKAGE} from {wheel.name} ({profile.name})")


def installed_profile() -> str | None:
    """Profile of the patched llama-cpp-python installed in this environment, if it is of this build key."""
    stamp = Path(sys.prefix) / INSTALL_STAMP
    if installed_key() is None or not stamp.is_file():
        return None
    parts = stamp.read_text().split()
    return parts[1] if len(parts) == 2 else None


def build(cuda: bool = False, jobs: int | None = None, tools: bool = True, python: bool = True) -> dict:
    """Build (or reuse) tools and binding, trying the profiles in order until one passes the smoke check.

    Returns the selection record written to `<build root>/selected.json`. Raises UserError naming every profile's
    first problem when none passes.
    """
    from .smoke import run_smoke

    selected = selected_profile(cuda)
    if selected and (not tools or _tools_present(tools_dir(cuda))) and (
            not python or installed_profile() == selected["profile"]):
        print(f"llama.cpp build up to date: profile {selected['profile']} in {build_root(cuda)}")
        return selected
    tried = []
    # a profile that passed before on this key is tried first (a new environment re-installs and re-checks it)
    order = sorted(profiles(), key=lambda p: not (selected and p.name == selected["profile"]))
    for profile in order:
        print(f"llama.cpp build profile {profile.name}: {profile.what}", flush=True)
        bin_dir = build_profile_tools(profile, cuda, jobs) if tools else None
        if python:
            install_python(profile, cuda, jobs)
        result = run_smoke(bin_dir / COMPLETION_TOOL if bin_dir else None,
                           bin_dir / "llama-quantize" if bin_dir else None, binding=python)
        if result.ok:
            record = {"profile": profile.name, "what": profile.what, "cmake_args": list(profile.cmake_args),
                      "compiler_flags": list(profile.compiler_flags), "smoke_checks": result.checks,
                      "smoke_files": result.files, "rejected": tried, "cpu": cpu_fingerprint().splitlines()[:2]}
            (build_root(cuda) / SELECTED_FILE).write_text(json.dumps(record, indent=2) + "\n")
            print(f"smoke check passed ({len(result.checks)} runs): using profile {profile.name}")
            return record
        print(f"smoke check failed for profile {profile.name}:", *result.problems, sep="\n  ", file=sys.stderr)
        tried.append({"profile": profile.name, "problems": result.problems})
    (Path(sys.prefix) / INSTALL_STAMP).unlink(missing_ok=True)  # no binding that failed is taken for a good one
    raise UserError("no llama.cpp build profile passed the smoke check: "
                    + "; ".join(f"{t['profile']}: {t['problems'][0]}" for t in tried))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m basel_edge.runtimes.llama_cpp.build", description=__doc__.split("\n")[0])
    parser.add_argument("--cuda", action="store_true", help="build the CUDA backend (needs the CUDA toolkit)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--skip-tools", action="store_true", help="only the Python binding")
    parser.add_argument("--skip-python", action="store_true", help="only the CLI tools")
    parser.add_argument("--stock", action="store_true",
                        help=f"only an unpatched {STOCK_TOOL} of the same pin (what stock llama.cpp makes of a file)")
    args = parser.parse_args(argv)
    try:
        if args.stock:
            print(f"stock {STOCK_TOOL}: {build_stock_tool(args.jobs)}")
            return 0
        build(args.cuda, args.jobs, tools=not args.skip_tools, python=not args.skip_python)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

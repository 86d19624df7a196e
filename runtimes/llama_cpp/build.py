"""Build the low-rank llama.cpp: the pinned llama-cpp-python sdist, patched, as tools and as the Python binding.

`python -m runtimes.llama_cpp.build` downloads the exactly pinned sdist from PyPI (checked against its hash),
applies `lowrank.patch` to its vendored llama.cpp, builds the CLI tools (`llama-completion`, `llama-bench`,
`llama-perplexity`, `llama-quantize`) with CMake into the basel-edge cache, builds the patched llama-cpp-python
wheel into the same cache and pip-installs it into the running environment. Everything is keyed by pin + patch (+ CUDA flag): a second run
with the same key does nothing, a changed patch rebuilds. `--cuda` builds the CUDA backend (needs nvcc).
`--stock` builds only an unpatched `llama-completion` of the same pin (cached too): what a user's stock llama.cpp
does with basel-edge's files, checked by the slow tests.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from basel_edge.cache import cache_dir
from basel_edge.errors import UserError

PIN = "0.3.36"
PACKAGE = "llama-cpp-python"
SDIST_NAME = f"llama_cpp_python-{PIN}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PATCH = Path(__file__).with_name("lowrank.patch")
TOOLS = ("llama-completion", "llama-bench", "llama-perplexity", "llama-quantize")
STOCK_TOOL = "llama-completion"
# GGML_NATIVE: this machine's SIMD; LLAVA_BUILD off: no multimodal library (not used, minutes of build).
BASE_CMAKE_ARGS = ("-DGGML_NATIVE=ON", "-DLLAVA_BUILD=OFF")
CUDA_CMAKE_ARGS = ("-DGGML_CUDA=ON",)
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
    """What the build depends on: the pin, its hash, the patch text and the backend."""
    digest = hashlib.sha256()
    for part in (PIN, SDIST_SHA256, PATCH.read_bytes().decode(), "cuda" if cuda else "cpu"):
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_root(cuda: bool = False) -> Path:
    """Cache folder of one build: `<cache>/llama_cpp/<pin>-<key>`."""
    return cache_dir() / "llama_cpp" / f"{PIN}-{build_key(cuda)}"


def tools_dir(cuda: bool = False) -> Path:
    """Where the patched llama.cpp CLI tools are (whether or not they are built yet)."""
    return build_root(cuda) / "bin"


def tools_built(cuda: bool = False) -> bool:
    return all((tools_dir(cuda) / tool).is_file() for tool in TOOLS)


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


def stock_root() -> Path:
    """Cache folder of the unpatched build of the same pin: `<cache>/llama_cpp/<pin>-stock`."""
    return cache_dir() / "llama_cpp" / f"{PIN}-stock"


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


def build_tools(cuda: bool = False, jobs: int | None = None) -> Path:
    """Configure and build the CLI tools into `tools_dir()`; skipped when they are already there."""
    root = build_root(cuda)
    if tools_built(cuda):
        print(f"llama.cpp tools up to date in {tools_dir(cuda)}")
        return tools_dir(cuda)
    _cmake_tools(source_tree(root), root / "build", TOOLS, tools_dir(cuda), cuda, jobs)
    return tools_dir(cuda)


def build_stock_tool(jobs: int | None = None) -> Path:
    """The unpatched `llama-completion` of the pinned sdist (CPU), built once; returns its path."""
    root = stock_root()
    tool = root / "bin" / STOCK_TOOL
    if tool.is_file():
        return tool
    _cmake_tools(source_tree(root, patch=False), root / "build", (STOCK_TOOL,), root / "bin", False, jobs)
    return tool


def _cmake_tools(src: Path, build: Path, tools: tuple[str, ...], out: Path, cuda: bool, jobs: int | None) -> None:
    start = time.monotonic()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    args = [*BASE_CMAKE_ARGS, *TOOLS_CMAKE_ARGS, *(CUDA_CMAKE_ARGS if cuda else ())]
    _run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), *generator, *args])
    _run(["cmake", "--build", str(build), "--target", *tools, "-j", str(jobs or os.cpu_count() or 1)])
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
    return stamp.read_text().strip() if stamp.is_file() else None


def python_wheel(cuda: bool = False, jobs: int | None = None) -> Path:
    """The patched llama-cpp-python wheel, built once per key into `<build root>/wheel`.

    The binding loads its shared library through ctypes, so the wheel does not depend on the Python version:
    every new environment (a fresh clone's venv, CI) installs it in seconds instead of compiling again.
    """
    root = build_root(cuda)
    wheels = sorted((root / "wheel").glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[-1]
    src = source_tree(root)
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join([*BASE_CMAKE_ARGS, *(CUDA_CMAKE_ARGS if cuda else ())])
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs or os.cpu_count() or 1)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", tmp, str(src)], env=env)
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if not built:
            raise UserError(f"pip wheel did not produce a {PACKAGE} wheel")
        (root / "wheel").mkdir(exist_ok=True)
        wheel = root / "wheel" / built[-1].name
        built[-1].replace(wheel)
    print(f"built patched {PACKAGE} wheel in {time.monotonic() - start:.0f} s -> {wheel}")
    return wheel


def install_python(cuda: bool = False, jobs: int | None = None) -> None:
    """pip-install the patched llama-cpp-python wheel into this environment; skipped when the key matches."""
    key = build_key(cuda)
    if installed_key() == key:
        print(f"patched {PACKAGE} {PIN} already installed ({key})")
        return
    wheel = python_wheel(cuda, jobs)
    # --no-deps + --force-reinstall: replace any stock build without touching the pinned numpy
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)])
    _run([sys.executable, "-m", "pip", "install", "diskcache>=5.6.1", "jinja2>=2.11.3", "typing-extensions>=4.5.0"])
    (Path(sys.prefix) / INSTALL_STAMP).write_text(key + "\n")
    print(f"installed patched {PACKAGE} from {wheel.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtimes.llama_cpp.build", description=__doc__.split("\n")[0])
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
        if not args.skip_tools:
            build_tools(args.cuda, args.jobs)
        if not args.skip_python:
            install_python(args.cuda, args.jobs)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

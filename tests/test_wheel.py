"""The installed package (issue 19): a non-editable wheel, installed beside a distribution that owns a top-level
`eval` package (PyPI has one), runs `basel-edge --help` and a tiny-model export from a folder that is not the
repo, and carries the files it reads at run time.

The wheel is built from a copy of the working tree (no build/ or egg-info left in the repo) without build
isolation and installed, non-editable and with the shadowing distribution, into a fresh venv. The venv gets
the dependencies (torch, transformers, ...) from the test interpreter's site-packages through a `.pth` path
line instead of downloading them; path lines do not run that site's own `.pth` hooks, so the repo's editable
install stays invisible and `basel_edge` can only come from the wheel."""

from __future__ import annotations

import os
import shutil
import site
import venv
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("basel_edge", "exporters", "runtimes", "eval", "pyproject.toml", "README.md", "requirements-embedded.txt")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _wheel(source: Path, out: Path) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
          str(source)])
    return next(out.glob("*.whl"))


def test_wheel_runs_beside_a_distribution_owning_eval(tiny_llama, tmp_path):
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns("__pycache__", "results", "*.egg-info", "build")
    for name in SOURCES:
        src = ROOT / name
        (shutil.copytree(src, tree / name, ignore=skip) if src.is_dir() else shutil.copy2(src, tree / name))
    wheel = _wheel(tree, tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "basel_edge/runtimes/llama_cpp/lowrank.patch" in names and "basel_edge/eval/report.schema.json" in names
    assert "basel_edge/exporters/gguf.py" in names and "basel_edge/eval/worker.py" in names
    assert not any(n.split("/")[0] in ("eval", "exporters", "runtimes") for n in names), "a top-level package"
    assert not any("/results/" in n for n in names)

    other = tmp_path / "other"  # a distribution that owns the top-level name `eval`
    (other / "eval").mkdir(parents=True)
    (other / "eval" / "__init__.py").write_text("OWNER = 'other'\n")
    (other / "pyproject.toml").write_text('[project]\nname = "other-eval"\nversion = "1.0"\n'
                                          '[tool.setuptools]\npackages = ["eval"]\n')
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / ("Scripts" if sys.platform == "win32" else "bin")
    python = bin_dir / "python"
    fresh_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    assert not list(fresh_site.glob("basel*")), "the fresh venv already holds basel-edge"
    (fresh_site / "test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel),
          str(_wheel(other, tmp_path / "dist-other"))])

    work = tmp_path / "work"  # not the repo: nothing may come from the checkout
    work.mkdir()
    where = _run([str(python), "-c", "import basel_edge, basel_edge.exporters, eval; "
                  "print(basel_edge.__file__); print(basel_edge.exporters.__file__); print(eval.OWNER)"],
                 cwd=work).stdout.split()
    assert where[0].startswith(str(fresh_site)) and where[1].startswith(str(fresh_site)) and where[2] == "other"
    assert "export" in _run([str(bin_dir / "basel-edge"), "--help"], cwd=work).stdout
    out = work / "tiny.gguf"
    _run([str(bin_dir / "basel-edge"), "export", "--target", "gguf", str(tiny_llama), "-o", str(out), "--quiet"],
         cwd=work)
    assert out.stat().st_size > 0 and out.read_bytes()[:4] == b"GGUF"

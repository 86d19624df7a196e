"""Run native engine code in a child process, so that an abort or a segfault fails one call, not the caller.

llama.cpp (and any engine written in C/C++) reports a broken invariant with `abort()` or dies on a bad memory
access; neither can be caught in Python. `run_isolated(func, *args)` runs `func` in a fresh interpreter
(multiprocessing "spawn"), returns its result, re-raises its Python exception, and turns a native death into
`NativeCrash` whose message is the engine's own error line (`engine_error_line`), never a debugger backtrace.
The harness workers (basel_edge.eval.worker) and the llama.cpp build's smoke check use the same error-line extraction.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

# ggml prints a gdb/lldb backtrace after its assertion line unless this is set (ggml.c, ggml_print_backtrace)
NO_BACKTRACE_ENV = {"GGML_NO_BACKTRACE": "1"}
# lines that carry an engine's own reason for dying, most specific first
_ERROR_PATTERNS = (
    re.compile(r"GGML_ASSERT|GGML_ABORT|^\S+\.(?:c|cc|cpp|cu|h|m|mm):\d+: "),  # ggml_abort: "file.cpp:123: why"
    re.compile(r"terminate called|what\(\):"),
    re.compile(r"\berror\b|\bfailed\b|\bfatal\b", re.IGNORECASE),
)
_SOURCE_LOCATION = re.compile(r"^(\S+?):\d+:")
_SOURCE_ROOTS = ("ggml/", "tools/", "common/", "src/")


def _short_source_path(line: str) -> str:
    """`/abs/…/llama.cpp/ggml/src/x.cpp:12: msg` -> `ggml/src/x.cpp:12: msg` (the place in llama.cpp's tree)."""
    match = _SOURCE_LOCATION.match(line)
    if match is None:
        return line
    path = match.group(1)
    for root in _SOURCE_ROOTS:
        index = path.rfind("/" + root)
        if index >= 0:
            return path[index + 1:] + line[len(path):]
    return line


def signal_name(returncode: int) -> str | None:
    """'SIGABRT' for a process killed by signal 6 (returncode -6, or 134 from a shell); None for a normal exit."""
    number = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 160 else None
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def engine_error_line(stderr: str, returncode: int | None = None) -> str:
    """One line saying why a native engine process died: its own assertion/error line and the signal.

    The path of the source file in an assertion line is cut to its place in the source tree
    (`ggml/src/ggml-backend.cpp:1294: GGML_ASSERT(...) failed`).
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    found = None
    for index, pattern in enumerate(_ERROR_PATTERNS):
        matches = [line for line in lines if pattern.search(line)]
        if index == 0 and not matches and "Traceback (most recent call last):" in lines:
            matches = lines[-1:]  # a Python exception: its last line is the message
        if matches:
            found = matches[0] if index == 0 else matches[-1]
            break
    if found is None and lines:
        found = lines[-1]
    if found is not None:
        found = _short_source_path(found)[:400]
    sig = signal_name(returncode) if returncode is not None else None
    if sig and found:
        return f"{found} ({sig})"
    if sig:
        return f"killed by {sig} without an error message"
    if found:
        return found if returncode in (None, 0) else f"{found} (exit {returncode})"
    return f"exit {returncode} without an error message"


class NativeCrash(RuntimeError):
    """The child process died (signal or non-zero exit) without returning; the message is its error line."""

    def __init__(self, message: str, returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.returncode, self.stderr = returncode, stderr


class ChildError(RuntimeError):
    """`func` raised in the child; the message is its exception type and text, `child_traceback` the rest."""

    def __init__(self, message: str, child_traceback: str) -> None:
        super().__init__(message)
        self.child_traceback = child_traceback


def _child(conn, stderr_path: str, env: dict[str, str], func: Callable, args: tuple, kwargs: dict) -> None:
    fd = os.open(stderr_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(env)
    try:
        result = ("ok", func(*args, **kwargs))
    except BaseException as exc:  # the parent re-raises it; nothing may escape a child silently
        result = ("error", (type(exc), f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    try:
        conn.send(result)
    except Exception as exc:  # an unpicklable result or exception
        conn.send(("error", (RuntimeError, f"result could not be sent back: {exc}", traceback.format_exc())))
    conn.close()


def run_isolated(func: Callable, *args: Any, timeout: float | None = 600, env: dict[str, str] | None = None,
                 **kwargs: Any) -> Any:
    """`func(*args, **kwargs)` in a fresh child process; its return value, or its exception, or NativeCrash.

    `func` must be importable by name (a module-level function). The child's stderr is captured for the error
    line; `env` is added to the child's environment (ggml's backtrace is always switched off).
    """
    ctx = multiprocessing.get_context("spawn")
    with tempfile.NamedTemporaryFile(prefix="basel-isolated-", suffix=".stderr", delete=False) as fh:
        stderr_path = fh.name
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, stderr_path, {**NO_BACKTRACE_ENV, **(env or {})}, func, args, kwargs))
    try:
        proc.start()
        send.close()
        message = receive.recv() if receive.poll(timeout) else None
        proc.join(None if message is not None else 5)
        if proc.is_alive():
            proc.kill()
            proc.join()
            if message is None:
                raise NativeCrash(f"{getattr(func, '__name__', func)} timed out after {timeout} s", None, "")
        stderr = Path(stderr_path).read_text(errors="replace")
    except EOFError:
        proc.join()
        stderr = Path(stderr_path).read_text(errors="replace")
        message = None
    finally:
        receive.close()
        Path(stderr_path).unlink(missing_ok=True)
    if message is None:
        raise NativeCrash(engine_error_line(stderr, proc.exitcode), proc.exitcode, stderr)
    status, payload = message
    if status == "ok":
        return payload
    exc_type, text, child_tb = payload
    if isinstance(exc_type, type) and issubclass(exc_type, Exception):
        try:
            error = exc_type(text.split(": ", 1)[-1])
        except Exception:
            error = ChildError(text, child_tb)
        raise error from ChildError(text, child_tb)
    raise ChildError(text, child_tb)

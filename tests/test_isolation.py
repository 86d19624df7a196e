"""runtimes.isolation: native code in a child process, and the one-line error of a process that died."""

from __future__ import annotations

import os
import sys
import time

import pytest

from basel_edge.runtimes.isolation import NativeCrash, engine_error_line, run_isolated, signal_name

GDB_NOISE = """\
[New LWP 4242]
[Thread debugging using libthread_db enabled]
Using host libthread_db library "/lib/x86_64-linux-gnu/libthread_db.so.1".
0x00007f0c1c2e7a33 in __GI___wait4 (pid=4243, stat_loc=0x0, options=0) at ../sysdeps/unix/sysv/linux/wait4.c:30
#0  0x00007f0c1c2e7a33 in __GI___wait4 () at ../sysdeps/unix/sysv/linux/wait4.c:30
#1  0x00007f0c1c6a1b2e in ggml_print_backtrace () from /x/libggml-base.so
[Inferior 1 (process 4242) detached]
"""


def test_error_line_is_the_assertion_with_its_place_in_the_source_tree():
    stderr = ("llama_context: constructing\n"
              "/root/.cache/basel-edge/llama_cpp/x/src/vendor/llama.cpp/ggml/src/ggml-backend.cpp:1294: "
              "GGML_ASSERT(*cur_backend_id != -1) failed\n" + GDB_NOISE)
    line = engine_error_line(stderr, -6)
    assert line == "ggml/src/ggml-backend.cpp:1294: GGML_ASSERT(*cur_backend_id != -1) failed (SIGABRT)"


def test_error_line_of_a_python_exception_and_of_a_silent_segfault():
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nValueError: bad model file\n'
    assert engine_error_line(tb, 1) == "ValueError: bad model file (exit 1)"
    assert engine_error_line("", -11) == "killed by SIGSEGV without an error message"
    assert engine_error_line("terminate called after throwing an instance of 'std::runtime_error'\n"
                             "  what():  invalid n_rot\n", 134).endswith("(SIGABRT)")
    abort = ("llama_completion: load the model\n/x/llama.cpp/ggml/src/ggml-cpu/binary-ops.cpp:135: binary_op: "
             "unsupported types: dst: f32, src0: f32, src1: i32\n" + GDB_NOISE)
    assert engine_error_line(abort, -6) == ("ggml/src/ggml-cpu/binary-ops.cpp:135: binary_op: unsupported types: "
                                            "dst: f32, src0: f32, src1: i32 (SIGABRT)")
    assert signal_name(139) == "SIGSEGV" and signal_name(0) is None and signal_name(1) is None


def _add(a: int, b: int) -> int:
    return a + b


def _raise() -> None:
    raise KeyError("no such tensor")


def _abort_like_ggml() -> None:
    sys.stderr.write("/src/ggml/src/ggml.c:42: GGML_ASSERT(ggml_can_mul_mat(a, b)) failed\n")
    sys.stderr.flush()
    os.abort()


def _hang() -> None:
    time.sleep(60)


def test_run_isolated_returns_the_result_and_reraises_python_errors():
    assert run_isolated(_add, 2, b=3) == 5
    with pytest.raises(KeyError, match="no such tensor"):
        run_isolated(_raise)


def test_a_native_abort_fails_the_call_not_the_caller():
    with pytest.raises(NativeCrash) as info:
        run_isolated(_abort_like_ggml)
    assert str(info.value) == "ggml/src/ggml.c:42: GGML_ASSERT(ggml_can_mul_mat(a, b)) failed (SIGABRT)"
    assert info.value.returncode == -6
    assert run_isolated(_add, 1, 1) == 2  # this process goes on


def test_a_hung_child_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(NativeCrash, match="timed out"):
        run_isolated(_hang, timeout=3)
    assert time.monotonic() - start < 30

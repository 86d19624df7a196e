"""HumanEval: the sandbox against hostile completions, scoring, the stop rule, batched generation per engine."""

import os
import socket
import threading
from pathlib import Path

import pytest

from conftest import needs_llama_cpp
from basel_edge.eval import humaneval
from basel_edge.eval.sandbox import SandboxLimits, run_program

FAST = SandboxLimits(wall_s=3, cpu_s=3)
PROJECT = Path(__file__).resolve().parent.parent


def _tree_state(root: Path) -> dict:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", "out"}
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if not skip & set(p.parts) and p.is_file()}


@pytest.fixture()
def hostile(tmp_path):
    """Completions that each try one harmful thing, aimed at a folder outside the sandbox; plus a live server."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    accepted = []

    def serve():
        server.settimeout(20)
        try:
            while True:
                accepted.append(server.accept()[0])
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    # every program succeeds (exit 0) only if its harmful action worked
    programs = {
        "loops forever": "while True:\n    pass\n",
        "sleeps forever": "import time\ntime.sleep(3600)\n",
        "allocates 8 GiB": "block = bytearray(8 * 2**30)\nblock[-1] = 1\n",
        "forks repeatedly": "import os\nwhile True:\n    os.fork()\n",
        "forks through libc": "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n"
                              "    if libc.fork() < 0:\n        raise OSError('fork refused')\n",
        "writes outside its folder": f"open({str(outside / 'new.txt')!r}, 'w').write('x')\n",
        "writes into the project": f"open({str(PROJECT / 'ESCAPED.txt')!r}, 'w').write('x')\n",
        "overwrites a file outside": f"open({str(outside / 'keep.txt')!r}, 'w').write('gone')\n",
        "runs rm through os.system": f"import os\nassert os.system('rm -rf {outside}') == 0\n",
        "runs rm through libc": f"import ctypes\nassert ctypes.CDLL(None).system(b'rm -rf {outside}') == 0\n",
        "deletes through os.unlink": f"import os\nos.unlink({str(outside / 'keep.txt')!r})\n",
        "opens a socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'x')\n",
        "calls sys.exit(0)": "import sys\nsys.exit(0)\n",
        "calls os._exit(0)": "import os\nos._exit(0)\n",
    }
    yield programs, outside, accepted
    server.close()


def test_every_hostile_completion_fails_and_changes_nothing_outside(hostile):
    programs, outside, accepted = hostile
    before = _tree_state(PROJECT)
    results = {name: run_program(source, FAST) for name, source in programs.items()}
    failed = {name: r.status for name, r in results.items() if r.status == "passed"}
    assert not failed, f"scored passed: {failed}"
    assert results["loops forever"].status == "timed_out"
    assert results["sleeps forever"].status == "timed_out"
    assert "MemoryError" in results["allocates 8 GiB"].detail
    assert "Read-only file system" in results["writes outside its folder"].detail
    assert (outside / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert not (PROJECT / "ESCAPED.txt").exists()
    assert _tree_state(PROJECT) == before
    assert accepted == []
    # the run goes on: a correct program right after still passes
    assert run_program("assert sum(range(4)) == 6\n", FAST).status == "passed"


def test_a_program_can_use_its_own_folder_and_threads():
    source = ("import threading\nopen('scratch.txt', 'w').write('ok')\nout = []\n"
              "t = threading.Thread(target=lambda: out.append(open('scratch.txt').read()))\nt.start(); t.join()\n"
              "assert out == ['ok']\n")
    assert run_program(source, FAST).status == "passed"


def test_all_canonical_solutions_pass_and_a_wrong_one_fails():
    items = humaneval.problems()
    assert len(items) == humaneval.NUM_PROBLEMS
    completions = [p["canonical_solution"] for p in items]
    wrong = completions[2].replace("return", "return 1 +", 1)  # HumanEval/2 truncate_number
    assert wrong != completions[2]
    completions[2] = wrong
    result = humaneval.score(items, completions)
    by_id = {r["task_id"]: r for r in result["problems"]}
    assert by_id["HumanEval/2"]["status"] == "failed"
    assert result["passed"] == humaneval.NUM_PROBLEMS - 1
    assert [r["task_id"] for r in result["problems"]] == [p["task_id"] for p in items]


def test_wilson_interval():
    low, high = humaneval.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = humaneval.wilson_interval(82, 164)
    assert low == pytest.approx(0.4240, abs=1e-3) and high == pytest.approx(0.5760, abs=1e-3)
    assert humaneval.wilson_interval(10, 10)[1] == 1.0


def test_cut_at_the_fence_or_the_completion_stops():
    assert humaneval.cut("    return x\n```\nMore text", chat=True) == ("    return x\n", True)
    assert humaneval.cut("    return x\n", chat=True) == ("    return x\n", False)
    assert humaneval.cut("    return x\n\n\ndef other():\n", chat=False) == ("    return x\n\n", True)
    assert humaneval.cut("    return x\nprint(f(1))", chat=False) == ("    return x", True)


def test_limit_is_checked():
    with pytest.raises(ValueError, match="--limit"):
        humaneval.HumanEvalConfig(limit=0)
    assert [p["task_id"] for p in humaneval.problems(3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_validate_limit_without_humaneval_is_a_user_error(tiny_llama, tmp_path, capsys):
    from basel_edge.cli import main

    assert main(["validate", "--baseline", str(tiny_llama), str(tiny_llama), "--limit", "3", "-o", str(tmp_path / "r")]) == 2
    assert "--limit selects HumanEval problems" in capsys.readouterr().err


def test_torch_batched_generation_equals_one_at_a_time(tiny_llama):
    from basel_edge.runtimes import open_runtime

    runtime = open_runtime("torch", tiny_llama, "cpu", 1)
    prompts = [[1, 5, 9, 20], [1, 7], [1, 30, 31, 32, 33, 34, 35], [1, 2, 3]]
    single = [runtime.generate(p, 10).token_ids for p in prompts]
    assert runtime.generate_batch(prompts, 10, batch=3) == single
    stopped = runtime.generate_batch(prompts, 10, stop=lambda i, new: len(new) >= 2 + i, batch=4)
    assert stopped == [s[:2 + i] for i, s in enumerate(single)]


def _llama_batch_in_child(path: str, prompts: list[list[int]]) -> tuple[list, list, list]:
    from basel_edge.runtimes import open_runtime

    runtime = open_runtime("llama_cpp", path, "cpu", 1)
    single = [runtime.generate(p, 10).token_ids for p in prompts]
    batched = runtime.generate_batch(prompts, 10, batch=3)
    stopped = runtime.generate_batch(prompts, 10, stop=lambda i, new: len(new) >= 2 + i, batch=2)
    runtime.close()
    return single, batched, stopped


@needs_llama_cpp
def test_llama_cpp_continuous_batching_equals_one_at_a_time(tiny_llama, tmp_path):
    from basel_edge.exporters.gguf import export_gguf
    from basel_edge.runtimes.isolation import run_isolated

    export_gguf(tiny_llama, tmp_path / "t.gguf", weights="f32", progress=False)
    prompts = [[1, 5, 9, 20], [1, 7], [1, 30, 31, 32, 33, 34, 35], [1, 2, 3], [1, 40, 41]]
    single, batched, stopped = run_isolated(_llama_batch_in_child, str(tmp_path / "t.gguf"), prompts)
    assert batched == single
    assert stopped == [s[:2 + i] for i, s in enumerate(single)]


@needs_llama_cpp
def test_validate_humaneval_rows_hold_per_problem_results(tiny_llama, tiny_text_data, tmp_path):
    """torch and its F32 GGUF generate the same completions (same weights, greedy) and score identically."""
    from basel_edge.eval.harness import ValidateConfig, run_validation
    from basel_edge.exporters.gguf import export_gguf

    export_gguf(tiny_llama, tmp_path / "t.gguf", weights="f32", progress=False)
    cfg = ValidateConfig(baseline=str(tiny_llama), artifacts=[f"{tmp_path / 't.gguf'}@{tiny_llama}"],
                         out=tmp_path / "report", task=None, data=str(tiny_text_data), threads=1, seq_len=32,
                         eval_tokens=64, agreement_tokens=48, prompt_tokens=8, new_tokens=4, reps=1,
                         humaneval=humaneval.HumanEvalConfig(limit=3, max_new_tokens=12, batch_size=2))
    report = run_validation(cfg, progress=False)
    torch_row, gguf_row = report["rows"]
    assert [r["status"] for r in report["rows"]] == ["ok", "ok"]
    for row in report["rows"]:
        h = row["humaneval"]
        assert h["n"] == 3 and [p["task_id"] for p in h["problems"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
        assert h["ci95"][0] <= h["pass@1"] <= h["ci95"][1]
    assert [p["completion"] for p in torch_row["humaneval"]["problems"]] == \
        [p["completion"] for p in gguf_row["humaneval"]["problems"]]
    assert "HumanEval pass@1" in (tmp_path / "report" / "report.md").read_text()
    assert os.path.getsize(tmp_path / "report" / "report.json") > 0

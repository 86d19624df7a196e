"""Parsing of ExecuTorch's llama runner output by the on-device benchmark script (no phone needed).

tests/data/llama_main_sample.txt follows the runner's output format (extension/llm/runner/stats.h:
`PyTorchObserver {json}` then the human-readable report), with the VmHWM lines the script's polling loop adds.
"""

from pathlib import Path

import pytest

from basel_edge.errors import UserError
from basel_edge.eval.scripts.executorch_device_bench import parse_observer, parse_peak_rss, runner_command, to_row

SAMPLE = Path(__file__).parent / "data" / "llama_main_sample.txt"


def test_parse_observer_sample():
    (run,) = parse_observer(SAMPLE.read_text())
    assert run.prompt_tokens == 64 and run.generated_tokens == 32
    assert run.prefill_tps == pytest.approx(64 / 0.25)  # prompt_eval_end - inference_start = 250 ms
    assert run.decode_tps == pytest.approx(31 / 0.31)  # 31 tokens after the first, 700 → 1010 ms
    assert run.model_load_ms == 400
    assert run.first_token_s == pytest.approx(0.29)


def test_peak_rss_is_the_largest_vmhwm():
    assert parse_peak_rss(SAMPLE.read_text()) == 183456 * 1024
    assert parse_peak_rss("no polling here") is None


def test_row_has_the_harness_fields(tmp_path):
    (tmp_path / "model.pte").write_bytes(b"x" * 1000)
    runs = parse_observer(SAMPLE.read_text() + "\n" + SAMPLE.read_text().replace('"inference_end_ms":1732540001010', '"inference_end_ms":1732540001320'))
    row = to_row(tmp_path, runs, parse_peak_rss(SAMPLE.read_text()), 4, "Pixel 7", "1.5.1")
    assert row["kind"] == "pte" and row["engine"] == "executorch" and row["backend"] == "mobile"
    assert row["emulated"] is False and row["bytes"] == 1000 and row["status"] == "ok"
    assert row["decode_tps"]["max"] == pytest.approx(100.0) and row["decode_tps"]["min"] == pytest.approx(31 / 0.62)
    assert row["peak_rss_bytes"] == 183456 * 1024 and row["new_tokens"] == 32


def test_output_without_stats_is_a_clear_error():
    with pytest.raises(UserError, match="PyTorchObserver"):
        parse_observer("I 00:00:00 executorch:runner.cpp] something else\n")


def test_runner_command_is_greedy_and_polls_memory():
    line = runner_command("/d/llama_main", "/d/model.pte", "/d/tokenizer.json", "def f(x):\n    'q'", 104, 4)
    assert "--temperature=0" in line and "--cpu_threads=4" in line and "--seq_len=104" in line
    assert "VmHWM" in line and "'--prompt=def f(x):" in line

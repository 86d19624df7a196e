"""The frontier benchmark's Pareto set, table and plots, on made-up points (its real runs are committed results)."""

import json

from basel_edge.eval.bench_frontier import markdown, pareto, plot, write_index


def _row(name, method, mib, ppl, passed, tps=10.0, n=40):
    return {"name": name, "method": method, "bytes": int(mib * 2**20), "perplexity": ppl, "decode_tps": tps,
            "prefill_tps": 5 * tps, "tensor_types": {"Q8_0": 3}, "threads": 2,
            "humaneval": {"pass@1": passed / n, "ci95": [max(0, passed / n - 0.1), min(1, passed / n + 0.1)],
                          "passed": passed, "n": n}}


ROWS = [
    _row("dense Q8_0", "dense", 500, 4.0, 20, tps=20),
    _row("dense Q4_0", "dense", 300, 4.5, 18, tps=30),
    _row("dense Q2_K", "dense", 200, 9.0, 5, tps=35),
    _row("SVD-LLM keep 0.6 Q8_0", "svd-llm/q8_0", 320, 12.0, 4, tps=28),  # beaten by dense Q4_0
    _row("SVD-LLM keep 0.6 Q4_0", "svd-llm/q4_0", 150, 13.0, 3, tps=50),  # smallest: on the frontier
]


def test_pareto_keeps_only_points_nothing_beats_on_both_axes():
    assert pareto(ROWS, "bytes", lambda r: r["humaneval"]["pass@1"]) == {"dense Q8_0", "dense Q4_0", "dense Q2_K",
                                                                        "SVD-LLM keep 0.6 Q4_0"}
    assert pareto(ROWS, "bytes", lambda r: -r["perplexity"]) == {"dense Q8_0", "dense Q4_0", "dense Q2_K",
                                                                "SVD-LLM keep 0.6 Q4_0"}
    ties = [_row("a", "dense", 100, 5, 3), _row("b", "dense", 100, 5, 3), _row("c", "dense", 120, 5, 3)]
    assert pareto(ties, "bytes", lambda r: r["humaneval"]["pass@1"]) == {"a", "b"}


def test_table_index_and_plots(tmp_path):
    result = {"model": "m", "machine": {"cpu": "cpu", "cores": 2}, "engine": "e", "threads": 2, "eval_tokens": 100,
              "command": "python -m basel_edge.eval.bench_frontier --model m", "rows": ROWS}
    text = markdown(result)
    lines = [line for line in text.splitlines() if line.startswith("| SVD-LLM keep 0.6 Q8_0")]
    assert len(lines) == 1 and "| 10.0 [0.0–20.0] |" in lines[0] and not lines[0].split("|")[7].strip()
    (tmp_path / "frontier-m.json").write_text(json.dumps(result))
    write_index(tmp_path)
    assert "## m" in (tmp_path / "frontier.md").read_text()
    files = plot(ROWS, "m", tmp_path)
    assert [f.name for f in files] == ["frontier-m-bytes.png", "frontier-m-decode.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" and f.stat().st_size > 20_000 for f in files)

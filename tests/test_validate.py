"""The validation harness on tiny models: report contents, failure isolation, schema, regressions."""

import copy
import json
import shutil

import jsonschema
import pytest

from basel_edge.checkpoint import load_model, save_factorized
from basel_edge.cli import main
from basel_edge.compress import Budget, compress
from basel_edge.data import load_data, pack
from basel_edge.models import load_dense, load_tokenizer
from basel_edge.perplexity import perplexity
from basel_edge.eval.harness import ValidateConfig, run_validation
from basel_edge.eval.report import compare_reports, validate_schema

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    model = load_dense(tiny_llama)
    compress(model, "svd", Budget(ranks={"*": 16}, rank_multiple=8), progress=False)
    save_factorized(model, root / "fact", tiny_llama, method="svd", rank_multiple=8)
    broken = root / "broken"
    shutil.copytree(root / "fact", broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    return root


@pytest.fixture(scope="module")
def report(tiny_llama, tiny_text_data, artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "r"
    cfg = ValidateConfig(
        baseline=str(tiny_llama),
        artifacts=[str(artifacts / "fact"), str(artifacts / "broken")],
        out=out,
        backends=["cpu", "mobile"],
        task=None,
        data=str(tiny_text_data),
        threads=1,
        seq_len=64,
        eval_tokens=256,
        agreement_tokens=64,
        prompt_tokens=16,
        new_tokens=NEW_TOKENS,
        reps=2,
    )
    return run_validation(cfg, progress=False), out


def test_report_files_and_schema(report):
    data, out = report
    on_disk = json.loads((out / "report.json").read_text())
    validate_schema(on_disk)
    for png in ("accuracy_vs_size.png", "decode_tps.png"):
        assert (out / png).stat().st_size > 1000
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert on_disk["machine"]["cores"] >= 1 and on_disk["engines"]["torch"]


def test_one_markdown_row_per_artifact_and_backend(report):
    data, out = report
    table = [l for l in (out / "report.md").read_text().splitlines() if l.startswith("| ") and "---" not in l]
    body = table[1:]
    assert len(body) == 3 * 2 == len(data["rows"])
    assert "(baseline)" in body[0]
    assert sum("mobile (emulated)" in l for l in body) == 3


def test_broken_artifact_is_a_failed_row_and_others_still_run(report):
    rows = {(r["artifact"], r["backend"]): r for r in report[0]["rows"]}
    broken = rows[("broken", "cpu")]
    assert broken["status"] == "failed" and "safetensors" in broken["error"]
    # the refusal's own line, not a traceback's last line with the exception class
    assert "\n" not in broken["error"] and "Error:" not in broken["error"] and "(exit" not in broken["error"]
    assert rows[("fact", "cpu")]["status"] == "ok"
    assert rows[("fact", "mobile")]["status"] == "skipped" and "mobile" in rows[("fact", "mobile")]["reason"]


def test_torch_perplexity_equals_basel_edge_perplexity(report, tiny_llama, tiny_text_data, artifacts):
    rows = {(r["artifact"], r["backend"]): r for r in report[0]["rows"]}
    blocks = pack(load_data(tiny_text_data).validation, load_tokenizer(tiny_llama), 64, max_tokens=256)
    for label, path in (("tiny-llama", tiny_llama), ("fact", artifacts / "fact")):
        expected = perplexity(load_model(path), blocks, progress=False)
        row = rows[(label, "cpu")]
        assert row["scored_tokens"] == expected.tokens
        assert row["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)


def test_speed_figures_and_fidelity(report):
    for row in report[0]["rows"]:
        if row["status"] != "ok":
            continue
        assert row["new_tokens"] == NEW_TOKENS
        assert row["prefill_tps"]["median"] > 0 and row["decode_tps"]["min"] > 0
        assert row["peak_rss_bytes"] > 0
        assert row["fidelity"]["top1_agreement"] == 1.0  # a torch checkpoint is its own same-weights reference
    fact = next(r for r in report[0]["rows"] if r["artifact"] == "fact" and r["backend"] == "cpu")
    assert fact["vs_dense"]["mean_kl"] > 0 and fact["ratios"]["bytes"] < 1


def test_schema_rejects_an_ok_row_without_numbers(report):
    bad = copy.deepcopy(report[0])
    ok = next(r for r in bad["rows"] if r["status"] == "ok")
    del ok["decode_tps"]
    with pytest.raises(jsonschema.ValidationError):
        validate_schema(bad)


def test_compare_to_flags_regressions_over_five_percent(report):
    new = report[0]
    old = copy.deepcopy(new)
    for row in old["rows"]:
        if row["status"] == "ok":
            row["decode_tps"]["median"] *= 2.0
            row["perplexity"] *= 1.02
    found = compare_reports(old, new)
    metrics = {(g["artifact"], g["metric"]) for g in found}
    assert ("fact", "decode_tps") in metrics
    assert not any(m == "perplexity" for _, m in metrics)


def test_validate_cli_exits_zero_with_a_failed_row_and_rejects_bad_backend(capsys, tiny_llama, tiny_text_data, artifacts, tmp_path):
    code = main(["validate", "--baseline", str(tiny_llama), str(artifacts / "broken"), "--data", str(tiny_text_data),
                 "--seq-len", "32", "--eval-tokens", "64", "--new-tokens", "4", "--reps", "1", "--threads", "1",
                 "-o", str(tmp_path / "r"), "--quiet"])
    assert code == 0 and "1 failed row" in capsys.readouterr().out
    code = main(["validate", "--baseline", str(tiny_llama), str(artifacts / "fact"), "--backends", "cpu,phone", "-o", str(tmp_path / "r2")])
    assert code == 2 and "phone" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("name,content", [("cut.gguf", b"GGUF\x03\x00\x00\x00" + b"\x01" * 40),
                                          ("foreign.gguf", b"not a gguf at all")])
def test_a_damaged_gguf_is_refused_before_any_work(capsys, tiny_llama, tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    code = main(["validate", "--baseline", str(tiny_llama), str(tmp_path / name), "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and name in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_relative_paths_are_the_callers(capsys, tiny_llama, tiny_text_data, artifacts, tmp_path, monkeypatch):
    """The workers run from the repository root; artifact paths relative to the caller's folder still work."""
    monkeypatch.chdir(artifacts)
    code = main(["validate", "--baseline", str(tiny_llama), "fact", "--data", str(tiny_text_data), "--seq-len", "32",
                 "--eval-tokens", "64", "--new-tokens", "4", "--reps", "1", "--threads", "1", "--backends", "cpu",
                 "-o", str(tmp_path / "r"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert [r["status"] for r in rows if r["artifact"] == "fact"] == ["ok"], rows


def test_peak_rss_is_the_workers_own(report):
    """Workers are forked from a harness holding more memory; their figure must not be the harness's."""
    import resource

    harness_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ok = [r for r in report[0]["rows"] if r["status"] == "ok"]
    assert ok and all(0 < r["peak_rss_bytes"] < harness_peak * 4 for r in ok)
    assert len({r["peak_rss_bytes"] for r in ok}) > 1


def test_report_folder_never_replaces_an_input_or_a_foreign_folder(capsys, tiny_llama, artifacts, report, tmp_path):
    """-o is replaced as a whole, so it is checked before any work: an input, or a folder with other files in
    it, is refused (exit 2, nothing touched); an earlier report's folder is replaced; --overwrite is asked for
    anything else that is not empty."""
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    fact_files = sorted(p.name for p in (artifacts / "fact").iterdir())
    base = ["validate", "--baseline", str(tiny_llama), str(artifacts / "fact"), "--quiet"]
    for output, extra, fragment in [(foreign, [], "--overwrite"), (artifacts / "fact", [], "input"),
                                    (artifacts / "fact", ["--overwrite"], "input"), (artifacts, [], "input"),
                                    (foreign / "mine.txt", [], "is a file")]:
        assert main([*base, "-o", str(output), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err
    assert (foreign / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in (artifacts / "fact").iterdir()) == fact_files
    _, earlier = report
    ValidateConfig(baseline=str(tiny_llama), artifacts=[str(artifacts / "fact")], out=earlier)  # no error
    ValidateConfig(baseline=str(tiny_llama), artifacts=[str(artifacts / "fact")], out=foreign, overwrite=True)


@pytest.mark.parametrize("content,fragment", [("not json", "not valid JSON"), ('{"rows": 3}', "not a report.json"),
                                              ("[1, 2]", "not a report.json")])
def test_compare_to_a_file_that_is_not_a_report_is_refused_before_any_work(capsys, tiny_llama, artifacts, tmp_path,
                                                                          content, fragment):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(content)
    code = main(["validate", "--baseline", str(tiny_llama), str(artifacts / "fact"), "--compare-to", str(earlier),
                 "-o", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()

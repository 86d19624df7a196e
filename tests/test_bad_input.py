"""The bad-input corpus: every command, at least three bad inputs each, one `basel-edge: error:` line, exit 2,
no traceback and nothing written (README "What each command guarantees")."""

from __future__ import annotations

import re

import pytest

from basel_edge.checkpoint import save_factorized
from basel_edge.cli import main
from basel_edge.compress import Budget, compress
from basel_edge.models import load_dense


@pytest.fixture(scope="module")
def corpus(tiny_llama, tiny_text_data, tmp_path_factory):
    """Paths the cases name: a dense and a factorized model, a text file, a plain file standing where a folder
    should be, an empty folder, a folder that is not a model."""
    root = tmp_path_factory.mktemp("bad")
    model = load_dense(tiny_llama)
    compress(model, "svd", Budget(ranks={"*": 16}, rank_multiple=8), progress=False)
    save_factorized(model, root / "fact", tiny_llama, method="svd", rank_multiple=8)
    (root / "file.txt").write_text("not a model\n")
    (root / "empty").mkdir()
    (root / "notmodel").mkdir()
    (root / "notmodel" / "readme.txt").write_text("x")
    (root / "fake.gguf").write_bytes(b"GGUF" + b"\x00" * 12)
    return {"dense": str(tiny_llama), "fact": str(root / "fact"), "data": str(tiny_text_data), "root": root}


CASES = {
    # command: [(argv with {placeholders}, fragment of the error line)]
    "finetune": [
        (["finetune", "{root}/missing", "--data", "{data}"], "missing"),
        (["finetune", "{dense}", "--data", "{data}"], "not a factorized checkpoint"),
        (["finetune", "{fact}", "--data", "{root}/missing.jsonl"], "missing.jsonl"),
        (["finetune", "{fact}", "--data", "{data}", "--steps", "-3"], "steps"),
        (["finetune", "{fact}", "--data", "{data}", "--teacher", "{root}/missing", "--loss", "kl"], "missing"),
        (["finetune", "{fact}", "--data", "{data}", "--train-dense", "--dense-lr", "0"], "dense-lr"),
    ],
    "info": [
        (["info", "{root}/missing"], "missing"),
        (["info", "{root}/file.txt"], "file.txt"),
        (["info", "{root}/notmodel"], "notmodel"),
    ],
    "merge": [
        (["merge", "{root}/missing"], "missing"),
        (["merge", "{dense}"], "not a factorized"),
        (["merge", "{fact}", "-o", "{root}/file.txt/x"], "file.txt"),
    ],
    "eval-ppl": [
        (["eval-ppl", "{root}/missing", "--data", "{data}"], "missing"),
        (["eval-ppl", "{root}/notmodel", "--data", "{data}"], "notmodel"),
        (["eval-ppl", "{dense}", "--data", "{root}/empty"], "empty"),
        (["eval-ppl", "{root}/fake.gguf", "--data", "{data}"], "fake.gguf"),
    ],
    "export-onnx": [
        (["export", "--target", "onnx", "{root}/missing"], "missing"),
        (["export", "--target", "onnx", "{fact}", "--weights", "q4_0"], "q4_0"),
        (["export", "--target", "onnx", "{root}/notmodel"], "notmodel"),
        (["export", "--target", "onnx", "{fact}", "--keep-8bit", "lm_head", "--weights", "int4"], "lm_head"),
    ],
    "export-executorch": [
        (["export", "--target", "executorch", "{root}/missing"], "missing"),
        (["export", "--target", "executorch", "{fact}", "--weights", "int2"], "int2"),
        (["export", "--target", "executorch", "{fact}", "--max-seq-len", "4"], "max-seq-len"),
    ],
    "export-gguf": [
        (["export", "--target", "gguf", "{root}/missing"], "missing"),
        (["export", "--target", "gguf", "{fact}", "--weights", "q9_9"], "q9_9"),
        (["export", "--target", "gguf", "{fact}", "--layout", "sideways"], "sideways"),
    ],
    "export": [
        (["export", "--target", "tflite", "{fact}"], "tflite"),
    ],
    "demo": [
        (["demo", "--keep", "0"], "keep"),
        (["demo", "--threads", "0"], "threads"),
        (["demo", "--method", "nope"], "nope"),
    ],
}

OUTPUTS = {"merge", "export-onnx", "export-executorch", "export-gguf", "export", "finetune", "demo"}


@pytest.mark.parametrize("command,index", [(c, i) for c, cases in CASES.items() for i in range(len(cases))])
def test_bad_input_is_one_line_and_exit_2(capsys, corpus, tmp_path, command, index):
    argv, fragment = CASES[command][index]
    argv = [a.format(**corpus) for a in argv]
    out = tmp_path / "out"
    if command in OUTPUTS and "-o" not in argv:
        argv += ["-o", str(out) + (".gguf" if command == "export-gguf" else "")]
    before = sorted(p.name for p in corpus["root"].iterdir())
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    error_line = re.compile(r"^basel-edge( [a-z-]+)?: error: ")  # argparse's refusals name the subcommand
    assert code == 2, err
    assert "Traceback" not in err and lines and error_line.match(lines[-1]), err
    assert sum(bool(error_line.match(line)) for line in lines) == 1, err
    assert fragment.format(**corpus) in lines[-1], lines[-1]
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())
    assert sorted(p.name for p in corpus["root"].iterdir()) == before

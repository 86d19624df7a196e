import json
import subprocess
import sys

import pytest

from basel_edge.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_user_error(code, err, *fragments):
    assert code == 2
    lines = [l for l in err.strip().replace("\r", "\n").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("basel-edge: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for f in fragments:
        assert f in errors[0]


def test_compress_info_merge_eval_end_to_end(capsys, tiny_llama, tiny_text_data, tmp_path):
    out = tmp_path / "fact"
    code, stdout, _ = run(
        capsys, "compress", "--model", tiny_llama, "--data", tiny_text_data, "--method", "svd-llm", "--keep", "0.5",
        "--rank-multiple", "8", "--seq-len", "64", "--calib-tokens", "512", "-o", out, "--json", "--quiet",
    )
    assert code == 0
    summary = json.loads(stdout)
    assert summary["method"] == "svd-llm" and 0.4 < summary["kept_fraction"] < 0.6
    dims = json.loads((out / "basel.json").read_text())
    assert dims["method"] == "svd-llm" and dims["extra"]["keep"] == 0.5

    code, stdout, _ = run(capsys, "info", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["factorized"] and info["linears"] and info["bytes_on_disk"] > 0
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "rank" in stdout and "model.layers.0.self_attn.q_proj" in stdout

    code, _, _ = run(capsys, "merge", out, "-o", tmp_path / "merged")
    assert code == 0 and (tmp_path / "merged" / "model.safetensors").is_file()

    ppl = {}
    for name, path in (("fact", out), ("merged", tmp_path / "merged")):
        code, stdout, _ = run(capsys, "eval-ppl", path, "--data", tiny_text_data, "--seq-len", "64", "--max-tokens", "256", "--json", "--quiet")
        assert code == 0
        ppl[name] = json.loads(stdout)["perplexity"]
    assert ppl["fact"] == pytest.approx(ppl["merged"], rel=1e-4)


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["compress", "--model", "/no/such/model", "--task", "python-code", "-o", "{tmp}/o"], ["not found"]),
        (["compress", "--model", "{tiny}", "--data", "/no/such/data", "-o", "{tmp}/o"], ["does not exist"]),
        (["compress", "--model", "{tiny}", "--task", "nope", "-o", "{tmp}/o"], ["unknown task"]),
        (["compress", "--model", "{tiny}", "--task", "python-code", "--method", "magic", "-o", "{tmp}/o"], ["unknown method"]),
        (["compress", "--model", "{tiny}", "--task", "humaneval", "-o", "{tmp}/o"], ["evaluation-only"]),
        (["compress", "--model", "{gpt2}", "--task", "python-code", "-o", "{tmp}/o"], ["gpt2", "llama"]),
        (["compress", "--model", "{tiny}/config.json", "--task", "python-code", "-o", "{tmp}/o"], ["not a .gguf"]),
        (["compress", "--model", "{tiny}", "--task", "python-code", "--ranks", "{tmp}/r.json", "-o", "{tmp}/o"], ["ranks file"]),
        (["merge", "{tiny}", "-o", "{tmp}/o"], ["not a factorized"]),
        (["info", "/no/such/model"], ["not found"]),
        (["eval-ppl", "{tiny}", "--data", "{tmp}/x.parquet"], ["unsupported data format"]),
    ],
)
def test_cli_user_errors(capsys, tiny_llama, tmp_path, argv, fragments):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    argv = [a.format(tmp=tmp_path, tiny=tiny_llama, gpt2=gpt2) for a in argv]
    code, _, err = run(capsys, *argv)
    _assert_user_error(code, err, *fragments)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,fragment", [
    *((["compress", "--task", "python-code", "--keep", keep], "keep") for keep in ("0", "1.5", "-0.2", "abc", "nan")),
    (["compress", "--task", "python-code", "--method", "basel", "--lr", "nan"], "--lr"),
    (["compress", "--task", "python-code", "--method", "basel", "--finetune-lr", "inf"], "--finetune-lr"),
    (["compress", "--task", "python-code", "--rank-multiple", "0"], "--rank-multiple"),
    (["finetune", "ckpt", "--lr", "nan"], "--lr"),
    (["finetune", "ckpt", "--lr", "-1"], "--lr"),
    (["finetune", "ckpt", "--loss", "mse"], "--loss"),
    *((["compress", "--task", "python-code", "--error-aware", "--ls-correction", c], "--ls-correction")
      for c in ("nan", "1.5", "x")),
    (["compress", "--task", "python-code", "--error-aware", "--local-steps", "-1"], "--local-steps"),
    (["compress", "--task", "python-code", "--error-aware", "--local-lr", "nan"], "--local-lr"),
])
def test_bad_option_values_exit_2_with_one_line(capsys, tmp_path, argv, fragment):
    """NaN, inf and out-of-range numbers are refused before any work, in one line that points at --help."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and fragment in err and "--help" in err and "usage:" not in err, err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_clobbered(capsys, tiny_llama, tiny_text_data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep-me").write_text("x")
    code, _, err = run(capsys, "compress", "--model", tiny_llama, "--data", tiny_text_data, "-o", out)
    _assert_user_error(code, err, "already exists", "--overwrite")
    assert (out / "keep-me").read_text() == "x"


def test_failure_during_compress_leaves_no_output(capsys, tiny_llama, tiny_text_data, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"*": 512}))
    code, _, err = run(
        capsys, "compress", "--model", tiny_llama, "--data", tiny_text_data, "--method", "svd",
        "--ranks", tmp_path / "r.json", "-o", tmp_path / "o", "--quiet",
    )
    _assert_user_error(code, err, "break-even")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_console_script_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "basel_edge", "info", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_a_killed_writers_partial_output_is_removed_by_the_next_run(tmp_path):
    """kill -9 cannot be cleaned up after; the next write to the same output removes what the dead writer left
    (its PID is in the partial name) and leaves a live writer's partial output alone."""
    out = tmp_path / "o"
    script = ("import os, signal, sys\nfrom basel_edge.atomic import atomic_output_dir\n"
              "with atomic_output_dir(sys.argv[1]) as tmp:\n    (tmp / 'weights').write_bytes(b'x' * 4096)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", script, str(out)], check=False).returncode == -9
    stale = list(tmp_path.glob(".o.partial-*"))
    assert len(stale) == 1 and (stale[0] / "weights").is_file()
    with subprocess.Popen(["sleep", "30"]) as live_writer:
        live = tmp_path / f".o.partial-{live_writer.pid}-abc"
        live.mkdir()
        try:
            from basel_edge.atomic import atomic_output_dir

            with atomic_output_dir(out) as tmp:
                (tmp / "done").write_text("1")
            assert not stale[0].exists() and live.is_dir() and (out / "done").is_file()
        finally:
            live_writer.kill()


def test_sigterm_exits_143_and_leaves_no_output(tiny_llama, tiny_text_data, tmp_path):
    """SIGTERM (timeout, CI, containers) is handled like Ctrl-C: one line, exit 143, no output folder."""
    import signal
    import time

    out = tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, "-m", "basel_edge", "compress", "--model", str(tiny_llama), "--data", str(tiny_text_data),
         "--method", "basel", "--rank-multiple", "8", "--r-add", "4", "--steps", "100000", "--train-seq-len", "32",
         "--checkpoint-every", "2", "--quiet", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (tmp_path / ".o.train").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "basel-edge: terminated (SIGTERM)" and "Traceback" not in err, err[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".o.partial-*"))


def test_a_model_whose_weights_do_not_cover_it_is_refused_not_randomly_filled(capsys, tiny_llama, tmp_path,
                                                                                monkeypatch):
    """transformers fills missing tensors at random and goes on; perplexity 4e10 with exit 0 was the result.
    A factorized checkpoint without its basel.json and a factorized GGUF (llama.cpp only) are both refused, and
    the GGUF's failed conversion is not cached."""
    from basel_edge.checkpoint import save_factorized
    from basel_edge.compress import Budget, compress
    from basel_edge.models import load_dense
    from basel_edge.exporters.gguf import export_gguf

    monkeypatch.setenv("BASEL_EDGE_CACHE", str(tmp_path / "cache"))
    model = load_dense(tiny_llama)
    compress(model, "svd", Budget(ranks={"*": 16}, rank_multiple=8), progress=False)
    save_factorized(model, tmp_path / "fact", tiny_llama, method="svd", rank_multiple=8)
    export_gguf(tmp_path / "fact", tmp_path / "fact.gguf", progress=False)
    (tmp_path / "fact" / "basel.json").unlink()
    code, _, err = run(capsys, "eval-ppl", tmp_path / "fact", "--task", "python-code", "--max-tokens", "64")
    _assert_user_error(code, err, "not in its weights", "basel.json")
    code, _, err = run(capsys, "eval-ppl", tmp_path / "fact.gguf", "--task", "python-code", "--max-tokens", "64")
    _assert_user_error(code, err, "not in its weights", "llama.cpp")
    assert not list((tmp_path / "cache" / "models").glob("fact-*"))


def test_pickle_weights_and_non_utf8_data_are_refused_in_one_line(capsys, tiny_llama, tmp_path):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    code, _, err = run(capsys, "eval-ppl", pickled, "--task", "python-code", "--max-tokens", "64")
    _assert_user_error(code, err, "pickle", "safetensors")
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe broken"}\n')
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.jsonl").write_bytes(bad.read_bytes())
    for data in (bad, folder):
        code, _, err = run(capsys, "compress", "--model", tiny_llama, "--data", data, "-o", tmp_path / "o")
        _assert_user_error(code, err, "not UTF-8")
        assert not (tmp_path / "o").exists()


def test_importing_the_export_stack_writes_nothing_on_stderr():
    """torchao and torch printed four lines on every ExecuTorch command before basel-edge's own output."""
    pytest.importorskip("executorch")
    proc = subprocess.run([sys.executable, "-c", "import basel_edge, executorch.exir, torchao.quantization"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_an_output_that_cannot_be_written_is_refused_before_any_work(capsys, tiny_llama, tiny_text_data, tmp_path):
    """The output's parent is a file: compress, export and validate say so at once (they used to fail with
    FileExistsError after all the work was done)."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "o"
    for argv in (["compress", "--model", tiny_llama, "--data", tiny_text_data, "-o", out],
                 ["export", "--target", "gguf", tiny_llama, "-o", tmp_path / "file" / "m.gguf"],
                 ["validate", "--baseline", tiny_llama, tiny_llama, "-o", out]):
        code, _, err = run(capsys, *argv)
        _assert_user_error(code, err, "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("damage,fragment", [("truncated", "not a readable safetensors"),
                                             ("garbage", "not a readable safetensors"),
                                             ("config", "do not match config.json")])
def test_a_damaged_dense_model_folder_is_refused_in_one_line(capsys, tiny_llama, tmp_path, damage, fragment):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    weights = model / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"garbage" * 100)
    else:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    code, _, err = run(capsys, "eval-ppl", model, "--task", "python-code", "--max-tokens", "64")
    _assert_user_error(code, err, fragment)


@pytest.mark.parametrize("command", [["compress", "--task", "python-code"], ["finetune", "--task", "python-code"],
                                     ["merge"], ["info"], ["eval-ppl", "--task", "python-code"],
                                     ["export", "--target", "onnx"]])
def test_every_command_names_its_model_both_ways(capsys, tmp_path, command):
    """One grammar (issue 19): `MODEL` and `--model MODEL` are the same everywhere; two different ones refused."""
    missing = str(tmp_path / "missing-model")
    out = [] if command[0] in ("info", "eval-ppl") else ["-o", str(tmp_path / "o")]
    errors = []
    for spelling in ([missing], ["--model", missing]):
        code = main([*command, *spelling, *out])
        errors.append(capsys.readouterr().err)
        assert code == 2 and "missing-model" in errors[-1], errors[-1]
    assert errors[0] == errors[1]
    assert main([*command, missing, "--model", missing + "2", *out]) == 2
    assert "two models given" in capsys.readouterr().err


def test_info_reads_the_same_model_either_way(capsys, tiny_llama):
    assert main(["info", str(tiny_llama), "--json"]) == 0
    positional = capsys.readouterr().out
    assert main(["info", "--model", str(tiny_llama), "--json"]) == 0
    assert capsys.readouterr().out == positional and positional.strip()


def test_the_parser_takes_its_defaults_from_the_configs(tmp_path, monkeypatch):
    """A default lives in one place (issue 19): options the user leaves out get the typed config's default,
    not a second literal in the parser."""
    import dataclasses

    from basel_edge.cli import build_parser
    from basel_edge.compress.basel import BaselConfig
    from basel_edge.eval import harness

    args = build_parser().parse_args(["compress", "--task", "python-code", "-o", str(tmp_path / "x")])
    basel = BaselConfig()
    for option, name in [("steps", "steps"), ("prune_events", "prune_events"), ("prune_mode", "mode"),
                         ("mass", "mass"), ("basis", "basis"), ("r_add", "r_add"), ("lr", "lr"), ("lr_add", "lr_add"),
                         ("finetune_steps", "finetune_steps"), ("finetune_lr", "finetune_lr"), ("dense_lr", "dense_lr"),
                         ("bsi_hessian", "bsi_hessian"), ("bsi_probes", "bsi_probes")]:
        assert getattr(args, option) == getattr(basel, name), option

    seen = {}

    def fake_run(cfg, progress=True):
        seen["cfg"] = cfg
        return {"rows": []}

    monkeypatch.setattr(harness, "run_validation", fake_run)
    baseline = tmp_path / "dense"
    baseline.mkdir()
    assert main(["validate", str(tmp_path / "a.gguf"), "--baseline", str(baseline), "-o", str(tmp_path / "r"),
                 "--json"]) == 0
    cfg, defaults = seen["cfg"], {f.name: f.default for f in dataclasses.fields(harness.ValidateConfig)}
    for name in ("threads", "seq_len", "eval_tokens", "new_tokens", "reps", "task", "data"):
        assert getattr(cfg, name) == defaults[name], name


def test_finetune_rows_default_to_the_trained_methods_rows(tmp_path):
    """Part 2 trains on rows as long as part 1's and the demo's unless asked otherwise; it used to take the
    calibration row length (512), so `finetune --steps N` trained on twice the tokens of `compress`'s N steps."""
    from basel_edge.cli import build_parser

    parser = build_parser()
    finetune = parser.parse_args(["finetune", str(tmp_path / "m"), "--task", "python-code", "-o", str(tmp_path / "o")])
    compress = parser.parse_args(["compress", "--task", "python-code", "-o", str(tmp_path / "x")])
    assert finetune.seq_len == compress.train_seq_len
    assert compress.seq_len > compress.train_seq_len  # calibration rows stay the longer ones

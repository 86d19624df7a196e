"""Benchmark: a real model of a non-Llama family end to end (Qwen2.5-Coder-0.5B, Gemma-3-270M).

What CI cannot afford on 2 cores, run once per model with the results committed (eval/results/families-*.json):
- SVD-LLM at keep 0.6 on python-code; every export target with its inline validation (GGUF Q8_0 factorized is
  also scored against torch on held-out text in llama.cpp);
- every linear factorized at full rank, as an F32 GGUF: llama.cpp logits against torch's (max |diff|, top-1);
- the GGUF tokenizer against the HF tokenizer on unicode, whitespace and every special token;
- the dense-layout GGUF on an unpatched llama.cpp of the same pin: the same greedy tokens as the patched build.
llama.cpp runs in child processes only.

    python -m basel_edge.eval.bench_families --model qwen2.5-coder-0.5b [--targets gguf gguf-full-rank onnx executorch]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from basel_edge.cache import cache_dir
from basel_edge.checkpoint import load_model, save_factorized
from basel_edge.compress import Budget, compress
from basel_edge.data import load_task, pack
from basel_edge.embedded import EMBEDDED
from basel_edge.families import family_of
from basel_edge.lowrank import decoder_linears
from basel_edge.models import load_dense, load_tokenizer, resolve_model
from basel_edge.eval.harness import cpu_model
from basel_edge.exporters.gguf import export_gguf
from basel_edge.runtimes.isolation import run_isolated
from basel_edge.runtimes.llama_cpp.build import PIN, build_key, build_stock_tool
from basel_edge.runtimes.llama_cpp.tools import tool

RESULTS = Path(__file__).parent / "results"
KEEP = 0.6
# full-rank factorized F32 GGUF in llama.cpp vs the dense model in torch fp32: the same top-1 everywhere and a
# max |logit diff| within 1% of the largest |logit| (24 layers of float32 in another operation order)
FULL_RANK_BOUND = 0.01
ADDED_TOKENS = 64  # added tokens of the vocabulary put in the tokenizer round-trip text (Gemma has thousands)
TEXTS = [
    "def f(x: int) -> int:\n\treturn x * 1234  # émoji 🙂 ünïcödé ✓",
    "日本語のテキスト and emoji 🚀, tabs\tand  double  spaces",
    "numbers 1234567 3.14159 -42 0x1F\n\n",
]
PROMPT = "def fibonacci(n):"


def round_trip_texts(tok) -> list[str]:
    """Texts the GGUF tokenizer must split as the HF one does: unicode, whitespace, and the special tokens with
    the first added ones, glued to text and to each other."""
    added = [t.content for t in tok.added_tokens_decoder.values()][:ADDED_TOKENS]
    specials = "".join(dict.fromkeys([*tok.all_special_tokens, *added]))
    return [*TEXTS, f"{specials} between {specials[::-1][:3]} text", f"x{specials}y\n"]


def _logits_in_child(path: str, ids: list[int]) -> np.ndarray:
    from basel_edge.runtimes import open_runtime

    runtime = open_runtime("llama_cpp", path, threads=2)
    try:
        return runtime.logits(ids)
    finally:
        runtime.close()


def _tokenizer_in_child(path: str, texts: list[str]) -> list[list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(text.encode(), add_bos=False, special=True) for text in texts]
    finally:
        llm.close()


def _torch_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    return {"max_abs_diff": float(np.abs(a - b).max()), "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def _complete(binary: Path, gguf_file: Path) -> str:
    proc = subprocess.run([str(binary), "-m", str(gguf_file), "-p", PROMPT, "-n", "16", "--temp", "0", "-t", "1",
                           "-no-cnv", "--simple-io"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{binary.name} exit {proc.returncode}: {proc.stderr[-400:]}")
    return proc.stdout


def _timed(results: dict, key: str, fn):
    start = time.monotonic()
    try:
        results[key] = fn()
    except Exception as exc:  # a failed step is recorded, the others still run
        results[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:800]}
    results[key]["seconds"] = round(time.monotonic() - start, 1)
    print(f"{key}: {json.dumps(results[key])[:600]}", flush=True)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(results: dict) -> str:
    """One row per check: passed or not, its numbers, its seconds."""
    head = (f"{results['model']} ({results.get('family')}, {results.get('dense_params', 0) / 1e6:.0f} M parameters), "
            f"SVD-LLM keep {results.get('keep')} on python-code ({results.get('calib_tokens')} calibration tokens, "
            f"{results.get('compress_seconds', '?')} s), {results.get('cpu')}; {results.get('engine_llama_cpp')}.")
    lines = [head, "", "| check | ok | numbers | s |", "|---|---|---|---:|"]
    torch_cmp = results.get("torch_factorized_vs_dense", {})
    lines.append(f"| torch: factorized vs dense (held-out positions) | – | top-1 {_fmt(torch_cmp.get('top1_agreement'))}, "
                 f"max abs diff {_fmt(torch_cmp.get('max_abs_diff'))} | |")
    for key, value in results.items():
        if not isinstance(value, dict) or "ok" not in value:
            continue
        numbers = []
        for name, item in value.items():
            if name in ("ok", "seconds", "scheme", "stock", "special_and_added_tokens") or item in (None, "", []):
                continue
            if isinstance(item, dict):
                inner = ", ".join(f"{k} {_fmt(v)}" for k, v in item.items()
                                  if not isinstance(v, (dict, list)) and k != "stock")
                numbers.append(f"{name}: {inner}")
            else:
                numbers.append(f"{name} {_fmt(item)}")
        text = "; ".join(numbers).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {key} | {'yes' if value['ok'] else '**no**'} | {text} | {value.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(EMBEDDED))
    parser.add_argument("--targets", nargs="+", default=["gguf", "gguf-full-rank", "onnx", "executorch"])
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--eval-positions", type=int, default=256)
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the committed .json")
    args = parser.parse_args()
    out = RESULTS / f"families-{args.model}.json"
    if args.report_only:
        out.with_suffix(".md").write_text(markdown(json.loads(out.read_text())))
        return
    torch.set_num_threads(2)
    work = cache_dir() / "bench" / "families" / args.model
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"model": args.model, "cpu": cpu_model(), "keep": KEEP, "calib_tokens": args.calib_tokens,
                     "engine_llama_cpp": f"llama-cpp-python {PIN} + lowrank.patch ({build_key(False)})"}

    start = time.monotonic()
    dense = resolve_model(args.model).path
    results["convert_seconds"] = round(time.monotonic() - start, 1)
    tok = load_tokenizer(dense)
    model = load_dense(dense)
    results["family"] = family_of(model.config).name
    results["dense_params"] = sum(p.numel() for p in model.parameters())
    heldout = pack(load_task("python-code").validation, tok, seq_len=args.eval_positions, max_tokens=args.eval_positions)
    ids = heldout.input_ids[0].tolist()

    fact = work / f"svd-llm-{KEEP}"
    if not (fact / "basel.json").is_file():
        start = time.monotonic()
        calib = pack(load_task("python-code").train, tok, seq_len=256, max_tokens=args.calib_tokens)
        compress(model, "svd-llm", Budget(keep=KEEP, allocation="uniform"), calib, progress=True)
        shutil.rmtree(fact, ignore_errors=True)
        save_factorized(model, fact, dense, method="svd-llm", task="python-code")
        results["compress_seconds"] = round(time.monotonic() - start, 1)
        model = load_dense(dense)
    dense_logits = _torch_logits(model, ids)
    fact_logits = _torch_logits(load_model(fact), ids)
    results["torch_factorized_vs_dense"] = _compare(fact_logits, dense_logits)

    if "gguf" in args.targets:
        def gguf_factorized() -> dict:
            info = export_gguf(fact, work / "fact-q8_0.gguf", overwrite=True, progress=False)
            llama = run_isolated(_logits_in_child, info["output"], ids)
            return {"ok": True, "bytes": info["bytes"], "vs_torch_same_weights": _compare(llama, fact_logits)}
        _timed(results, "gguf_factorized_q8_0", gguf_factorized)

        def tokenizer() -> dict:
            export_gguf(dense, work / "dense-q8_0.gguf", overwrite=True, progress=False)
            texts = round_trip_texts(tok)
            expected = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            got = run_isolated(_tokenizer_in_child, str(work / "dense-q8_0.gguf"), texts)
            mismatches = [t for t, e, g in zip(texts, expected, got) if e != g]
            return {"ok": not mismatches, "texts": len(texts), "special_and_added_tokens": texts[-1][1:-2],
                    "mismatches": mismatches}
        _timed(results, "gguf_tokenizer_round_trip", tokenizer)

        def stock_vs_patched() -> dict:
            export_gguf(fact, work / "fact-dense-q8_0.gguf", layout="dense", overwrite=True, progress=False)
            stock = build_stock_tool()
            out = {}
            for name in ("dense-q8_0.gguf", "fact-dense-q8_0.gguf"):
                s, p = _complete(stock, work / name), _complete(tool("llama-completion"), work / name)
                out[name] = {"same": s == p, "stock": s[-200:]}
            return {"ok": all(v["same"] for v in out.values()), **out}
        _timed(results, "gguf_dense_layout_stock_vs_patched", stock_vs_patched)

    if "gguf-full-rank" in args.targets:
        def full_rank() -> dict:
            full_model = load_dense(dense)
            n = {name: min(m.in_features, m.out_features) for name, m in decoder_linears(full_model).items()}
            compress(full_model, "svd", Budget(ranks=n, rank_multiple=1, force=True), progress=False)
            save_factorized(full_model, work / "full-rank", dense, method="svd", rank_multiple=1)
            del full_model
            files = {"factorized": work / "full-rank-f32.gguf", "dense": work / "dense-f32.gguf"}
            export_gguf(work / "full-rank", files["factorized"], weights="f32", overwrite=True, progress=False)
            export_gguf(dense, files["dense"], weights="f32", overwrite=True, progress=False)
            llama = {k: run_isolated(_logits_in_child, str(f), ids) for k, f in files.items()}
            shutil.rmtree(work / "full-rank")
            for f in files.values():
                f.unlink()
            bound = FULL_RANK_BOUND * float(np.abs(dense_logits).max())
            factorized = _compare(llama["factorized"], dense_logits)
            return {"ok": factorized["max_abs_diff"] <= bound and factorized["top1_agreement"] == 1.0,
                    "bound": bound, "largest_torch_logit": float(np.abs(dense_logits).max()),
                    "factorized_f32_vs_torch": factorized,
                    "dense_f32_gguf_vs_torch": _compare(llama["dense"], dense_logits),
                    "factorized_vs_dense_gguf": _compare(llama["factorized"], llama["dense"])}
        _timed(results, "gguf_full_rank_f32_vs_torch", full_rank)

    if "onnx" in args.targets:
        def onnx() -> dict:
            from basel_edge.exporters.onnx import OnnxExportConfig, export_onnx

            info = export_onnx(fact, work / "onnx-int8", OnnxExportConfig(weights="int8"), overwrite=True,
                               log=lambda *a: None)
            metrics = dict(info["validation"]["metrics"])
            factor = metrics.pop("factor_matmuls", {})
            return {"ok": info["validation"]["ok"], "bytes": info.get("bytes"), **metrics,
                    "two_matmuls_per_factorized_linear": all(c == [1, 1] for c in factor.values()) and len(factor)}
        _timed(results, "onnx_int8", onnx)

    if "executorch" in args.targets:
        def executorch() -> dict:
            from basel_edge.errors import UserError
            from basel_edge.exporters.executorch import ExecutorchExportConfig, export_executorch

            lines: list[str] = []
            try:
                info = export_executorch(fact, work / "pte-int8", ExecutorchExportConfig(weights="int8", max_seq_len=512),
                                         overwrite=True, log=lambda *a: lines.append(" ".join(map(str, a))))
            except UserError as exc:  # keep the exporter's own validation lines: which check failed, by how much
                return {"ok": False, "error": str(exc), "validation_lines": lines[-12:]}
            metrics = dict(info["validation"]["metrics"])
            factor = metrics.pop("factor_matmuls", {})
            return {"ok": info["validation"]["ok"], "bytes": info.get("bytes"), "scheme": info.get("scheme"),
                    **metrics,
                    "two_matmuls_per_factorized_linear": all(c == [1, 1] for c in factor.values()) and len(factor)}
        _timed(results, "executorch_int8", executorch)

    previous = json.loads(out.read_text()) if out.is_file() else {}
    previous.update(results)  # a run of some targets keeps the others' committed results
    out.write_text(json.dumps(previous, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(previous))
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    sys.exit(0 if all(v.get("ok", True) for v in results.values() if isinstance(v, dict) and "ok" in v) else 1)


if __name__ == "__main__":
    main()

"""`basel-edge validate`: every artifact on every requested backend, against the dense baseline.

Each artifact×backend runs in its own worker process (eval.worker), so peak RSS is its own and a crash is a
`failed` row rather than the end of the run. Fidelity (the exported model vs the torch model of the same
weights) and compression loss (vs the dense baseline) are computed here from the logits the workers save.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from basel_edge.errors import UserError
from exporters.validation import compare_logits
from runtimes.isolation import NO_BACKTRACE_ENV, engine_error_line

from .artifacts import Artifact, parse_artifact

BACKENDS = ("cpu", "mobile", "cuda")
MOBILE_ENGINES = ("executorch",)
CUDA_ENGINES = ("torch", "onnxruntime", "llama_cpp")
REPORT_VERSION = 1


@dataclass
class ValidateConfig:
    """What to validate and how; checked on creation."""

    baseline: str
    artifacts: list[str]
    out: Path
    backends: list[str] = field(default_factory=lambda: ["cpu"])
    task: str | None = "python-code"
    data: str | None = None
    threads: int = 2
    seq_len: int = 512
    eval_tokens: int = 8192
    agreement_tokens: int = 256
    prompt_tokens: int = 64
    new_tokens: int = 32
    reps: int = 3
    timeout_s: int = 1800
    compare_to: Path | None = None
    overwrite: bool = True

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise UserError(f"unknown backend(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(BACKENDS)}")
        if self.threads <= 0:
            raise UserError(f"--threads must be positive, got {self.threads}")
        if self.new_tokens < 2 or self.reps < 1:
            raise UserError("need at least 2 new tokens and 1 repetition to measure decoding")
        if self.prompt_tokens >= self.agreement_tokens:
            raise UserError("the prompt must be shorter than the agreement sequence")
        if self.compare_to is not None and not Path(self.compare_to).is_file():
            raise UserError(f"--compare-to {self.compare_to} does not exist")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def skip_reason(artifact: Artifact, backend: str) -> str | None:
    """Why an artifact cannot run on a backend here, decided without starting a worker."""
    if backend == "mobile" and artifact.engine not in MOBILE_ENGINES:
        return f"{artifact.engine} has no mobile profile (the emulated phone profile is ExecuTorch's)"
    if backend == "cuda":
        if artifact.engine not in CUDA_ENGINES:
            return f"{artifact.engine} has no CUDA backend"
        if not torch.cuda.is_available():
            return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    return None


def _data(cfg: ValidateConfig, baseline: Artifact):
    from basel_edge.data import load_task, pack
    from basel_edge.models import load_tokenizer

    tok = load_tokenizer(baseline.path)
    task = load_task(cfg.task, cfg.data)
    blocks = pack(task.validation, tok, cfg.seq_len, max_tokens=cfg.eval_tokens, packing=not task.has_prompt)
    agree = pack(task.validation, tok, cfg.agreement_tokens, max_tokens=cfg.agreement_tokens)
    agreement_ids = agree.input_ids[0].tolist()
    return task.name, blocks, agreement_ids


def _torch_logits(path: Path, ids: list[int], threads: int) -> np.ndarray:
    from basel_edge.checkpoint import load_model

    torch.set_num_threads(threads)
    model = load_model(path)
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def _run_worker(spec: dict, workdir: Path, timeout: int) -> tuple[dict, list[str]]:
    spec_file = workdir / f"{spec['job']}.spec.json"
    result_file = workdir / f"{spec['job']}.result.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "eval.worker", str(spec_file), str(result_file)]
    env = {**os.environ, **NO_BACKTRACE_ENV, "OMP_NUM_THREADS": str(spec["threads"])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=Path(__file__).parent.parent)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout} s"}, cmd
    if proc.returncode != 0 or not result_file.is_file():
        return {"status": "failed", "error": engine_error_line(proc.stderr, proc.returncode)}, cmd
    return json.loads(result_file.read_text()), cmd


def _ratio(value, base):
    if value is None or base in (None, 0):
        return None
    return value / base


def run_validation(cfg: ValidateConfig, progress: bool = True) -> dict:
    """Measure everything, write report.json / report.md / PNGs into cfg.out, and return the report."""
    from .report import compare_reports, write_report

    baseline = parse_artifact(cfg.baseline)
    if baseline.kind != "torch":
        raise UserError(f"--baseline must be a torch model folder (dense HF checkpoint), got a {baseline.kind} artifact")
    artifacts = [parse_artifact(a) for a in cfg.artifacts]
    seen = {baseline.label}
    for i, a in enumerate(artifacts):
        if a.label in seen:
            artifacts[i] = Artifact(f"{a.label}#{i + 1}", a.path, a.kind, a.source)
        seen.add(artifacts[i].label)
    task_name, blocks, agreement_ids = _data(cfg, baseline)
    rows_ids = [r.tolist() for r in blocks.input_ids]
    rows_labels = [r.tolist() for r in blocks.labels]
    prompt_ids = agreement_ids[: cfg.prompt_tokens]
    references: dict[Path, np.ndarray] = {}

    def reference(path: Path | None) -> np.ndarray | None:
        if path is None:
            return None
        key = path.resolve()
        if key not in references:
            references[key] = _torch_logits(path, agreement_ids, cfg.threads)
        return references[key]

    dense_ref = reference(baseline.path)
    jobs = [(baseline, backend, True) for backend in cfg.backends] + [
        (artifact, backend, False) for artifact in artifacts for backend in cfg.backends
    ]
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="basel-validate-") as tmp:
        workdir = Path(tmp)
        for index, (artifact, backend, is_baseline) in enumerate(
            tqdm(jobs, desc="validate", unit="run", disable=not progress)
        ):
            row = {
                "artifact": artifact.label,
                "path": str(artifact.path),
                "kind": artifact.kind,
                "engine": artifact.engine,
                "backend": backend,
                "baseline": is_baseline,
                "emulated": backend == "mobile",
                "threads": cfg.threads,
                "bytes": artifact.bytes_on_disk(),
                "source": str(artifact.source) if artifact.source else None,
            }
            reason = skip_reason(artifact, backend)
            if reason:
                rows.append({**row, "status": "skipped", "reason": reason})
                continue
            spec = {
                "job": f"job{index}",
                "engine": artifact.engine,
                "artifact": str(artifact.path),
                "device": backend,
                "threads": cfg.threads,
                "rows": rows_ids,
                "labels": rows_labels,
                "agreement_ids": agreement_ids,
                "prompt_ids": prompt_ids,
                "new_tokens": cfg.new_tokens,
                "reps": cfg.reps,
                "logits_file": str(workdir / f"job{index}.logits.npy"),
            }
            result, cmd = _run_worker(spec, workdir, cfg.timeout_s)
            row["command"] = shlex.join(cmd)
            row.update(result)
            if result["status"] == "ok":
                logits = np.load(spec["logits_file"])
                same = reference(artifact.source)
                row["fidelity"] = compare_logits(same, logits) if same is not None else None
                row["vs_dense"] = compare_logits(dense_ref, logits)
            rows.append(row)
    by_backend = {r["backend"]: r for r in rows if r["baseline"] and r["status"] == "ok"}
    for row in rows:
        base = by_backend.get(row["backend"])
        if row["status"] != "ok" or base is None:
            row["ratios"] = None
            continue
        row["ratios"] = {
            "bytes": _ratio(row["bytes"], base["bytes"]),
            "perplexity": _ratio(row["perplexity"], base["perplexity"]),
            "prefill_tps": _ratio(row["prefill_tps"]["median"], base["prefill_tps"]["median"]),
            "decode_tps": _ratio(row["decode_tps"]["median"], base["decode_tps"]["median"]),
            "peak_rss": _ratio(row["peak_rss_bytes"], base["peak_rss_bytes"]),
        }
    engines = {}
    for r in rows:
        if r["status"] == "ok":
            engines[r["engine"]] = r["info"].get("version")
    report = {
        "version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "engines": engines,
        "task": task_name,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": shlex.join(sys.argv),
        "data": {"eval_rows": len(rows_ids), "scored_tokens": blocks.scored_tokens, "agreement_positions": len(agreement_ids), "prompt_tokens": len(prompt_ids)},
        "rows": rows,
        "regressions": [],
    }
    if cfg.compare_to is not None:
        report["regressions"] = compare_reports(json.loads(Path(cfg.compare_to).read_text()), report)
    write_report(report, cfg.out, overwrite=cfg.overwrite)
    return report

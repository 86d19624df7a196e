"""Validation reports: report.json (checked against report.schema.json), report.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from basel_edge.atomic import atomic_output_dir

SCHEMA_FILE = Path(__file__).with_name("report.schema.json")
REGRESSION_THRESHOLD = 0.05
# metric -> (how to read it from a row, True if higher is better)
TRACKED = {
    "perplexity": (lambda r: r.get("perplexity"), False),
    "decode_tps": (lambda r: (r.get("decode_tps") or {}).get("median"), True),
    "prefill_tps": (lambda r: (r.get("prefill_tps") or {}).get("median"), True),
    "bytes": (lambda r: r.get("bytes"), False),
    "humaneval_pass@1": (lambda r: (r.get("humaneval") or {}).get("pass@1"), True),
}


def validate_schema(report: dict) -> None:
    """Raise jsonschema.ValidationError if the report does not follow the schema kept in the repo."""
    import jsonschema

    jsonschema.validate(report, json.loads(SCHEMA_FILE.read_text()))


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f" ({ratio:.2f}×)"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    """One table, dense baseline first, every figure with its ratio to the dense baseline on the same backend."""
    head = (
        "| artifact | backend | engine | status | MiB on disk | perplexity | top-1 / KL vs same weights | "
        "top-1 / KL vs dense | prefill tok/s | decode tok/s | peak RSS MiB |"
    )
    lines = [head, "|" + "---|" * 11]
    rows = sorted(report["rows"], key=lambda r: (not r["baseline"], r["artifact"], r["backend"]))
    for r in rows:
        backend = r["backend"] + (" (emulated)" if r["emulated"] else "")
        if r["status"] != "ok":
            why = r.get("reason") or r.get("error") or ""
            name = r['artifact'] + (' (baseline)' if r['baseline'] else '')
            lines.append(f"| {name} | {backend} | {r['engine']} | {r['status']}: {why} | {_mib(r['bytes'])} |  |  |  |  |  |  |")
            continue
        ratios = r.get("ratios") or {}
        fid = r.get("fidelity")
        fid_text = "–" if not fid else f"{fid['top1_agreement']:.3f} / {fid['mean_kl']:.1e}"
        dense = r["vs_dense"]
        lines.append(
            f"| {r['artifact']}{' (baseline)' if r['baseline'] else ''} | {backend} | {r['engine']} | ok | "
            f"{_mib(r['bytes'])}{_x(ratios.get('bytes'))} | {_num(r['perplexity'], '.3f')}{_x(ratios.get('perplexity'))} | "
            f"{fid_text} | {dense['top1_agreement']:.3f} / {dense['mean_kl']:.1e} | "
            f"{r['prefill_tps']['median']:.1f}{_x(ratios.get('prefill_tps'))} | "
            f"{r['decode_tps']['median']:.1f} [{r['decode_tps']['min']:.1f}–{r['decode_tps']['max']:.1f}]{_x(ratios.get('decode_tps'))} | "
            f"{_mib(r['peak_rss_bytes'])}{_x(ratios.get('peak_rss'))} |"
        )
    lines += humaneval_table(rows)
    lines += like_with_like_table(rows)
    m = report["machine"]
    notes = [
        "",
        f"Task `{report['task']}`: {report['data']['scored_tokens']} held-out tokens scored; agreement over "
        f"{report['data']['agreement_positions']} positions; speed: {report['data']['prompt_tokens']}-token prompt, "
        f"{report['config']['new_tokens']} new tokens, median [min–max] of {report['config']['reps']} runs after a warm-up, "
        f"{report['config']['threads']} thread(s). Machine: {m['cpu']}, {m['cores']} cores. Ratios (×) are to the dense "
        "baseline on the same backend; `mobile` rows are an emulated phone profile on this host.",
    ]
    if report.get("regressions"):
        notes += ["", "**Regressions over 5% against the previous report:**", ""]
        notes += [f"- {g['artifact']} on {g['backend']}: {g['metric']} {g['old']:.4g} → {g['new']:.4g} ({g['change']:+.1%})" for g in report["regressions"]]
    return "\n".join(lines + notes) + "\n"


def humaneval_table(rows: list[dict]) -> list[str]:
    """HumanEval pass@1 with its 95% interval per row, in points against the dense baseline of the backend."""
    scored = [r for r in rows if r.get("humaneval")]
    if not scored:
        return []
    base = {r["backend"]: r["humaneval"]["pass@1"] for r in scored if r["baseline"]}
    lines = ["", "| artifact | backend | engine | HumanEval pass@1 [95% CI] | vs dense (points) | passed / n | "
             "timed out | generated tok/s |", "|" + "---|" * 8]
    for r in scored:
        h = r["humaneval"]
        delta = "" if r["backend"] not in base else f"{100 * (h['pass@1'] - base[r['backend']]):+.1f}"
        tps = _num(h.get("generated_tps"), ".1f")
        lines.append(f"| {r['artifact']}{' (baseline)' if r['baseline'] else ''} | {r['backend']} | {r['engine']} | "
                     f"{100 * h['pass@1']:.1f} [{100 * h['ci95'][0]:.1f}–{100 * h['ci95'][1]:.1f}] | {delta} | "
                     f"{h['passed']} / {h['n']} | {h.get('timed_out', 0)} | {tps} |")
    return lines


def like_with_like_table(rows: list[dict]) -> list[str]:
    """Factorized artifacts against the dense model exported to the same engine at the same weight format."""
    paired = [r for r in rows if r.get("vs_dense_same_engine")]
    if not paired:
        return []
    lines = ["", "| artifact | backend | engine | weights | vs dense | size × | perplexity × | decode tok/s × | "
             "HumanEval (points) |", "|" + "---|" * 9]
    for r in paired:
        v = r["vs_dense_same_engine"]
        points = v.get("humaneval_points")
        lines.append(f"| {r['artifact']} | {r['backend']} | {r['engine']} | {v['weights']} | {v['artifact']} | "
                     f"{v['bytes']:.2f} | {v['perplexity']:.2f} | {v['decode_tps']:.2f} | "
                     f"{'' if points is None else f'{points:+.1f}'} |")
    return lines


def plots(report: dict, out: Path) -> list[Path]:
    """accuracy_vs_size.png (perplexity vs MiB) and decode_tps.png (decode tokens/s per backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["rows"] if r["status"] == "ok"]
    files = []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    markers = "osD^vP<>Xph"  # one per point, named in the legend: exports of one checkpoint sit together
    for i, r in enumerate(ok):
        ax.scatter(r["bytes"] / 2**20, r["perplexity"], marker="*" if r["baseline"] else markers[i % len(markers)],
                   s=90 if r["baseline"] else 60, alpha=0.8, label=f"{r['artifact']} ({r['engine']}, {r['backend']})")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel(f"held-out perplexity ({report['task']})")
    ax.set_title("accuracy vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.tight_layout()
    files.append(out / "accuracy_vs_size.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    backends = sorted({r["backend"] for r in ok})
    fig, axes = plt.subplots(1, max(len(backends), 1), figsize=(5 * max(len(backends), 1), 4.5), squeeze=False)
    for ax, backend in zip(axes[0], backends):
        sel = [r for r in ok if r["backend"] == backend]
        names = [f"{r['artifact']}\n{r['engine']}" for r in sel]
        values = [r["decode_tps"]["median"] for r in sel]
        errs = [[v - r["decode_tps"]["min"] for v, r in zip(values, sel)], [r["decode_tps"]["max"] - v for v, r in zip(values, sel)]]
        ax.bar(range(len(sel)), values, yerr=errs, color=["#888" if r["baseline"] else "#3a7" for r in sel])
        ax.set_xticks(range(len(sel)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"decode tokens/s — {backend}{' (emulated)' if backend == 'mobile' else ''}")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    files.append(out / "decode_tps.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def compare_reports(old: dict, new: dict) -> list[dict]:
    """Metrics that got more than 5% worse for the same artifact and backend."""
    before = {(r["artifact"], r["backend"]): r for r in old.get("rows", []) if r.get("status") == "ok"}
    found = []
    for row in new["rows"]:
        prev = before.get((row["artifact"], row["backend"]))
        if row["status"] != "ok" or prev is None:
            continue
        for metric, (get, higher_better) in TRACKED.items():
            a, b = get(prev), get(row)
            if not a or b is None:
                continue
            change = (b - a) / a
            worse = -change if higher_better else change
            if worse > REGRESSION_THRESHOLD:
                found.append({"artifact": row["artifact"], "backend": row["backend"], "metric": metric, "old": a, "new": b, "change": change})
    return found


REPORT_FILES = ("report.json", "report.md", "accuracy_vs_size.png", "decode_tps.png")


def holds_only_a_report(folder: Path) -> bool:
    """Whether `folder` holds an earlier report (report.json) and nothing but the files a report is made of."""
    entries = list(folder.iterdir())
    return (folder / "report.json").is_file() and all(e.is_file() and e.name in REPORT_FILES for e in entries)


def write_report(report: dict, out: str | Path, overwrite: bool = True) -> Path:
    """Write report.json, report.md and the plots into `out` (all or nothing)."""
    validate_schema(report)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(markdown(report))
        plots(report, tmp)
    return Path(out)

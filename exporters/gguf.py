"""GGUF export (llama.cpp): `basel-edge export --target gguf MODEL -o OUT.gguf [--layout] [--weights]`.

Writes a GGUF of the model family's llama.cpp architecture (`llama`, `qwen2`, `gemma3`; basel_edge/families) with the
gguf package: the standard hyper-parameters, the full tokenizer metadata, and the weights in Q8_0 (default),
F16 or F32. `--layout factorized` (default for a
factorized checkpoint) keeps each factorized linear as two tensors `_lr_a`/`_lr_b` (see gguf_format.py) that
only the patched llama.cpp of runtimes/llama_cpp runs; `--layout dense` multiplies them back into a standard
file any llama.cpp loads. The file is written beside the target and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from basel_edge.atomic import chmod_as_new, check_writable_parent, partial_prefix, remove_stale_partials
from basel_edge.errors import UserError

from . import KEEP_8BIT_PROJECTIONS, Exporter, ExportJob, Target, register
from .gguf_format import (
    FORMAT_VERSION,
    FUSED_FIRST_FACTORS,
    KEY_FACTORIZED_LINEARS,
    KEY_FORMAT_VERSION,
    KEY_LAYOUT,
    KEY_METHOD,
    KEY_PARAMS_DENSE,
    KEY_PARAMS_FACTORIZED,
    KEY_RANK_MAX,
    KEY_RANK_MIN,
    KEY_RANK_MULTIPLE,
    KEY_TASK,
    LAYOUTS,
    LOWRANK_PROJECTIONS,
    LR_A_SUFFIX,
    LR_B_SUFFIX,
    is_lowrank_tensor,
    lowrank_names,
    read_summary,
)
from .gguf_tokenizer import add_tokenizer

DIRECT_FORMATS = ("q8_0", "f16", "f32")  # written by the gguf package
# made by llama-quantize from an F32 file of the same tensors (the k-quant mixes are llama.cpp's own); a row whose
# length is not a multiple of the type's block falls back to a type llama-quantize picks, named in the summary
QUANTIZE_TYPES = {"q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q4_0": "Q4_0",
                  "q3_k_m": "Q3_K_M", "q2_k": "Q2_K"}
WEIGHT_FORMATS = DIRECT_FORMATS + tuple(QUANTIZE_TYPES)
DEFAULT_WEIGHTS = "q8_0"
KEEP_8BIT_TYPE = "q8_0"
Q8_0_BLOCK = 32  # also Q4_0's block: factor ranks are padded to it for every quantized format


def _file_type(weights: str):
    import gguf

    return {
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "f32": gguf.LlamaFileType.ALL_F32,
    }[weights]


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection from HF's rotate-half layout to llama.cpp's.

    Each head's rows [first half | second half] become interleaved pairs, which is what llama.cpp's
    `ggml_rope` (normal mode) expects for the llama architecture. Works on a weight [out, in], a `b` factor
    [out, r] or a bias [out].
    """
    out = rows.shape[0]
    head_dim = out // n_head
    return rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def pad_rank(a: torch.Tensor, b: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the rank of A [r, in] and B [out, r] up to a multiple (exact: the extra terms are zero)."""
    r = a.shape[0]
    padded = -(-r // multiple) * multiple
    if padded == r:
        return a, b
    return (torch.cat([a, a.new_zeros(padded - r, a.shape[1])]),
            torch.cat([b, b.new_zeros(b.shape[0], padded - r)], dim=1))


class _Config:
    """The hyper-parameters of an HF config, checked for what its family's GGUF architecture can express."""

    def __init__(self, config: dict, where: Path) -> None:
        from basel_edge.families import family_of, gguf_architectures

        self.family = family_of(config, where)
        if self.family.gguf_architecture is None:
            raise UserError(f"{where}: model family '{self.family.name}' has no llama.cpp architecture; GGUF "
                            f"export supports {', '.join(gguf_architectures())}")
        self.arch = self.family.gguf_architecture
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope = rope.get("full_attention", rope)  # per-layer-type rope parameters: the global layers' ones
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise UserError(f"{where}: rope scaling '{rope.get('rope_type', rope.get('type'))}' is not supported")
        activation = config.get("hidden_act") or config.get("hidden_activation") or "silu"
        if activation != self.family.activation or config.get("mlp_bias"):
            raise UserError(f"{where}: only {self.family.activation}-gated MLPs without bias map to the GGUF "
                            f"{self.arch} architecture (this model: {activation}"
                            f"{', with MLP bias' if config.get('mlp_bias') else ''})")
        self.n_layer = int(config["num_hidden_layers"])
        self.n_embd = int(config["hidden_size"])
        self.n_ff = int(config["intermediate_size"])
        self.n_head = int(config["num_attention_heads"])
        self.n_head_kv = int(config.get("num_key_value_heads") or self.n_head)
        self.head_dim = self.family.head_dim(config)
        self.n_ctx = int(config.get("max_position_embeddings", 2048))
        self.rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        self.rms_eps = float(config.get("rms_norm_eps", 1e-6))
        self.vocab_size = int(config["vocab_size"])
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.name = str(config.get("_name_or_path") or config.get("_model_name_or_path") or where.name)
        self.config = config

    def add_to(self, writer) -> None:
        writer.add_name(self.name)
        writer.add_block_count(self.n_layer)
        writer.add_context_length(self.n_ctx)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_layer_norm_rms_eps(self.rms_eps)
        writer.add_vocab_size(self.vocab_size)
        writer.add_rope_dimension_count(self.head_dim)
        if self.head_dim != self.n_embd // self.n_head:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        if self.family.gguf_keys:
            self.family.gguf_keys(self.config, self.head_dim, writer)


class _Converter:
    """Turns a loaded (dense or LowRankLinear) model's tensors into GGUF tensors."""

    def __init__(self, cfg: _Config, weights: str, layout: str, fuse: bool = True, pad_ranks: bool = False) -> None:
        import gguf

        self.cfg, self.weights, self.layout, self.fuse, self.pad_ranks = cfg, weights, layout, fuse, pad_ranks
        arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == cfg.arch)
        self.names = gguf.get_tensor_name_map(arch, cfg.n_layer)
        self.ranks: list[int] = []

    def gguf_name(self, hf_name: str) -> str:
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor '{hf_name}' has no {self.cfg.arch} GGUF name")
        return name

    def _rope_heads(self, module_name: str) -> int | None:
        # HF module suffixes whose rows llama.cpp expects in its rotary (interleaved-halves) order
        for suffix, kind in self.cfg.family.gguf_rope_permuted.items():
            if module_name.endswith(suffix):
                return self.cfg.n_head if kind == "heads" else self.cfg.n_head_kv
        return None

    def encode(self, tensor: torch.Tensor, quantizable: bool) -> tuple[np.ndarray, object]:
        """numpy data and ggml type: matrices in the chosen format, vectors (norms, biases) in F32."""
        import gguf

        data = tensor.detach().float().cpu().numpy()
        if not quantizable or data.ndim < 2 or self.weights == "f32":
            return data.astype(np.float32), gguf.GGMLQuantizationType.F32
        if self.weights == "f16":
            return data.astype(np.float16), gguf.GGMLQuantizationType.F16
        if data.shape[-1] % Q8_0_BLOCK:
            raise UserError(f"a row length of {data.shape[-1]} is not a multiple of {Q8_0_BLOCK}; Q8_0 needs it")
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0

    def tensors(self, model: torch.nn.Module):
        """Yield (gguf name, torch tensor, quantizable) for every tensor of the GGUF file, in model order."""
        from basel_edge.lowrank import LowRankLinear

        lowrank = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
        state = model.state_dict()
        if self.cfg.tied:
            state.pop("lm_head.weight", None)
        handled: set[str] = set()
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # gguf base name -> (a, b), in model order
        for module_name, module in lowrank.items():
            base = self.gguf_name(module_name + ".weight").removesuffix(".weight")
            if base.split(".")[-1] not in LOWRANK_PROJECTIONS:
                raise UserError(f"'{module_name}' is factorized but llama.cpp has no low-rank form for '{base}'")
            heads = self._rope_heads(module_name)
            a, b = module.a.weight.detach(), module.b.weight.detach()
            if heads:
                b = rope_permute(b, heads)
            if self.layout == "dense":
                yield base + ".weight", b.float() @ a.float(), True
            else:
                if self.pad_ranks:
                    a, b = pad_rank(a, b, Q8_0_BLOCK)
                self.ranks.append(module.rank)
                factors[base] = (a, b)
            bias = module.b.bias
            if bias is not None:
                yield base + ".bias", rope_permute(bias.detach(), heads) if heads else bias.detach(), False
            handled.update(f"{module_name}.{p}" for p in ("a.weight", "b.weight", "b.bias"))
        yield from self._factor_tensors(factors)
        for hf_name, tensor in state.items():
            if hf_name in handled:
                continue
            module_name = hf_name.rsplit(".", 1)[0]
            heads = self._rope_heads(module_name)
            if heads:
                tensor = rope_permute(tensor, heads)
            if hf_name.endswith("norm.weight") and self.cfg.family.norm_weight_offset:
                tensor = tensor + self.cfg.family.norm_weight_offset  # llama.cpp multiplies by the stored weight
            yield self.gguf_name(hf_name), tensor, hf_name.endswith(".weight") and tensor.dim() == 2


    def _factor_tensors(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        """`_lr_a`/`_lr_b` tensors; first factors of a whole FUSED_FIRST_FACTORS group are concatenated."""
        fused: set[str] = set()
        if self.fuse:
            for base in list(factors):
                block, proj = base.rsplit(".", 1)
                for group, members in FUSED_FIRST_FACTORS.items():
                    names = [f"{block}.{m}" for m in members]
                    if proj == members[0] and all(n in factors for n in names):
                        yield lowrank_names(f"{block}.{group}")[0], torch.cat([factors[n][0] for n in names]), True
                        fused.update(names)
        for base, (a, b) in factors.items():
            name_a, name_b = lowrank_names(base)
            if base not in fused:
                yield name_a, a, True
            yield name_b, b, True


def _basel_metadata(writer, model_dir: Path, layout: str, ranks: list[int]) -> None:
    from basel_edge.checkpoint import DIMENSION_FILE, read_dimension_file

    writer.add_uint32(KEY_FORMAT_VERSION, FORMAT_VERSION)
    writer.add_string(KEY_LAYOUT, layout)
    if not (model_dir / DIMENSION_FILE).is_file():
        return
    dims = read_dimension_file(model_dir)
    writer.add_string(KEY_METHOD, dims.method)
    if dims.task:
        writer.add_string(KEY_TASK, dims.task)
    writer.add_uint32(KEY_RANK_MULTIPLE, dims.rank_multiple)
    writer.add_uint32(KEY_FACTORIZED_LINEARS, len(dims.linears))
    all_ranks = ranks or [d.rank for d in dims.linears.values()]
    if all_ranks:
        writer.add_uint32(KEY_RANK_MIN, min(all_ranks))
        writer.add_uint32(KEY_RANK_MAX, max(all_ranks))
    for key, value in ((KEY_PARAMS_DENSE, "dense"), (KEY_PARAMS_FACTORIZED, "factorized")):
        if value in dims.params:
            writer.add_uint64(key, int(dims.params[value]))


def _quantize_options(keep_8bit: tuple[str, ...], n_layer: int) -> list[str]:
    options = []
    for item in keep_8bit:
        if item == "embedding":
            options += ["--token-embedding-type", KEEP_8BIT_TYPE]
        elif item == "output":
            options += ["--output-tensor-type", KEEP_8BIT_TYPE]
        elif item in KEEP_8BIT_PROJECTIONS:
            # the dense tensor or its two factors; a fused first factor (attn_qkv, ffn_gate_up) stays as it is
            suffixes = f"({LR_A_SUFFIX}|{LR_B_SUFFIX})?"
            options += ["--tensor-type", rf"\.{KEEP_8BIT_PROJECTIONS[item]}{suffixes}\.={KEEP_8BIT_TYPE}"]
        else:
            if int(item) >= n_layer:
                raise UserError(f"--keep-8bit: layer {item} does not exist (the model has {n_layer})")
            options += ["--tensor-type", rf"^blk\.{int(item)}\.={KEEP_8BIT_TYPE}"]
    return options


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF holds (what llama-quantize actually chose)."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def requantize(src: Path, dst: Path, weights: str, options: list[str] = ()) -> None:
    """An F32/F16 GGUF to one of QUANTIZE_TYPES with llama-quantize (`options`: its per-tensor type flags)."""
    from basel_edge.runtimes import Unavailable
    from basel_edge.runtimes.llama_cpp.tools import llama_quantize

    try:
        llama_quantize(src, dst, QUANTIZE_TYPES[weights], threads=os.cpu_count() or 1, options=list(options))
    except Unavailable as exc:
        raise UserError(f"--weights {weights} is made by llama-quantize: {exc}") from None


def export_gguf(
    model_spec: str | Path,
    output: str | Path,
    weights: str = DEFAULT_WEIGHTS,
    layout: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    fuse: bool = True,
    keep_8bit: tuple[str, ...] = (),
) -> dict:
    """Write `model_spec` (dense or factorized checkpoint) as a GGUF of its family's architecture at `output`;
    return a summary. 4-bit and the other llama-quantize formats go through an F32 file of the same tensors."""
    import gguf
    from tqdm import tqdm

    from basel_edge.checkpoint import load_model
    from basel_edge.lowrank import balance_factors_
    from basel_edge.models import resolve_model

    if weights not in WEIGHT_FORMATS:
        raise UserError(f"--weights {weights!r} is not a GGUF weight format; choose one of {', '.join(WEIGHT_FORMATS)}")
    ref = resolve_model(model_spec)
    layout = layout or ("factorized" if ref.factorized else "dense")
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r} is unknown; choose one of {', '.join(LAYOUTS)}")
    if layout == "factorized" and not ref.factorized:
        raise UserError(f"{model_spec} is a dense model; --layout factorized needs a factorized checkpoint")
    output = Path(output)
    if output.exists() and not overwrite:
        raise UserError(f"output {output} already exists; choose another path or pass --overwrite")
    if output.is_dir():
        raise UserError(f"output {output} is a directory; give a .gguf file path")
    check_writable_parent(output)
    if keep_8bit and weights not in QUANTIZE_TYPES:
        raise UserError(f"--keep-8bit applies to the llama-quantize formats ({', '.join(QUANTIZE_TYPES)}), not {weights}")
    cfg = _Config(json.loads((ref.path / "config.json").read_text()), ref.path)
    quantize_options = _quantize_options(keep_8bit, cfg.n_layer)
    model = load_model(ref.path)
    quantized = weights not in ("f16", "f32")
    if layout == "factorized" and quantized:
        balance_factors_(model)  # quantized mul_mat quantizes the activation a·x per block; see balance_factors_
    written = "f32" if weights in QUANTIZE_TYPES else weights
    converter = _Converter(cfg, written, layout, fuse, pad_ranks=quantized)

    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output)
    fd, tmp_name = tempfile.mkstemp(prefix=partial_prefix(output), dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, cfg.arch)
        cfg.add_to(writer)
        writer.add_file_type(_file_type(written))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, ref.path, cfg.vocab_size)
        n_tensors = 0
        with torch.no_grad():
            items = list(converter.tensors(model))
            bar = tqdm(items, desc=f"gguf {written} {layout}", unit="tensor", disable=not progress)
            for name, tensor, quantizable in bar:
                data, qtype = converter.encode(tensor, quantizable)
                bar.set_postfix_str(f"{name} {qtype.name} {tuple(tensor.shape)}", refresh=False)
                writer.add_tensor(name, data, raw_dtype=qtype)
                n_tensors += 1
        _basel_metadata(writer, ref.path, layout, converter.ranks)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        if weights in QUANTIZE_TYPES:
            f32, tmp = tmp, tmp.with_name(tmp.name + ".quantized")
            try:
                requantize(f32, tmp, weights, quantize_options)
            finally:
                f32.unlink(missing_ok=True)
        chmod_as_new(tmp)
        tmp.replace(output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "target": "gguf",
        "source": str(ref.path),
        "output": str(output),
        "bytes": output.stat().st_size,
        "architecture": cfg.arch,
        "layout": layout,
        "weights": weights,
        "keep_8bit": list(keep_8bit),
        "tensor_types": tensor_types(output),
        "tensors": n_tensors,
        "factorized_linears": len(converter.ranks),
    }


def gguf_traits(path: Path) -> dict:
    """Whether a .gguf holds low-rank factor tensors, and its weight format (general.file_type)."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)
    field = reader.fields.get("general.file_type")
    weights = LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_").removeprefix(
        "ALL_").lower() if field else "unknown"
    return {"factorized": any(is_lowrank_tensor(t.name) for t in reader.tensors), "weights": weights}


@register
class GGUFExporter(Exporter):
    target = Target(
        name="gguf", kind="gguf", engine="llama_cpp", engine_module="basel_edge.runtimes.llama_cpp",
        default_weights=DEFAULT_WEIGHTS, int8_weights="q8_0", devices=("cpu", "cuda"), suffix=".gguf",
        recognise=lambda path: path.is_file() and path.suffix.lower() == ".gguf",
        traits=gguf_traits, check=read_summary,  # a truncated or foreign file is refused before any measurement
    )
    description = (f"llama.cpp GGUF, --weights q8_0 (default) | f16 | f32 | {' | '.join(QUANTIZE_TYPES)} (the last "
                   "made by llama-quantize); factorized layers need the patched llama.cpp")

    @dataclass(frozen=True)
    class Options:
        layout: str | None = None  # None: factorized for a factorized checkpoint, dense for a dense one
        no_fuse: bool = False

        def __post_init__(self) -> None:
            if self.layout is not None and self.layout not in LAYOUTS:
                raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout}")

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--layout", choices=LAYOUTS, default=cls.Options.layout,
                           help="factorized: _lr_a/_lr_b tensors (patched llama.cpp); dense: factors multiplied "
                                "back, a standard GGUF (default: factorized for a factorized checkpoint)")
        group.add_argument("--no-fuse", action="store_true",
                           help="factorized layout: one _lr_a per projection instead of one for q/k/v and one for "
                                "gate/up (the unfused form, for comparison)")

    def run(self, job: ExportJob, log=print) -> dict:
        options = job.options or self.Options()
        return export_gguf(job.model, job.output, weights=self.weights(job), layout=options.layout,
                           overwrite=job.overwrite, progress=job.progress, fuse=not options.no_fuse,
                           keep_8bit=job.keep_8bit)

    @staticmethod
    def describe(summary: dict) -> str:
        return (f"basel-edge: wrote {summary['output']} ({summary['bytes'] / 2**20:.1f} MiB, {summary['weights']}, "
                f"{summary['layout']} layout, {summary['factorized_linears']} factorized linears)")

"""ONNX target: a decoder with KV cache, int8 two-matmul layers, validated on onnxruntime after export.

Built with the maintained exporter, `torch.onnx.export(dynamo=True)` (optimum-onnx does not import with
transformers 5, ARCHITECTURE.md section 7), around a thin wrapper that takes the KV cache as flat tensors
(`past_key_values.N.key/value` in, `present.N.key/value` out, optimum's names). Nodes are renamed after the
module they come from (`/model/layers/0/self_attn/q_proj/a/MatMul`), so the two MatMuls of each factorized
linear can be found and counted.

int8 (the default) is the scheme measured fastest on CPU at near-fp32 accuracy (ARCHITECTURE.md section 5):
`MatMulNBits` bits=8, symmetric, block 32 (a rank of 144 is not padded to 256), accuracy_level=4 (int8
compute; the default level decodes at ~1 tok/s); the tied lm_head is untied so it is quantized too, and the
embedding Gather is int8 per row with a float scale, done here because the stock quantizer only takes
4-bit Gathers. The scheme is written into the model's metadata.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from basel_edge.atomic import atomic_output_dir
from basel_edge.checkpoint import DIMENSION_FILE, load_model
from basel_edge.errors import UserError
from basel_edge.families import family_of
from basel_edge.lowrank import LowRankLinear, balance_factors_, untie_embeddings_
from basel_edge.models import copy_tokenizer_files, load_tokenizer, resolve_model

from . import EXPORT_INFO_FILE, Exporter, ExportJob, Target, kept_8bit, register
from .validation import VALIDATION_PROMPTS, ValidationReport, compare_logits

ONNX_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
WEIGHT_FORMATS = ("int8", "int4", "fp32")
BITS = {"int8": 8, "int4": 4}
KEEP_8BIT_DEFAULT = ("output",)  # int4: the lm_head stays at 8 bits (the embedding Gather is int8 either way)
DEFAULT_OPSET = 21
PROTOBUF_LIMIT = 2**31 - 1
METADATA_PREFIX = "basel."
EMBED_INT8_SUFFIX = "_int8"
EMBED_SCALE_SUFFIX = "_scale"


@dataclass
class OnnxExportConfig:
    """Options of the ONNX export; validated on creation."""

    weights: str = "int8"
    opset: int = DEFAULT_OPSET
    block_size: int = 32
    accuracy_level: int = 4
    atol: float = 1e-3
    rtol: float = 1e-4
    min_agreement: float = 0.85
    max_kl: float = 0.05
    # int8 (accuracy_level 4 quantizes activations per call): cached decode vs one teacher-forced full pass.
    # SmolLM2 SVD-LLM keep 0.5 + 120 fine-tuning steps flipped one of 8 exact-recompute tokens at a 0.10-nat
    # margin on an Intel Xeon VM (0.875 teacher-forced); a broken cache disagrees on most tokens
    min_kv_agreement: float = 0.75
    # int4 floors: they catch a dropped scale or a wrong kernel (top-1 ~0, KL >> 1), not the 4-bit noise,
    # which the frontier benchmark measures as task accuracy
    min_agreement_int4: float = 0.6
    max_kl_int4: float = 0.5
    keep_8bit: tuple[str, ...] | None = None  # int4: "output" (lm_head) and/or layer numbers; None: KEEP_8BIT_DEFAULT
    validate: bool = True

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise UserError(f"--weights {self.weights!r} is not an ONNX weight format; choose {', '.join(WEIGHT_FORMATS)}")
        if not 0.0 < self.min_kv_agreement <= 1.0:
            raise UserError(f"minimum KV-cache agreement must be in (0, 1], got {self.min_kv_agreement}")
        if not 18 <= self.opset <= 23:
            raise UserError(f"--opset must be in 18..23 for torch's dynamo exporter and onnxruntime 1.32, got {self.opset}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserError(f"block size must be a power of two >= 16, got {self.block_size}")
        if not 0.0 < self.min_agreement <= 1.0:
            raise UserError(f"minimum top-1 agreement must be in (0, 1], got {self.min_agreement}")
        if self.keep_8bit is not None and self.weights != "int4":
            raise UserError(f"--keep-8bit applies to --weights int4, not {self.weights}")
        if self.keep_8bit is None:
            self.keep_8bit = KEEP_8BIT_DEFAULT if self.weights == "int4" else ()

    @property
    def quantized(self) -> bool:
        return self.weights in BITS

    # min_agreement and max_kl are floors that catch silently wrong lowering (a dropped scale gives KL >> 1);
    # the measured fidelity is reported either way. SmolLM2 int8 measured top-1 0.98 / KL 0.007 dense and
    # 0.90-0.95 / KL 0.012-0.019 factorized (SVD-LLM keep 0.5): two quantized weights and a quantized
    # intermediate activation per layer, on a model whose flatter distributions flip top-1 more easily.

    def scheme(self) -> dict:
        """What is written into the model's metadata."""
        if self.weights == "fp32":
            return {"weights": "fp32"}
        scheme = {
            "weights": self.weights,
            "linear": f"MatMulNBits bits={BITS[self.weights]} symmetric block_size={self.block_size} "
                      f"accuracy_level={self.accuracy_level}",
            "embedding": "Gather int8 per-row symmetric, float scale",
            "activations": "float32",
            "why": "fastest measured CPU decode at near-fp32 perplexity (ARCHITECTURE.md section 5)",
        }
        if self.weights == "int4":
            scheme["kept_at_8_bits"] = list(self.keep_8bit)
            scheme["why"] = "the 4-bit baseline of onnxruntime users (MatMulNBits 4-bit, block 32)"
        return scheme


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names, as optimum names them."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


class FlatKVCacheDecoder(nn.Module):
    """The causal LM with its KV cache as flat tensors, so torch.export/ONNX see plain inputs and outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        # every layer keeps its whole history (no sliding-window layer that crops its cache): the flat cache has
        # one shape for all layers, and sliding-window layers get their window from the attention mask
        cache = DynamicCache()
        for i, (key, value) in enumerate(past):
            cache.update(key, value, i)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a Llama-family config."""
    return config.num_hidden_layers, config.num_key_value_heads, family_of(config).head_dim(config)


def export_fp32(model: nn.Module, opset: int):
    """torch.onnx.export(dynamo=True) of the flat-KV-cache decoder; returns the onnx ModelProto."""
    from torch.export import Dim

    layers, kv_heads, head_dim = kv_shape(model.config)
    batch, seq, past_len, total = Dim("batch"), Dim("sequence_length"), Dim("past_sequence_length", min=0), Dim("total_sequence_length")
    t, p = 4, 3
    ids = torch.randint(0, model.config.vocab_size, (1, t))
    mask = torch.ones(1, p + t, dtype=torch.long)
    pos = torch.arange(p, p + t)[None]
    past = tuple(
        (torch.zeros(1, kv_heads, p, head_dim), torch.zeros(1, kv_heads, p, head_dim)) for _ in range(layers)
    )
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple(({0: batch, 2: past_len}, {0: batch, 2: past_len}) for _ in range(layers)),
    }
    inputs, outputs = io_names(layers)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = _export(model, (ids, mask, pos, past), dynamic_shapes, inputs, outputs, opset)
    return program.model_proto


def _export(model, args, dynamic_shapes, inputs, outputs, opset):
    return torch.onnx.export(
        FlatKVCacheDecoder(model).eval(),
        args,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=inputs,
        output_names=outputs,
        opset_version=opset,
        verbose=False,
    )


def _module_scope(node) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = json.loads(prop.value.replace("'", '"'))
            if len(scopes) >= 2:
                scope = scopes[-2]
                return scope[len("model.") :] if scope.startswith("model.") else scope
    return None


def name_nodes_by_module(proto) -> None:
    """Rename nodes `/<module path>/<OpType>` and MatMul weight constants `<module>.weight_t` (in place)."""

    initializers = {init.name: init for init in proto.graph.initializer}
    used = Counter()
    renames: dict[str, str] = {}
    for node in proto.graph.node:
        scope = _module_scope(node)
        if scope is None:
            continue
        base = "/" + scope.replace(".", "/") + "/" + node.op_type
        used[base] += 1
        node.name = base if used[base] == 1 else f"{base}_{used[base] - 1}"
        if node.op_type == "MatMul" and node.input[1] in initializers and node.input[1] not in renames:
            renames[node.input[1]] = f"{scope}.weight_t"
    for old, new in renames.items():
        initializers[old].name = new
        for node in proto.graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new


def _kept_node(name: str, keep_8bit: tuple[str, ...]) -> bool:
    return kept_8bit(tuple(name.strip("/").split("/")), keep_8bit)


def quantize_matmuls(proto, bits: int, block_size: int, accuracy_level: int, keep_8bit: tuple[str, ...] = ()):
    """Every MatMul with a constant weight → MatMulNBits (`bits`, symmetric, blockwise); with 4 bits, the
    MatMuls of `keep_8bit` (lm_head as "output", layer numbers) get 8 bits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    kept = {name for name in matmuls if _kept_node(name, keep_8bit)} if bits < 8 else set()
    # nodes_to_include only adds to op_types_to_quantize, so each pass excludes the other pass's nodes
    passes = ([(8, set(matmuls) - kept)] if kept else []) + [(bits, kept)]
    for nbits, exclude in passes:
        quantizer = MatMulNBitsQuantizer(proto, bits=nbits, block_size=block_size, is_symmetric=True,
                                         accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",),
                                         nodes_to_exclude=sorted(exclude))
        quantizer.process()
        proto = quantizer.model.model
    return proto


def quantize_embedding_int8(proto) -> str | None:
    """Replace the embedding Gather's float table by an int8 table and a per-row scale (in place)."""
    from onnx import helper, numpy_helper, TensorProto

    initializers = {init.name: init for init in proto.graph.initializer}
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "Gather" or node.input[0] not in initializers:
            continue
        table_init = initializers[node.input[0]]
        if len(table_init.dims) != 2:
            continue
        table = numpy_helper.to_array(table_init).astype(np.float32)
        scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
        name = table_init.name
        proto.graph.initializer.remove(table_init)
        proto.graph.initializer.extend(
            [numpy_helper.from_array(q, name + EMBED_INT8_SUFFIX), numpy_helper.from_array(scale.astype(np.float32), name + EMBED_SCALE_SUFFIX)]
        )
        out = node.output[0]
        prefix = node.name or "/embed"
        new_nodes = [
            helper.make_node("Gather", [name + EMBED_INT8_SUFFIX, node.input[1]], [out + "_q"], name=prefix + "_int8", axis=0),
            helper.make_node("Cast", [out + "_q"], [out + "_f"], name=prefix + "_cast", to=TensorProto.FLOAT),
            helper.make_node("Gather", [name + EMBED_SCALE_SUFFIX, node.input[1]], [out + "_s"], name=prefix + "_scale", axis=0),
            helper.make_node("Mul", [out + "_f", out + "_s"], [out], name=prefix + "_dequant"),
        ]
        del proto.graph.node[index]
        for offset, new in enumerate(new_nodes):
            proto.graph.node.insert(index + offset, new)
        return name
    return None


def factor_matmul_counts(proto, linears: list[str]) -> dict[str, tuple[int, int]]:
    """For each factorized linear, how many (quantized) MatMul nodes come from its `a` and its `b` module."""
    kinds = {"MatMul", "MatMulNBits"}
    counts = Counter(n.name.rsplit("/", 1)[0] for n in proto.graph.node if n.op_type in kinds)
    out = {}
    for name in linears:
        base = "/" + name.replace(".", "/")
        out[name] = (counts[base + "/a"], counts[base + "/b"])
    return out


def save_proto(proto, path: Path) -> None:
    """Save, moving the weights to `model.onnx.data` when the model would pass protobuf's 2 GB limit."""
    import onnx

    weight_bytes = sum(len(init.raw_data) for init in proto.graph.initializer)
    if weight_bytes > PROTOBUF_LIMIT - (64 << 20):
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE)
    else:
        onnx.save_model(proto, str(path))


def validate(out_dir: Path, model: nn.Module, tokenizer, config: OnnxExportConfig, factorized: list[str], proto) -> ValidationReport:
    """optimum-cli-style checks: names/shapes, logits vs torch, KV-cache decode vs full recompute, matmul count."""
    from basel_edge.runtimes.onnxruntime import OrtRuntime

    report = ValidationReport()
    runtime = OrtRuntime.open(out_dir, "cpu")
    layers, kv_heads, head_dim = kv_shape(model.config)
    inputs, outputs = io_names(layers)
    got_in = [i.name for i in runtime.session.get_inputs()]
    got_out = [o.name for o in runtime.session.get_outputs()]
    report.add("input and output names", got_in == inputs and got_out == outputs, f"{len(got_in)} inputs, {len(got_out)} outputs")
    refs, cands = [], []
    for prompt in VALIDATION_PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            refs.append(model(input_ids=torch.tensor([ids])).logits[0].float().numpy())
        cands.append(runtime.logits(ids))
    shape_ok = all(r.shape == c.shape for r, c in zip(refs, cands))
    report.add("logits shape", shape_ok, f"[T, {model.config.vocab_size}]")
    metrics = compare_logits(np.concatenate(refs), np.concatenate(cands))
    report.metrics.update(metrics)
    if config.weights == "fp32":
        report.add_fp32_match(metrics, np.concatenate(refs), config.atol, config.rtol)
    elif config.weights == "int4":
        report.add_int8_floors(metrics, config.min_agreement_int4, config.max_kl_int4, label="int4")
    else:
        report.add_int8_floors(metrics, config.min_agreement, config.max_kl)
    prompt_ids = tokenizer(VALIDATION_PROMPTS[0], add_special_tokens=False)["input_ids"]
    report.add_kv_cache_check(runtime, prompt_ids, 8, config.weights == "fp32", config.min_kv_agreement)
    if factorized:
        counts = factor_matmul_counts(proto, factorized)
        good = sum(1 for a, b in counts.values() if a == 1 and b == 1)
        report.add("two MatMuls per factorized linear", good == len(counts), f"{good}/{len(counts)} linears")
        report.metrics["factor_matmuls"] = {k: list(v) for k, v in counts.items()}
    return report


def export_onnx(model_path: str | Path, out_dir: str | Path, config: OnnxExportConfig, overwrite: bool = False, log=print) -> dict:
    """Export a dense or factorized checkpoint to `out_dir`; all-or-nothing (removed if validation fails)."""
    ref = resolve_model(model_path)
    start = time.perf_counter()
    model = load_model(ref.path).eval()
    factorized = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    tokenizer = load_tokenizer(ref.path)
    untie_embeddings_(model)
    if config.quantized:
        balance_factors_(model)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        log(f"basel-edge: exporting {ref.path} to ONNX (opset {config.opset}, {'factorized' if factorized else 'dense'})")
        proto = export_fp32(model, config.opset)
        name_nodes_by_module(proto)
        if config.quantized:
            log(f"basel-edge: quantizing weights to {config.weights} (MatMulNBits, embedding Gather int8)")
            proto = quantize_matmuls(proto, BITS[config.weights], config.block_size, config.accuracy_level,
                                     config.keep_8bit if config.weights == "int4" else ())
            quantize_embedding_int8(proto)
        scheme = config.scheme()
        meta = {
            "weights": json.dumps(scheme),
            "factorized": json.dumps(bool(factorized)),
            "source": str(ref.path),
        }
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_PREFIX + key, value
        save_proto(proto, tmp / ONNX_FILE)
        copy_tokenizer_files(ref.path, tmp)
        if ref.factorized:
            (tmp / DIMENSION_FILE).write_bytes((ref.path / DIMENSION_FILE).read_bytes())
        info = {
            "target": "onnx",
            "source": str(ref.path),
            "factorized_linears": len(factorized),
            "opset": config.opset,
            "scheme": scheme,
            "config": asdict(config),
            "export_seconds": round(time.perf_counter() - start, 1),
        }
        if config.validate:
            log("basel-edge: validating the ONNX model against torch:")
            report = validate(tmp, model, tokenizer, config, factorized, proto)
            for line in report.lines():
                log(line)
            info["validation"] = report.to_json()
            if not report.ok:
                raise UserError(f"validation of the exported ONNX model failed; {out_dir} was not written")
        info["bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.name.startswith(ONNX_FILE))
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


@register
class OnnxExporter(Exporter):
    target = Target(
        name="onnx", kind="onnx", engine="onnxruntime", engine_module="basel_edge.runtimes.onnxruntime",
        default_weights="int8", int8_weights="int8", devices=("cpu", "cuda"), validates_after_export=True,
        recognise=lambda path: path.is_dir() and (path / "model.onnx").is_file(), weight_files=("*.onnx", "*.onnx.data"),
    )
    description = "decoder with KV cache for onnxruntime; --weights int8 (default) | int4 | fp32"

    @dataclass(frozen=True)
    class Options:
        opset: int = DEFAULT_OPSET

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--opset", type=int, default=cls.Options.opset, help="ONNX opset (onnx target)")

    def run(self, job: ExportJob, log=print) -> dict:
        options = job.options or self.Options()
        config = OnnxExportConfig(
            weights=self.weights(job), opset=options.opset, validate=job.validate,
            **({"keep_8bit": tuple(k for k in job.keep_8bit if k != "embedding")} if job.keep_8bit else {}),
        )
        return {"output": str(job.output), **export_onnx(job.model, job.output, config, overwrite=job.overwrite,
                                                        log=log)}

    @staticmethod
    def describe(summary: dict) -> str:
        return f"basel-edge: wrote {summary['output']} ({summary['bytes']} bytes of ONNX, {summary['export_seconds']} s)"

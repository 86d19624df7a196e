"""ExecuTorch target: a `.pte` decoder with a static KV cache, lowered to XNNPACK, validated on the runtime.

Built from ExecuTorch's own pieces rather than transformers' static-cache export, which fragments the graph
(ARCHITECTURE.md section 7): the HF model runs with an attention function that writes the new keys and values into
per-layer cache buffers with `llama::update_cache` and attends with `llama::custom_sdpa`
(`executorch.extension.llm.custom_ops`), so the cache is a mutable buffer of the program and the runner
passes only `(tokens [1, T], input_pos [1])`, the signature of ExecuTorch's llama runner. Then
`torch.export` → `to_edge_transform_and_lower` (XNNPACK partitioner) → `to_executorch` with quant fusion, as
`executorch.extension.llm.export.builder` does.

int8 (the default) is torchao's 8-bit dynamic activations + int8 per-channel weights ("8da8w") on every
linear factor and the untied lm_head, and int8 per-row weights for the embedding (fused to
`quantized_decomposed::embedding_byte`): ARCHITECTURE.md section 5; weight-only int8 lowers silently wrong in
this version, which the logits check after export would catch. Factorized checkpoints are first rotated
(`basel_edge.rotation.prepare_for_int8_`, exact in float): the hidden space where the layout allows it, else
the value heads and factor ranks. Without it per-token int8 activations of SVD-LLM factors were so noisy that
the .pte and its eager model, which differ only in float rounding order, agreed on 0.81 of the top-1 tokens
(issue 6).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from basel_edge.atomic import atomic_output_dir
from basel_edge.checkpoint import DIMENSION_FILE, load_model
from basel_edge.errors import UserError
from basel_edge.families import family_of
from basel_edge.lowrank import LowRankLinear, balance_factors_, set_module, untie_embeddings_
from basel_edge.models import copy_tokenizer_files, load_tokenizer, resolve_model
from basel_edge.rotation import prepare_for_int8_

from . import EXPORT_INFO_FILE, Exporter, ExportJob, Target, kept_8bit, register
from .validation import VALIDATION_PROMPTS, ValidationReport, compare_logits, decided_agreement

PTE_FILE = "model.pte"
WEIGHT_FORMATS = ("int8", "int4", "fp32")
INT4_GROUP = 32  # 8da4w weight group along the input dim; a linear whose input is not a multiple stays 8da8w
# int4: the lm_head and every down_proj stay 8da8w, as llama.cpp's Q4_K_M keeps ffn_down at more bits. Dense
# SmolLM2-135M, eager 8da4w vs fp32 on the validation prompts: all 4-bit but the lm_head top-1 0.649 / KL 0.524
# (over the check's 0.5: 8da4w also quantizes activations; onnxruntime's weight-only int4 gives 0.75 / 0.31);
# keeping down_proj 0.766 / 0.279, v_proj 0.712 / 0.426, layers 0,1,28,29 0.693 / 0.430; rotating first 0.585 / 0.869
KEEP_8BIT_DEFAULT = ("output", "down_proj")
ATTENTION_NAME = "basel_executorch_sdpa"
LINEAR_OPS = ("aten.linear.default", "aten.mm.default", "aten.addmm.default")


@dataclass
class ExecutorchExportConfig:
    """Options of the ExecuTorch export; validated on creation."""

    weights: str = "int8"
    max_seq_len: int = 1024
    atol: float = 1e-3
    rtol: float = 1e-4
    # int8 vs fp32: the same floors as the ONNX export (a dropped scale or a wrong kernel gives top-1 ~0 and
    # KL >> 1); SmolLM2 factorized by SVD-LLM (keep 0.5) measured 0.902 / KL 0.038, dense 0.927 / 0.029
    min_agreement: float = 0.85
    max_kl: float = 0.05
    # lowering: top-1 agreement with the eager quantized model over the positions it decides by ≥
    # lowering_margin nats. Over all positions it is noise on a noisy int8 model: SmolLM2 SVD-LLM keep 0.5
    # (2,048 calibration tokens) scored 0.878 or 0.849 against the same .pte, with eager torch on 2 threads in
    # two processes; every disagreement was at a margin below 0.6, and over margins ≥ 0.5 it scored 0.992.
    # A broken lowering (weight-only int8, scale dropped) scores ~0.
    min_lowering_agreement: float = 0.95
    lowering_margin: float = 0.5
    min_kv_agreement: float = 0.75
    # int4 vs fp32: floors that still catch a dropped scale or wrong kernel (~0) under 4-bit noise
    min_agreement_int4: float = 0.6
    max_kl_int4: float = 0.5
    # int4: linears kept at 8da8w ("output" = the lm_head, projections, layer numbers); None: KEEP_8BIT_DEFAULT
    keep_8bit: tuple[str, ...] | None = None
    # quantized: rotate before quantizing (basel_edge.rotation.prepare_for_int8_); None = factorized checkpoints only.
    # SVD-LLM keep 0.5 SmolLM2 without it: eager 8da8w top-1 0.81 vs fp32, and the .pte 0.81 vs its own eager
    # model, as two int8 runs that differ only in float rounding order diverge that much (issue 6)
    rotate: bool | None = None
    validate: bool = True

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise UserError(f"--weights {self.weights!r} is not an ExecuTorch weight format; choose {', '.join(WEIGHT_FORMATS)}")
        if not 16 <= self.max_seq_len <= 32768:
            raise UserError(f"--max-seq-len must be in 16..32768, got {self.max_seq_len}")
        if self.max_kl <= 0:
            raise UserError(f"the maximum KL must be positive, got {self.max_kl}")
        if self.lowering_margin < 0:
            raise UserError(f"the lowering margin must be non-negative, got {self.lowering_margin}")
        if not (0.0 < self.min_agreement <= 1.0 and 0.0 < self.min_lowering_agreement <= 1.0):
            raise UserError(f"minimum top-1 agreements must be in (0, 1], got {self.min_agreement}, {self.min_lowering_agreement}")
        if not 0.0 < self.min_kv_agreement <= 1.0:
            raise UserError(f"minimum KV-cache agreement must be in (0, 1], got {self.min_kv_agreement}")
        if self.keep_8bit is not None and self.weights != "int4":
            raise UserError(f"--keep-8bit applies to --weights int4, not {self.weights}")
        if self.keep_8bit is None:
            self.keep_8bit = KEEP_8BIT_DEFAULT if self.weights == "int4" else ()

    @property
    def quantized(self) -> bool:
        return self.weights != "fp32"

    def scheme(self) -> dict:
        """What is written into the export's metadata."""
        if self.weights == "fp32":
            return {"weights": "fp32", "backend": "XNNPACK"}
        if self.weights == "int4":
            return {
                "weights": "int4",
                "backend": "XNNPACK",
                "linear": f"torchao Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, "
                          f"weight_granularity=PerGroup({INT4_GROUP})) (8da4w); inputs not a multiple of "
                          f"{INT4_GROUP} and {', '.join(self.keep_8bit) or 'nothing'} kept at 8da8w",
                "embedding": "torchao IntxWeightOnlyConfig(int8, PerAxis(0)) -> quantized_decomposed::embedding_byte",
                "activations": "float32, quantized per token to int8 inside each linear",
                "why": "ExecuTorch's 4-bit scheme for XNNPACK",
            }
        return {
            "weights": "int8",
            "backend": "XNNPACK",
            "linear": "torchao Int8DynamicActivationIntxWeightConfig(weight_dtype=int8, weight_granularity=PerAxis(0)) (8da8w)",
            "embedding": "torchao IntxWeightOnlyConfig(int8, PerAxis(0)) -> quantized_decomposed::embedding_byte",
            "lm_head": "untied from the embedding, 8da8w",
            "activations": "float32, quantized per token to int8 inside each linear",
            "why": "bit-exact vs eager on a tiny model; weight-only int8 lowers silently wrong "
                   "(ARCHITECTURE.md section 5)",
        }


def _executorch_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, et_cache=None, et_start=None, **kwargs):
    """HF attention function: update this layer's static cache and attend with ExecuTorch's custom SDPA.

    query/key/value arrive as [B, heads, T, D]; the custom ops work on [B, T, heads, D] and handle GQA. A
    sliding-window layer (the model passes `sliding_window`) attends through an explicit mask over the whole
    cache, as ExecuTorch's llama example does: position p sees cache rows p - window < c <= p.
    """
    k_cache, v_cache = et_cache[module.layer_idx]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    torch.ops.llama.update_cache(k, k_cache, et_start)
    torch.ops.llama.update_cache(v, v_cache, et_start)
    window = kwargs.get("sliding_window")
    if window:
        delta = (torch.arange(q.shape[1]) + et_start)[:, None] - torch.arange(k_cache.shape[1])[None, :]
        mask = torch.where((delta >= 0) & (delta < window), 0.0, float("-inf"))
        return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, 0, mask, 0.0, False, scaling), None
    return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, et_start, None, 0.0, True, scaling), None


def register_attention() -> None:
    """Make the attention function known to transformers (mask creation is skipped for unknown mask kinds)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama:: ops)
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _executorch_attention)


class StaticCacheDecoder(nn.Module):
    """`forward(tokens [1, T], input_pos [1]) -> logits [1, T, vocab]` with the KV cache as program buffers."""

    def __init__(self, model: nn.Module, max_seq_len: int) -> None:
        super().__init__()
        register_attention()
        self.model = model
        self.max_seq_len = max_seq_len
        config = model.config
        self.layers = config.num_hidden_layers
        shape = (1, max_seq_len, config.num_key_value_heads, family_of(config).head_dim(config))
        for i in range(self.layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)
        model.config._attn_implementation = ATTENTION_NAME

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start < self.max_seq_len)
        positions = (torch.arange(tokens.shape[1]) + input_pos[0])[None]
        cache = [(getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")) for i in range(self.layers)]
        return self.model(input_ids=tokens, position_ids=positions, use_cache=False, et_cache=cache, et_start=start).logits


def quantize_(model: nn.Module, weights: str = "int8", keep_8bit: tuple[str, ...] = ()) -> None:
    """8da8w (int8) or 8da4w (int4, groups of INT4_GROUP) on every linear (factors, dense projections,
    lm_head), int8 per row on the embedding; with int4, `keep_8bit` linears and those whose input is not a
    whole number of groups get 8da8w."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization import quantize_ as torchao_quantize
    from torchao.quantization.granularity import PerAxis, PerGroup

    untie_embeddings_(model)
    balance_factors_(model)
    torchao_quantize(
        model,
        IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
        lambda module, fqn: isinstance(module, nn.Embedding),
    )
    four_bit = {fqn for fqn, m in model.named_modules() if weights == "int4" and isinstance(m, nn.Linear)
                and m.in_features % INT4_GROUP == 0 and not kept_8bit(tuple(fqn.split(".")), keep_8bit)}
    if four_bit:
        torchao_quantize(
            model,
            Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(INT4_GROUP)),
            lambda m, fqn: fqn in four_bit,
        )
    torchao_quantize(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                     lambda m, fqn: isinstance(m, nn.Linear) and fqn not in four_bit)


class DelegableRMSNorm(nn.Module):
    """RMSNorm with the mean of squares as a matmul by a constant 1/d vector.

    XNNPACK does not take `mean` over the last dim of a 3-D tensor, so the stock norm splits every decoder
    layer into several delegates; as a linear it stays inside one, which lowers faster and decodes faster.
    """

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps = eps
        self.register_buffer("mean_vector", torch.full((1, weight.numel()), 1.0 / weight.numel()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        variance = nn.functional.linear(x * x, self.mean_vector)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def replace_rms_norms_(model: nn.Module) -> int:
    """Swap every `*RMSNorm` module (weight + variance_epsilon) for DelegableRMSNorm; returns how many."""
    swaps = [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
    ]
    for name, module in swaps:
        set_module(model, name, DelegableRMSNorm(module.weight, module.variance_epsilon))
    return len(swaps)


def should_rotate(model: nn.Module, config: ExecutorchExportConfig) -> bool:
    if not config.quantized:
        return False
    if config.rotate is None:
        return any(isinstance(m, LowRankLinear) for m in model.modules())
    return config.rotate


def prepare(model: nn.Module, config: ExecutorchExportConfig) -> nn.Module:
    """The model ready to trace: rotated and quantized when asked, delegable norms, no embedding padding_idx.

    `model.basel_rotation` names the exact transforms applied before quantizing (empty when none). padding_idx
    only matters for training, and it keeps ExecuTorch's quant fusion from matching the dequantize+embedding
    pattern (the int8 table would then have no kernel).
    """
    model.get_input_embeddings().padding_idx = None
    rotation: tuple[str, ...] = ()
    if should_rotate(model, config):
        untie_embeddings_(model)
        rotation = prepare_for_int8_(model)
    if config.quantized:
        quantize_(model, config.weights, config.keep_8bit)
    replace_rms_norms_(model)
    model.basel_rotation = rotation
    return model


def metadata_methods(model: nn.Module, config: ExecutorchExportConfig, tokenizer) -> dict:
    """Constant methods ExecuTorch's llama runner reads from the program."""
    eos = model.config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else tokenizer.bos_token_id
    return {
        "get_max_seq_len": config.max_seq_len,
        "get_max_context_len": config.max_seq_len,
        "get_vocab_size": model.config.vocab_size,
        "get_n_layers": model.config.num_hidden_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
        "get_bos_id": int(bos if bos is not None else 0),
        "get_eos_ids": [int(e) for e in eos_ids if e is not None],
    }


def executorch_version() -> str:
    import executorch.version

    return executorch.version.__version__


@dataclass
class Timings:
    """Seconds per export stage, to see where the time goes."""

    load: float = 0.0
    quantize: float = 0.0
    export: float = 0.0
    lower: float = 0.0
    to_executorch: float = 0.0
    validate: float = 0.0


def export_program(decoder: StaticCacheDecoder, methods: dict, timings: Timings):
    """torch.export → XNNPACK lowering → ExecuTorch program; returns (edge manager, executorch program)."""
    from torch.export import Dim, export

    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed ops for quant fusion)

    tokens = torch.zeros(1, 4, dtype=torch.long)
    start = time.perf_counter()
    with torch.no_grad():
        program = export(
            decoder,
            (tokens, torch.tensor([0])),
            dynamic_shapes=({1: Dim("seq_len", min=1, max=decoder.max_seq_len)}, None),
            strict=False,
        )
    timings.export = time.perf_counter() - start
    start = time.perf_counter()
    edge = to_edge_transform_and_lower(
        program,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=methods,
    )
    edge = edge.transform([ConvertToLinearPass()])
    timings.lower = time.perf_counter() - start
    start = time.perf_counter()
    executorch_program = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )
    timings.to_executorch = time.perf_counter() - start
    return edge, executorch_program


def _module_path(node) -> str | None:
    """The causal LM's module a node comes from (`model.layers.0.self_attn.q_proj.a`), without the wrapper's prefix."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path[len("model.") :] if path.startswith("model.") else path


def delegated_linear_counts(edge) -> tuple[Counter, Counter]:
    """Linear ops per source module inside XNNPACK delegates, and those left outside any delegate.

    Keys are module paths; the norms' mean-of-squares matmuls appear under the norm's path.
    """
    graph_module = edge.exported_program().graph_module
    inside, outside = Counter(), Counter()
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and any(op in str(node.target) for op in LINEAR_OPS):
            outside[_module_path(node)] += 1
    for name, child in graph_module.named_children():
        original = getattr(child, "original_module", None)
        if original is None or not name.startswith("lowered_module"):
            continue
        for node in original.graph.nodes:
            if node.op == "call_function" and any(op in str(node.target) for op in LINEAR_OPS):
                inside[_module_path(node)] += 1
    return inside, outside


def factor_matmul_counts(inside: Counter, linears: list[str]) -> dict[str, tuple[int, int]]:
    """For each factorized linear, how many delegated linear ops come from its `a` and its `b` module."""
    return {name: (inside[f"{name}.a"], inside[f"{name}.b"]) for name in linears}


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence native code writing to fd 2 (the eager custom ops log a line per call)."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def validate(out_dir: Path, reference: nn.Module, decoder: StaticCacheDecoder, tokenizer, config: ExecutorchExportConfig, factorized: list[str], inside: Counter, outside: Counter) -> ValidationReport:
    """Logits of the .pte on the ExecuTorch runtime vs eager torch, KV-cache decode vs recompute, op counts.

    int8 is checked twice: against the eager run of the same quantized decoder (lowering must not change
    what the quantized model computes: the class of bug where weight-only int8 lowers silently wrong) and
    against the float model (the quantization error itself, top-1 and KL).
    """
    from basel_edge.runtimes.executorch import ExecutorchRuntime

    report = ValidationReport()
    runtime = ExecutorchRuntime.open(out_dir, "cpu")
    refs, cands, eager = [], [], []
    for prompt in VALIDATION_PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][: config.max_seq_len]
        with torch.no_grad():
            refs.append(reference(input_ids=torch.tensor([ids])).logits[0].float().numpy())
            if config.quantized:
                with quiet_native_stderr():
                    eager.append(decoder(torch.tensor([ids]), torch.tensor([0]))[0].float().numpy())
        cands.append(runtime.logits(ids))
    report.add("logits shape", all(r.shape == c.shape for r, c in zip(refs, cands)), f"[T, {reference.config.vocab_size}]")
    refs, cands = np.concatenate(refs), np.concatenate(cands)
    metrics = compare_logits(refs, cands)
    report.metrics.update(metrics)
    if config.weights == "fp32":
        report.add_fp32_match(metrics, refs, config.atol, config.rtol)
    else:
        eager = np.concatenate(eager)
        lowering = compare_logits(eager, cands)
        decided = decided_agreement(eager, cands, config.lowering_margin)
        lowering["decided"] = decided
        report.metrics["vs_eager_int8"] = lowering
        report.add(
            f"top-1 agreement vs eager {config.weights} (lowering)",
            decided["positions"] > 0 and decided["top1_agreement"] >= config.min_lowering_agreement,
            f"{decided['top1_agreement']:.4f} over the {decided['positions']} positions eager {config.weights} decides by "
            f"≥ {config.lowering_margin} nats (min {config.min_lowering_agreement}); all {lowering['positions']}: "
            f"{lowering['top1_agreement']:.4f}, max abs diff {lowering['max_abs_diff']:.2e}",
        )
        if config.weights == "int4":
            report.add_int8_floors(metrics, config.min_agreement_int4, config.max_kl_int4, label="int4")
        else:
            report.add_int8_floors(metrics, config.min_agreement, config.max_kl)
    prompt_ids = tokenizer(VALIDATION_PROMPTS[0], add_special_tokens=False)["input_ids"]
    report.add_kv_cache_check(runtime, prompt_ids, 8, config.weights == "fp32", config.min_kv_agreement)
    report.add("every linear in an XNNPACK delegate", sum(outside.values()) == 0, f"{sum(inside.values())} delegated, {sum(outside.values())} outside")
    if factorized:
        counts = factor_matmul_counts(inside, factorized)
        good = sum(1 for a, b in counts.values() if a == 1 and b == 1)
        report.add("two matmuls per factorized linear (delegated)", good == len(counts), f"{good}/{len(counts)} linears")
        report.metrics["factor_matmuls"] = {k: list(v) for k, v in counts.items()}
    return report


def export_executorch(model_path: str | Path, out_dir: str | Path, config: ExecutorchExportConfig, overwrite: bool = False, log=print) -> dict:
    """Export a dense or factorized checkpoint to `out_dir`; all-or-nothing (removed if validation fails)."""
    ref = resolve_model(model_path)
    timings = Timings()
    start_all = time.perf_counter()
    start = time.perf_counter()
    model = load_model(ref.path).eval()
    reference = load_model(ref.path).eval() if config.validate else None
    factorized = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    tokenizer = load_tokenizer(ref.path)
    timings.load = time.perf_counter() - start
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        log(f"basel-edge: exporting {ref.path} to ExecuTorch/XNNPACK ({config.weights}, max_seq_len {config.max_seq_len}, {'factorized' if factorized else 'dense'})")
        start = time.perf_counter()
        prepare(model, config)
        timings.quantize = time.perf_counter() - start
        decoder = StaticCacheDecoder(model, config.max_seq_len).eval()
        methods = metadata_methods(model, config, tokenizer)
        logging.getLogger("torch._export").setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            edge, program = export_program(decoder, methods, timings)
        inside, outside = delegated_linear_counts(edge)
        weight_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        inside = Counter({k: v for k, v in inside.items() if k in weight_linears})
        outside = Counter({k: v for k, v in outside.items() if k in weight_linears})
        portable = Counter(
            str(node.target).split(":")[0].replace("<EdgeOpOverload: ", "").strip(">")
            for node in program.exported_program().graph.nodes
            if node.op == "call_function" and not str(node.target).startswith(("<built-in", "<function"))
        )
        (tmp / PTE_FILE).write_bytes(program.buffer)
        copy_tokenizer_files(ref.path, tmp)
        if ref.factorized:
            (tmp / DIMENSION_FILE).write_bytes((ref.path / DIMENSION_FILE).read_bytes())
        scheme = config.scheme()
        if getattr(model, "basel_rotation", ()):
            scheme["rotation"] = f"{', '.join(model.basel_rotation)} (seeded random orthogonal matrices, exact in float) before quantizing (basel_edge.rotation)"
        info = {
            "target": "executorch",
            "source": str(ref.path),
            "executorch_version": executorch_version(),
            "factorized_linears": len(factorized),
            "scheme": scheme,
            "config": asdict(config),
            "delegates": sum(1 for n, _ in edge.exported_program().graph_module.named_children() if n.startswith("lowered_module")),
            "linears": {"delegated": sum(inside.values()), "outside": sum(outside.values())},
            "portable_ops": dict(sorted(portable.items())),
        }
        if config.validate:
            log("basel-edge: validating the .pte on the ExecuTorch runtime against torch:")
            start = time.perf_counter()
            report = validate(tmp, reference, decoder, tokenizer, config, factorized, inside, outside)
            timings.validate = time.perf_counter() - start
            for line in report.lines():
                log(line)
            info["validation"] = report.to_json()
            if not report.ok:
                raise UserError(f"validation of the exported .pte failed; {out_dir} was not written")
        info["bytes"] = (tmp / PTE_FILE).stat().st_size
        info["timings"] = {k: round(v, 1) for k, v in asdict(timings).items()}
        info["export_seconds"] = round(time.perf_counter() - start_all, 1)
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


@register
class ExecutorchExporter(Exporter):
    target = Target(
        name="executorch", kind="pte", engine="executorch", engine_module="basel_edge.runtimes.executorch",
        default_weights="int8", int8_weights="int8", devices=("cpu", "mobile"), validates_after_export=True,
        recognise=lambda path: path.suffix.lower() == ".pte" if path.is_file() else any(path.glob("*.pte")),
        weight_files=("*.pte", "*.ptd"),
        slow="its XNNPACK lowering takes several minutes on 2 cores (run the demo without --quick)",
    )
    description = ".pte with static KV cache for ExecuTorch/XNNPACK; --weights int8 (default, 8da8w) | int4 (8da4w) | fp32"

    @dataclass(frozen=True)
    class Options:
        max_seq_len: int = 1024  # static KV cache length

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--max-seq-len", type=int, default=cls.Options.max_seq_len,
                            help="static KV cache length (executorch target)")

    def run(self, job: ExportJob, log=print) -> dict:
        options = job.options or self.Options()
        config = ExecutorchExportConfig(
            weights=self.weights(job), max_seq_len=options.max_seq_len, validate=job.validate,
            **({"keep_8bit": tuple(k for k in job.keep_8bit if k != "embedding")} if job.keep_8bit else {}),
        )
        return {"output": str(job.output), **export_executorch(job.model, job.output, config,
                                                              overwrite=job.overwrite, log=log)}

    @staticmethod
    def describe(summary: dict) -> str:
        return f"basel-edge: wrote {summary['output']} ({summary['bytes']} bytes of .pte, {summary['export_seconds']} s)"

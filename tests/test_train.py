"""The shared training loop (basel_edge/train.py): the learning-rate schedule and where bf16 autocast runs."""

from __future__ import annotations

import math

import pytest
import torch

from basel_edge.compress.basel import finetune
from basel_edge.data import load_data, pack
from basel_edge.errors import UserError
from basel_edge.lowrank import LowRankLinear, decoder_linears, low_rank_from_factors, set_module, svd_factors
from basel_edge.models import load_dense, load_tokenizer
from basel_edge.train import LoopConfig, autocast, lr_factor


@pytest.fixture(scope="module")
def blocks(tiny_llama, tiny_text_data):
    return pack(load_data(tiny_text_data).train, load_tokenizer(tiny_llama), seq_len=32, max_tokens=1024)


def _factorized(path):
    model = load_dense(path)
    for name, lin in decoder_linears(model).items():
        a, b = svd_factors(lin.weight.detach(), 8)
        set_module(model, name, low_rank_from_factors(a, b, lin.bias))
    return model


def _factors(model):
    return {n: m.a.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def test_cosine_starts_at_the_base_rate_halves_midway_and_decays_without_reaching_zero():
    steps = 40
    rates = [lr_factor("cosine", s, steps) for s in range(steps)]
    assert rates[0] == 1.0 and rates[20] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] > 0
    assert rates[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert {lr_factor("constant", s, steps) for s in range(steps)} == {1.0}


def test_an_unknown_schedule_is_refused():
    with pytest.raises(UserError, match="schedule"):
        LoopConfig(steps=4, schedule="linear")


def test_the_optimizer_steps_at_the_scheduled_rates(tiny_llama, blocks, monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    finetune(_factorized(tiny_llama), blocks, LoopConfig(steps=6, batch_size=2, schedule="cosine"), lr=1e-3,
             progress=False)
    assert seen == pytest.approx([1e-3 * lr_factor("cosine", s, 6) for s in range(6)])


def test_a_resumed_cosine_run_reproduces_the_uninterrupted_one(tiny_llama, blocks, tmp_path):
    """The rates come from the step alone: a resumed run must not decay from the rate its checkpoint saved."""
    reference = _factorized(tiny_llama)
    finetune(reference, blocks, LoopConfig(steps=8, batch_size=2, schedule="cosine"), lr=1e-3, progress=False)

    class Killed(Exception):
        pass

    def die(step, loss):
        if step == 4:
            raise Killed

    loop = LoopConfig(steps=8, batch_size=2, schedule="cosine", checkpoint_every=2, checkpoint_dir=tmp_path / "c",
                      resume=True)
    with pytest.raises(Killed):
        finetune(_factorized(tiny_llama), blocks, loop, lr=1e-3, progress=False, on_step=die)
    resumed = _factorized(tiny_llama)
    result = finetune(resumed, blocks, loop, lr=1e-3, progress=False)
    assert result.resumed_from == 4
    want, got = _factors(reference), _factors(resumed)
    assert want.keys() == got.keys() and want
    for name in want:
        assert (want[name] - got[name]).abs().max() <= 1e-6, name


@pytest.mark.parametrize("native", [False, True])
def test_cpu_autocast_only_where_the_cpu_computes_bf16(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    with autocast(cpu, amp=True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if native else torch.float32)
    with autocast(cpu, amp=False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def _half_factorized(path):
    """Every other decoder linear factorized, the rest left dense, as a rank allocation may leave them."""
    model = load_dense(path)
    for i, (name, lin) in enumerate(decoder_linears(model).items()):
        if i % 2:
            a, b = svd_factors(lin.weight.detach(), 8)
            set_module(model, name, low_rank_from_factors(a, b, lin.bias))
    return model


def _moved(before, after):
    return {n for n, p in after.named_parameters() if not torch.equal(p, before[n])}


@pytest.mark.parametrize("dense_lr", [None, 1e-3])
def test_finetune_trains_the_factors_and_everything_else_only_when_asked(tiny_llama, blocks, dense_lr):
    model = _half_factorized(tiny_llama)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    finetune(model, blocks, LoopConfig(steps=2, batch_size=2), lr=1e-3, progress=False, dense_lr=dense_lr)
    moved = _moved(before, model)
    linears = decoder_linears(model)
    factors = {f"{n}.{f}.weight" for n, m in linears.items() if isinstance(m, LowRankLinear) for f in "ab"}
    kept_dense = {f"{n}.weight" for n, m in linears.items() if isinstance(m, torch.nn.Linear)}
    rest = set(before) - factors
    assert factors and factors <= moved and kept_dense <= rest
    assert any("norm" in n for n in rest) and any("embed" in n for n in rest)
    assert moved & rest == (rest if dense_lr else set())


class _CompileBroke(torch._dynamo.exc.TorchDynamoException):
    pass


def test_a_failing_torch_compile_falls_back_to_the_eager_step(tiny_llama, blocks, monkeypatch, capsys):
    """A machine without a C++ compiler (or an op inductor cannot lower) still trains, eagerly, with one line
    saying so; the result is the eager run's, and the loop reports that it did not run compiled."""

    def broken(model, **kwargs):
        def call(*args, **kw):
            raise _CompileBroke("InvalidCxxCompiler: No working C++ compiler found")
        return call

    loop = dict(steps=3, batch_size=2, amp=False)
    eager = _factorized(tiny_llama)
    eager_result = finetune(eager, blocks, LoopConfig(**loop), lr=1e-3, progress=False)
    monkeypatch.setattr(torch, "compile", broken)
    fallen = _factorized(tiny_llama)
    result = finetune(fallen, blocks, LoopConfig(**loop, compile=True), lr=1e-3, progress=False)
    assert not result.compiled and not eager_result.compiled
    assert result.last_loss == eager_result.last_loss
    for name, a in _factors(eager).items():
        assert torch.equal(_factors(fallen)[name], a), name
    err = capsys.readouterr()
    assert "torch.compile failed (InvalidCxxCompiler" in err.out + err.err


def test_an_error_that_is_not_torch_compile_s_is_not_swallowed(tiny_llama, blocks, monkeypatch):
    def broken(model, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("out of memory")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        finetune(_factorized(tiny_llama), blocks, LoopConfig(steps=2, batch_size=2, compile=True), lr=1e-3,
                 progress=False)


@pytest.mark.slow
def test_a_compiled_run_follows_the_eager_one(tiny_llama, blocks):
    """torch.compile (inductor) trains the same factors as the eager loop, up to the fused kernels' rounding."""
    loop = dict(steps=4, batch_size=2, amp=False)
    eager, compiled = _factorized(tiny_llama), _factorized(tiny_llama)
    start = _factors(eager)
    eager_result = finetune(eager, blocks, LoopConfig(**loop), lr=1e-3, progress=False)
    result = finetune(compiled, blocks, LoopConfig(**loop, compile=True), lr=1e-3, progress=False)
    assert result.compiled
    assert result.last_loss == pytest.approx(eager_result.last_loss, rel=1e-3)
    for name, a in _factors(eager).items():
        moved = (a - start[name]).abs().max()
        assert moved > 0 and (_factors(compiled)[name] - a).abs().max() < 0.01 * moved, name

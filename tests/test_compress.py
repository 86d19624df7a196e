import json

import pytest
import torch

from basel_edge.cli import main
from basel_edge.compress import METHODS, Budget, compress, decompose
from basel_edge.compress.base import Weighting
from basel_edge.compress.calibration import collect
from basel_edge.families import family_of
from basel_edge.compress.svd_llm import cholesky_with_jitter
from basel_edge.data import load_data, pack
from basel_edge.errors import UserError
from basel_edge.lowrank import LowRankLinear, decoder_linears
from basel_edge.models import load_dense, load_tokenizer
from basel_edge.ranks import MatrixScores, allocate

BASELINES = ["svd", "asvd", "fwsvd", "svd-llm"]


@pytest.fixture(scope="module")
def calib(tiny_llama, tiny_text_data):
    task = load_data(tiny_text_data)
    return pack(task.train, load_tokenizer(tiny_llama), seq_len=64, max_tokens=1024)


def test_all_baselines_registered():
    assert set(BASELINES) <= set(METHODS)


def _stored(model):
    return sum(
        m.rank * (m.in_features + m.out_features) if isinstance(m, LowRankLinear) else m.in_features * m.out_features
        for m in decoder_linears(model).values()
    )


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("allocation", ["global", "uniform", "loss"])
@pytest.mark.parametrize("keep", [0.8, 0.5])
def test_baselines_hit_parameter_budget(tiny_llama, calib, method, allocation, keep):
    model = load_dense(tiny_llama)
    linears = decoder_linears(model)
    dense = sum(m.in_features * m.out_features for m in linears.values())
    multiple = 8
    result = compress(model, method, Budget(keep=keep, rank_multiple=multiple, allocation=allocation), calib, progress=False)
    stored = _stored(model)
    assert stored == result.params["factorized"]
    slack = sum(multiple * (m.in_features + m.out_features) for m in linears.values())
    assert abs(stored - keep * dense) <= slack
    if allocation != "uniform":
        assert stored <= keep * dense
    for name, module in decoder_linears(model).items():
        if isinstance(module, LowRankLinear):
            assert module.rank % multiple == 0 and module.rank > 0
            assert module.rank <= module.in_features * module.out_features / (module.in_features + module.out_features)
    with torch.no_grad():
        logits = model(calib.input_ids[:2]).logits
    assert torch.isfinite(logits).all()


def test_global_allocation_prefers_important_matrices():
    flat = torch.ones(64)
    steep = torch.cat([torch.full((8,), 100.0), torch.full((56,), 1e-3)])
    matrices = {"flat": MatrixScores(64, 64, flat), "steep": MatrixScores(64, 64, steep)}
    ranks = allocate(Budget(keep=0.5, rank_multiple=8, allocation="global"), matrices)
    assert ranks["steep"] == 8 and ranks["flat"] > 8


def test_loss_allocation_compares_importances_across_matrices_as_given():
    """global normalises each matrix to its own total, so two matrices with the same shape of spectrum get the
    same rank whatever their scale; loss (scores already scaled to loss increases) gives the costlier one more."""
    shape = torch.linspace(1.0, 0.01, 64)
    matrices = {"cheap": MatrixScores(64, 64, shape), "costly": MatrixScores(64, 64, 50 * shape)}
    balanced = allocate(Budget(keep=0.5, rank_multiple=8, allocation="global"), matrices)
    assert balanced["cheap"] == balanced["costly"]
    ranks = allocate(Budget(keep=0.5, rank_multiple=8, allocation="loss"), matrices)
    assert ranks["costly"] > ranks["cheap"] >= 8


def test_cli_loss_allocation_calibrates_even_a_method_that_needs_no_data(tiny_llama, tiny_text_data, tmp_path):
    """plain svd reads no activations, but --allocation loss does: the CLI must pack the task's calibration data
    for it (it used to refuse with 'give some' although the task had data)."""
    ranks = {}
    for allocation in ("uniform", "loss"):
        out = tmp_path / allocation
        assert main(["compress", str(tiny_llama), "--method", "svd", "--data", str(tiny_text_data), "--keep", "0.5",
                     "--rank-multiple", "8", "--allocation", allocation, "-o", str(out), "--quiet"]) == 0
        meta = json.loads((out / "basel.json").read_text())
        assert meta["extra"]["allocation"] == allocation
        assert (meta["extra"]["calibration_tokens"] > 0) == (allocation == "loss")
        ranks[allocation] = {k: v["rank"] for k, v in meta["linears"].items()}
    assert ranks["loss"] != ranks["uniform"]  # loss may even keep a matrix dense (no entry)


def test_cli_svd_family_defaults_to_loss_allocation_and_says_how_to_run_without_data(tiny_llama, tiny_text_data,
                                                                                       tmp_path, capsys):
    """loss allocation is the measured default of the SVD family (README "Compression quality"); it reads the
    calibration data, so an evaluation-only task is refused with the data-free alternative named."""
    out = tmp_path / "default"
    assert main(["compress", str(tiny_llama), "--method", "svd-llm", "--data", str(tiny_text_data), "--keep", "0.5",
                 "--rank-multiple", "8", "-o", str(out), "--quiet"]) == 0
    assert json.loads((out / "basel.json").read_text())["extra"]["allocation"] == "loss"
    assert main(["compress", str(tiny_llama), "--method", "svd", "--task", "humaneval", "--keep", "0.5",
                 "--rank-multiple", "8", "-o", str(tmp_path / "he"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--allocation uniform" in err and err.count("\n") == 1 and not (tmp_path / "he").exists()
    assert main(["compress", str(tiny_llama), "--method", "svd", "--task", "humaneval", "--keep", "0.5",
                 "--rank-multiple", "8", "--allocation", "uniform", "-o", str(tmp_path / "he"), "--quiet"]) == 0


def test_output_gradients_are_collected_for_every_linear(tiny_llama, calib):
    model = load_dense(tiny_llama)
    stats = collect(model, calib, frozenset({"outgrad"}), progress=False)
    assert set(stats.outgrad) == set(decoder_linears(model)) and all(v > 0 for v in stats.outgrad.values())
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in load_dense(tiny_llama).parameters()]


def test_keep_too_small_is_a_user_error():
    matrices = {"m": MatrixScores(64, 64, torch.ones(64))}
    with pytest.raises(UserError, match="too small"):
        allocate(Budget(keep=0.01, rank_multiple=8, allocation="global"), matrices)


def test_explicit_ranks_patterns_round_and_dense():
    matrices = {
        "model.layers.0.self_attn.q_proj": MatrixScores(64, 64, torch.ones(64)),
        "model.layers.0.mlp.up_proj": MatrixScores(64, 160, torch.ones(64)),
        "model.layers.0.mlp.down_proj": MatrixScores(160, 64, torch.ones(64)),
    }
    budget = Budget(ranks={"*": 10, "*.up_proj": 20, "model.layers.0.mlp.down_proj": None}, rank_multiple=8)
    ranks = allocate(budget, matrices)
    assert ranks == {"model.layers.0.self_attn.q_proj": 16, "model.layers.0.mlp.up_proj": 24, "model.layers.0.mlp.down_proj": None}
    with pytest.raises(UserError, match="match no decoder linear"):
        allocate(Budget(ranks={"*.nope": 8}), matrices)
    with pytest.raises(UserError, match="break-even"):
        allocate(Budget(ranks={"*": 40}, rank_multiple=8), matrices)


@pytest.mark.parametrize("bad", [dict(keep=0.0), dict(keep=1.5), dict(keep=0.5, ranks={"*": 8}), dict(), dict(keep=0.5, allocation="x"), dict(ranks={"*": 0})])
def test_budget_validation(bad):
    with pytest.raises(UserError):
        Budget(**bad)


def _calibration_inputs(model, blocks):
    """Inputs of every linear on the calibration data, keyed by linear name."""
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for n, m in decoder_linears(model).items()
    ]
    with torch.no_grad():
        model(blocks.input_ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def test_svd_llm_beats_svd_on_calibration_reconstruction(tiny_llama, calib):
    model = load_dense(tiny_llama)
    inputs = _calibration_inputs(model, calib)
    stats = collect(model, calib, frozenset({"xtx"}), progress=False)
    wins = 0
    linears = decoder_linears(model)
    for name, module in linears.items():
        w = module.weight.detach()
        x = inputs[name]
        errs = {}
        for method in ("svd", "svd-llm"):
            d = decompose(w, METHODS[method]().weighting(name, w, stats), dtype=torch.float64)
            a, b = d.factors(16)
            errs[method] = float(((w.double() - b @ a) @ x.T).pow(2).sum())
        assert errs["svd-llm"] <= errs["svd"] * (1 + 1e-6)
        wins += errs["svd-llm"] < errs["svd"]
    assert wins == len(linears)


def test_svd_llm_truncation_error_equals_dropped_singular_values(tiny_llama, calib):
    model = load_dense(tiny_llama)
    inputs = _calibration_inputs(model, calib)
    stats = collect(model, calib, frozenset({"xtx"}), progress=False)
    name = "model.layers.1.mlp.down_proj"
    w = decoder_linears(model)[name].weight.detach()
    d = decompose(w, METHODS["svd-llm"]().weighting(name, w, stats), dtype=torch.float64)
    a, b = d.factors(24)
    err = float(((w.double() - b @ a) @ inputs[name].T).pow(2).sum())
    assert err == pytest.approx(float(d.scores[24:].sum()), rel=1e-6)


@pytest.mark.parametrize("method", BASELINES)
def test_full_rank_decomposition_is_exact(tiny_llama, calib, method):
    model = load_dense(tiny_llama)
    m = METHODS[method]()
    stats = collect(model, calib, m.needs, progress=False)
    for name, module in decoder_linears(model).items():
        w = module.weight.detach()
        d = decompose(w, m.weighting(name, w, stats), dtype=torch.float64)
        torch.testing.assert_close(d.b_full @ d.a_full, w.double(), atol=1e-6, rtol=1e-6)


def test_cholesky_jitter_handles_singular_gram():
    x = torch.randn(3, 8, dtype=torch.float64)
    gram = x.T @ x  # rank 3 of 8: not positive definite
    factor = cholesky_with_jitter(gram)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(factor @ factor.T, gram, atol=1e-3, rtol=1e-3)


def test_shared_inputs_are_collected_once(tiny_llama, calib):
    model = load_dense(tiny_llama)
    stats = collect(model, calib, frozenset({"xtx", "absmean", "fisher"}), progress=False)
    assert family_of(model.config).input_key("model.layers.0.self_attn.v_proj") == "model.layers.0.self_attn.q_proj"
    assert len(stats.xtx) == 2 * 4  # q (shared by k, v), o, gate (shared by up), down per layer
    assert len(stats.fisher) == 2 * 7
    assert all((f >= 0).all() and f.sum() > 0 for f in stats.fisher.values())
    torch.testing.assert_close(stats.input_xtx("model.layers.0.self_attn.k_proj"), stats.xtx["model.layers.0.self_attn.q_proj"])


def test_weighting_defaults_identity():
    w = torch.randn(6, 4, dtype=torch.float64)
    d = decompose(w, Weighting(), dtype=torch.float64)
    torch.testing.assert_close(d.scores, torch.linalg.svdvals(w) ** 2)

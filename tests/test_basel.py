"""Basel / BSI on tiny random Llamas: coefficients, pruning schedules, budget, re-factoring, resume, CLI."""

import json

import pytest
import torch

from basel_edge.cli import main
from basel_edge.compress import Budget, compress
from basel_edge.compress.basel import (
    BaselConfig,
    basel_layers,
    bsi_importance,
    fisher_importance,
    refactor,
    run_basel,
    to_basel,
)
from basel_edge.compress.calibration import collect
from basel_edge.data import load_data, pack
from basel_edge.errors import UserError
from basel_edge.lowrank import LowRankLinear, decoder_linears
from basel_edge.models import load_dense, load_tokenizer
from basel_edge.train import LoopConfig, train_loop

MULTIPLE = 8


@pytest.fixture(scope="module")
def blocks(tiny_llama, tiny_text_data):
    task = load_data(tiny_text_data)
    return pack(task.train, load_tokenizer(tiny_llama), seq_len=64, max_tokens=2048)


def _cfg(**kw):
    base = dict(basis="svd", keep=0.5, r_add=8, rank_multiple=MULTIPLE, steps=12, keep_steps=3, prune_events=3, lr=1e-2)
    return BaselConfig(**{**base, **kw})


def _stored(model):
    return sum(
        m.rank * (m.in_features + m.out_features) if isinstance(m, LowRankLinear) else m.in_features * m.out_features
        for m in decoder_linears(model).values()
    )


def test_coefficients_stay_non_negative_under_aggressive_training(tiny_llama, blocks):
    model = load_dense(tiny_llama)
    layers = to_basel(model, _cfg(), None, torch.device("cpu"), progress=False)
    groups = [{"params": [m.w for m in layers.values()], "lr": 0.5}]
    train_loop(model, groups, blocks, LoopConfig(steps=6, batch_size=2), "x", progress=False)
    moved = sum(bool((m.w.detach() < 0).any()) for m in layers.values())
    assert moved > 0, "the learning rate was meant to push some w below zero"
    for m in layers.values():
        assert (m.coefficients() >= 0).all()


def test_new_bases_get_gradients(tiny_llama, blocks):
    model = load_dense(tiny_llama)
    layers = to_basel(model, _cfg(), None, torch.device("cpu"), progress=False)
    ids, labels = blocks.input_ids[:2], blocks.labels[:2]
    model(input_ids=ids, labels=labels).loss.backward()
    for m in layers.values():
        assert m.u_add.grad is not None and m.u_add.grad.abs().sum() > 0
        assert m.w.grad is not None and m.w.grad.abs().sum() > 0
    opt = torch.optim.SGD([p for m in layers.values() for p in (m.u_add, m.v_add)], lr=1.0)
    opt.step()
    model.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()
    for m in layers.values():
        assert m.v_add.grad is not None and m.v_add.grad.abs().sum() > 0


@pytest.mark.parametrize("basis", ["svd", "svd-llm"])
def test_initial_basel_model_computes_the_dense_model(tiny_llama, blocks, basis):
    dense = load_dense(tiny_llama)
    model = load_dense(tiny_llama)
    stats = collect(model, blocks, frozenset({"xtx"}), progress=False) if basis == "svd-llm" else None
    to_basel(model, _cfg(basis=basis), stats, torch.device("cpu"), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(blocks.input_ids[:2]).logits, dense(blocks.input_ids[:2]).logits,
                                   atol=1e-3, rtol=1e-3)


def test_mass_mode_shrinks_ranks_monotonically_to_the_mass_target(tiny_llama, blocks):
    model = load_dense(tiny_llama)
    cfg = _cfg(mode="mass", mass=0.4, prune_events=4, steps=12, keep_steps=2, lr=1e-9)
    initial = {}
    hook_layers = {}

    def snapshot(step, loss):
        if step == 0:
            hook_layers.update(basel_layers(model))
            initial.update({n: m.coefficients().detach().clone() for n, m in hook_layers.items()})

    result = run_basel(model, blocks, cfg, LoopConfig(steps=12, batch_size=2), progress=False, on_step=snapshot)
    assert [h["step"] for h in result.history] == cfg.event_steps() == [2, 4, 7, 9]
    kept = [h["kept"] for h in result.history]
    for name in kept[0]:
        counts = [k[name] for k in kept]
        assert all(a >= b for a, b in zip(counts, counts[1:])), (name, counts)
        # lr≈0 keeps coefficients fixed: what survives is the top-k of the initial coefficients, and k is the
        # fewest that hold K of the mass
        c = initial[name].sort(descending=True).values.double()
        k = counts[-1]
        frac = float(c[:k].sum() / c.sum())
        assert frac >= 0.4 - 1e-6
        assert float(c[: k - 1].sum() / c.sum()) < 0.4 ** (3 / 4) + 1e-6 or k == 1


@pytest.mark.parametrize("importance,allocation", [("coefficient", "uniform"), ("coefficient", "global"), ("bsi", "global")])
@pytest.mark.parametrize("keep", [0.6, 0.45])
def test_budget_mode_hits_the_parameter_budget(tiny_llama, blocks, importance, allocation, keep):
    model = load_dense(tiny_llama)
    linears = decoder_linears(model)
    dense = sum(m.in_features * m.out_features for m in linears.values())
    slack = sum(MULTIPLE * (m.in_features + m.out_features) for m in linears.values())
    cfg = _cfg(keep=keep, importance=importance, allocation=allocation)
    result = run_basel(model, blocks, cfg, LoopConfig(steps=12, batch_size=2), progress=False)
    stored = _stored(model)
    if allocation == "global":  # the greedy allocator never passes the budget; uniform rounds to nearest
        assert stored <= keep * dense
    assert abs(keep * dense - stored) <= slack
    kept = [h["kept"] for h in result.history]
    for name in kept[0]:
        counts = [k[name] for k in kept]
        assert all(a >= b for a, b in zip(counts, counts[1:]))
    for name, m in decoder_linears(model).items():
        if isinstance(m, LowRankLinear):
            assert m.rank % MULTIPLE == 0 and m.rank >= kept[-1][name]
    with torch.no_grad():
        assert torch.isfinite(model(blocks.input_ids[:2]).logits).all()


def test_refactor_preserves_the_effective_weight(tiny_llama):
    model = load_dense(tiny_llama)
    layers = to_basel(model, _cfg(r_add=8), None, torch.device("cpu"), progress=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in layers.values():
            m.w.mul_(torch.rand(m.w.shape, generator=gen) + 0.5)
            m.u_add.copy_(torch.randn(m.u_add.shape, generator=gen) * 0.1)
            m.mask[torch.randperm(m.n_bases, generator=gen)[: m.n_bases // 2]] = 0.0
    expected = {n: m.effective_weight() for n, m in layers.items()}
    ranks = refactor(model, r_add=8, multiple=MULTIPLE)
    for name, module in decoder_linears(model).items():
        got = module.merged_weight() if isinstance(module, LowRankLinear) else module.weight
        if ranks[name] is not None:
            assert isinstance(module, LowRankLinear) and module.rank == ranks[name]
        err = (got.double() - expected[name]).norm() / expected[name].norm()
        assert err < 1e-5, (name, float(err))


def _final_weights(model):
    return {n: (m.merged_weight() if isinstance(m, LowRankLinear) else m.weight).detach().clone()
            for n, m in decoder_linears(model).items()}


@pytest.mark.parametrize("importance", ["coefficient", "bsi"])
def test_resume_after_interruption_reproduces_the_uninterrupted_run(tiny_llama, blocks, tmp_path, importance):
    cfg = _cfg(importance=importance)
    reference = load_dense(tiny_llama)
    run_basel(reference, blocks, cfg, LoopConfig(steps=12, batch_size=2, seed=5), progress=False)

    class Killed(Exception):
        pass

    def die(step, loss):
        if step == 6:  # after the 7th step: the checkpoint of step 6 holds the first pruning event
            raise Killed

    loop = LoopConfig(steps=12, batch_size=2, seed=5, checkpoint_every=3, checkpoint_dir=tmp_path / "ckpt", resume=True)
    with pytest.raises(Killed):
        run_basel(load_dense(tiny_llama), blocks, cfg, loop, progress=False, on_step=die)
    resumed = load_dense(tiny_llama)
    result = run_basel(resumed, blocks, cfg, loop, progress=False)
    assert result.resumed_from == 6
    want, got = _final_weights(reference), _final_weights(resumed)
    for name in want:
        assert got[name].shape == want[name].shape
        assert (got[name] - want[name]).abs().max() <= 1e-5, name


def test_resume_refuses_a_checkpoint_from_other_settings(tiny_llama, blocks, tmp_path):
    loop = LoopConfig(steps=12, batch_size=2, checkpoint_every=3, checkpoint_dir=tmp_path / "c", resume=True)

    def die(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_basel(load_dense(tiny_llama), blocks, _cfg(), loop, progress=False, on_step=die)
    with pytest.raises(UserError, match="different settings"):
        run_basel(load_dense(tiny_llama), blocks, _cfg(lr=2e-2), loop, progress=False)


@pytest.mark.parametrize("hessian", ["hutchinson", "fisher"])
def test_bsi_scores_track_the_measured_loss_increase(tiny_llama, blocks, hessian):
    """Hutchinson probes one matrix (probing all at once is cross-term noise on real models); the Fisher
    estimate is taken for every matrix at once, as the pruner does."""
    model = load_dense(tiny_llama)
    layers = to_basel(model, _cfg(), None, torch.device("cpu"), progress=False)
    name = "model.layers.1.mlp.down_proj"
    rows = torch.arange(4)
    if hessian == "hutchinson":
        scores = bsi_importance(model, {name: layers[name]}, blocks, rows, probes=8, eps=1e-3,
                                generator=torch.Generator().manual_seed(0))[name]
    else:
        scores = fisher_importance(model, layers, blocks, [rows])[name]
        assert all(m.fisher is None for m in layers.values())
        # without the gradient term the score is ½ H_ii c_i², never negative
        second = fisher_importance(model, layers, blocks, [rows], first_order=False)
        assert all(bool((v >= 0).all()) for v in second.values()) and not torch.equal(second[name], scores)
    ids, labels = blocks.input_ids[rows], blocks.labels[rows]
    model.eval()
    with torch.no_grad():
        base = float(model(input_ids=ids, labels=labels).loss)
        measured = []
        picks = torch.argsort(scores, descending=True)[torch.linspace(0, scores.numel() - 1, 12).long()]
        for i in picks:
            layers[name].mask[i] = 0.0
            measured.append(float(model(input_ids=ids, labels=labels).loss) - base)
            layers[name].mask[i] = 1.0
    est = scores[picks]
    rank_est = est.argsort().argsort().float()
    rank_meas = torch.tensor(measured).argsort().argsort().float()
    spearman = torch.corrcoef(torch.stack([rank_est, rank_meas]))[0, 1]
    assert spearman > 0.6, (est.tolist(), measured)


def test_bad_configs_are_user_errors():
    for bad in (dict(keep=0), dict(mode="x"), dict(basis="basel"), dict(prune_events=20), dict(keep_steps=12),
                dict(lr=0.0), dict(importance="x"), dict(allocation="x"), dict(bsi_hessian="x")):
        with pytest.raises(UserError):
            _cfg(**bad)
    with pytest.raises(UserError, match="needs calibration"):
        run_basel(torch.nn.Module(), None, _cfg(basis="svd-llm"), LoopConfig(steps=12), progress=False)
    with pytest.raises(UserError, match="trains on the task"):
        compress(torch.nn.Module(), "basel", Budget(keep=0.5))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_basel_then_finetune(capsys, tiny_llama, tiny_text_data, tmp_path):
    out = tmp_path / "basel"
    code, stdout, err = _run(
        capsys, "compress", "--model", tiny_llama, "--data", tiny_text_data, "--method", "bsi", "--keep", "0.5",
        "--rank-multiple", "8", "--r-add", "8", "--steps", "8", "--prune-events", "2", "--train-seq-len", "64",
        "--train-batch-size", "2", "--lr", "1e-2", "-o", out, "--json", "--quiet",
    )
    assert code == 0, err
    summary = json.loads(stdout)
    # uniform allocation rounds each tiny matrix's rank to the nearest multiple of 8, hence the slack
    assert summary["method"] == "bsi" and 0.3 < summary["kept_fraction"] <= 0.6
    assert summary["train_tokens"] == 8 * 2 * 64
    dims = json.loads((out / "basel.json").read_text())
    assert dims["method"] == "bsi" and dims["extra"]["basel"]["importance"] == "bsi"
    assert not (tmp_path / ".basel.train").exists()

    ft = tmp_path / "ft"
    code, stdout, err = _run(capsys, "finetune", out, "--data", tiny_text_data, "--steps", "4", "--seq-len", "64",
                             "--lr", "1e-3", "-o", ft, "--quiet")
    assert code == 0, err
    dims_ft = json.loads((ft / "basel.json").read_text())
    assert dims_ft["method"] == "bsi+ft" and dims_ft["linears"] == dims["linears"]
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(ft / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.a.weight"
    assert key in a and not torch.equal(a[key], b[key])
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert "dense_lr" not in dims_ft["extra"]["finetune"]

    ft_all = tmp_path / "ft-all"
    code, stdout, err = _run(capsys, "finetune", out, "--data", tiny_text_data, "--steps", "4", "--seq-len", "64",
                             "--lr", "1e-3", "--train-dense", "--dense-lr", "1e-3", "-o", ft_all, "--quiet")
    assert code == 0, err
    c = load_file(ft_all / "model.safetensors")
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert not torch.equal(a["model.norm.weight"], c["model.norm.weight"])
    assert json.loads((ft_all / "basel.json").read_text())["extra"]["finetune"]["dense_lr"] == 1e-3


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--device", "cuda"], "CUDA"),
        (["--prune-events", "50"], "pruning events"),
        (["--basis", "nope"], "unknown basis"),
        (["--keep", "0.05"], "keep"),
        (["--allocation", "loss"], "SVD-family"),
        (["--error-aware"], "SVD-family"),
    ],
)
def test_cli_basel_user_errors(capsys, tiny_llama, tiny_text_data, tmp_path, extra, fragment):
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    code, _, err = _run(capsys, "compress", "--model", tiny_llama, "--data", tiny_text_data, "--method", "basel",
                        "--rank-multiple", "8", "--steps", "8", "--train-seq-len", "64", "--quiet",
                        "-o", tmp_path / "o", *extra)
    assert code == 2 and err.strip().splitlines()[-1].startswith("basel-edge: error:") and fragment in err, err
    assert not (tmp_path / "o").exists()


def _merged(path):
    from safetensors.torch import load_file

    t = load_file(path / "model.safetensors")
    return {k[: -len(".a.weight")]: t[k[: -len(".a.weight")] + ".b.weight"].double() @ t[k].double()
            for k in t if k.endswith(".a.weight")}


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tiny_llama, tiny_text_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    argv = ["compress", "--model", str(tiny_llama), "--data", str(tiny_text_data), "--method", "basel", "--basis", "svd",
            "--rank-multiple", "8", "--r-add", "8", "--steps", "120", "--prune-events", "3", "--train-seq-len", "64",
            "--lr", "1e-2", "--checkpoint-every", "5", "--threads", "1", "--quiet"]
    cmd = [sys.executable, "-m", "basel_edge"]
    subprocess.run([*cmd, *argv, "-o", str(tmp_path / "full")], check=True, capture_output=True)
    out = tmp_path / "killed"
    state = tmp_path / ".killed.train" / "train_state.pt"
    proc = subprocess.Popen([*cmd, *argv, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists() and not out.exists()
    done = subprocess.run([*cmd, *argv, "-o", str(out), "--resume", "--json"], check=True, capture_output=True, text=True)
    assert json.loads(done.stdout)["kept_fraction"] > 0
    want, got = _merged(tmp_path / "full"), _merged(out)
    assert want.keys() == got.keys() and want
    for name in want:
        assert (want[name] - got[name]).abs().max() <= 1e-5, name


@pytest.mark.parametrize("option", ["lr", "lr_add", "finetune_lr", "bsi_eps"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0])
def test_config_refuses_non_finite_or_non_positive_rates(option, value):
    """Library callers get the CLI's checks: a NaN rate would train to NaN weights and exit 0 (issue 20)."""
    with pytest.raises(UserError):
        _cfg(**{option: value})


@pytest.mark.parametrize("train_dense", [False, True])
def test_train_dense_moves_norms_and_embedding_only_when_asked(tiny_llama, blocks, train_dense):
    """--train-dense: part 1 trains the norms and the embedding too (the released code trains everything)."""
    dense = load_dense(tiny_llama)
    model = load_dense(tiny_llama)
    run_basel(model, blocks, _cfg(train_dense=train_dense, dense_lr=1e-2), LoopConfig(steps=12, batch_size=2),
              progress=False)
    outside = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"]
    before, after = dict(dense.named_parameters()), dict(model.named_parameters())
    moved = [name for name in outside if not torch.equal(before[name], after[name])]
    assert moved == (outside if train_dense else [])
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in outside)

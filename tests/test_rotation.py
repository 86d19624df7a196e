"""Hidden-space rotation before int8 (basel_edge.rotation): exact in float, dense and factorized."""

import torch

from basel_edge.checkpoint import load_model
from basel_edge.compress import Budget, compress
from basel_edge.lowrank import LowRankLinear, untie_embeddings_
from basel_edge.models import load_dense
from basel_edge.rotation import fold_norms_, prepare_for_int8_, random_orthogonal, rotatable, rotate_hidden_, rotate_ranks_
from basel_edge.tiny import make_tiny_model


def _randomize_norms_(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm"):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen) * 3)


def _loaded(path, factorize):
    """The dense model at `path`, factorized by plain SVD at rank 16 when asked."""
    model = load_dense(path).eval()
    if factorize:
        compress(model, "svd", Budget(ranks={"*": 16}, rank_multiple=8), progress=False)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(24, seed=5)
    assert torch.allclose(q @ q.T, torch.eye(24, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_orthogonal(24, seed=5))
    assert not torch.equal(q, random_orthogonal(24, seed=6))


def test_rotation_keeps_logits(tiny_llama):
    for factorize in (False, True):
        model = _loaded(tiny_llama, factorize)
        _randomize_norms_(model)
        ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        before = _logits(model, ids)
        assert not rotatable(model)  # tied embeddings: refused, model untouched
        assert not rotate_hidden_(model)
        untie_embeddings_(model)
        assert rotate_hidden_(model)
        after = _logits(model, ids)
        assert torch.allclose(after, before, atol=1e-4, rtol=1e-4), (after - before).abs().max()
        assert all(m.weight.eq(1).all() for n, m in model.named_modules() if n.endswith("norm"))
        if factorize:
            assert any(isinstance(m, LowRankLinear) for m in model.modules())


def test_rotation_spreads_massive_channels(tiny_llama):
    model = load_dense(tiny_llama).eval()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = 40.0
    untie_embeddings_(model)
    seen = {}
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    ids = torch.arange(3, 13)[None]  # not the pad token, whose embedding is zero
    _logits(model, ids)
    peak_before = (seen["x"].abs().amax(-1) / seen["x"].pow(2).mean(-1).sqrt()).mean()
    rotate_hidden_(model)
    _logits(model, ids)
    peak_after = (seen["x"].abs().amax(-1) / seen["x"].pow(2).mean(-1).sqrt()).mean()
    assert peak_after < 0.5 * peak_before


def test_rotation_refuses_unknown_layouts(tiny_llama):
    model = load_model(tiny_llama).eval()
    untie_embeddings_(model)
    model.model.layers[0].add_module("post_feedforward_layernorm", torch.nn.Identity())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert not rotate_hidden_(model)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def _randomize_all_norms_(model):
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm") and getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 3 - 1)


def test_gemma3_gets_the_transforms_that_stay_exact(tmp_path):
    """Gemma's post-norms rule out the residual rotation; prepare_for_int8_ then rotates value heads and factor
    ranks only, keeping every logit; folding the (1 + w) pre-norm scales alone is exact too, and leaves the
    pre-norms at scale 1 (weight 0)."""
    path = make_tiny_model(tmp_path / "g", model_type="gemma3_text", tie=False)
    for factorize in (False, True):
        model = _loaded(path, factorize)
        _randomize_all_norms_(model)
        ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        before = _logits(model, ids)
        assert not rotatable(model)
        done = prepare_for_int8_(model)
        assert done == ("value heads rotated",) + (("factor ranks rotated",) if factorize else ())
        after = _logits(model, ids)
        assert torch.allclose(after, before, atol=1e-4, rtol=1e-4), (after - before).abs().max()
        assert fold_norms_(model) == 2 * model.config.num_hidden_layers + 1
        assert torch.allclose(_logits(model, ids), before, atol=1e-4, rtol=1e-4)
        layer = model.model.layers[0]
        assert layer.input_layernorm.weight.eq(0).all() and layer.pre_feedforward_layernorm.weight.eq(0).all()
        assert not layer.post_feedforward_layernorm.weight.eq(0).all()  # after a sublayer: left alone
        assert model.model.norm.weight.eq(0).all()  # untied lm_head reads the final norm


def test_rank_rotation_keeps_outputs_and_spreads_the_intermediate():
    """SVD factors put σ₁ ≫ σ_r into the intermediate a·x; after the rotation no rank channel dominates."""
    gen = torch.Generator().manual_seed(0)
    layer = LowRankLinear(48, 40, rank=32, bias=True)
    sigma = 0.8 ** torch.arange(32.0)
    with torch.no_grad():
        u, _ = torch.linalg.qr(torch.randn(40, 32, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(48, 32, generator=gen))
        layer.a.weight.copy_(sigma[:, None] * v.T)
        layer.b.weight.copy_(u)
    x = torch.randn(64, 48, generator=gen)
    peak = lambda z: (z.abs().amax(-1) / z.pow(2).mean(-1).sqrt()).mean()  # noqa: E731
    with torch.no_grad():
        before, z_before = layer(x), layer.a(x)
        assert rotate_ranks_(torch.nn.Sequential(layer)) == 1
        after, z_after = layer(x), layer.a(x)
    assert torch.allclose(after, before, atol=1e-5), (after - before).abs().max()
    assert peak(z_after) < 0.7 * peak(z_before), (peak(z_before), peak(z_after))


def test_llama_gets_the_residual_rotation(tiny_llama_untied):
    model = _loaded(tiny_llama_untied, True)
    _randomize_norms_(model)
    ids = torch.arange(3, 13)[None]
    before = _logits(model, ids)
    assert prepare_for_int8_(model) == ("norm scales folded", "hidden space rotated", "value heads rotated")
    assert torch.allclose(_logits(model, ids), before, atol=1e-4, rtol=1e-4)

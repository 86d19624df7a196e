"""Hidden-space rotation before int8 (basel_edge.rotation): exact in float, dense and factorized."""

import torch

from basel_edge.checkpoint import load_model
from basel_edge.compress import Budget, compress
from basel_edge.lowrank import LowRankLinear, untie_embeddings_
from basel_edge.models import load_dense
from basel_edge.rotation import random_orthogonal, rotatable, rotate_hidden_


def _randomize_norms_(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm"):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen) * 3)


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
        model = load_dense(tiny_llama).eval()
        if factorize:
            compress(model, "svd", Budget(ranks={"*": 16}, rank_multiple=8), progress=False)
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

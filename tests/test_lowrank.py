import pytest
import torch

from basel_edge.errors import UserError
from basel_edge.lowrank import (
    LowRankLinear,
    break_even,
    check_rank,
    low_rank_from_factors,
    max_useful_rank,
    merge_to_dense_,
    round_rank,
    svd_factors,
)


def test_low_rank_linear_applies_a_then_b():
    torch.manual_seed(0)
    layer = LowRankLinear(12, 7, 4, bias=True)
    x = torch.randn(3, 12)
    expected = x @ layer.a.weight.T @ layer.b.weight.T + layer.b.bias
    torch.testing.assert_close(layer(x), expected)
    assert layer.a.weight.shape == (4, 12) and layer.b.weight.shape == (7, 4)


def test_rank_zero_is_refused():
    with pytest.raises(ValueError):
        LowRankLinear(8, 8, 0)
    with pytest.raises(UserError):
        check_rank("x", 0, 8, 8)


def test_rank_rounding_and_break_even():
    assert round_rank(1) == 32 and round_rank(32) == 32 and round_rank(33) == 64
    assert round_rank(9, 8) == 16
    assert break_even(576, 576) == 288
    assert max_useful_rank(576, 576) == 288
    assert max_useful_rank(576, 1536) == 416  # 418.9 rounded down to a multiple of 32
    assert max_useful_rank(40, 40, 32) == 0


def test_rank_above_break_even_refused_unless_forced():
    with pytest.raises(UserError, match="break-even"):
        check_rank("model.layers.0.mlp.up_proj", 320, 576, 576)
    check_rank("model.layers.0.mlp.up_proj", 320, 576, 576, force=True)


@pytest.mark.parametrize("rank", [16, 24, 40])
def test_svd_factors_full_rank_and_padding_reconstruct(rank):
    torch.manual_seed(1)
    w = torch.randn(24, 16)
    a, b = svd_factors(w, rank)
    assert a.shape == (rank, 16) and b.shape == (24, rank)
    torch.testing.assert_close(b @ a, w, atol=1e-5, rtol=1e-5)


def test_merge_replaces_low_rank_layers_with_their_product():
    torch.manual_seed(2)
    a, b, bias = torch.randn(3, 10), torch.randn(5, 3), torch.randn(5)
    model = torch.nn.Sequential(low_rank_from_factors(a, b, bias))
    x = torch.randn(4, 10)
    before = model(x)
    merge_to_dense_(model)
    assert isinstance(model[0], torch.nn.Linear)
    torch.testing.assert_close(model[0].weight, b @ a)
    torch.testing.assert_close(model(x), before)


def test_balancing_keeps_the_product_and_equalises_norms():
    from basel_edge.lowrank import balance_factors_

    torch.manual_seed(3)
    s = torch.logspace(2, -2, 6)
    layer = low_rank_from_factors(s[:, None] * torch.randn(6, 10), torch.linalg.qr(torch.randn(8, 6))[0])
    before = layer.merged_weight().clone()
    model = torch.nn.Sequential(layer)
    assert balance_factors_(model) == 1
    torch.testing.assert_close(layer.merged_weight(), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.a.weight.norm(dim=1), layer.b.weight.norm(dim=0), atol=1e-5, rtol=1e-5)

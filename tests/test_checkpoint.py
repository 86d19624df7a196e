import json
import pytest
import torch
from safetensors.torch import load_file, save_file

from basel_edge.checkpoint import load_factorized, load_model, merge_checkpoint, read_dimension_file, save_factorized
from basel_edge.compress import compress
from basel_edge.errors import UserError
from basel_edge.lowrank import LowRankLinear, decoder_linears
from basel_edge.models import load_dense
from basel_edge.ranks import Budget


def _ids(n=2, t=24, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, t), generator=g)


def _factorize(path, rank, force=False, multiple=8):
    model = load_dense(path)
    compress(model, "svd", Budget(ranks={"*": rank}, rank_multiple=multiple, force=force), progress=False)
    return model


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_untied"])
def test_round_trip_gives_identical_logits(request, tmp_path, fixture):
    src = request.getfixturevalue(fixture)
    model = _factorize(src, 16)
    out = tmp_path / "fact"
    dims = save_factorized(model, out, src, method="svd", task="unit", rank_multiple=8)
    assert (out / "basel.json").is_file() and (out / "tokenizer.json").is_file()
    assert set(dims.linears) == set(decoder_linears(model))
    loaded = load_factorized(out)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.a.weight"].shape == (16, 64) and tensors[f"{name}.b.weight"].shape == (64, 16)
    assert f"{name}.weight" not in tensors
    assert ("lm_head.weight" in tensors) == (fixture == "tiny_llama_untied")


def test_dimension_file_contract(tiny_llama, tmp_path):
    model = _factorize(tiny_llama, 16)
    save_factorized(model, tmp_path / "f", tiny_llama, method="svd", task="unit", rank_multiple=8)
    data = json.loads((tmp_path / "f" / "basel.json").read_text())
    assert data["format"] == "basel-edge.factorized" and data["version"] == 1
    assert data["rank_multiple"] == 8 and data["method"] == "svd" and data["task"] == "unit"
    assert data["linears"]["model.layers.1.mlp.down_proj"] == {"in": 160, "out": 64, "rank": 16}
    dense = sum(m.in_features * m.out_features for m in decoder_linears(load_dense(tiny_llama)).values())
    assert data["params"]["dense"] == dense
    assert data["params"]["factorized"] == sum(16 * (d["in"] + d["out"]) for d in data["linears"].values())


def test_full_rank_factorization_reproduces_dense_logits(tiny_llama):
    dense = load_dense(tiny_llama)
    model = _factorize(tiny_llama, 64, force=True)
    assert all(isinstance(m, LowRankLinear) for m in decoder_linears(model).values())
    ids = _ids()
    with torch.no_grad():
        diff = (model(ids).logits - dense(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_merge_of_factorization_gives_back_the_weights(tiny_llama, tmp_path):
    model = _factorize(tiny_llama, 64, force=True)
    save_factorized(model, tmp_path / "f", tiny_llama, method="svd", rank_multiple=8)
    merge_checkpoint(tmp_path / "f", tmp_path / "merged")
    merged, dense = load_dense(tmp_path / "merged"), load_dense(tiny_llama)
    for name, module in decoder_linears(dense).items():
        torch.testing.assert_close(merged.get_submodule(name).weight, module.weight, atol=1e-5, rtol=1e-4)
    assert not (tmp_path / "merged" / "basel.json").exists()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_merge_at_low_rank_equals_product_of_factors(tiny_llama, tmp_path):
    model = _factorize(tiny_llama, 8)
    save_factorized(model, tmp_path / "f", tiny_llama, method="svd", rank_multiple=8)
    merge_checkpoint(tmp_path / "f", tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.fixture
def saved(tiny_llama, tmp_path):
    model = _factorize(tiny_llama, 16)
    save_factorized(model, tmp_path / "f", tiny_llama, method="svd", rank_multiple=8)
    return tmp_path / "f"


def test_missing_dimension_file(saved):
    (saved / "basel.json").unlink()
    with pytest.raises(UserError, match="no basel.json"):
        load_factorized(saved)


def _edit_dims(saved, fn):
    path = saved / "basel.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_inconsistent_shape_in_dimension_file(saved):
    _edit_dims(saved, lambda d: d["linears"]["model.layers.0.mlp.up_proj"].update({"in": 32}))
    with pytest.raises(UserError, match="up_proj"):
        load_factorized(saved)


def test_rank_disagreeing_with_tensors(saved):
    _edit_dims(saved, lambda d: d["linears"]["model.layers.0.mlp.up_proj"].update({"rank": 24}))
    with pytest.raises(UserError, match="shape"):
        load_factorized(saved)


def test_unknown_linear_and_bad_format(saved):
    _edit_dims(saved, lambda d: d["linears"].update({"model.layers.9.mlp.up_proj": {"in": 64, "out": 160, "rank": 8}}))
    with pytest.raises(UserError, match="does not exist"):
        load_factorized(saved)
    _edit_dims(saved, lambda d: d.update({"format": "something-else"}))
    with pytest.raises(UserError, match="format"):
        read_dimension_file(saved)
    (saved / "basel.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_dimension_file(saved)


def test_missing_factor_tensor(saved):
    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.b.weight"]
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(UserError, match="missing tensors.*v_proj.b.weight"):
        load_factorized(saved)


def test_truncated_weights_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="safetensors"):
        load_factorized(saved)


def test_failed_save_leaves_nothing_behind(tiny_llama, tmp_path):
    model = _factorize(tiny_llama, 16)
    with pytest.raises(UserError, match="config.json"):
        save_factorized(model, tmp_path / "out", tmp_path / "no-such-source", method="svd")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field,value,fragment", [("params", [1, 2, 3], "'params'"), ("params", {"dense": "x"}, "'params'"),
                                                  ("rank_multiple", "abc", "'rank_multiple'"),
                                                  ("rank_multiple", 0, "'rank_multiple'"), ("extra", 5, "'extra'"),
                                                  ("method", 7, "'method'")])
def test_dimension_file_fields_of_the_wrong_type(saved, field, value, fragment):
    """A wrong type used to surface as a TypeError/ValueError traceback from the code that used the field."""
    _edit_dims(saved, lambda d: d.update({field: value}))
    with pytest.raises(UserError, match=fragment):
        read_dimension_file(saved)

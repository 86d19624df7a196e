"""Distillation (`--loss kl | kl+ce`): the KL objective, fine-tuning and Basel against the dense teacher."""

import json

import pytest
import torch

from basel_edge.checkpoint import load_model
from basel_edge.cli import main
from basel_edge.compress.basel import finetune
from basel_edge.data import load_data, pack
from basel_edge.errors import UserError
from basel_edge.models import load_dense, load_tokenizer
from basel_edge.train import LoopConfig, Objective


@pytest.fixture(scope="module")
def blocks(tiny_llama, tiny_text_data):
    return pack(load_data(tiny_text_data).train, load_tokenizer(tiny_llama), seq_len=64, max_tokens=2048)


@pytest.fixture(scope="module")
def svd_half(tiny_llama, tiny_text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "svd"
    assert main(["compress", "--model", str(tiny_llama), "--data", str(tiny_text_data), "--method", "svd",
                 "--keep", "0.5", "--rank-multiple", "8", "-o", str(out), "--quiet"]) == 0
    return out


def _kl_to(teacher, model, blocks) -> float:
    with torch.no_grad():
        return float(Objective("kl", teacher)(model, blocks.input_ids[:4], blocks.labels[:4], amp=False))


def test_kl_is_zero_against_itself_and_matches_a_direct_computation(tiny_llama, blocks):
    teacher, model = load_dense(tiny_llama), load_dense(tiny_llama)
    assert abs(_kl_to(teacher, model, blocks)) < 1e-6
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
        ids, labels = blocks.input_ids[:4], blocks.labels[:4]
        p = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1], -1)
        q = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
        scored = labels[:, 1:] != -100
        direct = float((p.exp() * (p - q)).sum(-1)[scored].mean())
    assert direct > 1e-4 and _kl_to(teacher, model, blocks) == pytest.approx(direct, rel=1e-4)
    with torch.no_grad():
        both = Objective("kl+ce", teacher)(model, ids, labels, amp=False)
        ce = model(input_ids=ids, labels=labels).loss
    assert float(both) == pytest.approx(direct + float(ce), rel=1e-4)


def test_kl_needs_a_teacher_with_the_same_vocabulary(tiny_llama, blocks):
    with pytest.raises(UserError, match="distils from the dense model"):
        Objective("kl")
    teacher = load_dense(tiny_llama)
    teacher.resize_token_embeddings(teacher.config.vocab_size + 8)
    with pytest.raises(UserError, match="predicts"):
        Objective("kl", teacher).check(load_dense(tiny_llama))


def test_distilled_finetuning_moves_the_model_towards_the_teacher(tiny_llama, svd_half, blocks):
    """KL fine-tuning lowers the KL to the dense model more than cross-entropy fine-tuning does (same steps,
    rows and learning rate)."""
    teacher = load_dense(tiny_llama)
    before = _kl_to(teacher, load_model(svd_half), blocks)
    after = {}
    for loss in ("ce", "kl"):
        model = load_model(svd_half)
        finetune(model, blocks, LoopConfig(steps=8, batch_size=2), 3e-3, progress=False,
                 objective=Objective(loss, teacher if loss == "kl" else None))
        after[loss] = _kl_to(teacher, model, blocks)
    assert after["kl"] < 0.8 * before and after["kl"] < after["ce"], (before, after)


def test_cli_finetune_distils_from_the_recorded_source(capsys, svd_half, tiny_text_data, tmp_path):
    out = tmp_path / "ft"
    code = main(["finetune", str(svd_half), "--data", str(tiny_text_data), "--steps", "2", "--seq-len", "64",
                 "--loss", "kl", "--train-rows", "windows", "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    recorded = json.loads((out / "basel.json").read_text())["extra"]["finetune"]
    assert recorded["loss"] == "kl" and recorded["teacher"] and recorded["train_rows"] == "windows"


def test_cli_finetune_without_a_recorded_source_asks_for_the_teacher(capsys, svd_half, tiny_text_data, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in svd_half.iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    dims = json.loads((bare / "basel.json").read_text())
    dims["extra"].pop("source_model")
    (bare / "basel.json").write_text(json.dumps(dims))
    code = main(["finetune", str(bare), "--data", str(tiny_text_data), "--steps", "2", "--loss", "kl",
                 "-o", str(tmp_path / "ft"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--teacher" in err and "Traceback" not in err
    assert not (tmp_path / "ft").exists()


def test_basel_part1_under_distillation_writes_a_checkpoint(capsys, tiny_llama, tiny_text_data, tmp_path):
    out = tmp_path / "bsi-kl"
    code = main(["compress", "--model", str(tiny_llama), "--data", str(tiny_text_data), "--method", "bsi", "--keep",
                 "0.5", "--rank-multiple", "8", "--r-add", "8", "--steps", "6", "--prune-events", "2",
                 "--train-seq-len", "64", "--loss", "kl", "--finetune-steps", "2", "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "basel.json").read_text())["extra"]["basel"]["loss"] == "kl"

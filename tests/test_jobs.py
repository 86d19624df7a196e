"""The typed jobs behind compress and finetune (basel_edge/jobs.py): what the demo and library callers use
instead of the CLI's argv."""

from __future__ import annotations

import json

import pytest

from basel_edge.errors import UserError
from basel_edge.jobs import CompressJob, DataSource, FinetuneJob, compress_checkpoint, finetune_checkpoint
from basel_edge.ranks import Budget


def test_a_data_source_is_a_task_or_a_path_not_both(tmp_path):
    with pytest.raises(UserError):
        DataSource()
    with pytest.raises(UserError):
        DataSource(task="python-code", data=tmp_path)
    with pytest.raises(UserError):
        DataSource(task="python-code", seq_len=0)


def test_a_trained_method_is_not_an_svd_family_job(tmp_path):
    with pytest.raises(UserError, match="TrainedCompressJob"):
        CompressJob(output=tmp_path / "x", data=DataSource(task="python-code"), method="basel")
    with pytest.raises(UserError, match="loss"):
        FinetuneJob(model="m", output=tmp_path / "y", data=DataSource(task="python-code"), loss="mse")


@pytest.mark.parametrize("bad, fragment", [({"schedule": "linear"}, "schedule"), ({"steps": -1}, "steps"),
                                           ({"batch_size": 0}, "batch size"), ({"lr": 0.0}, "learning rate")])
def test_a_finetune_job_is_checked_when_it_is_made(tmp_path, bad, fragment):
    """The loop's settings are refused when the job is made, before any model is read."""
    with pytest.raises(UserError, match=fragment):
        FinetuneJob(model="m", output=tmp_path / "y", data=DataSource(task="python-code"), **bad)


def test_compress_then_finetune_through_the_library(tiny_llama, tiny_text_data, tmp_path):
    data = DataSource(data=tiny_text_data, seq_len=32)
    out = tmp_path / "c"
    summary = compress_checkpoint(CompressJob(
        output=out, data=data, model=str(tiny_llama), budget=Budget(keep=0.5, allocation="uniform", rank_multiple=8),
        calib_tokens=256, progress=False))
    dims = json.loads((out / "basel.json").read_text())
    assert summary["output"] == str(out) and summary["method"] == "svd-llm"
    assert summary["factorized_linears"] == len(dims["linears"]) > 0
    assert summary["kept_fraction"] == pytest.approx(dims["params"]["factorized"] / dims["params"]["dense"], abs=1e-4)
    tuned = finetune_checkpoint(FinetuneJob(model=str(out), output=tmp_path / "f", data=data, steps=2, batch_size=2,
                                            progress=False))
    assert tuned["method"] == "svd-llm+ft" and tuned["train_tokens"] == 2 * 2 * 32
    assert json.loads((tmp_path / "f" / "basel.json").read_text())["method"] == "svd-llm+ft"

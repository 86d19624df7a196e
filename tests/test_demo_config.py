"""The demo's budgets: what each phase is asked to do, without running it."""

from pathlib import Path

import pytest

from basel_edge.errors import UserError
from basel_edge.eval.demo import DemoConfig


def test_full_demo_fine_tunes_the_svd_llm_model_on_the_demo_threads(tmp_path):
    from basel_edge.jobs import CompressJob

    cfg = DemoConfig(out=Path("x"))
    job = cfg.compress_job(tmp_path / "c")
    assert isinstance(job, CompressJob) and job.method == "svd-llm" and job.budget.keep == cfg.keep
    ft = cfg.finetune_job(tmp_path / "c", tmp_path / "f")
    assert ft.steps == cfg.train_steps > 0 and ft.threads == cfg.threads and ft.model == str(tmp_path / "c")


def test_quick_demo_does_not_train(tmp_path):
    cfg = DemoConfig(out=Path("x"), quick=True)
    assert cfg.finetune_job(tmp_path / "c", tmp_path / "f") is None
    trained = DemoConfig(out=Path("x"), quick=True, method="basel").compress_job(tmp_path / "c")
    assert trained.basel.finetune_steps == 0


def test_basel_demo_splits_the_same_step_budget_between_part_1_and_part_2(tmp_path):
    from basel_edge.jobs import TrainedCompressJob

    cfg = DemoConfig(out=Path("x"), method="basel")
    job = cfg.compress_job(tmp_path / "c")
    assert isinstance(job, TrainedCompressJob) and job.method == "basel" and job.basel.r_add == 0
    assert job.basel.steps == job.loop.steps and job.basel.steps + job.basel.finetune_steps == cfg.train_steps
    assert job.train_tokens == cfg.train_steps * 2 * 256
    assert job.loop.checkpoint_dir is not None and job.threads == cfg.threads
    assert cfg.finetune_job(tmp_path / "c", tmp_path / "f") is None
    assert DemoConfig(out=Path("x"), method="bsi").compress_job(tmp_path / "c").method == "bsi"


@pytest.mark.parametrize("bad", [dict(keep=0.0), dict(keep=1.5), dict(threads=0)])
def test_bad_demo_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        DemoConfig(out=Path("x"), **bad)


def test_demo_refuses_a_folder_it_did_not_make_and_reuses_its_own(tmp_path, capsys):
    from basel_edge.cli import main
    from basel_edge.eval.demo import DEMO_MARKER, claim_output

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "-o", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert str(foreign) in err and "--overwrite" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    made = tmp_path / "made"
    claim_output(made, overwrite=False)
    (made / "report").mkdir()
    claim_output(made, overwrite=False)  # a rerun into the demo's own folder needs no --overwrite
    assert (made / DEMO_MARKER).is_file() and (made / "report").is_dir()
    older = tmp_path / "older"  # a demo folder from before the marker: its report is there
    (older / "report").mkdir(parents=True)
    (older / "report" / "report.json").write_text("{}")
    claim_output(older, overwrite=False)
    claim_output(foreign, overwrite=True)  # asked: the demo may write there, and still deletes nothing
    assert (foreign / "notes.txt").read_text() == "keep me" and (foreign / DEMO_MARKER).is_file()
    with pytest.raises(UserError):
        claim_output(tmp_path / "made" / DEMO_MARKER, overwrite=False)  # a file, not a folder

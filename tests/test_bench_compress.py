"""eval/bench_compress.py's scoring sets: the committed compress results stay comparable only while the sets
score the same tokens (its --append and --dense-from refuse a report of other counts)."""

import json

import pytest
import torch

from basel_edge.data import TokenBlocks
from basel_edge.eval.bench_compress import RESULTS, by_length, scoring_sets
from basel_edge.models import DEFAULT_MODEL, load_tokenizer, resolve_model


def test_by_length_sorts_rows_by_their_last_scored_position():
    labels = torch.tensor([[1, 2, 3, -100], [1, -100, -100, -100], [1, 2, 3, 4]])
    out = by_length(TokenBlocks(labels.clone(), labels))
    assert out.labels.tolist() == [[1, -100, -100, -100], [1, 2, 3, -100], [1, 2, 3, 4]]
    assert torch.equal(out.input_ids, out.labels)


@pytest.mark.parametrize("report", ["compress-demo-budget.json", "compress-windows.json", "compress-ablation.json",
                                    "compress.json"])
def test_scoring_sets_score_the_tokens_the_committed_reports_record(report):
    recorded = json.loads((RESULTS / report).read_text())
    sets = scoring_sets(load_tokenizer(resolve_model(DEFAULT_MODEL).path))
    assert (sets.heldout.scored_tokens, sets.humaneval.scored_tokens) == (
        recorded["python_eval_tokens"], recorded["humaneval_eval_tokens"])

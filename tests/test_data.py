import copy
import json
from pathlib import Path

import pytest
import torch

from basel_edge.data import (
    IGNORE_INDEX,
    Example,
    _function_requests,
    humaneval_task,
    load_data,
    load_task,
    pack,
    python_code_task,
    python_functions_task,
    sample_windows,
    tokenize_examples,
)
from basel_edge.errors import UserError
from basel_edge.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_tokenizer(tiny_llama)


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_text_folder_split_by_document(tiny_text_data):
    task = load_data(tiny_text_data)
    assert len(task.train) + len(task.validation) == 6 and task.validation
    assert not {e.text for e in task.train} & {e.text for e in task.validation}
    assert load_data(tiny_text_data) == task  # same seed, same split


def test_single_text_file_holds_out_its_tail(tmp_path):
    lines = [f"line {i}\n" for i in range(100)]
    (tmp_path / "a.txt").write_text("".join(lines))
    task = load_data(tmp_path / "a.txt")
    assert task.train[0].text + task.validation[0].text == "".join(lines)
    assert task.validation[0].text.startswith("line 90")


@pytest.mark.parametrize(
    "record,example",
    [
        ({"text": "hello"}, Example("hello")),
        ({"prompt": "Q?", "completion": "A."}, Example("A.", "Q?")),
        ({"query": "Q?", "response": "A."}, Example("A.", "Q?")),
    ],
)
def test_jsonl_schemas(tmp_path, record, example):
    path = _write_jsonl(tmp_path / "d.jsonl", [record] * 10)
    task = load_data(path)
    assert task.train[0] == example and len(task.train) == 9 and len(task.validation) == 1


def test_jsonl_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        load_data(tmp_path / "bad.jsonl")
    _write_jsonl(tmp_path / "keys.jsonl", [{"title": "x"}])
    with pytest.raises(UserError, match="needs 'text'.*found: title"):
        load_data(tmp_path / "keys.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no records"):
        load_data(tmp_path / "empty.jsonl")
    _write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(UserError, match="expected a JSON object"):
        load_data(tmp_path / "list.jsonl")


def test_data_path_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_data(tmp_path / "missing")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match="unsupported data format"):
        load_data(tmp_path / "x.parquet")
    (tmp_path / "e.txt").write_text("   \n")
    with pytest.raises(UserError, match="empty"):
        load_data(tmp_path / "e.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="not UTF-8"):
        load_data(tmp_path / "bin.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="holds no text"):
        load_data(tmp_path / "emptydir")
    with pytest.raises(UserError, match="exactly one"):
        load_task("python-code", tmp_path)
    with pytest.raises(UserError, match="unknown task 'nope'"):
        load_task("nope")


def test_saved_datasets(tmp_path):
    import datasets

    rows = {"prompt": [f"p{i}" for i in range(20)], "completion": [f"c{i}" for i in range(20)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "flat"))
    task = load_data(tmp_path / "flat")
    assert len(task.train) == 18 and len(task.validation) == 2 and task.has_prompt
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["a", "b", "c"]}),
        validation=datasets.Dataset.from_dict({"text": ["v"]}),
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    task = load_data(tmp_path / "dict")
    assert [e.text for e in task.train] == ["a", "b", "c"] and [e.text for e in task.validation] == ["v"]
    datasets.DatasetDict(test=datasets.Dataset.from_dict({"text": ["t"]})).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(UserError, match="no 'train' split"):
        load_data(tmp_path / "notrain")


def test_python_code_task_is_deterministic_and_disjoint():
    a, b = python_code_task(), python_code_task()
    assert a == b
    assert len(a.train) > 1000 and len(a.validation) > 100
    assert not {e.text for e in a.train} & {e.text for e in a.validation}
    assert python_code_task(seed=1).validation != a.validation


def test_humaneval_is_evaluation_only_with_prompts():
    task = humaneval_task()
    assert task.train == [] and len(task.validation) == 164
    assert all(e.prompt.lstrip().startswith(("def", "from", "import", "\n")) or "def " in e.prompt for e in task.validation)
    assert task.has_prompt


def test_packing_rows_and_prompt_mask(tok):
    examples = [Example("def f():\n    return 1\n", "# prompt\n"), Example("x = 2\n")]
    blocks = pack(examples, tok, seq_len=8, packing=True)
    assert blocks.input_ids.shape[1] == 8
    prompt_len = len(tok("# prompt\n", add_special_tokens=False)["input_ids"])
    assert (blocks.labels.flatten()[:prompt_len] == IGNORE_INDEX).all()
    unmasked = blocks.labels.flatten()[prompt_len:]
    assert torch.equal(unmasked[unmasked != IGNORE_INDEX], blocks.input_ids.flatten()[prompt_len:][unmasked != IGNORE_INDEX])
    again = pack(examples, tok, seq_len=8, packing=True)
    assert torch.equal(blocks.input_ids, again.input_ids) and torch.equal(blocks.labels, again.labels)


def test_unpacked_rows_are_right_padded_and_unscored(tok):
    examples = [Example("short\n", "p:"), Example("a much longer completion than the first one\n", "p:")]
    blocks = pack(examples, tok, seq_len=64, packing=False)
    assert len(blocks) == 2
    n0 = len(tok("p:", add_special_tokens=False)["input_ids"]) + len(tok("short\n", add_special_tokens=False)["input_ids"]) + 1
    assert (blocks.labels[0, n0:] == IGNORE_INDEX).all() and (blocks.labels[0, n0 - 1] != IGNORE_INDEX)


def test_max_tokens_limits_packing(tok):
    examples = [Example(f"document number {i} " * 50) for i in range(40)]
    blocks = pack(examples, tok, seq_len=32, max_tokens=320)
    assert blocks.input_ids.shape == (10, 32)


def test_token_budget_spans_many_documents(tok):
    examples = [Example(f"doc{i} " * 400) for i in range(40)]
    blocks = pack(examples, tok, seq_len=16, max_tokens=32 * 16)
    text = tok.decode(blocks.input_ids.flatten())
    assert sum(f"doc{i} " in text for i in range(40)) >= 32


SOURCE = '''import os


@staticmethod
def documented(a, b=1):
    """Add.

    Twice.
    """
    c = a + b
    return c


def one_statement():
    """Only a docstring."""


def undocumented(x):
    return x


class K:
    def method(self):
        """Methods are not top-level functions."""
        return 1
'''


def test_function_requests_split_head_from_body():
    (ex,) = _function_requests(SOURCE)
    assert ex.request
    assert ex.prompt == '@staticmethod\ndef documented(a, b=1):\n    """Add.\n\n    Twice.\n    """\n'
    assert ex.text == "    c = a + b\n    return c\n"
    assert _function_requests("def broken(:\n") == []


def test_python_functions_task_keeps_the_module_split():
    code, funcs = python_code_task(), python_functions_task()
    assert len(funcs.train) > 1000 and len(funcs.validation) > 100
    held_out = "".join(e.text for e in code.validation)
    assert all(e.prompt + e.text in held_out for e in funcs.validation[:50])
    assert not {e.prompt + e.text for e in funcs.train} & {e.prompt + e.text for e in funcs.validation}


CHAT = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_requests_train_in_the_chat_form_that_humaneval_asks_in(tok):
    from basel_edge.eval.humaneval import prompt_text

    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHAT
    head, body = "def f(x):\n    \"\"\"Double.\"\"\"\n", "    return 2 * x\n"
    for t, ask, answer in [(chat_tok, prompt_text({"prompt": head}, chat_tok), body + "```"), (tok, head, body)]:
        ((ids, labels),) = tokenize_examples([Example(body, head, request=True)], t)
        n = len(t(ask, add_special_tokens=False)["input_ids"])
        assert labels[:n] == [IGNORE_INDEX] * n and IGNORE_INDEX not in labels[n:]
        assert ids[-1] == t.eos_token_id
        assert t.decode(ids[:n]) == t.decode(t(ask, add_special_tokens=False)["input_ids"])
        assert t.decode(ids[n:-1]) == t.decode(t(answer, add_special_tokens=False)["input_ids"])
    assert "<|user|>Complete the following Python function." in prompt_text({"prompt": head}, chat_tok)


def test_windows_take_each_row_from_another_document(tok):
    docs = [Example(f"doc{i} " + " ".join(f"w{i}_{j}" for j in range(200))) for i in range(30)]
    docs.insert(3, Example("short"))
    blocks = sample_windows(docs, tok, seq_len=16, rows=20, seed=0)
    assert blocks.input_ids.shape == (20, 16) and torch.equal(blocks.input_ids, blocks.labels)
    owners = []
    for row in blocks.input_ids.tolist():
        text = tok.decode(row)
        (owner,) = {i for i in range(30) if f"w{i}_" in text}
        full = tok(docs[owner + (owner >= 3)].text, add_special_tokens=False)["input_ids"]
        assert any(full[k : k + 16] == row for k in range(len(full) - 15))
        owners.append(owner)
    assert len(set(owners)) == 20
    starts = {tok.decode(r).split()[0] for r in blocks.input_ids.tolist()}
    assert len(starts) > 10  # bodies, not only the heads
    assert torch.equal(sample_windows(docs, tok, 16, 20, seed=0).input_ids, blocks.input_ids)
    assert not torch.equal(sample_windows(docs, tok, 16, 20, seed=1).input_ids, blocks.input_ids)
    assert sample_windows(docs[:2], tok, 16, 5).input_ids.shape == (5, 16)  # cycles over the documents
    with pytest.raises(UserError, match="no document holds"):
        sample_windows([Example("tiny")], tok, 16, 2)


def test_training_rows_packed_or_windows(tok):
    from basel_edge.data import TaskData
    from basel_edge.jobs import DataSource, FinetuneJob, train_blocks

    plain = TaskData("t", [Example(" ".join(f"w{i}" for i in range(300)))] * 8, [])
    windows = train_blocks(plain, tok, 32, 4 * 32, rows="windows")
    assert windows.input_ids.shape == (4, 32) and (windows.labels != IGNORE_INDEX).all()
    assert not torch.equal(windows.input_ids, train_blocks(plain, tok, 32, 4 * 32).input_ids)  # packed: the heads
    asks = TaskData("f", [Example("    return 1\n", "def f():\n", request=True)] * 8, [])
    assert (train_blocks(asks, tok, 32, 4 * 32).labels == IGNORE_INDEX).any()
    with pytest.raises(UserError, match="has prompts; use --train-rows packed"):
        train_blocks(asks, tok, 32, 4 * 32, rows="windows")
    with pytest.raises(UserError, match="unknown training rows 'random'"):
        FinetuneJob("m", Path("o"), DataSource("python-code"), train_rows="random")

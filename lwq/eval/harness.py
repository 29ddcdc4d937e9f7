"""A bridge to lm-evaluation-harness for in-memory (quantized) models.

``evaluate_tasks`` wraps the model in lm-eval's ``HFLM`` and runs
``simple_evaluate``. Task definitions shipped here read local files only:
``lwq_text_perplexity`` is a rolling-loglikelihood perplexity task (like
lm-eval's ``wikitext``) over any UTF-8 text file. Users who can reach the hub
may name lm-eval's standard tasks (piqa, arc_easy, hellaswag, winogrande...).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from lwq.errors import ConfigError
from lwq.models import context_window
from lwq.textio import read_text

log = logging.getLogger(__name__)

TEXT_PPL_TASK = "lwq_text_perplexity"

_TEXT_PPL_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def documents(text: str, max_chars: int = 20_000) -> list[str]:
    """Split a text into documents at blank lines, each at most ``max_chars`` long."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if size + len(para) > max_chars and current:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        docs.append("\n\n".join(current))
    return [d for d in docs if d.strip()]


def write_text_task(data: Path, folder: Path) -> str:
    """Write the local perplexity task over ``data`` into ``folder``; returns its name."""
    jsonl = folder / "docs.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for doc in documents(read_text(data)):
            f.write(json.dumps({"text": doc}) + "\n")
    (folder / f"{TEXT_PPL_TASK}.yaml").write_text(
        _TEXT_PPL_YAML.format(task=TEXT_PPL_TASK, data=json.dumps(str(jsonl.resolve())))
    )
    return TEXT_PPL_TASK


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    data: Path | None = None,
    max_length: int | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on an in-memory model; returns {task: {metric: value}}.

    ``lwq_text_perplexity`` in ``tasks`` needs ``data`` (a text file).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if TEXT_PPL_TASK in tasks and data is None:
        raise ConfigError(f"the task {TEXT_PPL_TASK} needs --data TEXT_FILE")
    max_length = context_window(model.config, max_length)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        device=device,
    )
    with tempfile.TemporaryDirectory(prefix="lwq-tasks-") as tmp:
        local = TEXT_PPL_TASK in tasks
        if local:
            assert data is not None
            write_text_task(data, Path(tmp))
        standard = [t for t in tasks if t != TEXT_PPL_TASK]
        manager = TaskManager(include_path=tmp if local else None, include_defaults=bool(standard))
        try:
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                log_samples=False,
                bootstrap_iters=0,
            )
        except Exception as err:  # lm-eval raises bare errors for unknown/unreachable tasks
            raise ConfigError(
                f"--tasks {','.join(tasks)}: lm-eval could not run them ({err}); standard "
                f"tasks need the Hugging Face hub, offline use {TEXT_PPL_TASK} with --data"
            ) from err
    assert out is not None
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        results[task] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k
        }
    return results

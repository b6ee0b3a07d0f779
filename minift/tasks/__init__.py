"""The four clinical tasks of the SFT-vs-DPO study (Savage et al., J Med Internet Res 2025), in synthetic form.

    from minift.tasks import get_task, TASKS
    task = get_task("triage"); rows = task.rows(n_sft=300, n_dpo=300, n_test=120)

Each task generates seeded cases (train and test phrasings kept apart), parses a model's answer and
computes the study's metric; `python -m minift.tasks.build` writes the bundled files under data/.
"""
from minift.errors import MinifTError
from minift.tasks.base import Case, Task
from minift.tasks.classification import Classification
from minift.tasks.reasoning import Reasoning
from minift.tasks.summarization import Summarization
from minift.tasks.triage import Triage

TASKS = {t.name: t for t in (Classification(), Reasoning(), Summarization(), Triage())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise MinifTError(f"unknown task {name!r}; choose one of {', '.join(TASKS)} (or 'all')")
    return TASKS[name]


__all__ = ["TASKS", "get_task", "Task", "Case"]

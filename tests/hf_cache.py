"""A local Hugging Face datasets cache, built offline, as ``load_dataset(hub_id)`` leaves it.

``datasets`` keeps a dataset it once downloaded under
``HF_DATASETS_CACHE/<namespace>___<name>/<config>/<version>/<hash>/`` (arrow files and
``dataset_info.json``); offline, ``load_dataset("namespace/name", config)`` reads it
from there. ``build_dataset_cache`` prepares that layout from rows with the JSON
builder, without any network, so tests can use hub ids the way a worker with a
populated cache does.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

SUPPORT_QUESTIONS = "meshq-examples/support-questions"
TINY_INSTRUCTIONS = "meshq-examples/tiny-instructions"

QUESTION_ROWS = [{"id": i, "question": f"Question: what is {i} plus {i}? Answer:", "answer": str(2 * i)}
                 for i in range(12)]
INSTRUCTION_ROWS = [{"instruction": "Say hello:", "output": " hello"},
                    {"instruction": "Count to three:", "output": " 1 2 3"},
                    {"instruction": "Name a colour:", "output": " blue"},
                    {"instruction": "Say goodbye:", "output": " bye"}]


def build_dataset_cache(cache_dir: Path, repo_id: str, config: str, splits: dict[str, list[dict[str, Any]]],
                        revision_hash: str = "0123456789abcdef") -> Path:
    """Put ``splits`` into ``cache_dir`` as the cached dataset ``repo_id`` (config ``config``)."""
    from datasets.packaged_modules.json.json import Json
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    namespace, name = repo_id.split("/")
    target = cache_dir / f"{namespace}___{name}" / config / "0.0.0" / revision_hash
    with tempfile.TemporaryDirectory() as scratch:
        files = {}
        for split, rows in splits.items():
            path = Path(scratch) / f"{split}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            files[split] = str(path)
        builder = Json(cache_dir=str(Path(scratch) / "build"), dataset_name=name, config_name=config,
                       data_files=files)
        builder.download_and_prepare()
        target.mkdir(parents=True, exist_ok=True)
        for produced in Path(builder.cache_dir).iterdir():
            if produced.suffix in (".arrow", ".json"):
                shutil.move(str(produced), target / produced.name)
    return target


def build_example_caches(cache_dir: Path) -> Path:
    """The two datasets the original-form example templates name by hub id."""
    build_dataset_cache(cache_dir, SUPPORT_QUESTIONS, "plain",
                        {"train": QUESTION_ROWS, "validation": QUESTION_ROWS[:3]})
    build_dataset_cache(cache_dir, TINY_INSTRUCTIONS, "default", {"train": INSTRUCTION_ROWS})
    return cache_dir

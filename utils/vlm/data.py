"""Image questions for GRPO on a vision-language model: rows of question, answer and image or images.

A local .jsonl/.json/.parquet file, or a folder with {split}.jsonl / {split}.parquet (dataset_path, as for
text). Image paths are relative to the data file's folder unless absolute. The answer is GSM8K's form
("... #### 42": the number) or any short text ("red"), compared as the text rewards compare answers.
"""

from __future__ import annotations

from pathlib import Path

from mlx_grpo.data.gsm8k import XML_SYSTEM_PROMPT, DataError, _local_data_file, gsm8k_reference_answer
from mlx_grpo.data.task import PromptTask
from mlx_grpo.vlm.model import VlmError, build_vlm_prompt


def _row_images(row: dict, base: Path, source: str, index: int) -> list[str]:
    images = row.get("images") if row.get("images") is not None else row.get("image")
    if images is None:
        return []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise DataError(f"{source}: row {index}: 'image' must be a path and 'images' a list of paths")
    paths = [Path(i) if Path(i).is_absolute() else base / i for i in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{source}: row {index}: image file(s) not found: {', '.join(missing)} (paths are "
                        "relative to the data file's folder)")
    return [str(p) for p in paths]


def load_image_rows(dataset_path: str, split: str) -> list[dict]:
    """[{question, answer, images}] of a local data file, in file order (row numbers 1-based)."""
    import datasets

    if not dataset_path:
        raise DataError("a vision-language model trains on local data: set dataset_path to a .jsonl/.parquet "
                        "file (or a folder of {split}.jsonl) with question, answer and image or images")
    path = _local_data_file(dataset_path, split)
    builder = "parquet" if path.suffix == ".parquet" else "json"
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except datasets.exceptions.DatasetGenerationError as e:
        raise DataError(f"could not read {path} as {builder}: {e.__cause__ or e}") from e
    missing = [name for name in ("question", "answer") if name not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing field(s) {missing} (found {table.column_names}); rows need 'question', "
                        "'answer' and 'image' (a path) or 'images' (a list of paths)")
    rows = []
    for i, row in enumerate(table, start=1):
        question, answer = row["question"], row["answer"]
        if not isinstance(question, str) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{path}: row {i}: 'question' must be a string and 'answer' a string or a number")
        answer = str(answer)
        reference = gsm8k_reference_answer(answer) if "####" in answer else answer.strip()
        rows.append({"question": question, "answer": reference, "images": _row_images(row, path.parent, str(path), i)})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def check_image_data_files(cfg, eval_only: bool = False) -> None:
    """Before the model loads: the splits' rows and image files read (check_data_files' job for text rows), and
    evaluation does not read the training rows. A row is its question with its images: image questions may
    share one text."""
    from mlx_grpo.data.gsm8k import check_held_out

    eval_rows = load_image_rows(cfg.dataset_path, cfg.eval_split)
    if not eval_only:
        train_rows = load_image_rows(cfg.dataset_path, cfg.train_split)
        check_held_out([repr((r["question"], r["images"])) for r in train_rows],
                       [repr((r["question"], r["images"])) for r in eval_rows])


class VlmTask(PromptTask):
    """The trainer's Task (mlx-grpo.py) for image questions: prompts are VlmPrompts, built once."""

    def __init__(self, cfg, policy, tokenizer, split, limit=0):
        if cfg.prompt_format == "nanochat":
            raise DataError('prompt_format = "nanochat" is for nanochat models; a vision-language model uses its '
                            'own chat template: set prompt_format = "xml" (or "auto")')
        system = cfg.system_prompt or XML_SYSTEM_PROMPT  # as build_messages' xml format
        rows = load_image_rows(cfg.dataset_path, split)

        def encode(row):
            try:
                return build_vlm_prompt(policy, row["question"], row["images"], system=system)
            except VlmError as e:
                raise DataError(f"{split}: {e}") from e

        super().__init__(cfg, tokenizer, split, rows[:limit] if limit else rows, encode,
                         question_answer=lambda row: (row["question"], row["answer"]), check="correctness",
                         length_note=" (image tokens included)")

"""Private client data: JSONL in the formats users bring, tokenized with response-only labels.

One JSON object per line, in one of three formats:

* chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}``
  (optionally a leading ``system`` message); every assistant turn is trained;
* instruction: ``{"instruction": ..., "response": ...}`` (optional ``"input"``, appended to
  the instruction), turned into one user and one assistant turn;
* plain text: ``{"text": ...}``: causal LM on every token (there is no prompt to mask).

Chat and instruction records are rendered with the model's chat template, and the loss is
computed on the response tokens only, including the end-of-turn token: an adapter trained
without it picks up the style but never stops generating.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # label value the cross-entropy loss skips


class DataError(ValueError):
    """A data file is missing, empty, or has a malformed line; the message names file and line."""


@dataclass(frozen=True)
class Example:
    """One training example, normalized: chat turns, or plain text (``messages`` empty)."""

    messages: tuple[tuple[str, str], ...]
    text: str = ""


@dataclass(frozen=True)
class Encoded:
    """Token ids and labels of one example (labels are ``IGNORE_INDEX`` outside responses)."""

    input_ids: list[int]
    labels: list[int]


def load_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a JSONL file.

    Raises
    ------
    DataError
        Naming the file and line of the first malformed record, or saying the file is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    examples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            try:
                examples.append(parse_record(record))
            except DataError as exc:
                raise DataError(f"{path}:{lineno}: {exc}") from None
    if not examples:
        raise DataError(f"{path}: empty client partition (no examples); give this client data or remove it")
    return examples


def parse_record(record: Any) -> Example:
    """Normalize one decoded JSON record to an :class:`Example`."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError("'messages' must be a non-empty list")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"messages[{i}] must be an object with string 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"messages[{i}] has unknown role '{m['role']}' (system, user or assistant)")
            turns.append((m["role"], m["content"]))
        if not any(role == "assistant" and content.strip() for role, content in turns):
            raise DataError("'messages' has no non-empty assistant turn to learn from")
        return Example(messages=tuple(turns))
    if "instruction" in record or "response" in record:
        instruction, response = record.get("instruction"), record.get("response")
        if not isinstance(instruction, str) or not isinstance(response, str) or not response.strip():
            raise DataError("'instruction' and a non-empty 'response' must both be strings")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError("'input' must be a string")
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return Example(messages=(("user", prompt), ("assistant", response)))
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise DataError("'text' must be a non-empty string")
        return Example(messages=(), text=record["text"])
    raise DataError(
        f"unknown record format with keys {sorted(record)}: use 'messages', 'instruction'/'response' or 'text'"
    )


def encode(example: Example, tokenizer: Any, max_len: int) -> Encoded:
    """Tokenize one example; labels cover assistant responses (and their end-of-turn token) only."""
    if not example.messages:
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_len]
        return Encoded(input_ids=ids, labels=list(ids))
    msgs = [{"role": r, "content": c} for r, c in example.messages]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans = []  # character spans of the assistant responses, end-of-turn marker included
    for i, (role, _) in enumerate(example.messages):
        if role != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False).rstrip())
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s <= lo and hi <= e for s, e in spans) and hi > lo else IGNORE_INDEX
        for tok, (lo, hi) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return Encoded(input_ids=enc["input_ids"][:max_len], labels=labels[:max_len])


def collate(batch: list[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch into ``input_ids``, ``attention_mask``, ``labels`` tensors, each (B, T)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

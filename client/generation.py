"""How the edge runtime decodes an answer: greedy, with repetition control, from the model's own defaults.

Greedy decoding of a small model falls into loops ("A genus of the genus of the genus ...").
Two of onnxruntime-genai's search options stop them: ``repetition_penalty`` (CTRL, Keskar et
al. 2019, arXiv 1909.05858: the logit of every token already in the sequence is divided by
the penalty) and ``no_repeat_ngram_size`` (no n-gram occurs twice). Measured on the demo's
federated adapter, 1.1 and 4 stop the loops and keep the answers close to greedy; 1.2 alone
rephrased good answers, and a 3-gram ban broke words the prompt had just quoted. The base
release's ``generation_config.json`` (signed with it) overrides these defaults when it sets them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared.files import read_bounded
from shared.onnx_base import GENERATION_CONFIG

log = logging.getLogger(__name__)
MAX_CONFIG_BYTES = 1 << 16


@dataclass(frozen=True)
class GenerationOptions:
    """Search options of one answer (all greedy: the same prompt gives the same answer)."""

    max_new_tokens: int = 128
    """Stop after this many tokens if the model has not ended its turn."""
    repetition_penalty: float = 1.1
    """>= 1; 1 switches it off."""
    no_repeat_ngram_size: int = 4
    """No n-gram of this size occurs twice in the sequence; 0 switches it off."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 1 << 15:
            raise ValueError(f"max-new-tokens {self.max_new_tokens} must be in [1, 32768]")
        if not (math.isfinite(self.repetition_penalty) and 1.0 <= self.repetition_penalty <= 10.0):
            raise ValueError(f"repetition-penalty {self.repetition_penalty} must be in [1, 10]")
        if not 0 <= self.no_repeat_ngram_size <= 64:
            raise ValueError(f"no-repeat-ngram {self.no_repeat_ngram_size} must be in [0, 64]")

    def search_options(self, prompt_tokens: int) -> dict[str, Any]:
        """Return the keyword arguments of ``og.GeneratorParams.set_search_options`` for a prompt."""
        return {
            "max_length": prompt_tokens + self.max_new_tokens,
            "do_sample": False,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }


def model_defaults(folder: str | Path, base: GenerationOptions | None = None) -> GenerationOptions:
    """Return ``base`` (or the defaults) with what the model's ``generation_config.json`` sets, if valid.

    The file comes from the signed base release; still, a value of the wrong type or out of
    range is ignored with a warning, never trusted.
    """
    options = base or GenerationOptions()
    path = Path(folder) / GENERATION_CONFIG
    try:
        config = json.loads(read_bounded(path, MAX_CONFIG_BYTES).decode("utf-8"))
    except FileNotFoundError:
        return options
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return options
    if not isinstance(config, dict):
        return options
    changes: dict[str, Any] = {}
    penalty, ngram = config.get("repetition_penalty"), config.get("no_repeat_ngram_size")
    if isinstance(penalty, int | float) and not isinstance(penalty, bool):
        changes["repetition_penalty"] = float(penalty)
    if isinstance(ngram, int) and not isinstance(ngram, bool):
        changes["no_repeat_ngram_size"] = ngram
    try:
        return replace(options, **changes)
    except ValueError as exc:
        log.warning("ignoring the generation settings of %s: %s", path, exc)
        return options

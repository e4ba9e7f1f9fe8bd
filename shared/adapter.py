"""LoRA adapters: building them with peft, their state, and their wire and disk formats.

An adapter's state is a ``dict[str, Tensor]`` keyed exactly as in PEFT's
``adapter_model.safetensors`` (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``),
so what travels, what the server averages and what lands on disk use one naming.

How they travel is ``shared/wire.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from shared.adapter_files import ADAPTER_CONFIG as ADAPTER_CONFIG  # PEFT's file names (one place, torch-free)
from shared.adapter_files import ADAPTER_WEIGHTS as ADAPTER_WEIGHTS
from shared.config import LoraConfig
from shared.int4_layer import Int4Linear, register_with_peft

State = dict[str, torch.Tensor]
_PEFT_NOISE = (
    r"Unsupported layer type .*Int4Linear",  # peft's warning for any custom layer, though it dispatches ours itself
    r"`is_gradient_checkpointing` is deprecated",  # peft reads transformers' deprecated alias
)


def attach_lora(model: Any, cfg: LoraConfig, seed: int, rank: int | None = None) -> Any:
    """Wrap a base model with a fresh LoRA adapter (A ~ Kaiming-uniform from ``seed``, B = 0).

    Every party that calls this with the same base, config and seed gets the same initial
    adapter, bit for bit. ``rank``: a device's own rank below ``cfg.rank`` (``shared/ranks.py``),
    at the run's scale alpha / r (PEFT's ``lora_alpha`` = alpha * rank / r).
    """
    rank = cfg.rank if rank is None else rank
    narrowest = _narrowest(model, cfg.target_modules)
    if narrowest is not None and rank > narrowest[1]:  # B·A of such a layer cannot have that rank: memory for nothing
        raise ValueError(
            f"lora rank {rank} is more than {narrowest[0]} is wide ({narrowest[1]}): refused before the adapter is "
            f"allocated; a rank of at most {narrowest[1]} fits every targeted layer"
        )
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=rank,
        lora_alpha=cfg.alpha * rank / cfg.rank if rank != cfg.rank else cfg.alpha,  # type: ignore[arg-type]
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if any(isinstance(m, Int4Linear) for m in model.modules()):
        register_with_peft(peft_cfg)  # LoRA on the frozen 4-bit layers, as on nn.Linear
    with torch.random.fork_rng(), warnings.catch_warnings():
        for message in _PEFT_NOISE:  # operators read these as faults; neither is one
            warnings.filterwarnings("ignore", message=message)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_cfg)
    return peft_model


def _narrowest(model: Any, targets: Sequence[str]) -> tuple[str, int] | None:
    """Return the targeted layer with the smallest min(in, out) features, and that width (None: none found)."""
    widths = [
        (name, min(m.in_features, m.out_features))
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and isinstance(getattr(m, "in_features", None), int)
    ]
    return min(widths, key=lambda w: w[1]) if widths else None


def causal_lm(model: Any) -> Any:
    """Return the transformers model under a peft wrapper (or ``model`` itself, if it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_state(peft_model: Any) -> State:
    """Return the adapter's tensors in fp32, keyed as in PEFT's saved files."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to(torch.float32).clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the adapter's tensors with ``state``; every key must match (no silent partial load).

    Raises
    ------
    ValueError
        Naming missing or unexpected keys, or the first shape mismatch.
    """
    from peft import set_peft_model_state_dict

    expected = adapter_state_shapes(peft_model)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter keys do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"adapter tensor {key} has shape {tuple(state[key].shape)}, model expects {shape}")
    set_peft_model_state_dict(peft_model, dict(state))


def adapter_state_shapes(peft_model: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of the adapter's tensors, keyed as in :func:`adapter_state`."""
    from peft import get_peft_model_state_dict

    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}


def uploaded_keys(method: str, keys: Iterable[str]) -> set[str]:
    """Keys a client uploads under aggregation ``method``: FFA-LoRA trains and sends B only."""
    return {k for k in keys if method != "ffa" or k.endswith(".lora_B.weight")}


def set_trainable_factors(peft_model: Any, method: str) -> None:
    """Train A and B, or only B under FFA-LoRA (A stays at the shared seed's initialization)."""
    for name, param in peft_model.named_parameters():
        if "lora_A" in name:
            param.requires_grad = method != "ffa"
        elif "lora_B" in name:
            param.requires_grad = True


def adapter_config_bytes(peft_model: Any, base: str) -> bytes:
    """PEFT's ``adapter_config.json`` for this adapter, as ``save_pretrained`` writes it."""
    import tempfile

    cfg = peft_model.peft_config["default"]
    cfg.base_model_name_or_path = base
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        return (Path(tmp) / ADAPTER_CONFIG).read_bytes()


def save_peft_folder(peft_model: Any, state: Mapping[str, torch.Tensor], folder: str | Path, base: str) -> Path:
    """Write ``state`` as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``base`` is recorded as ``base_model_name_or_path`` so ``PeftModel.from_pretrained`` users
    know which base it belongs to.
    """
    load_adapter_state(peft_model, state)
    peft_model.peft_config["default"].base_model_name_or_path = base
    folder = Path(folder)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder

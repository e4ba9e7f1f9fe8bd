"""Flower ClientApp: one edge device. Thin glue over ``client/train.py``.

Each message carries the global adapter; the device loads it on its cached base, then
either trains and replies with the adapter *delta* (``aggregation.delta-encoding``) and its metrics, or evaluates
it on its held-out file. The base model never travels in a round message.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.partition import Partition, partition_for
from client.train import evaluate, train_adapter
from shared.adapter import adapter_state, attach_lora, load_adapter_state, set_trainable_factors, uploaded_keys
from shared.config import FleetConfig, LoraConfig
from shared.data import Encoded, encode, load_jsonl
from shared.model import compute_dtype, load_model, load_tokenizer
from shared.wire import from_wire, pack

app = ClientApp()
INFO = 20


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on local data; reply with the delta only."""
    cfg = FleetConfig.from_run_config(context.run_config)
    part = partition_for(context.node_config, cfg)
    server_round = msg.content["config"]["server-round"]
    if not isinstance(server_round, int):
        raise TypeError(f"train message carries server-round {server_round!r}, expected an integer")
    model, tok = _runtime(cfg.model, cfg.lora, cfg.seed, cfg.train.dtype)
    start = from_wire(msg.content["arrays"])
    load_adapter_state(model, start)
    set_trainable_factors(model, cfg.aggregation.method)
    data = _encoded(part.train_file, cfg.model, cfg.train.max_seq_len)
    seed = zlib.crc32(f"{cfg.seed}/{server_round}/{part.name}".encode())  # stable across processes
    result = train_adapter(model, data, cfg.train, tok.pad_token_id, seed)
    trained = adapter_state(model)
    delta = {k: trained[k] - start[k] for k in uploaded_keys(cfg.aggregation.method, trained)}
    log(
        INFO,
        "client %s round %d: %d steps, train loss %.4f, %.1f s",
        part.name,
        server_round,
        result.steps,
        result.mean_loss,
        result.seconds,
    )
    metrics = MetricRecord({"num-examples": len(data), "train-loss": result.mean_loss, "train-seconds": result.seconds})
    return _reply(msg, part, metrics, arrays=pack(delta, cfg.aggregation.delta_encoding))


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the received global adapter on the local held-out file."""
    cfg = FleetConfig.from_run_config(context.run_config)
    part = partition_for(context.node_config, cfg)
    model, tok = _runtime(cfg.model, cfg.lora, cfg.seed, cfg.train.dtype)
    load_adapter_state(model, from_wire(msg.content["arrays"]))
    data = _encoded(part.heldout_file, cfg.model, cfg.train.max_seq_len)
    result = evaluate(model, data, cfg.eval, tok.pad_token_id)
    metrics = MetricRecord(
        {"num-examples": result.examples, "heldout-loss": result.loss, "heldout-tokens": result.tokens}
    )
    return _reply(msg, part, metrics)


def _reply(msg: Message, part: Partition, metrics: MetricRecord, arrays: Any = None) -> Message:
    content = RecordDict({"metrics": metrics, "client": ConfigRecord({"name": part.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, reply_to=msg)


@functools.lru_cache(maxsize=1)
def _runtime(model_spec: str, lora: LoraConfig, seed: int, dtype: str) -> tuple[Any, Any]:
    """Return the base model with a LoRA adapter attached, kept for the life of the process."""
    model = attach_lora(load_model(model_spec, compute_dtype(dtype)), lora, seed)
    return model, _tokenizer(model_spec)


@functools.lru_cache(maxsize=1)
def _tokenizer(model_spec: str) -> Any:
    return load_tokenizer(model_spec)


@functools.lru_cache(maxsize=8)
def _encoded(path: Any, model_spec: str, max_len: int) -> list[Encoded]:
    tok = _tokenizer(model_spec)
    return [encode(ex, tok, max_len) for ex in load_jsonl(path)]

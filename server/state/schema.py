"""The state store's tables (SQLAlchemy Core); ``migrations/`` creates and evolves them.

One row per run, per round of a run, and per client of a round::

    runs            run_id | name, model, method, base digest, config (JSON), started, finished, DP facts, ...
    rounds          (run_id, round) | started, closed, seconds, losses, bytes, signed release, DP facts
    client_results  (run_id, round, client) | name, node id, status, reason, examples, losses, bytes, ...

A client result is keyed by the client's Flower node id (decimal text; rows recorded before 0003
by the name the client reported); ``name`` is that self-reported name, display text only, so a
client reporting another's name gets a row of its own instead of overwriting the other's.
Times are Unix seconds (float). A client result's ``status`` is one of :data:`STATUSES`.
Round counts (participants, accepted, rejected) are derived from the client rows when read,
so they can never disagree with them. The ``dp_*`` columns (0004) hold the differential-privacy
facts of a run and of each round that released under DP (NULL otherwise; ``rows.py`` names their
bounds); they are prefixed because a bare ``delta`` here would read as an adapter update. The ``secure_*``
columns (0005) hold what a round aggregated with SecAgg+ records (NULL for other rounds).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

STATUSES = ("accepted", "rejected", "refused", "evaluated")
"""``accepted``: its update counted in the aggregate; ``rejected``: the server refused its update
(``reason``); ``refused``: the device refused the signed release (``reason``); ``evaluated``:
it only reported a held-out loss (round 0, or a round that kept the previous adapter)."""

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("name", String, nullable=False),
    Column("model", String),
    Column("method", String),
    Column("base_digest", String),
    Column("base_format", String),
    Column("num_rounds", Integer),
    Column("min_clients", Integer),
    Column("releases", String),  # folder of the run's signed releases
    Column("config", JSON, nullable=False),  # the whole run config
    Column("started", Float, nullable=False),
    Column("finished", Float),
    Column("wall_seconds", Float),
    Column("adapter", String),  # the final adapter's PEFT folder
    Column("heard", Float),  # the coordinator's last heartbeat (server/state/heartbeat.py); NULL before 0002
    Column("dp_delta", Float),  # the δ every round's ε is stated at; the dp_* columns are NULL without DP (0004)
    Column("dp_max_epsilon", Float),  # the run stops before its ε would exceed this; NULL or 0 = no limit
    Column("dp_noise_multiplier", Float),  # z, C, q as the run fixed them when it started (each round has them too)
    Column("dp_clip_norm", Float),
    Column("dp_sampling_rate", Float),
    Column("dp_clipping", String),  # "server" (clipped on receipt) or "client" (clipped on the device)
    Column("dp_population", Integer),  # the devices the sampling rate q was computed over
)

rounds = Table(
    "rounds",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("method", String),
    Column("started", Float, nullable=False),
    Column("closed", Float),  # set when the round's evaluation is in
    Column("seconds", Float),
    Column("mean_train_loss", Float),
    Column("mean_heldout_loss", Float),
    Column("bytes_up", BigInteger),
    Column("bytes_down", BigInteger),
    Column("manifest_digest", String),  # SHA-256 of the signed manifest the round ended with
    Column("key_id", String),
    Column("signed_at", String),  # the manifest's creation time (UTC, ISO 8601)
    Column("release_path", String),  # the release folder (files, manifest.json, manifest.sig)
    Column("dp_epsilon", Float),  # the ε spent so far (after this round, at dp_delta); NULL: no DP release (0004)
    Column("dp_delta", Float),
    Column("dp_noise_multiplier", Float),  # z: the noise std on the mean is z * C / m
    Column("dp_clip_norm", Float),  # C: the L2 bound of every contribution
    Column("dp_clipped_fraction", Float),  # of this round's accepted updates, the share whose norm exceeded C
    Column("dp_sampling_rate", Float),  # q: each connected device's chance to be sampled
    Column("dp_expected_clients", Float),  # m = q * N, the fixed denominator of the mean
    Column("dp_clipping", String),
    Column("secure_survivors", Integer),  # devices whose masked vectors are in the sum; NULL: not secure (0005)
    Column("secure_recovered", Integer),  # dropped after sharing keys, masks removed through the survivors' shares
    Column("secure_dropped", Integer),  # out of the protocol in all (no answer, an error, a reply that did not parse)
    Column("secure_shares", Integer),  # SecAgg+ share count and reconstruction threshold the round ran with
    Column("secure_threshold", Integer),
    Column("secure_clip_range", Float),  # every delta entry was clipped to [-c, c] before quantization
    Column("secure_enrolled", Integer),  # survivors that announced an enrolled identity (0007)
    ForeignKeyConstraint(["run_id"], ["runs.run_id"], ondelete="CASCADE"),
)

client_results = Table(
    "client_results",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("client", String, primary_key=True),  # the node id (decimal); before 0003 the reported name
    Column("node_id", String),  # Flower node ids are unsigned 64-bit: kept as text
    Column("name", String, nullable=False),  # the name the client reported: display text only (0003)
    Column("status", String, nullable=False),
    Column("reason", Text),
    Column("num_examples", Integer),
    Column("train_loss", Float),
    Column("heldout_loss", Float),
    Column("train_seconds", Float),
    Column("update_norm", Float),
    Column("bytes_up", BigInteger),
    Column("bytes_down", BigInteger),
    Column("base_download_bytes", BigInteger),
    Column("lora_rank", Integer),  # the rank the device trained at, when below the run's lora.rank (0005)
    Column("staleness", Integer),  # async: releases signed since the one the update trained on (0006)
    Column("release_round", Integer),  # async: the release the update trained on (0006)
    Column("contributions", Integer),  # async: the device's accepted updates in the run so far (0006)
    Column("memory_budget_mb", Integer),  # a budget device: its node config memory-budget-mb (0006)
    Column("micro_batch_size", Integer),  # ... and what it chose: micro-batch (0: whole batch) (0006)
    Column("gradient_checkpointing", Integer),  # ... and checkpointing, 0 / 1 (0006)
    ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"], ondelete="CASCADE"),
)

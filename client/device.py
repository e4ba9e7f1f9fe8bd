"""What a device decides alone: whom it trusts, where it keeps its state, whether it runs an unverified base.

None of it comes from the run config: whoever submits a run writes that, so a run config that
could name the trust list or switch verification off would let any submitter load any adapter
on every device. The settings come from the device's own node config (``flower-supernode
--node-config``), else from the environment of whoever starts the SuperNode or the simulation:

==================  ==============================  ======================================================
setting             node config                     else
==================  ==============================  ======================================================
trust list          ``trust-file``                  ``$FLEETLORA_TRUST_FILE``, else ``<cache>/trust.pub``;
                                                    none: every release is refused
float base          ``allow-float-base = true``     ``$FLEETLORA_ALLOW_FLOAT_BASE=1``; else a run with
                                                    ``base.format = "float"`` is refused
replay store        ``state-dir``                   ``<cache>/devices/<name>/``
release cache       ``cache-dir``                   ``<cache>/releases/``
artifact TLS        ``ca-file``                     plaintext (a simulation on loopback)
privacy floor       ``require-record-dp``,          none: the run config decides (:class:`PrivacyFloor`)
                    ``min-noise-multiplier``,
                    ``max-epsilon``,
                    ``require-secure-aggregation``
work ceiling        ``max-train-steps``             the run's ``train.steps``, at most 100,000
                                                    (:func:`check_train_steps`)
SecAgg+ identity    ``secagg-identity-key``,        ``$FLEETLORA_SECAGG_ENROLMENT_DIR``: the three files
                    ``secagg-enrolment``            of this device there (:func:`secagg_enrolment`); none:
enrolled neighbours ``secagg-enrolment-trust``      its keys go unsigned, its shares to any neighbour the
                                                    coordinator names
sum floor           ``secagg-min-threshold``        the round's SecAgg+ threshold (``client/secagg.py``)
app pin             ``app-pins``                    read before the app loads, by ``client/app_pin.py``
                                                    (the SuperNode's ``flwr-clientapp``), not by this code
==================  ==============================  ======================================================

``<cache>`` is ``shared.model.cache_dir()`` (``$FLEETLORA_CACHE``, else ``~/.cache/fleetlora``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from client.channel import ChannelConfigError, node_credentials
from shared.config import MAX_TRAIN_STEPS
from shared.enrolment import Identity, load_identity
from shared.errors import ReleaseError
from shared.model import cache_dir
from shared.replay import STATE_FILE
from shared.sign import TrustList

TRUST_ENV = "FLEETLORA_TRUST_FILE"
FLOAT_BASE_ENV = "FLEETLORA_ALLOW_FLOAT_BASE"
DEFAULT_TRUST_FILE = "trust.pub"
PINNED_ENV = "FLEETLORA_APP_PINNED"  # set to "1" by client/app_pin.py in the ClientApp processes it starts
ENROLMENT_DIR_ENV = "FLEETLORA_SECAGG_ENROLMENT_DIR"
ENROLMENT_TRUST_FILE = "trust.pub"  # in $FLEETLORA_SECAGG_ENROLMENT_DIR: the enrolment authorities, one list
STEPS_KEY = "max-train-steps"  # node config: the most local steps a round may ask of this device
_YES, _NO = ("1", "true", "yes"), ("", "0", "false", "no")


class DeviceConfigError(ReleaseError):
    """The device's own settings do not allow what the run asks for; the message says which setting to change."""


def trust_file(node_config: Mapping[str, Any]) -> Path:
    """Return the device's trust list: node config ``trust-file``, else ``$FLEETLORA_TRUST_FILE``, else the cache's.

    Raises
    ------
    DeviceConfigError
        The device has none: it then refuses every release.
    """
    if "trust-file" in node_config:
        return Path(str(node_config["trust-file"])).expanduser()
    if os.environ.get(TRUST_ENV):
        return Path(os.environ[TRUST_ENV]).expanduser()
    default = cache_dir() / DEFAULT_TRUST_FILE
    if default.is_file():
        return default
    raise DeviceConfigError(
        f"this device has no trust list, so it refuses every release: give its SuperNode node config "
        f"trust-file=..., or set {TRUST_ENV} where it is started, or put the list at {default} "
        f"(a run config's signing.trust-file is never used by a device: whoever submits the run writes it)"
    )


def load_trust(node_config: Mapping[str, Any]) -> TrustList:
    """Load the device's trust list (:func:`trust_file`)."""
    return TrustList.load(trust_file(node_config))


def secagg_enrolment(node_config: Mapping[str, Any]) -> tuple[Identity | None, TrustList | None]:
    """Return the device's SecAgg+ identity and the enrolment authorities it trusts (``shared/enrolment.py``).

    ``secagg-identity-key`` (its Ed25519 key) and ``secagg-enrolment`` (the authority's signature over
    it, ``fleetlora keys enrol``) sign its keys; ``secagg-enrolment-trust`` (a trust list of
    authorities) makes it share only with neighbours whose keys an identity they enrolled signed, and
    reveal only what their signed survivor lists corroborate. All three or none.

    With none of them, ``$FLEETLORA_SECAGG_ENROLMENT_DIR`` (set by whoever starts the SuperNode or
    the simulation) names a folder of enrolments: ``trust.pub`` and the device's ``<device>.key``
    and ``<device>.enrolment``, ``<device>`` its node config ``name``, in a simulation
    ``partition-<partition-id>`` (:func:`enrolment_files`).

    Raises
    ------
    DeviceConfigError
        Some of the three settings without the others, or a file that does not load.
    """
    key, enrolment, trust = (node_config.get(k) for k in ("secagg-identity-key", "secagg-enrolment",
                                                          "secagg-enrolment-trust"))  # fmt: skip
    folder, where = os.environ.get(ENROLMENT_DIR_ENV), ""
    if key is None and enrolment is None and trust is None and folder:
        name = _enrolled_name(node_config)
        key, enrolment, trust = enrolment_files(Path(folder), name)
        where = f" ({ENROLMENT_DIR_ENV}={folder}, device {name}: {key.name}, {enrolment.name} and {trust.name} there)"
    if len({key is None, enrolment is None, trust is None}) > 1:
        raise DeviceConfigError(
            "secagg-identity-key, secagg-enrolment and secagg-enrolment-trust are set together: a device that signs "
            "its keys also checks its neighbours' (one that signed without checking could be made to reveal what "
            "opens an enrolled neighbour's vector)"
        )
    try:
        identity = None if key is None else load_identity(_path(key), _path(enrolment))
        trusted = None if trust is None else TrustList.load(_path(trust))
    except (OSError, ValueError) as exc:
        raise DeviceConfigError(f"this device's SecAgg+ enrolment does not load{where}: {exc}") from None
    if trusted is not None and set(trusted.trusted) & set(_release_keys(node_config)):
        raise DeviceConfigError(
            "secagg-enrolment-trust lists a key of this device's release trust list: that key is the coordinator's, "
            "and an enrolment authority the coordinator holds can enrol devices of its own (SecAgg+ then protects "
            "nothing from it); trust the authority that admits devices to the fleet instead"
        )
    return identity, trusted


def check_app_pinned(node_config: Mapping[str, Any]) -> None:
    """Refuse to run when the node config names ``app-pins`` or ``app-trust`` but the pin did not start this process.

    Only the fleet's own app makes this check (another app would not): it catches a SuperNode started
    without the pin's ``flwr-clientapp`` first on its PATH, which runs whatever app it is sent.

    Raises
    ------
    DeviceConfigError
        ``app-pins`` or ``app-trust`` is set and ``client/app_pin.py`` did not start this ClientApp.
    """
    named = [k for k in ("app-pins", "app-trust") if k in node_config]
    if named and os.environ.get(PINNED_ENV) != "1":
        raise DeviceConfigError(
            f"this device's node config names {named[0]}, but its ClientApp was not started by the pin: start the "
            "SuperNode with `fleetlora device -- <flower-supernode arguments>`, which puts the pin's flwr-clientapp "
            "first on its PATH; without it the SuperNode runs any app it is sent"
        )


def enrolment_files(folder: Path, device: str) -> tuple[Path, Path, Path]:
    """Return a device's identity key, its enrolment and the authorities' trust list in an enrolment folder."""
    return folder / f"{device}.key", folder / f"{device}.enrolment", folder / ENROLMENT_TRUST_FILE


def _enrolled_name(node_config: Mapping[str, Any]) -> str:
    """Return the name a device's files have in ``$FLEETLORA_SECAGG_ENROLMENT_DIR``."""
    if "name" in node_config:
        name = str(node_config["name"])
    elif "partition-id" in node_config:
        name = f"partition-{node_config['partition-id']}"
    else:
        raise DeviceConfigError(f"{ENROLMENT_DIR_ENV} is set but this device's node config has no name")
    if not name or "/" in name or name.startswith("."):
        raise DeviceConfigError(f"node config name {name!r:.60} cannot name files in {ENROLMENT_DIR_ENV}")
    return name


def _release_keys(node_config: Mapping[str, Any]) -> dict[str, bytes]:
    """Return the coordinator's signing keys this device trusts (none if it has no trust list yet)."""
    try:
        return load_trust(node_config).trusted
    except (OSError, ValueError):  # DeviceConfigError is a ValueError: no list at all
        return {}


def _path(value: Any) -> Path:
    return Path(str(value)).expanduser()


def check_base_format(base_format: str, node_config: Mapping[str, Any]) -> None:
    """Refuse ``base.format = "float"`` (no signed, verified base) unless the device itself opted in.

    Raises
    ------
    DeviceConfigError
        The run asks for a float base and the device did not opt in.
    """
    if base_format != "float":
        return
    setting = node_config.get("allow-float-base", os.environ.get(FLOAT_BASE_ENV, ""))
    if _flag(setting, "allow-float-base"):
        return
    raise DeviceConfigError(
        "the run asks for base.format=float (each device loads the model itself, with no signed base to verify); "
        f"this device accepts only a signed base: opt in with its node config allow-float-base=true or "
        f"{FLOAT_BASE_ENV}=1 where it is started"
    )


def state_file(node_config: Mapping[str, Any], name: str) -> Path:
    """Return the device's replay store: ``<state-dir>/accepted.json``, by default under the cache, per device."""
    folder = node_config.get("state-dir", cache_dir() / "devices" / name)
    return Path(str(folder)).expanduser() / STATE_FILE


def release_cache(node_config: Mapping[str, Any]) -> Path:
    """Return where the device caches fetched releases (node config ``cache-dir``)."""
    return Path(str(node_config.get("cache-dir", cache_dir() / "releases"))).expanduser()


def channel_credentials(node_config: Mapping[str, Any]) -> grpc.ChannelCredentials | None:
    """Mutual TLS to the artifact service from the node config (``ca-file``, ``cert-file``, ``key-file``), else none.

    Raises
    ------
    DeviceConfigError
        The node config names some of the three files but not all, or one cannot be used.
    """
    try:
        return node_credentials(node_config)
    except ChannelConfigError as exc:
        raise DeviceConfigError(str(exc)) from None


@dataclass(frozen=True)
class PrivacyFloor:
    """What this device requires of a round before its data trains anything; a run config cannot lower it.

    Record-level DP (``dp.level = record``) and secure aggregation are what a device can enforce
    itself: the noise is added here, the masks are made here. Client-level DP's noise is added by
    the coordinator, which the device cannot check, so it does not count for ``require-record-dp``.
    """

    record_dp: bool = False
    """``require-record-dp``: train only under record-level DP-SGD."""
    min_noise_multiplier: float = 0.0
    """``min-noise-multiplier``: under record-level DP, refuse a round whose ``dp.noise-multiplier`` is lower."""
    max_epsilon: float | None = None
    """``max-epsilon``: this device's own cap on its record-level epsilon (its ledger), whatever ``dp.max-epsilon``."""
    secure: bool = False
    """``require-secure-aggregation``: train only in SecAgg+ rounds (the coordinator sees only the sum)."""
    delta: float = 1e-5
    """``dp-delta``: the delta this device accounts its record-level epsilon at, and checks ``max-epsilon`` at
    (a run's smaller ``dp.delta`` instead): at the run's own delta, a run with ``dp.delta`` 0.5 read the same
    steps as epsilon 0.07 where they were 4.6 at 1e-5, and trained 20x the steps under the device's cap."""

    def check(self, record_dp: bool, noise_multiplier: float, secure: bool) -> None:
        """Refuse a round that asks less than this floor (the message names the setting).

        Raises
        ------
        DeviceConfigError
            The round's privacy is below what this device's node config requires.
        """
        if self.record_dp and not record_dp:
            raise DeviceConfigError("this device trains only under record-level DP (node config require-record-dp)")
        if record_dp and noise_multiplier < self.min_noise_multiplier:
            raise DeviceConfigError(
                f"the run's dp.noise-multiplier {noise_multiplier:g} is below this device's min-noise-multiplier "
                f"{self.min_noise_multiplier:g}"
            )
        if self.secure and not secure:
            raise DeviceConfigError("this device trains only in secure rounds (node config require-secure-aggregation)")

    def accounting_delta(self, run_delta: float) -> float:
        """Return the delta record-level epsilon is accounted at: the lower of the run's and this device's."""
        return min(run_delta, self.delta)

    def epsilon_cap(self, run_cap: float | None) -> float | None:
        """Return the record-level epsilon cap: the lower of the run's and this device's (None: neither)."""
        caps = [c for c in (run_cap, self.max_epsilon) if c]
        return min(caps) if caps else None


def privacy_floor(node_config: Mapping[str, Any]) -> PrivacyFloor:
    """Parse this device's :class:`PrivacyFloor` from its node config (none set: no floor).

    Raises
    ------
    DeviceConfigError
        A setting that is not a boolean, or not a positive finite number.
    """
    numbers = {}
    for key in ("min-noise-multiplier", "max-epsilon"):
        value = node_config.get(key)
        if value is not None and (type(value) not in (int, float) or not 0 < value < math.inf):
            raise DeviceConfigError(f"device setting {key} = {value!r:.40} is not a positive number")
        numbers[key] = None if value is None else float(value)
    delta = node_config.get("dp-delta", PrivacyFloor.delta)
    if type(delta) not in (int, float) or not 0 < delta < 1:
        raise DeviceConfigError(f"device setting dp-delta = {delta!r:.40} is not a number in (0, 1)")
    return PrivacyFloor(
        record_dp=_flag(node_config.get("require-record-dp", False), "require-record-dp"),
        min_noise_multiplier=numbers["min-noise-multiplier"] or 0.0,
        max_epsilon=numbers["max-epsilon"],
        secure=_flag(node_config.get("require-secure-aggregation", False), "require-secure-aggregation"),
        delta=float(delta),
    )


def node_integer(node_config: Mapping[str, Any], key: str, high: int, digits: int, what: str) -> int | None:
    """Return the node config's ``key`` as an integer in [1, ``high``], None when it is not set.

    ``flower-supernode --node-config`` may pass a number as text: ASCII digits, at most ``digits``
    of them, are read as one. ``what`` names the range in the refusal.

    Raises
    ------
    DeviceConfigError
        Anything else: ``device setting <key> = <value> must be <what>``.
    """
    if key not in node_config:
        return None
    value = node_config[key]
    text = value.strip() if isinstance(value, str) else ""
    if 0 < len(text) <= digits and text.isascii() and text.isdigit():
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise DeviceConfigError(f"device setting {key} = {value!r:.40} must be {what}")
    return value


def check_train_steps(node_config: Mapping[str, Any], steps: int) -> None:
    """Refuse a round that asks more local steps than this device's ``max-train-steps`` (none set: no ceiling).

    A run may ask up to ``MAX_TRAIN_STEPS`` (100,000) steps a round, hours of a small device's CPU
    or battery; a device that pays for its own compute bounds what one round can cost it.

    Raises
    ------
    DeviceConfigError
        The setting is not an integer in [1, ``MAX_TRAIN_STEPS``], or the round asks more steps.
    """
    value = node_integer(node_config, STEPS_KEY, MAX_TRAIN_STEPS, 6, f"an integer in [1, {MAX_TRAIN_STEPS:,}]")
    if value is not None and steps > value:
        raise DeviceConfigError(
            f"the run asks {steps:,} local steps a round, more than this device's {STEPS_KEY} {value:,}"
        )


def _flag(value: Any, name: str) -> bool:
    text = str(value).strip().lower()
    if text in _YES or text in _NO:
        return text in _YES
    raise DeviceConfigError(f"device setting {name} = {value!r:.40} is not true or false")

"""Which release a device takes from the artifact service: the one asked for, newer than and chained to the one it
accepted (across missed and empty rounds, and far behind), LATEST followed in the service and mirrored in the cache.

The transport (lying sizes, resume, retry) is tests/client/test_fetch.py; the fixtures and the service helpers are its.
"""

import pytest

from client.fetch import FetchError, FetchPolicy, fetch_release
from client.objects import OBJECTS
from server.distribute import ArtifactServicer
from shared.release import follow_latest, make_release, read_release, verify_release, write_release
from shared.replay import AcceptedReleases
from shared.sign import public_line
from tests.client.test_fetch import (  # noqa: F401 - root and base_root are fixtures
    BASE,
    KEY,
    TRUST,
    _serve_base,
    _Started,
    base_root,
    root,
)


def _adapter_rounds(store, rounds):
    previous = ""
    for n in rounds:
        files = {"adapter_model.safetensors": bytes([n]) * 10}
        release, manifest = make_release(
            files, kind="adapter", run_id="r", round=n, base_digest=BASE, method="fedavg", key=KEY, previous=previous
        )
        write_release(release, store / "adapter" / "r" / f"round-{n:04d}")
        previous = manifest.digest()


def test_fleetlora_fetch_keeps_replay_state_across_runs(root, tmp_path, capsys):  # noqa: F811
    from shared.cli import main

    _adapter_rounds(root, (1, 2))
    trust = tmp_path / "trust.pub"
    trust.write_text(public_line(KEY.public_key()) + "\n")
    cache = tmp_path / "cache"
    with _Started(root, ArtifactServicer) as address:
        common = ["--address", address, "--trust", str(trust), "--cache", str(cache)]
        assert main(["fetch", "adapter/r/round-0002", *common]) == 0
        assert main(["fetch", "adapter/r/round-0001", *common]) == 2  # a later run of the command: still refused
        err = capsys.readouterr().err
        assert "replay: round 1 of run r is not newer than the accepted round 2" in err
        (cache / "accepted.json").write_bytes(b"")  # the store damaged (a power loss)
        assert main(["fetch", "adapter/r/round-0002", *common]) == 2
        assert "refuses every release until an operator repairs it" in capsys.readouterr().err
    digests = {p.name for p in cache.iterdir() if p.is_dir() and p.name not in ("adapter", OBJECTS)}
    assert len(digests) == 1  # round 1 was refused before anything of it was downloaded


def _cli(address, trust, cache):
    from shared.cli import main

    return lambda artifact: main(
        ["fetch", artifact, "--address", address, "--trust", str(trust), "--cache", str(cache)]
    )


def test_fleetlora_fetch_follows_the_chain_across_missed_and_empty_rounds(root, tmp_path, capsys):  # noqa: F811
    _adapter_rounds(root, (1, 2, 4))  # round 3 published nothing; the device will miss round 2
    trust = tmp_path / "trust.pub"
    trust.write_text(public_line(KEY.public_key()) + "\n")
    cache = tmp_path / "cache"
    with _Started(root, ArtifactServicer) as address:
        fetch = _cli(address, trust, cache)
        assert fetch("adapter/r/round-0001") == 0
        assert fetch("adapter/r/round-0004") == 0  # round 4: it asked the service for the manifests in between
    assert (cache / "adapter" / "r" / "LATEST").read_text() == "round-0004\n"
    other = tmp_path / "other-store"
    _adapter_rounds(other, (1, 2, 3, 4, 5))  # another history, validly signed
    with _Started(other, ArtifactServicer) as address:
        assert _cli(address, trust, cache)("adapter/r/round-0005") == 2
    assert "chain broken: round 5 of run r does not lead back to the accepted round 4" in capsys.readouterr().err
    assert not (cache / "adapter" / "r" / "round-0005").exists()  # refused before anything was downloaded


def test_a_device_far_behind_catches_up_and_one_too_far_is_refused_with_its_reason(root, tmp_path, monkeypatch):  # noqa: F811
    from client.fetch import fetch_links
    from shared.chain import MAX_LINKS

    rounds = [*range(1, MAX_LINKS + 4), MAX_LINKS + 6]  # one round published nothing
    _adapter_rounds(root, rounds)
    (root / "adapter" / "r" / "LATEST").write_text(f"round-{MAX_LINKS + 6:04d}\n")
    cache, state = tmp_path / "cache", AcceptedReleases(tmp_path / "accepted.json")
    with _Started(root, ArtifactServicer) as address:
        fetch_release(address, "adapter/r/round-0001", cache, TRUST, BASE, accepted=state)  # accepted: round 1
        latest = fetch_release(address, "adapter/r/latest", cache, TRUST, BASE, accepted=state)  # 69 rounds on
        assert latest.manifest.round == MAX_LINKS + 6  # was refused: more than 64 rounds behind, for good
        assert len(fetch_links(address, latest.manifest, 1, TRUST)) == MAX_LINKS + 2
        monkeypatch.setattr("client.fetch.MAX_CATCH_UP", MAX_LINKS)
        with pytest.raises(FetchError, match=r"68 rounds behind, more than the 64 it fetches the chain through"):
            fetch_links(address, latest.manifest, 1, TRUST)


def test_latest_resolves_through_the_latest_file(base_root, tmp_path):  # noqa: F811
    for n in (1, 2):
        release, _ = make_release(
            {"adapter_model.safetensors": bytes([n]) * 10},
            kind="adapter",
            run_id="r",
            round=n,
            base_digest=BASE,
            method="fedavg",
            key=KEY,
        )
        write_release(release, base_root / "adapter" / "r" / f"round-{n:04d}")
    (base_root / "adapter" / "r" / "LATEST").write_text("round-0002\n")
    server, address = _serve_base(base_root)
    cache = tmp_path / "cache"
    try:
        result = fetch_release(address, "adapter/r/latest", cache, TRUST, BASE)
        older = fetch_release(address, "adapter/r/round-0001", cache, TRUST, BASE)
        (base_root / "adapter" / "r" / "LATEST").write_text("../../base\n")  # a pointer out of the run folder
        with pytest.raises(FetchError, match="LATEST names an invalid release"):
            fetch_release(address, "adapter/r/latest", cache, TRUST, BASE, FetchPolicy(retries=0))
    finally:
        server.stop(None)
    assert result.manifest.round == 2
    # the device's cache mirrors the server's run folder: LATEST names the newest round fetched, and
    # fetching an older round afterwards does not move it back
    assert result.run_folder == older.run_folder == cache / "adapter" / "r"
    assert (result.run_folder / "LATEST").read_text() == "round-0002\n"
    newest = read_release(follow_latest(result.run_folder))
    assert newest.files["adapter_model.safetensors"] == bytes([2]) * 10
    assert verify_release(newest, TRUST, BASE).round == 2
    assert read_release(result.run_folder / "round-0001").files["adapter_model.safetensors"] == bytes([1]) * 10


class AnswersWith(ArtifactServicer):
    """A hostile host: whatever is asked, it answers with the signed release named ``answer``."""

    answer = "base"

    async def GetManifest(self, request, context):  # noqa: N802
        request.artifact = self.answer
        return await super().GetManifest(request, context)


@pytest.mark.parametrize(
    ("asked", "answer", "reason"),
    [
        ("adapter/r/latest", "adapter/other/round-0001", "run_id 'other'"),  # another run's release
        ("adapter/r/round-0002", "adapter/r/round-0001", "round 1"),  # an older round of the run asked for
        ("onnx", "base", "run_id 'base'"),  # the 4-bit base where the ONNX base was asked for
        ("base", "adapter/r/round-0001", "kind 'adapter'"),
        ("base", "onnx", "run_id 'onnx'"),  # the ONNX base where the 4-bit base was asked for
    ],
)
def test_a_signed_release_other_than_the_one_asked_for_is_refused(base_root, tmp_path, asked, answer, reason):  # noqa: F811
    _adapter_rounds(base_root, [1, 2])
    release, _ = make_release(
        {"w": b"o"}, kind="adapter", run_id="other", round=1, base_digest=BASE, method="fedavg", key=KEY
    )
    write_release(release, base_root / "adapter" / "other" / "round-0001")
    onnx, _ = make_release({"m": b"o"}, kind="base", run_id="onnx", round=0, base_digest=BASE, method="onnx", key=KEY)
    write_release(onnx, base_root / "onnx")
    AnswersWith.answer = answer
    server, address = _serve_base(base_root, AnswersWith)
    try:
        with pytest.raises(FetchError, match=f"manifest refused: asked for '{asked}', the service sent .*{reason}"):
            fetch_release(address, asked, tmp_path / "cache", TRUST, None, FetchPolicy(retries=0))
    finally:
        server.stop(None)
    assert not any(p.is_dir() for p in (tmp_path / "cache").iterdir())  # nothing downloaded

"""A coordinator telling survivors different stories about who dropped out, scripted against real devices.

9 devices on a ring, 5 shares, threshold 3. The stories (found by search in review): device 0's seed
from the holders told it survived, the private keys of its four neighbours from the holders told
*they* dropped, i.e. every mask of device 0's vector. Without enrolment that opens its delta; enrolled
devices (consistency stage, ``client/secagg._unmask``) refuse, also when the coordinator forwards
survivor lists they signed in an earlier run of the same round.
"""

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from tests.server.secagg.scripted import Coordinator, open_vector, quantized, ring, setup_values
from tests.server.secagg.test_enrolment import enrolled

N, SHARES, THRESHOLD = 9, 5, 3
IDS = [101 + p for p in range(N)]
RING = ring(IDS, SHARES)
STORIES = {0: {0, 1, 2}, 1: {0, 1, 3}, 2: {0, 2, 3}, 3: {3, 4, 5}, 4: {3, 4, 5}, 5: {3, 4, 5}, 6: {4, 5, 6},
           7: {0, 5, 7}, 8: {0, 6, 8}}  # fmt: skip
ALIVE = {IDS[p]: sorted(IDS[q] for q in story) for p, story in STORIES.items()}
DEAD = {n: [o for o in RING[n] if o not in ALIVE[n]] for n in IDS}
X = IDS[0]


def deltas() -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    return {n: {"w": rng.normal(0, 0.05, (4, 8)).astype(np.float32)} for n in IDS}


def reveal(coord, group, stories):
    """Unmask every device with its story and the signed lists ``stories`` (neighbour -> (list, signature))."""
    revealed, refused = {}, {}
    for h in IDS:
        out = coord.unmask(h, ALIVE[h], DEAD[h], {g: stories[g] for g in ALIVE[h] if g != h and g in stories}, group)
        (refused if isinstance(out, Exception) else revealed)[h] = out
    return revealed, refused


def opened(keys, links, masked, revealed):
    """Device X's codes if the revealed shares remove all its masks, else None."""
    seed = [r[X] for h, r in revealed.items() if X in ALIVE[h]]
    keys_of = {}
    for g in links[X]:
        shares = [r[g] for h, r in revealed.items() if g in DEAD[h]]
        if len(shares) < THRESHOLD:
            return None
        keys_of[g] = combine_shares(shares)
    if len(seed) < THRESHOLD:
        return None
    pk1 = {n: keys[n]["pk1"] for n in IDS}
    return open_vector(X, masked[X], seed, keys_of, pk1, links[X])


def test_without_enrolment_different_stories_open_one_devices_delta():
    """The threat, as the README states it."""
    d = deltas()
    coord = Coordinator(IDS, {}, d)
    keys, links, masked = coord.run_to_collect("3", RING, setup_values(N, SHARES, THRESHOLD))
    revealed, refused = reveal(coord, "3", {})
    assert refused == {}
    codes = opened(keys, links, masked, revealed)
    assert codes is not None and int(np.abs(codes - quantized(d[X]["w"])).max()) <= 1  # device 0's delta, opened


def test_enrolled_devices_refuse_different_stories_and_the_delta_stays_closed(tmp_path):
    coord = Coordinator(IDS, dict(zip(IDS, enrolled(tmp_path, N), strict=True)), deltas())
    keys, links, masked = coord.run_to_collect("3", RING, setup_values(N, SHARES, THRESHOLD))
    signed = {n: (ALIVE[n], coord.consistency(n, ALIVE[n], DEAD[n], "3")) for n in IDS}  # each signs its own story
    revealed, refused = reveal(coord, "3", signed)
    assert refused and all("did not sign that it survived" in str(e) for e in refused.values())
    assert opened(keys, links, masked, revealed) is None


def test_lists_signed_in_an_earlier_run_of_the_same_round_do_not_pass(tmp_path):
    """Run 1 honest and complete; run 2 (setup afresh, same group id): different stories, run 1's lists forwarded."""
    coord = Coordinator(IDS, dict(zip(IDS, enrolled(tmp_path, N), strict=True)), deltas())
    coord.run_to_collect("7", RING, setup_values(N, SHARES, THRESHOLD))
    first = {n: (RING[n], coord.consistency(n, RING[n], [], "7")) for n in IDS}
    for h in IDS:  # run 1 was honest: every device reveals
        assert not isinstance(coord.unmask(h, RING[h], [], {g: first[g] for g in RING[h] if g != h}, "7"), Exception)
    keys, links, masked = coord.run_to_collect("7", RING, setup_values(N, SHARES, THRESHOLD))
    for n in IDS:
        coord.consistency(n, ALIVE[n], DEAD[n], "7")
    revealed, refused = reveal(coord, "7", first)
    assert set(refused) == set(IDS)  # run 1's lists were signed for run 1's keys (was: none refused, delta opened)
    assert opened(keys, links, masked, revealed) is None

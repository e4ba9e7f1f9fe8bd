from server.state.values import MAX_NAME, finite, ident, integer, node_id, text, within


def test_numbers_that_are_not_finite_or_not_numbers_read_as_missing():
    assert [finite(v) for v in (1, 2.5, -0.0)] == [1.0, 2.5, -0.0]
    assert [finite(v) for v in (float("inf"), float("-inf"), float("nan"), "2.5", b"1", True, None, 10**400)] == [
        None
    ] * 8


def test_integers_are_bounded_and_whole():
    assert [integer(v) for v in (0, 500, 500.0, 2**63 - 1)] == [0, 500, 500, 2**63 - 1]
    assert [integer(v) for v in (-1, 2**63, 2.5, 1e30, float("inf"), "7", True)] == [None] * 7
    assert integer(2**31, 0, 2**31 - 1) is None


def test_node_ids_are_unsigned_64_bit_and_kept_as_text():
    assert [node_id(v) for v in (0, 2**64 - 1, "17", 5.0)] == ["0", str(2**64 - 1), "17", "5"]
    assert [node_id(v) for v in (-1, 2**64, "1e3", "", "٣", "9" * 21, b"5", None)] == [None] * 8


def test_text_is_cut_and_identifiers_refused_when_too_long():
    assert text("abc") == "abc" and text(b"abc") is None and text(3) is None
    cut = text("n" * 1000, MAX_NAME)
    assert len(cut) == MAX_NAME and cut.endswith("…")
    assert ident("run-1") == "run-1" and ident("") is None and ident("x" * 257) is None


def test_a_range_is_closed_unless_its_low_end_is_open():
    assert [within(v, 0.0, 1.0) for v in (0, 0.5, 1.0)] == [0.0, 0.5, 1.0]
    assert [within(v, 0.0, 1.0) for v in (-1e-300, 1.0000001, float("nan"), "0.5", True)] == [None] * 5
    assert within(0.0, 0.0, open_low=True) is None and within(1e300, 0.0) == 1e300

"""A peer's words on their way into a log line or a terminal: one line, bounded, control characters escaped."""

from shared.text import printable


def test_control_characters_are_escaped_and_the_text_is_cut_first():
    assert printable("ok\nINFO : forged line\r\x1b[2K\u2028end") == "ok\\nINFO : forged line\\r\\x1b[2K\\u2028end"
    assert printable("Größe: 3 ✓") == "Größe: 3 ✓"  # printable text of any script stays as it is
    assert printable("a" * 500, 10) == "a" * 10 and printable("\n" * 500, 10) == "\\n" * 10
    assert printable(b"\x00bytes", 50) == "b'\\x00bytes'"  # any object: its str (already escaped by repr)

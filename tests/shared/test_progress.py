import io

from shared.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_shows_bytes_rate_and_eta_on_a_terminal():
    out = Terminal()
    p = Progress("base/model", 10_000_000, stream=out)
    p.update(5_000_000)
    text = out.getvalue()
    assert "base/model  5.0/10.0 MB" in text and "MB/s" in text and "ETA" in text
    p.update(10_000_000)
    p.close()
    assert out.getvalue().rstrip().endswith("done\x1b[K")


def test_progress_is_silent_in_logs():
    out = io.StringIO()  # not a TTY
    p = Progress("base/model", 100, stream=out)
    p.update(50)
    p.close()
    assert out.getvalue() == ""

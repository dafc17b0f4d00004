"""Progress bars refresh rarely when written to a log file, normally on a terminal."""
import io

from pedenet.progress import LOG_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_file_gets_few_refreshes():
    log = io.StringIO()
    bar = progress_bar(range(1000), file=log, desc="work")
    assert bar.mininterval == LOG_INTERVAL_S
    assert sum(1 for _ in bar) == 1000
    # the first draw and the final one only: no carriage-return line per update
    assert log.getvalue().count("\r") <= 3
    assert "1000/1000" in log.getvalue()


def test_terminal_keeps_tqdm_default_and_explicit_interval_wins():
    assert progress_bar(range(3), file=_Terminal()).mininterval == 0.1
    assert progress_bar(range(3), file=io.StringIO(), mininterval=2.0).mininterval == 2.0

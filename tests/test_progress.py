"""compiler/progress.py: a tqdm bar on a terminal, a log line per quarter otherwise, nothing when disabled; the items
pass through unchanged either way."""

import io
import logging

import pytest

from vitc.compiler.progress import progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Records(logging.Handler):
    """Collects the progress logger's records directly (the CLI's logging setup may stop propagation to caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("enabled", [True, False])
def test_not_a_terminal_logs_quarters(monkeypatch, enabled):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    logger = logging.getLogger("vitc.progress")
    rec = Records()
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(rec)
    try:
        assert list(progress(iter(range(8)), 8, "work", enabled)) == list(range(8))
    finally:
        logger.removeHandler(rec)
    lines = [r.getMessage() for r in rec.records]
    assert [ln.split(" (")[0] for ln in lines] == (["work: 2/8", "work: 4/8", "work: 6/8", "work: 8/8"] if enabled
                                                  else [])
    assert "%|" not in err.getvalue()  # no tqdm bar (a vitc log handler may echo the lines themselves)


def test_terminal_gets_a_bar_and_no_log(monkeypatch, caplog):
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    with caplog.at_level(logging.INFO, logger="vitc.progress"):
        assert list(progress(["a", "b", "c"], 3, "calibration")) == ["a", "b", "c"]
    assert "calibration" in tty.getvalue() and "3/3" in tty.getvalue() and not caplog.records


def test_disabled_on_a_terminal_is_silent(monkeypatch):
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    assert list(progress(range(3), None, "x", enabled=False)) == [0, 1, 2]
    assert tty.getvalue() == ""

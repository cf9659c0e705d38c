"""The progress bar is drawn only when a person watches: both stdout and stderr are terminals."""

import io
import sys

import pytest

from vtprune import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("out_tty, err_tty, shown", [(True, True, True), (False, True, False),
                                                      (True, False, False), (False, False, False)])
def test_bar_only_when_both_streams_are_terminals(monkeypatch, out_tty, err_tty, shown):
    monkeypatch.setattr(sys, "stdout", _Tty() if out_tty else io.StringIO())
    monkeypatch.setattr(sys, "stderr", _Tty() if err_tty else io.StringIO())
    bar = progress.progress_bar(3, "x", "step")
    assert (bar is not None) == shown
    if bar is not None:
        bar.close()
    assert progress.progress_bar(3, "x", "step", enabled=False) is None

"""Helpers for tests that drive the ``cplfast`` command line in-process."""

from __future__ import annotations

from cplfast.cli import main


def run_cli(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``cplfast ARGV...``."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err):
    """The command failed with exactly one line on stderr and no traceback; returns that line."""
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]

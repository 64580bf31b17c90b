"""Logging: every line on stderr is a JSON event, Python warnings included, and secret-looking text is redacted."""

from __future__ import annotations

import io
import json
import select
import subprocess
import sys
import warnings

from agent import log
from tests.support import ROOT, cli_env


class TestLog:
    def test_python_warnings_become_json_events(self):
        """A library warning (cryptography warns about odd certificates) is a log event, not stray stderr text."""
        buf = io.StringIO()
        old = warnings.showwarning
        try:
            log.configure(stream=buf)
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("Parsed a negative serial number", UserWarning, stacklevel=1)
        finally:
            warnings.showwarning = old
        event = json.loads(buf.getvalue().strip().splitlines()[-1])
        assert event["event"] == "python_warning" and "negative serial" in event["message"]

    def test_error_line_goes_to_the_stderr_of_the_moment(self):
        """The `error:` line of a command run in a process whose log was set up on another stream (a caller that
        swapped sys.stderr, as tests and embedding tools do) is printed on the stderr of the moment, not lost in
        the old stream."""
        import contextlib

        from agent import cli

        old, now = io.StringIO(), io.StringIO()
        log.configure(stream=old)
        with contextlib.redirect_stderr(now):
            assert cli.main(["check", "/nonexistent-dir-for-this-test"]) == 1
        assert now.getvalue().startswith("error: ") and "error: " not in old.getvalue()

    def test_guard_redacts_keys_and_tokens(self):
        """A private key or a Vault token passed to a log call by mistake is redacted, not written."""
        buf = io.StringIO()
        log.configure(stream=buf)
        pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n-----END PRIVATE KEY-----\n"
        log.get_logger().info("oops", detail=f"got {pem}", client_token="hvs.CAESIJ1234567890abcdefghij")
        line = buf.getvalue()
        assert "MIGHAgEAMBMGByqGSM49" not in line and "hvs.CAESIJ" not in line
        assert json.loads(line)["client_token"] == "[redacted]"


_FLOOD = """
import sys, time
from agent import log
log.configure()
start = time.monotonic()
for i in range(3000):
    log.get_logger().info("flood", n=i, padding="x" * 80)
print("logged", time.monotonic() - start, log.dropped_lines(), flush=True)
sys.stdin.readline()
"""


class TestWriter:
    def test_a_full_stderr_drops_lines_and_never_blocks(self):
        """3000 lines into a stderr nobody reads take well under a second: what does not fit in the queue is dropped
        and counted, and once stderr is read again one line says how many were lost."""
        proc = subprocess.Popen([sys.executable, "-c", _FLOOD], cwd=ROOT, env=cli_env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 15)
            assert ready, "logging blocked on a full stderr"
            _, elapsed, dropped = proc.stdout.readline().split()
            assert float(elapsed) < 1.0 and int(dropped) > 0
            _, err = proc.communicate("go\n", timeout=15)
        finally:
            proc.kill()
            proc.wait()
        events = [json.loads(line) for line in err.splitlines()]
        reports = [e for e in events if e["event"] == "log_lines_dropped"]
        assert len(reports) == 1 and reports[0]["dropped"] == int(dropped), reports
        assert len(events) == 3000 - int(dropped) + 1
        assert [e["n"] for e in events if e["event"] == "flood"][:log.QUEUE_LINES] == list(range(log.QUEUE_LINES))

    def test_a_short_run_gets_every_line_out(self):
        """A process that logs and exits at once (init mode, `check`) still writes every line, in order."""
        code = "from agent import log\nlog.configure()\nfor i in range(500): log.get_logger().info('line', n=i)\n"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                              timeout=30, check=True)
        assert [json.loads(line)["n"] for line in proc.stderr.splitlines()] == list(range(500))

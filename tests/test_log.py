"""Logging: every line on stderr is a JSON event, Python warnings included, and secret-looking text is redacted."""

from __future__ import annotations

import io
import json
import warnings

from agent import log


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

    def test_guard_redacts_keys_and_tokens(self):
        """A private key or a Vault token passed to a log call by mistake is redacted, not written."""
        buf = io.StringIO()
        log.configure(stream=buf)
        pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n-----END PRIVATE KEY-----\n"
        log.get_logger().info("oops", detail=f"got {pem}", client_token="hvs.CAESIJ1234567890abcdefghij")
        line = buf.getvalue()
        assert "MIGHAgEAMBMGByqGSM49" not in line and "hvs.CAESIJ" not in line
        assert json.loads(line)["client_token"] == "[redacted]"

"""Fixtures of the weights tests: a loopback HTTP server (no internet) and a private download cache."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Serve tmp_path/'www' on 127.0.0.1 (port 0) with MEDSEGKIT_HOME in tmp_path.

    Yields ``(folder, base_url, request_log)``.
    """
    monkeypatch.setenv("MEDSEGKIT_HOME", str(tmp_path / "home"))
    root = tmp_path / "www"
    root.mkdir()
    log: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", log
    server.shutdown()
    server.server_close()

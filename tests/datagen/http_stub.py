"""A ``ThreadingHTTPServer`` on 127.0.0.1 (port 0) running in a thread, for client tests."""
from __future__ import annotations

import contextlib
import threading
from http.server import ThreadingHTTPServer


@contextlib.contextmanager
def local_http_server(handler, state: dict, wait_for_handlers: bool = False):
    """Serve ``handler`` with ``server.state = state``; shut down and joined on exit.

    ``wait_for_handlers`` makes ``server_close()`` wait for requests still being handled (a test
    that provokes a client timeout needs its slow handler finished before the next test)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = not wait_for_handlers
    server.state = state
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

"""Whether the Hugging Face Hub answers: loading a model or data set that is not cached fails in
seconds, with a line that says so, instead of after a minute of retries with no network."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

PROBE_S = 3.0  # how long the Hub may take to accept a connection


def hub_reachable(timeout: float | None = None) -> bool:
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout or PROBE_S).close()
        return True
    except OSError:
        return False

"""Short GIL switch intervals while one of the pack's worker threads must get the GIL back quickly (the background
compile, the image staging thread). One registry of requests: while any is out the interpreter runs at the shortest
requested interval, and the process's own interval comes back once the last is released, whatever their order."""
from __future__ import annotations

import contextlib
import itertools
import sys
import threading

_LOCK = threading.Lock()
_REQUESTS: dict[int, float] = {}      # token -> requested interval (s)
_BASE: list = [None]                  # the process's interval before the first request
_TOKENS = itertools.count()


def lower(interval: float) -> int:
    """Run at min(own, requested) from now on; a token for restore()."""
    with _LOCK:
        if not _REQUESTS:
            _BASE[0] = sys.getswitchinterval()
        token = next(_TOKENS)
        _REQUESTS[token] = interval
        sys.setswitchinterval(min(_BASE[0], *_REQUESTS.values()))
    return token


def restore(token: int) -> None:
    """Withdraw one request (unknown tokens: nothing); the last one out sets the process's own interval again."""
    with _LOCK:
        if _REQUESTS.pop(token, None) is None:
            return
        sys.setswitchinterval(min(_BASE[0], *_REQUESTS.values()) if _REQUESTS else _BASE[0])


@contextlib.contextmanager
def lowered(interval: float):
    token = lower(interval)
    try:
        yield
    finally:
        restore(token)

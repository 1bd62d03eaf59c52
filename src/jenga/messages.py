"""The library's logger and once-per-process warnings (per-step warnings would flood a training log)."""

from __future__ import annotations

import logging

logger = logging.getLogger("jenga")
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log `message` the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)

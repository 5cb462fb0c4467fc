"""Finding the real reason inside a wrapped exception.

httpx, trio and trio-websocket wrap the real reason for a failure (a refused TCP connect, a TLS
verification failure) in exception groups and ``__cause__``/``__context__`` chains, and some of
the wrappers have empty messages; these walk to it.
"""

from __future__ import annotations

MAX_CHAIN_LENGTH = 32


def leaf_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions inside ``error``'s (nested) exception groups, or ``[error]``."""
    if isinstance(error, BaseExceptionGroup):
        found: list[BaseException] = []
        for inner in error.exceptions:
            found.extend(leaf_exceptions(inner))
        return found
    return [error]


def root_causes(error: BaseException) -> list[BaseException]:
    """``error``, then each exception it was raised from or during, groups flattened."""
    chain: list[BaseException] = []
    pending = leaf_exceptions(error)
    while pending and len(chain) < MAX_CHAIN_LENGTH:
        current = pending.pop(0)
        if any(current is seen for seen in chain):
            continue
        chain.append(current)
        # Suppressed contexts too: libraries hide the real reason behind ``from None``.
        following = current.__cause__ or current.__context__
        if following is not None:
            pending[:0] = leaf_exceptions(following)
    return chain

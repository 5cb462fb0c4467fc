"""The in-memory store keeps the AuditStore contract."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from audit.store import AuditStore, MemoryAuditStore
from tests.audit.store_contract import STORE_CONTRACT_CHECKS


@pytest.mark.parametrize("check", STORE_CONTRACT_CHECKS, ids=lambda check: check.__name__)
def test_memory_store_keeps_the_audit_store_contract(
    check: Callable[[AuditStore], Awaitable[None]],
) -> None:
    trio.run(check, MemoryAuditStore())


def test_memory_store_is_an_audit_store() -> None:
    assert isinstance(MemoryAuditStore(), AuditStore)

"""A serving instance's check that the database schema is still one it understands.

An instance reads the schema version once, when it opens the store. If a newer build migrates
the database while it serves (a rolling upgrade, or ``init --while-running``), it would go on
applying its old rules to the new schema — e.g. ignore an agent's removal. So every
``SCHEMA_CHECK_SECONDS`` it reads the version again and stops serving when it is newer.
"""

from __future__ import annotations

import logging

import trio

from rendezvous.store.base import SchemaTooNew, Store, StoreError

SCHEMA_CHECK_SECONDS = 60.0

logger = logging.getLogger("tucdesk.rendezvous.store")


async def watch_schema_version(store: Store, interval: float | None = None) -> None:
    """Every ``interval`` seconds (default SCHEMA_CHECK_SECONDS), read the schema version; when
    it is newer than this program understands, log an error and raise SchemaTooNew (which ends
    the instance). A failed read is logged and retried next round."""
    while True:
        await trio.sleep(SCHEMA_CHECK_SECONDS if interval is None else interval)
        try:
            version = await store.schema_version()
        except StoreError as error:
            logger.warning("checking the database schema version failed: %s", error)
            continue
        if version > store.understood_schema_version:
            message = (
                f"the database schema is now version {version}, newer than this program "
                f"understands ({store.understood_schema_version}): a newer tucdesk-rendezvous "
                "migrated it; stopping rather than serve with old rules. Start the new version "
                "instead (docs/self-hosting.md, 'Upgrading')"
            )
            logger.error("%s", message)
            raise SchemaTooNew(message)

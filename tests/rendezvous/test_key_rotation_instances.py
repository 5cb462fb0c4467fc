"""``keys rotate`` reaches every serving instance by itself: each reloads its service keys (and
tells its agents) on the rotation's notice, or at its minute sweep if the notice was lost; an
instance whose keys dir was not shared says so (ERROR) instead of signing with the old key.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import trio

from rendezvous import offer_bus
from rendezvous.context import ServiceContext
from rendezvous.key_rotation import (
    KEYS_ROTATED_NOTICE_KIND,
    reload_if_pins_changed,
    rotate_service_key,
)
from rendezvous.service_keys import KEYS_DIRECTORY
from rendezvous.store import open_store
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.sessions_support import (
    WAIT_SECONDS,
    agent_channel,
    enroll_agent,
    served_instance,
)

pytestmark = pytest.mark.anyio

ROLE = "jwt-issuer"


async def _until_signing_with(ctx: ServiceContext, fingerprint: str) -> None:
    with trio.fail_after(WAIT_SECONDS):
        while True:
            if ctx.keys.jwt_issuer.public.fingerprint == fingerprint:
                return
            await trio.sleep(0.02)


@pytest.mark.postgres
async def test_every_instance_reloads_a_rotated_key_by_itself_and_tells_its_agents(
    postgres_cluster: PostgresCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    database = postgres_cluster.create_database(f"rotate_{os.getpid()}")
    shared, unshared = tmp_path / "shared", tmp_path / "unshared"
    async with (
        open_store(database) as store_a,
        open_store(database) as store_b,
        open_store(database) as store_c,
        open_store(database) as admin_store,
        served_instance(store_a, shared) as (instance_a, url_a),
        served_instance(store_b, shared) as (instance_b, _),
    ):
        shutil.copytree(shared, unshared)  # C's own copy, made before the rotation
        async with served_instance(store_c, unshared) as (instance_c, _):
            team = await instance_a.team("ops")
            admin = await instance_a.operator(team, "admin")
            agent = await enroll_agent(instance_a, admin)
            async with agent_channel(url_a, agent) as channel:
                rotation = await rotate_service_key(
                    admin_store, shared, ROLE, issuer=instance_a.config.issuer,
                    retire_old_now=False, now=instance_a.clock.now,
                )  # fmt: skip
                new = rotation.new_key
                # No SIGHUP anywhere: the notice reloads A and B.
                await _until_signing_with(instance_a.ctx, new.fingerprint)
                await _until_signing_with(instance_b.ctx, new.fingerprint)
                message = await channel.receive("service_keys")
                assert new.key_id in {key["kid"] for key in message["keys"]}
                # C cannot read the new key: it keeps the old one and says why, every minute.
                with trio.fail_after(WAIT_SECONDS):
                    while True:
                        if "kept the current service keys" in caplog.text:
                            break
                        await trio.sleep(0.02)
                assert instance_c.ctx.keys.jwt_issuer.public == rotation.old_key
                caplog.clear()
                assert not await reload_if_pins_changed(instance_c.ctx)
                [refusal] = [r for r in caplog.records if r.levelno == logging.ERROR]
                assert "kept the current service keys" in refusal.getMessage()
                assert "copy" in refusal.getMessage()
                # Copied over: the next sweep takes it.
                shutil.rmtree(unshared / KEYS_DIRECTORY)
                shutil.copytree(shared / KEYS_DIRECTORY, unshared / KEYS_DIRECTORY)
                assert await reload_if_pins_changed(instance_c.ctx)
                assert instance_c.ctx.keys.jwt_issuer.public == new
                assert not await reload_if_pins_changed(instance_c.ctx)


async def test_the_minute_sweep_reloads_keys_rotated_while_serving(tmp_path: Path) -> None:
    data, database = tmp_path / "data", f"sqlite:///{tmp_path / 'rendezvous.db'}"
    async with open_store(database) as store, served_instance(store, data) as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            assert not await reload_if_pins_changed(service.ctx)
            rotation = await rotate_service_key(
                store, data, ROLE, issuer=service.config.issuer, retire_old_now=False,
                now=service.clock.now,
            )  # fmt: skip
            assert service.ctx.keys.jwt_issuer.public == rotation.old_key  # no notice on SQLite
            assert await reload_if_pins_changed(service.ctx)
            assert service.ctx.keys.jwt_issuer.public == rotation.new_key
            message = await channel.receive("service_keys")
            assert rotation.new_key.key_id in {key["kid"] for key in message["keys"]}


@pytest.mark.postgres
async def test_keys_rotated_notices_name_a_known_role_and_a_burst_reloads_once(
    postgres_cluster: PostgresCluster,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reasons: list[str] = []
    reload = offer_bus.reload_service_keys

    async def counted_reload(ctx: ServiceContext, why: str) -> bool:
        reasons.append(why)
        return await reload(ctx, why)

    monkeypatch.setattr(offer_bus, "reload_service_keys", counted_reload)
    caplog.set_level(logging.INFO)
    database = postgres_cluster.create_database(f"rotate_notices_{os.getpid()}")
    async with (
        open_store(database) as store,
        open_store(database) as sender,
        served_instance(store, tmp_path / "data") as (service, _),
    ):
        rejected = {"reason": offer_bus.REJECTED_KEYS_ROTATED_NOTICE}
        registry = service.ctx.metrics.registry
        for role in ("jwt-issuer\nFORGED reloaded", "x" * 10, ""):
            await sender.notify(
                offer_bus.OFFER_CHANNEL,
                json.dumps({"kind": KEYS_ROTATED_NOTICE_KIND, "role": role}),
            )
        with trio.fail_after(WAIT_SECONDS):
            while registry.get_sample_value("tucdesk_rejected_inputs_total", rejected) != 3:  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert reasons == []
        assert "FORGED" not in caplog.text
        for _ in range(20):
            await sender.notify(
                offer_bus.OFFER_CHANNEL,
                json.dumps({"kind": KEYS_ROTATED_NOTICE_KIND, "role": ROLE}),
            )
        with trio.fail_after(WAIT_SECONDS):
            while not reasons:  # noqa: ASYNC110 - the notices arrive on their own
                await trio.sleep(0.02)
        # One at once, and one for the rest of the burst after the interval if it came later.
        await trio.sleep(offer_bus.KEYS_RELOAD_MIN_INTERVAL_SECONDS + 1.0)
        assert 1 <= len(reasons) <= 2, reasons
        assert set(reasons) == {f"the {ROLE} key was rotated (keys rotate)"}

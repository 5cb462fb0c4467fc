"""Sending a team's policy bundle to its agents' control channels, on every instance.

The newest bundle goes to an agent right after ``welcome`` and to every online agent of the team
whenever a new one is stored (docs/sessions.md §6). On PostgreSQL other instances hear of a new
bundle through the offer notification channel (a ``policy_bundle`` notice naming the team) and
push it down the channels they hold. Agents answer ``policy_applied`` or ``policy_refused``,
which the control channel records (rendezvous/control_channel.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from rendezvous.context import ServiceContext
from rendezvous.store import StoredPolicyBundle, StoreError

logger = logging.getLogger("tucdesk.rendezvous.policy")

POLICY_NOTICE_KIND = "policy_bundle"
REJECTED_POLICY_NOTICE = "bus_policy_notice"  # its reason in tucdesk_rejected_inputs_total


def policy_message(stored: StoredPolicyBundle) -> dict[str, Any]:
    """The control-channel message carrying a countersigned bundle."""
    return {"type": "policy_bundle", "bundle": json.loads(stored.bundle)}


async def push_here(ctx: ServiceContext, team_id: str) -> int:
    """Send the team's newest bundle down every channel of the team this instance holds."""
    connections = ctx.connections
    if connections is None:
        return 0
    stored = await ctx.store.latest_policy_bundle(team_id)
    if stored is None:
        return 0
    message = policy_message(stored)
    sent = 0
    for agent_id in connections.agents_of_team(team_id):
        if await connections.send(team_id, agent_id, message):
            sent += 1
    return sent


async def publish_policy(ctx: ServiceContext, team_id: str) -> None:
    """Push a newly stored bundle to the team's online agents here and on other instances."""
    await push_here(ctx, team_id)
    if not ctx.store.notifications_supported:
        return
    from rendezvous.offer_bus import OFFER_CHANNEL

    notice = json.dumps(
        {"kind": POLICY_NOTICE_KIND, "instance": ctx.instance_id, "team_id": team_id}
    )
    try:
        await ctx.store.notify(OFFER_CHANNEL, notice)
    except StoreError as error:
        # Agents elsewhere get the bundle when they next connect; the stored version is final.
        logger.warning("announcing a policy bundle failed: %s", type(error).__name__)


async def handle_policy_notice(ctx: ServiceContext, fields: dict[str, Any]) -> None:
    """Push the bundle another instance announced to this instance's channels of the team."""
    instance, team_id = fields.get("instance"), fields.get("team_id")
    if not (isinstance(instance, str) and isinstance(team_id, str)):
        ctx.metrics.rejected_inputs.labels(REJECTED_POLICY_NOTICE).inc()
        logger.warning("ignored a malformed policy bundle notice")
        return
    if instance == ctx.instance_id:
        return
    try:
        await push_here(ctx, team_id)
    except StoreError as error:
        logger.warning("pushing a policy bundle failed: %s", type(error).__name__)

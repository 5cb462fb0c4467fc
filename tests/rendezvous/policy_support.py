"""Helpers for policy and approval tests: sign bundles as an admin would, PUT them with a proof."""

from __future__ import annotations

import json
from typing import Any

import httpx

from protocol.identity import SigningIdentity
from protocol.policy import (
    PolicyBundleContent,
    Roster,
    SignedPolicyBundle,
    sign_policy_bundle,
)
from protocol.request_proof import PROOF_HEADER
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness

BASE_RULES = """
[[rules]]
id = "ops-may-connect"
outcome = "allow"
operators = { roles = ["operator", "admin"] }

[[rules]]
id = "never-reboot"
outcome = "deny"
commands = ["reboot*"]

[[rules]]
id = "restarts-need-approval"
outcome = "approval_required"
commands = ["systemctl restart *"]
"""


def policy_text(version: int, rules: str = BASE_RULES, mode: str = "allowlist") -> str:
    """A policy document of ``version`` with ``rules``."""
    return f'version = {version}\nmode = "{mode}"\nhigh_risk = ["*rm -rf*"]\n{rules}'


async def put_policy(
    service: ServiceHarness, admin: OperatorSession, bundle: dict[str, Any]
) -> httpx.Response:
    """``PUT /v1/policy`` with the admin's token and request proof."""
    content = json.dumps({"bundle": bundle}).encode()
    proof = service.proof(admin.identity, "PUT", "/v1/policy", content, admin.token)
    headers = {
        "Authorization": f"Bearer {admin.token}",
        "Content-Type": "application/json",
        PROOF_HEADER: proof,
    }
    return await service.http.request("PUT", "/v1/policy", content=content, headers=headers)


async def current_policy(service: ServiceHarness, operator: OperatorSession) -> dict[str, Any]:
    """``GET /v1/policy``."""
    response = await service.call(operator, "GET", "/v1/policy")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def signed_bundle(
    service: ServiceHarness,
    admin: OperatorSession,
    *,
    text: str | None = None,
    signer: SigningIdentity | None = None,
    roster: Roster | None = None,
    agent_tags: dict[str, frozenset[str]] | None = None,
) -> SignedPolicyBundle:
    """The next bundle as an admin's CLI signs it: current roster and tags unless given."""
    state = await current_policy(service, admin)
    version = state["version"] + 1
    previous = None
    if state["bundle"] is not None:
        previous = SignedPolicyBundle.from_json(state["bundle"]).content.sha256()
    tags = agent_tags
    if tags is None:
        pending_tags = state["pending"]["agent_tags"].items()
        tags = {agent: frozenset(values) for agent, values in pending_tags}
    content = PolicyBundleContent(
        team_id=admin.team_id,
        version=version,
        issued_at=int(service.clock.now),
        policy_text=text if text is not None else policy_text(version),
        roster=roster if roster is not None else Roster.from_json(state["pending"]["roster"]),
        agent_tags=tags,
        previous_sha256=previous,
    )
    return sign_policy_bundle(content, signer or admin.identity)


async def set_policy(
    service: ServiceHarness, admin: OperatorSession, **kwargs: Any
) -> dict[str, Any]:
    """Sign and store the next bundle; return the PUT answer."""
    bundle = await signed_bundle(service, admin, **kwargs)
    response = await put_policy(service, admin, bundle.to_json())
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer

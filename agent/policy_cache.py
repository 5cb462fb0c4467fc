"""The agent's cached team policy: the pins it trusts and the last signed bundle it accepted.

docs/sessions.md §6. The pins (PinnedPolicyTrust: team, admin keys, rendezvous policy key,
applied version and bundle hash) live in the encrypted state file; the accepted bundle itself is
``STATE_DIR/policy.json`` (0600). A bundle pushed by the rendezvous is taken only through
``accept_policy_bundle`` with the current pins; on success the file is written first, then the
new pins, so a crash in between leaves a file the pins do not match (refused at start-up until
the rendezvous sends the bundle again) rather than pins without a policy to back them.

At start-up the cached file is accepted only if it verifies under the pins and is exactly the
version and content the pins record: swapping in an older (or any other) file is refused.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import PolicyCacheError
from agent.state_file import StateFileError
from protocol.errors import KeyFileError
from protocol.identity import write_private_file
from protocol.policy import (
    AcceptedPolicy,
    CountersignatureError,
    PinnedPolicyTrust,
    PolicyBundleError,
    TeamMismatchError,
    UntrustedSignerError,
    accept_policy_bundle,
)
from protocol.policy.signed_policy import MAX_BUNDLE_SIZE

logger = logging.getLogger("tucdesk.agent.policy")

POLICY_FILE_NAME = "policy.json"
MAX_REFUSAL_REASON_LENGTH = 300

TrustSaver = Callable[[PinnedPolicyTrust], None]
"""Persists new pins (into the encrypted state file); raises on failure."""


@dataclass(frozen=True)
class PolicyRefusal:
    """A newer policy bundle this agent refused, as it answered the rendezvous (policy_refused)."""

    version: int | None
    reason: str
    needs_reenrollment: bool
    """Refused by the trust pinned at enrollment (a countersigning key rotated since, an admin
    or team it does not pin): it will refuse every later bundle too until re-enrolled."""


class PolicyCache:
    """The pins and the accepted bundle this agent enforces; see the module docstring."""

    def __init__(
        self,
        trust: PinnedPolicyTrust | None,
        accepted: AcceptedPolicy | None,
        policy_file: Path,
        save_trust: TrustSaver,
        *,
        problem: str | None = None,
    ) -> None:
        self._trust = trust
        self._accepted = accepted
        self._policy_file = Path(policy_file)
        self._save_trust = save_trust
        self.problem = problem
        """Why the cached policy could not be used (None when it can): shown in refusals."""
        self.refusal: PolicyRefusal | None = None
        """The newer bundle last refused, until one is accepted: shown in out-of-date refusals."""

    @property
    def trust(self) -> PinnedPolicyTrust | None:
        """The current pins, or None for an agent enrolled before policies existed."""
        return self._trust

    @property
    def accepted(self) -> AcceptedPolicy | None:
        """The bundle in force, or None when the team never signed one (or the cache is bad)."""
        return self._accepted

    @property
    def version(self) -> int:
        """The applied policy version as the pins record it (0: none yet, or no pins)."""
        return 0 if self._trust is None else self._trust.version

    @classmethod
    def load(
        cls, policy_file: Path, trust_json: Mapping[str, Any] | None, save_trust: TrustSaver
    ) -> PolicyCache:
        """The cache as the state file's pins and ``policy_file`` leave it at start-up.

        Never raises for a bad cache: the agent then holds no usable policy, refuses every
        session with ``problem`` as the reason, and recovers when the bundle arrives again.
        """
        if trust_json is None:
            return cls(
                None,
                None,
                policy_file,
                save_trust,
                problem="this agent was enrolled before team policies and pins no admin keys; "
                "re-enroll it with 'tucdesk-agent enroll --force' and a new registration key",
            )
        try:
            trust = PinnedPolicyTrust.from_json(dict(trust_json))
        except (ValueError, TypeError) as error:
            raise PolicyCacheError(
                f"the pinned policy trust in the agent state is malformed ({error}); "
                "re-enroll this agent"
            ) from None
        if trust.version == 0:
            return cls(trust, None, policy_file, save_trust)
        try:
            data = read_policy_file(Path(policy_file))
            accepted = accept_policy_bundle(data, trust)
        except (PolicyCacheError, PolicyBundleError, ValueError) as error:
            logger.error(
                "the cached policy %s cannot be used (%s); refusing sessions until the "
                "rendezvous sends policy version %d again", policy_file, error, trust.version,
            )
            return cls(
                trust,
                None,
                policy_file,
                save_trust,
                problem=f"the agent's cached policy (version {trust.version}) is missing or "
                "does not verify; it refuses sessions until the rendezvous sends it again",
            )
        if not accepted.unchanged:
            # Verified, but not the bundle the encrypted state records: a swapped file.
            return cls(
                trust,
                None,
                policy_file,
                save_trust,
                problem=f"the agent's cached policy file is not the version {trust.version} "
                "its state records; it refuses sessions until the rendezvous sends it again",
            )
        return cls(trust, accepted, policy_file, save_trust)

    def apply(self, bundle: object) -> AcceptedPolicy:
        """Accept a pushed bundle under the pins, cache it and keep the new pins.

        Raises PolicyBundleError (refused by the pins) or PolicyCacheError (could not be stored).
        """
        if self._trust is None:
            raise PolicyCacheError(
                "this agent pins no admin keys, so it can accept no policy; re-enroll it"
            )
        accepted = accept_policy_bundle(bundle, self._trust)
        self.refusal = None  # the rendezvous sends its newest bundle: nothing newer was refused
        if accepted.unchanged and self._accepted is not None:
            return accepted
        try:
            write_private_file(self._policy_file, accepted.bundle.to_bytes())
            if not accepted.unchanged:
                self._save_trust(accepted.trust)
        except (OSError, KeyFileError, StateFileError) as error:
            raise PolicyCacheError(f"cannot store policy version "
                                   f"{accepted.bundle.content.version}: {error}") from None
        self._trust = accepted.trust
        self._accepted = accepted
        self.problem = None
        if accepted.admins_changed:
            logger.warning(
                "policy version %d changes the team's admin keys: now %d pinned",
                accepted.trust.version, len(accepted.trust.admin_keys),
            )
        return accepted

    def answer_bundle_message(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Handle a ``policy_bundle`` control message: the ``policy_applied``/``refused`` reply."""
        bundle = message.get("bundle")
        offered = _offered_version(bundle)
        try:
            accepted = self.apply(bundle)
        except (PolicyBundleError, PolicyCacheError, ValueError) as error:
            # ValueError: pins the bundle would produce are unusable (e.g. too many admins).
            reason = str(error)[:MAX_REFUSAL_REASON_LENGTH]
            logger.warning("refusing policy version %s: %s", offered, reason)
            if offered is None or offered > self.version:
                self.refusal = PolicyRefusal(offered, reason, isinstance(
                    error, CountersignatureError | UntrustedSignerError | TeamMismatchError
                ))
            return {"type": "policy_refused", "version": offered, "reason": reason}
        version = accepted.bundle.content.version
        if not accepted.unchanged:
            logger.info("applied policy version %d", version)
        return {"type": "policy_applied", "version": version}


def policy_file_path(state_dir: Path) -> Path:
    """Where the accepted bundle is cached."""
    return Path(state_dir) / POLICY_FILE_NAME


def read_policy_file(path: Path) -> bytes:
    """The cached bundle's bytes; PolicyCacheError if missing, not private, or oversized."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise PolicyCacheError(f"{path}: cannot open ({error.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PolicyCacheError(f"{path}: not a regular file")
        if info.st_mode & 0o077:
            raise PolicyCacheError(f"{path}: permissions are too open; run 'chmod 600 {path}'")
        data = handle.read(MAX_BUNDLE_SIZE + 1)
    if len(data) > MAX_BUNDLE_SIZE:
        raise PolicyCacheError(f"{path}: larger than any policy bundle")
    return data


def _offered_version(bundle: object) -> int | None:
    # Only for the reply: the version the bundle claims, before anything is verified.
    content = bundle.get("content") if isinstance(bundle, Mapping) else None
    version = content.get("version") if isinstance(content, Mapping) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None

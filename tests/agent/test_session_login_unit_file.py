"""The agent's systemd unit does not bind the sessions it starts: every process of a session
inherits the unit's sandbox, cgroup and limits, and a restart must not kill what sessions left
running on purpose."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT_FILE = Path(__file__).resolve().parents[2] / "deploy" / "agent" / "tucdesk-agent.service"

# Options that would reach into every operator's shell, and what they would break there.
SESSION_BINDING_OPTIONS = {
    "ProtectSystem": "/usr, /boot, /etc read-only: no package installs or config edits",
    "ProtectHome": "/home, /root hidden or read-only",
    "PrivateTmp": "a /tmp of the unit's own, not the host's",
    "PrivateDevices": "no /dev/sda, no raw devices for disk tools",
    "PrivateNetwork": "no network at all",
    "PrivateUsers": "root is not root",
    "ProtectKernelTunables": "/proc/sys and /sys read-only: sysctl -w fails",
    "ProtectKernelModules": "modprobe fails",
    "ProtectKernelLogs": "dmesg fails",
    "ProtectControlGroups": "/sys/fs/cgroup read-only: containers and systemd-run fail",
    "ProtectClock": "date -s and hwclock fail",
    "ProtectHostname": "hostname changes are lost",
    "ProtectProc": "other users' processes hidden from ps",
    "RestrictAddressFamilies": "no AF_PACKET: tcpdump fails",
    "RestrictNamespaces": "unshare, containers fail",
    "RestrictRealtime": "chrt fails",
    "RestrictSUIDSGID": "chmod u+s fails",
    "LockPersonality": "setarch / linux32 fail",
    "SystemCallArchitectures": "32-bit programs fail",
    "SystemCallFilter": "whatever the filter leaves out fails",
    "MemoryDenyWriteExecute": "JIT runtimes (java, node) fail",
    "NoNewPrivileges": "sudo and setuid programs fail",
    "CapabilityBoundingSet": "root shells lose capabilities",
    "AmbientCapabilities": "sessions start with capabilities they did not ask for",
    "ReadOnlyPaths": "those paths read-only in every session",
    "InaccessiblePaths": "those paths gone in every session",
    "TemporaryFileSystem": "those paths empty in every session",
    "IPAddressDeny": "sessions cannot reach those addresses",
    "DevicePolicy": "device access restricted",
    "DeviceAllow": "device access restricted",
}


def _service_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    section = None
    for raw in UNIT_FILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_the_unit_sets_no_option_that_would_bind_the_sessions() -> None:
    settings = _service_settings()
    binding = {name: why for name, why in SESSION_BINDING_OPTIONS.items() if name in settings}
    assert binding == {}


def test_a_restart_signals_only_the_daemon_not_what_sessions_left_running() -> None:
    # mixed or control-group would SIGKILL nohup jobs and tmux servers on every restart.
    assert _service_settings()["KillMode"] == "process"


def test_the_unit_says_that_a_crash_leaves_open_exec_sessions_running() -> None:
    # KillMode=process signals only the daemon: after a SIGKILL or OOM kill nothing ends the
    # commands of the sessions that were open (as sshd's sessions survive sshd).
    comment = " ".join(
        line.lstrip("# ") for line in UNIT_FILE.read_text().splitlines() if line.startswith("#")
    )
    assert "crashes or is killed" in comment
    assert "exec sessions open then keep running" in comment
    assert "no session.ended record" in comment


def test_the_daemons_own_files_stay_private() -> None:
    # Sessions set session_umask themselves (test_session_login_records.py).
    assert _service_settings()["UMask"] == "0077"


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # The installed path of the program does not exist here; everything else is checked.
    unit = tmp_path / UNIT_FILE.name
    unit.write_text(UNIT_FILE.read_text().replace("/usr/local/bin/tucdesk-agent", "/bin/true"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr

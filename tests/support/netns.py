"""Test hosts on one machine: Linux network namespaces with their own addresses on a private bridge.

Each host is a namespace (``ip netns``) with a veth pair whose outer end is on a bridge in the test's own
namespace, so every host reaches every other one, and the test process reaches them all, through real
interfaces and addresses (not loopback). Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2; without
them the tests that use it are skipped, unless ``FLUXSERVE_REQUIRE_NETNS=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

SUBNET = "10.77.0"  # a /24 of our own: the bridge is .1, hosts .10 and up


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Host:
    name: str  # the namespace
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs it: the pid is its own)."""
        return ["ip", "netns", "exec", self.name, *argv]


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"fxprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as error:
        return f"ip netns add failed: {error.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


def require() -> None:
    reason = unavailable()
    if reason is not None:
        if os.environ.get("FLUXSERVE_REQUIRE_NETNS") == "1":
            pytest.fail(f"FLUXSERVE_REQUIRE_NETNS=1 but {reason}")
        pytest.skip(reason)


@contextmanager
def hosts(names: Sequence[str]) -> Iterator[dict[str, Host]]:
    """Namespaces named after ``names`` (with this process's id, so that runs never meet), on one bridge;
    all removed at the end (their processes must have ended)."""
    tag = str(os.getpid() % 100000)
    bridge = f"fxbr{tag}"
    made: dict[str, Host] = {}
    _ip("link", "add", bridge, "type", "bridge")
    try:
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for index, name in enumerate(names):
            host = Host(f"fx{tag}{name}", f"{SUBNET}.{10 + index}")
            outer = f"fv{tag}{index}"
            _ip("netns", "add", host.name)
            made[name] = host
            _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            _ip("link", "set", outer, "master", bridge, "up")
            for argv in (
                ["addr", "add", f"{host.address}/24", "dev", "eth0"],
                ["link", "set", "eth0", "up"],
                ["link", "set", "lo", "up"],
            ):
                _ip("netns", "exec", host.name, "ip", *argv)
        yield made
    finally:
        for host in made.values():
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)

"""Two "hosts" for end-to-end tests: network namespaces joined by a veth pair.

Example (blocking, in ``setUp``)::

    from tests.support.netns import create_pair

    pair = create_pair(self)                 # cleanup registered; SkipTest when impossible
    pair.a.address, pair.b.address           # "10.231.X.1", "10.231.X.2"
    argv = pair.a.prefix + ["twistd", ...]   # ["nsenter", "--net=/var/run/netns/NAME", "--", ...]
    # with tests.support.daemon: start_daemon(self, config, prefix=pair.a.prefix,
    #                                         address=pair.a.address)

Topology, all inside one private /24 (``10.231.X.0/24``, X picked so that nothing on this
machine uses it yet)::

        namespace A  10.231.X.1/25 ==veth== 10.231.X.2/25  namespace B
            | .130/30                                  | .134/30
            | (management link)                        | (management link)
        root .129/30 ----- test process (root namespace) ----- root .133/30

The hosts talk to each other over the A-B veth pair only (the seed stream, agent to
agent).  The test process reaches each host's address over that host's own management
link, as an operator's machine or orchestrator would, through a /32 route in the root
namespace; there is no forwarding, so no traffic leaves the links the fixture made.
Services the hosts must call back (a stand-in orchestrator) listen on
:attr:`HostNS.gateway`: each host has a /32 route to the other host's gateway too, so
one root address (:attr:`NetworkPair.callback_address`) serves both.

Cleanup deletes both namespaces (their interfaces, and the root ends of the veths, go
with them) and the root routes; it runs even when the test fails.  Processes started in a
namespace must be stopped by whoever started them (their cleanups run first, being
registered later).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess

import attrs

BASE = ipaddress.ip_network("10.231.0.0/16")


@attrs.frozen
class HostNS:
    """One host: a namespace, its address on the A-B link, its management link."""

    name: str
    address: str
    #: The root namespace's address on this host's management link.
    gateway: str

    @property
    def prefix(self) -> list[str]:
        """Command prefix running a program inside this namespace's network.

        ``nsenter --net`` rather than ``ip netns exec``: the latter also gives the program
        a private mount namespace, so a snapshot the agent mounts would be invisible to
        the test and vanish when the agent dies.  On a real host the agent's mounts are
        the host's; here too.
        """
        return ["nsenter", f"--net=/var/run/netns/{self.name}", "--"]


@attrs.frozen
class NetworkPair:
    a: HostNS
    b: HostNS
    subnet: str

    @property
    def callback_address(self) -> str:
        """A root-namespace address both hosts can reach (for a stand-in orchestrator)."""
        return self.a.gateway


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if shutil.which("nsenter") is None:
        return "nsenter (util-linux) is not installed"
    return None


def _ip(*args: str, namespace: str | None = None) -> None:
    argv = ["ip"] + (["-n", namespace] if namespace else []) + list(args)
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.decode(errors='replace').strip()}")


def _used_networks() -> str:
    out = subprocess.run(["ip", "-o", "addr"], stdout=subprocess.PIPE, check=True).stdout
    out += subprocess.run(["ip", "route"], stdout=subprocess.PIPE, check=True).stdout
    return out.decode(errors="replace")


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    for _ in range(64):
        third = 1 + secrets.randbelow(254)
        subnet = ipaddress.ip_network(f"10.231.{third}.0/24")
        if f"10.231.{third}." not in used:
            return subnet
    raise RuntimeError("no free /24 left in 10.231.0.0/16")


def create_pair(testcase) -> NetworkPair:
    """Two namespaces joined by a veth pair; see the module docstring.  Blocking."""
    from twisted.trial.unittest import SkipTest

    reason = unavailable_reason()
    if reason:
        raise SkipTest(reason)
    tag = secrets.token_hex(3)
    subnet = _pick_subnet()
    net = subnet.network_address
    a_addr, b_addr = str(net + 1), str(net + 2)
    a_gw, a_mgmt = str(net + 129), str(net + 130)
    b_gw, b_mgmt = str(net + 133), str(net + 134)
    ns_a, ns_b = f"oa{tag}a", f"oa{tag}b"
    root_a, root_b = f"oa{tag}ra", f"oa{tag}rb"
    created_ns: list[str] = []
    created_links: list[str] = []

    def cleanup() -> None:
        for link in created_links:
            subprocess.run(["ip", "link", "del", link], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        for ns in created_ns:
            subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    testcase.addCleanup(cleanup)
    for ns in (ns_a, ns_b):
        _ip("netns", "add", ns)
        created_ns.append(ns)
        _ip("link", "set", "lo", "up", namespace=ns)
    # The A-B link.
    _ip("link", "add", f"oa{tag}ab", "type", "veth", "peer", "name", f"oa{tag}ba")
    created_links.append(f"oa{tag}ab")
    _ip("link", "set", f"oa{tag}ab", "netns", ns_a)
    _ip("link", "set", f"oa{tag}ba", "netns", ns_b)
    created_links.remove(f"oa{tag}ab")
    _ip("addr", "add", f"{a_addr}/25", "dev", f"oa{tag}ab", namespace=ns_a)
    _ip("addr", "add", f"{b_addr}/25", "dev", f"oa{tag}ba", namespace=ns_b)
    _ip("link", "set", f"oa{tag}ab", "up", namespace=ns_a)
    _ip("link", "set", f"oa{tag}ba", "up", namespace=ns_b)
    # Management links from the root namespace.
    for ns, root_end, gw, mgmt, host_addr, other_gw in (
            (ns_a, root_a, a_gw, a_mgmt, a_addr, b_gw),
            (ns_b, root_b, b_gw, b_mgmt, b_addr, a_gw)):
        inner = root_end[:-2] + "m" + root_end[-1]
        _ip("link", "add", root_end, "type", "veth", "peer", "name", inner)
        created_links.append(root_end)
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{gw}/30", "dev", root_end)
        _ip("link", "set", root_end, "up")
        _ip("addr", "add", f"{mgmt}/30", "dev", inner, namespace=ns)
        _ip("link", "set", inner, "up", namespace=ns)
        _ip("route", "add", f"{host_addr}/32", "via", mgmt, "dev", root_end)
        _ip("route", "add", f"{other_gw}/32", "via", gw, "dev", inner, namespace=ns)
    return NetworkPair(a=HostNS(ns_a, a_addr, a_gw), b=HostNS(ns_b, b_addr, b_gw),
                       subnet=str(subnet))

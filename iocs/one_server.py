"""One IOC per prefix: before serving, look whether the PVs answer already.

Two CA servers with the same PV names on one network both answer a search and clients then read
from either, alternately and silently (with hardware, two IOCs would drive one instrument). So an
IOC searches for its instruments' PVs first and refuses to start when another server answers,
naming that server's host and port, whose process it is (its Server_RBV) and how to stop it.
"""
from __future__ import annotations

import os
import random
import socket
import time

import caproto as ca
from caproto.sync.client import read

DEFAULT_CA_PORT = 5064
SEARCH_TIMEOUT_S = 1.0
SEARCH_RETRY_S = 0.2


class AlreadyServed(RuntimeError):
    """The PVs of an instrument are served by another IOC already; the message says which."""


def search_port() -> int:
    """The UDP port our server will listen on for searches (and another one would, too)."""
    return int(os.environ.get("EPICS_CAS_SERVER_PORT") or os.environ.get("EPICS_CA_SERVER_PORT")
               or DEFAULT_CA_PORT)


def find_servers(pvnames: list[str], interfaces: list[str], *, timeout: float = SEARCH_TIMEOUT_S,
                 ) -> dict[str, tuple[str, int]]:
    """{PV name: (host, TCP port)} for the PVs a CA server answers for on the interfaces."""
    port = search_port()
    cids = {random.randint(0, 2 ** 31): name for name in pvnames}
    broadcaster = ca.Broadcaster(our_role=ca.CLIENT)
    request = broadcaster.send(ca.VersionRequest(0, ca.DEFAULT_PROTOCOL_VERSION),
                               *(ca.SearchRequest(n, cid, ca.DEFAULT_PROTOCOL_VERSION)
                                 for cid, n in cids.items()))
    found: dict[str, tuple[str, int]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("", 0))
        deadline, resend = time.monotonic() + timeout, 0.0
        while time.monotonic() < deadline and len(found) < len(cids):
            if time.monotonic() >= resend:
                for host in interfaces:
                    sock.sendto(request, (host, port))
                resend = time.monotonic() + SEARCH_RETRY_S
            sock.settimeout(max(0.01, min(resend, deadline) - time.monotonic()))
            try:
                data, sender = sock.recvfrom(65536)
            except socket.timeout:
                continue
            try:
                commands = broadcaster.recv(data, sender)
            except Exception:       # not a CA reply: ignore it
                continue
            for command in commands:
                if isinstance(command, ca.SearchResponse) and command.cid in cids:
                    host = sender[0] if command.ip in ("255.255.255.255", "0.0.0.0") else command.ip
                    found[cids[command.cid]] = (host, command.port)
    return found


def refuse_if_served(prefixes: list[str], interfaces: list[str]) -> None:
    """AlreadyServed if another server answers for any of these instrument prefixes."""
    probes = [p + "StatusMessage_RBV" for p in prefixes]
    found = find_servers(probes, interfaces)
    if not found:
        return
    lines = []
    for probe, (host, port) in found.items():
        prefix = probe[: -len("StatusMessage_RBV")]
        lines.append(f"{prefix}* are served by {host}:{port} already ({_who(prefix, host)})")
    raise AlreadyServed("; ".join(lines) + ". Stop that IOC first (`calbench down` with its lab "
                        "home, or Ctrl-C / kill its process), or give this lab another pv_prefix "
                        "(or another EPICS_CAS_SERVER_PORT)")


def _who(prefix: str, host: str) -> str:
    """What the other IOC says about itself (Server_RBV), or what to look for."""
    patch = {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": host,
             "EPICS_CA_SERVER_PORT": str(search_port())}
    saved = {key: os.environ.get(key) for key in patch}
    os.environ.update(patch)
    try:
        # no repeater: caproto would spawn one that keeps this process's stdout open for good
        data = read(prefix + "Server_RBV", timeout=2.0, repeater=False).data
    except Exception:       # an older or foreign IOC: its address is all we know
        return "an IOC that does not say who runs it"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return bytes(data).split(b"\0")[0].decode("utf-8", "replace") or "unknown process"


def describe_this_server(home: str | None = None) -> str:
    """Server_RBV of this process: who serves, and the command that stops it."""
    stop = f"CALBENCH_HOME={home} calbench down, or kill {os.getpid()}" if home \
        else f"kill {os.getpid()}"
    return f"pid {os.getpid()} on {socket.gethostname()}; stop: {stop}"

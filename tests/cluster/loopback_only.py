"""Keep an operator under test on loopback: a connection to any other address is refused.

kwok gives pods addresses from the bed's pod range (bed.POD_CIDR), which belong to no host
here. The operator reads rank 0's metrics port at that address when it cannot read the output
folder, and without this guard the request would leave the machine by its default route.
Importing the module installs the guard, in the test process (operator_runner) or in an operator
started as `kopf run -m loopback_only -m lathe.k8s.handlers`. A refused connection raises
ConnectionRefusedError, which the operator treats as a pod that does not serve yet.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

# (host, port) of every connection the guard refused, in order.
REFUSED: list[tuple[str, int]] = []
_INSTALLED: list[bool] = []


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost


def _guard(event: str, args: tuple) -> None:
    if event != "socket.connect":
        return
    sock, address = args
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket stays on this machine
    host, port = address[0], address[1]
    if not _is_loopback(host):
        REFUSED.append((host, port))
        raise ConnectionRefusedError(
            f"The test guard refused a connection to {host}:{port}, because the cluster "
            "suite connects only to loopback addresses."
        )


def install() -> None:
    """Add the guard to this process's audit hooks, once; an audit hook cannot be removed."""
    if not _INSTALLED:
        sys.addaudithook(_guard)
        _INSTALLED.append(True)


install()

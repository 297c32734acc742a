"""The destination's post-copy actions for ``Reception`` (the receiver table's
PREPARE_POSTCOPY, GATE_DMA, AWAIT_LANDED, END_POSTCOPY, SEND_LANDED), over
destination_side.PostcopyDestination; as audit_side.py is for the audit."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from vmferry.migration.incoming import CHANNEL_ACCEPT_TIMEOUT_S, Connection
from vmferry.migration.postcopy.destination_side import PostcopyDestination
from vmferry.migration.postcopy.fault_server import LinkBroken
from vmferry.migration.receiver_machine import ReceiverEvent

if TYPE_CHECKING:
    import socket

    from vmferry.migration.reception import Reception

log = logging.getLogger(__name__)
Re = ReceiverEvent


def prepare_postcopy(r: Reception) -> None:
    """Owed pages discarded, RAM registered, page channels accepted, the server started:
    before the check (which reads only the landing digests) and "ready"."""
    assert r.loaded is not None and r.loaded.owed is not None and r.memory is not None

    def accept(what: str) -> socket.socket:
        conn = r.incoming.acceptor.accept(CHANNEL_ACCEPT_TIMEOUT_S, what)
        r.socks.append(conn)  # woken and closed with the others, whatever happens
        return r._secure(conn, what)

    pc = r.postcopy = PostcopyDestination(r.memory, r.loaded.owed, r.timeout_s)
    pc.prepare(accept, r.head.mig_id, r.loaded.landing)


def gate_dma(r: Reception) -> None:
    assert r.postcopy is not None and r.machine is not None
    r.postcopy.gate_dma(r.machine)


def await_landed(r: Reception) -> ReceiverEvent:
    assert r.postcopy is not None and r.machine is not None
    try:
        r.postcopy.await_landed()
    except LinkBroken as e:
        log.warning("post-copy paused: %s (the guest waits; migrate-recover resumes it)", e)
        return Re.LINK_BROKEN
    return Re.LANDED_UNAUDITED if r.head.verify == "on" else Re.LANDED


def await_recover(r: Reception) -> ReceiverEvent:
    """Paused: the old link's heartbeat stopped; then the new link migrate-recover and
    the source's resume make, its heartbeat and reply path the connection's now."""
    assert r.postcopy is not None
    if r.conn is not None:
        r.conn.heartbeat.stop()
    main = r.postcopy.await_recover(r._secure, r.head.mig_id)
    r.socks.append(main)
    r.conn = Connection(main, r.timeout_s)
    r.conn.heartbeat.start()
    return Re.RECOVERED


def end_postcopy(r: Reception) -> None:
    if r.postcopy is not None:
        r.postcopy.end()


def send_landed(r: Reception) -> None:
    """Every owed page is here: the source may audit (or end); its figures go along."""
    assert r.conn is not None and r.postcopy is not None
    msg = r.postcopy.landed()
    log.info("post-copy: every page landed: %s", msg)
    with contextlib.suppress(OSError):  # the guest is whole here; the source's loss is its
        r.conn.reply.send(msg)


__all__ = [
    "await_landed",
    "await_recover",
    "end_postcopy",
    "gate_dma",
    "prepare_postcopy",
    "send_landed",
]

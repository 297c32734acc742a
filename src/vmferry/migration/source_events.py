"""The source table's names: its targets, states, events and actions (source_machine.py
builds the table from them and says what each means in a migration)."""

from __future__ import annotations

import enum


class Target(enum.Enum):
    LIVE = "tcp"  # a destination that answers on the reply path
    FILE = "file"  # a save file: nobody to ask, the VM stays here


class SourceState(enum.Enum):
    IDLE = enum.auto()
    SETUP = enum.auto()  # checking blockers, connecting (or opening the file)
    AWAIT_ACCEPTED = enum.auto()  # CONF sent, the destination checks it
    PRECOPY = enum.auto()  # rounds while the VM runs
    STOP_COPY = enum.auto()  # VM paused: the rest, CPU and device state, END
    AWAIT_READY = enum.auto()  # END sent, the destination loads and verifies
    HANDING_OVER = enum.auto()  # "go" sent: released, waiting for "resumed"
    AUDITING = enum.auto()  # it runs there; the audit's digests out, its verdict due
    POSTCOPY_SWITCH = enum.auto()  # VM paused: devices, CPU state, owed pages, END
    POSTCOPY_AWAIT_READY = enum.auto()  # the destination discards owed pages, registers RAM
    POSTCOPY_HANDING_OVER = enum.auto()  # "go" sent, pages served: waiting for "resumed"
    POSTCOPY_ACTIVE = enum.auto()  # it runs there; requests answered, the rest pushed
    POSTCOPY_AUDITING = enum.auto()  # every page landed; the audit's verdict due
    POSTCOPY_PAUSED = enum.auto()  # the link broke after the switch: waiting for a new one
    COMPLETED = enum.auto()
    SAVED = enum.auto()  # a file is whole; the VM is paused here and may run again
    CONTINUED = enum.auto()  # a saved VM runs here again (cont)
    CANCELLING_NO_PEER = enum.auto()  # no one to tell: no stream yet, or a file
    CANCELLING = enum.auto()  # sections flow: the destination gets an ABRT
    CANCELLING_AFTER_END = enum.auto()  # END is out: the destination gets "abandon"
    CANCELLED = enum.auto()
    FAILED = enum.auto()  # rolled back: the VM runs on here
    FAILED_AFTER_RELEASE = enum.auto()  # the VM stays paused: the destination may run it


class SourceEvent(enum.Enum):
    START = enum.auto()
    CONNECTED = enum.auto()  # every channel (or the file) is open
    ACCEPTED = enum.auto()  # the destination's answer to the CONF
    ROUND_CONTINUE = enum.auto()  # a round ended; the policy's decision
    ROUND_SWITCHOVER = enum.auto()
    ROUND_GIVE_UP = enum.auto()  # the policy says it will not converge
    ROUND_POSTCOPY = enum.auto()  # switch to post-copy (asked for, or x-postcopy-after)
    STREAM_ENDED = enum.auto()  # END (and each CEND) is written
    READY = enum.auto()  # the destination loaded and verified everything
    RESUMED = enum.auto()  # the destination runs the VM (nothing left to check)
    RESUMED_UNAUDITED = enum.auto()  # it runs the VM; the audit after resume is due
    PAGES_LANDED = enum.auto()  # post-copy: every owed page landed there
    PAGES_LANDED_UNAUDITED = enum.auto()  # and the audit of all RAM is due (x-verify on)
    LINK_BROKEN = enum.auto()  # post-copy's link was reset or went silent (not closed)
    LINK_RESUMED = enum.auto()  # a new link (migrate resume) and the present bitmap back
    AUDIT_PASSED = enum.auto()  # the destination's verdict on the audit
    AUDIT_FAILED = enum.auto()  # a mismatch: the destination stopped its VM
    DESTINATION_FAILED = enum.auto()  # a "failed" line: the destination gave up first
    PEER_SILENT = enum.auto()  # no word from the destination within the bound
    PEER_CLOSED = enum.auto()  # the connection broke: a section may be half written
    CANCEL = enum.auto()  # migrate_cancel
    HALTED = enum.auto()  # after a cancel: the step in flight stopped at a boundary
    GUEST_ENDED = enum.auto()  # the guest powered off or crashed meanwhile
    ERROR = enum.auto()  # a failure here, the stream still whole
    CONT = enum.auto()  # run a saved VM here again


class SourceAction(enum.Enum):
    REPORT_STATUS = enum.auto()  # query-migrate shows the new status; a MIGRATION event
    CONNECT = enum.auto()  # refuse blockers, open the channels or the file
    SEND_CONFIG = enum.auto()  # CONF, and CHAN on each extra channel
    WATCH_PEER = enum.auto()  # read the reply path (heartbeats) on its own thread
    AWAIT_ACCEPTED = enum.auto()
    START_DIRTY_TRACKING = enum.auto()  # the dirty log, and the devices' DMA tracking
    SEND_ROUND = enum.auto()  # RAM and device pre-copy, RND, dirty sync, the policy
    PAUSE_VM = enum.auto()  # and the throttle off
    STOP_DEVICES = enum.auto()  # devices stop and send their final state
    SEND_FINAL_ROUND = enum.auto()  # the last dirty pages and the stop-copy RND
    SEND_CPU_AND_DEVICES = enum.auto()  # CPUS and DEVS
    SEND_VERIFY = enum.auto()  # VRFY, when verification is on (else nothing)
    END_STREAM = enum.auto()  # END, CEND on the extra channels
    AWAIT_READY = enum.auto()
    SEND_GO = enum.auto()
    STOP_DIRTY_TRACKING = enum.auto()
    AWAIT_RESUMED = enum.auto()
    SEND_AUDIT = enum.auto()  # digest all resident RAM (frozen here), send it in chunks
    AWAIT_AUDITED = enum.auto()  # the destination's verdict
    RELEASE_DEVICES = enum.auto()  # devices let go of the VM's state (STOP, kept)
    RESUME_HERE = enum.auto()  # devices back to RUNNING, the VM runs again
    INTERRUPT = enum.auto()  # wake a wait for the destination; sends stop at a batch
    TELL_ABORT = enum.auto()  # an ABRT section: why the source gives up
    TELL_ABANDON = enum.auto()  # an "abandon" line: why, once END is out
    ROLLBACK = enum.auto()  # no throttle, no dirty log, devices and VM running again
    SYNC_OWED = enum.auto()  # the last dirty sync: the pages the destination lacks
    SEND_OWED = enum.auto()  # PCPY: the owed pages' bitmap
    OPEN_POSTCOPY = enum.auto()  # the page channels (urgent, background) connected
    SERVE_PAGES = enum.auto()  # the page server: answer requests, push the owed pages
    AWAIT_LANDED = enum.auto()  # every page pushed and the destination's "landed"
    AWAIT_RESUME = enum.auto()  # until migrate resume gives a new link that works


__all__ = ["SourceAction", "SourceEvent", "SourceState", "Target"]

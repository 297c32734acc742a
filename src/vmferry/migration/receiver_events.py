"""The receiver table's names: its states, events and actions (receiver_machine.py
builds the tables from them and says what each means in a migration)."""

from __future__ import annotations

import enum


class ReceiverState(enum.Enum):
    IDLE = enum.auto()
    WAITING = enum.auto()  # listening: no source yet
    AWAIT_CONF = enum.auto()  # a source connected; its first section is due
    SETTING_UP = enum.auto()  # RAM, devices (RESUMING) and extra channels for the CONF
    LOADING = enum.auto()  # RAM, RND and DEVD sections, round after round
    AFTER_CPUS = enum.auto()  # the vCPU state is in; the device summary is due
    AFTER_DEVS = enum.auto()  # VRFY or END is due
    AFTER_VRFY = enum.auto()  # END is due
    AFTER_PCPY = enum.auto()  # post-copy: the owed pages are known; END is due
    VERIFYING = enum.auto()  # the stream is whole: load finished, digests compared
    READY = enum.auto()  # "ready" sent: waiting for the source's "go"
    AUDITING = enum.auto()  # the guest runs here; the source's audit is compared
    POSTCOPY_ACTIVE = enum.auto()  # the guest runs here on RAM whose owed pages still come
    POSTCOPY_AUDITING = enum.auto()  # every page landed; the source's audit is compared
    POSTCOPY_PAUSED = enum.auto()  # the link broke: the guest waits on its missing pages
    RUNNING = enum.auto()  # the guest runs here
    FAILED = enum.auto()


class ReceiverEvent(enum.Enum):
    START = enum.auto()
    CONNECTED = enum.auto()  # the source connected (and, with TLS, was admitted)
    STRANGER = enum.auto()  # a connection that is not a vmferry source: refuse it
    CONF = enum.auto()  # one event per main-stream section
    RAM = enum.auto()
    RND = enum.auto()
    DEVD = enum.auto()
    CPUS = enum.auto()
    DEVS = enum.auto()
    VRFY = enum.auto()
    END = enum.auto()
    ABRT = enum.auto()  # the source gives up while sections flow
    PCPY = enum.auto()  # post-copy: the pages the source still owes
    SET_UP = enum.auto()  # the CONF was usable: memory, devices, channels are ready
    VERIFY_PASSED = enum.auto()  # or verification is off: nothing to compare
    VERIFY_FAILED = enum.auto()
    GO = enum.auto()
    GO_UNAUDITED = enum.auto()  # "go", and an audit after the resume is due (x-verify on)
    GO_POSTCOPY = enum.auto()  # "go" to a post-copy load: the guest runs, pages come
    LANDED = enum.auto()  # post-copy: the last owed page landed
    LANDED_UNAUDITED = enum.auto()  # and the audit of all RAM is due (x-verify on)
    LINK_BROKEN = enum.auto()  # post-copy's link was reset or went silent (not closed)
    RECOVERED = enum.auto()  # a new link (migrate-recover, the source's resume)
    AUDIT_PASSED = enum.auto()
    AUDIT_FAILED = enum.auto()  # a page differs from the source's
    ABANDON = enum.auto()  # the source gives up (an "abandon" line, or any notice)
    SOURCE_SILENT = enum.auto()  # nothing from the source within its x-peer-timeout
    SOURCE_CLOSED = enum.auto()  # EOF or reset: the source stopped or was killed
    ERROR = enum.auto()  # a failure here: a bad section, an incompatible VM


class ReceiverAction(enum.Enum):
    REPORT_STATUS = enum.auto()  # the destination's query-migrate shows the new status
    AWAIT_SOURCE = enum.auto()  # accept the next connection
    REFUSE_CONNECTION = enum.auto()  # say why in one line and close it
    START_HEARTBEAT = enum.auto()  # "alive" on the reply path while the load runs
    READ_SECTION = enum.auto()  # the next main-stream section header
    SET_UP = enum.auto()  # the peer timeout, extra channels, guest RAM, devices
    SEND_ACCEPTED = enum.auto()
    LOAD_RAM = enum.auto()
    END_ROUND = enum.auto()  # count it: the stream cap is per round
    LOAD_DEVICE_DATA = enum.auto()  # a DEVD chunk to its device (RESUMING)
    LOAD_CPU_STATE = enum.auto()
    LOAD_DEVICE_SUMMARY = enum.auto()
    LOAD_DIGESTS = enum.auto()
    FINISH_LOAD = enum.auto()  # join the channels, check CPUS and DEVS, commit devices
    VERIFY = enum.auto()  # compare with the source's digests (if it sent them)
    SEND_READY = enum.auto()
    AWAIT_GO = enum.auto()
    START_VM = enum.auto()  # devices RUNNING, vCPUs run
    SEND_RESUMED = enum.auto()  # a failure to send is only logged: the guest is ours
    HOLD_OUTPUT = enum.auto()  # x-verify-hold-output: the VF's frames held (else nothing)
    AWAIT_AUDIT = enum.auto()  # read the source's audit chunks, compare them
    SEND_AUDITED = enum.auto()  # the verdict (failed: after the guest was stopped)
    RELEASE_OUTPUT = enum.auto()  # the held frames go out (if held)
    STOP_VM = enum.auto()  # vCPUs and devices stopped: the guest runs on at the source
    DROP_OUTPUT = enum.auto()  # the held frames are dropped (if held)
    KEEP_UNAUDITED = enum.auto()  # the source is gone: the guest runs on here, unaudited
    STOP_HEARTBEAT = enum.auto()
    SEND_FAILED = enum.auto()  # the reason (and what a failed check found) to the source
    DISCARD = enum.auto()  # close what was built: machine, devices, memory
    LOAD_OWED = enum.auto()  # PCPY: the owed pages' bitmap
    PREPARE_POSTCOPY = enum.auto()  # discard owed pages, userfaultfd, page channels, server
    GATE_DMA = enum.auto()  # every device's IOMMU waits for missing pages (a page gate)
    AWAIT_LANDED = enum.auto()  # until the last owed page landed
    END_POSTCOPY = enum.auto()  # RAM unregistered, DMA ungated, the fault server stopped
    SEND_LANDED = enum.auto()  # "landed", with post-copy's figures
    AWAIT_RECOVER = enum.auto()  # until migrate-recover's listener gets the source back


__all__ = ["ReceiverAction", "ReceiverEvent", "ReceiverState"]

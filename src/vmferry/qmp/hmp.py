"""The few human monitor (HMP) commands vmferry answers through ``human-monitor-command``
(what ``qmp-shell -H`` sends): ``info status`` and ``info migrate``, in QEMU's wording,
drawn from the same replies as ``query-status`` and ``query-migrate``; and post-copy's
``migrate_start_postcopy``, ``migrate_pause`` and ``migrate_recover URI``, which run the
QMP commands of the same names.

The text is QEMU 7.2's (``hmp_info_status``, ``hmp_info_migrate``), lines ending in CR LF
as its monitor sends them; a command that fails answers ``Error: `` and its reason, as
QEMU's does. Anything else gets QEMU's answer to an unknown command (a reply, not an
error).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from vmferry.qmp.backend import QmpError

Query = Callable[[], dict[str, Any]]
Action = Callable[..., None]

#: The commands that do something, and the arguments each takes (all strings).
ACTIONS: Mapping[str, tuple[str, ...]] = {
    "migrate_start_postcopy": (),
    "migrate_pause": (),
    "migrate_recover": ("uri",),
}

INFO_HELP = (
    ("migrate", "show migration status"),
    ("status", "show the current VM status (running|paused)"),
)


def _lines(lines: list[str]) -> str:
    return "".join(f"{line}\r\n" for line in lines)


def info_status(status: dict[str, Any]) -> str:
    """``VM status: running``, ``VM status: paused``, ``VM status: paused (postmigrate)``."""
    state = str(status.get("status", "running"))
    if status.get("running"):
        return _lines(["VM status: running"])
    return _lines([f"VM status: paused ({state})" if state != "paused" else "VM status: paused"])


def _kib(value: Any) -> int:
    return int(value) >> 10


def info_migrate(info: dict[str, Any]) -> str:
    """``query-migrate``'s reply as ``info migrate`` prints it ("" before any migration:
    QEMU prints its migration globals there, which vmferry has none of)."""
    if not info:
        return ""
    status = str(info["status"])
    first = f"Migration status: {status}"
    if status == "failed" and info.get("error-desc"):
        first += f" ({info['error-desc']})"
    out = [first, f"total time: {info.get('total-time', 0)} ms"]
    if "expected-downtime" in info:
        out.append(f"expected downtime: {info['expected-downtime']} ms")
    if "downtime" in info:
        out.append(f"downtime: {info['downtime']} ms")
    if "setup-time" in info:
        out.append(f"setup: {info['setup-time']} ms")
    ram = info.get("ram")
    if ram:
        out += [
            f"transferred ram: {_kib(ram['transferred'])} kbytes",
            f"throughput: {float(ram['mbps']):.2f} mbps",
            f"remaining ram: {_kib(ram['remaining'])} kbytes",
            f"total ram: {_kib(ram['total'])} kbytes",
            f"duplicate: {ram['duplicate']} pages",
            f"skipped: {ram.get('skipped', 0)} pages",
            f"normal: {ram['normal']} pages",
            f"normal bytes: {_kib(ram['normal-bytes'])} kbytes",
            f"dirty sync count: {ram['dirty-sync-count']}",
            f"page size: {_kib(ram['page-size'])} kbytes",
            f"multifd bytes: {_kib(ram.get('multifd-bytes', 0))} kbytes",
        ]
        if "pages-per-second" in ram:  # QEMU's own figure; vmferry does not report it
            out.append(f"pages-per-second: {ram['pages-per-second']}")
        # QEMU prints these only when not zero.
        if ram.get("dirty-pages-rate"):
            out.append(f"dirty pages rate: {ram['dirty-pages-rate']} pages")
        if ram.get("postcopy-requests"):
            out.append(f"postcopy request count: {ram['postcopy-requests']}")
        if ram.get("precopy-bytes"):
            out.append(f"precopy ram: {_kib(ram['precopy-bytes'])} kbytes")
        if ram.get("downtime-bytes"):
            out.append(f"downtime ram: {_kib(ram['downtime-bytes'])} kbytes")
        if ram.get("postcopy-bytes"):
            out.append(f"postcopy ram: {_kib(ram['postcopy-bytes'])} kbytes")
    vfio = info.get("vfio")
    if vfio and vfio.get("transferred"):
        out.append(f"vfio device transferred: {_kib(vfio['transferred'])} kbytes")
    if "cpu-throttle-percentage" in info:
        out.append(f"cpu throttle percentage: {info['cpu-throttle-percentage']}")
    if "postcopy-blocktime" in info:
        out.append(f"postcopy blocktime: {info['postcopy-blocktime']}")
    if "postcopy-vcpu-blocktime" in info:
        times = ",".join(str(t) for t in info["postcopy-vcpu-blocktime"])
        out.append(f"postcopy vcpu blocktime: {times}")
    for addr in info.get("socket-address", []):  # a destination that waits, as QEMU prints
        out += ["socket address: [", f"\ttcp:{addr['host']}:{addr['port']}", "]"]
    return _lines(out)


def _act(name: str, args: list[str], action: Action) -> str:
    wanted = ACTIONS[name]
    if len(args) != len(wanted):
        what = f"one argument: {wanted[0]}" if wanted else "no arguments"
        return _lines([f"Error: {name} takes {what}"])
    try:
        action(*args)
    except QmpError as e:
        return _lines([f"Error: {e.desc}"])
    return ""


def run(
    command_line: str,
    *,
    query_status: Query,
    query_migrate: Query,
    actions: Mapping[str, Action] | None = None,
) -> str:
    """The monitor's text reply to one command line; ``actions`` run the commands named
    in ACTIONS (those not given are unknown commands)."""
    words = command_line.split()
    if words and words[0] in ACTIONS and actions and words[0] in actions:
        return _act(words[0], words[1:], actions[words[0]])
    if words == ["info"]:
        return _lines([f"info {name}  -- {what}" for name, what in INFO_HELP])
    if len(words) == 2 and words[0] == "info":
        if words[1] == "status":
            return info_status(query_status())
        if words[1] == "migrate":
            return info_migrate(query_migrate())
    return _lines([f"unknown command: '{' '.join(words)}'"])

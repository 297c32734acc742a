"""When post-copy's QMP commands are refused, in QEMU's words where QEMU has some.

Pure functions of what the controller knows (the capability, each side's status, the
URI's scheme): each returns the one-line refusal, or None when the command may go to
the engine, which refuses what only it can judge (a MigrationError). QEMU's texts:
``qmp_migrate_start_postcopy``, ``qmp_migrate_pause``, ``qmp_migrate_recover`` and
``migrate_prepare``'s resume check.
"""

from __future__ import annotations

from typing import Final

from vmferry.migration.status import MigrationStatus

MS = MigrationStatus
# After the switch: the VM runs at the destination, pages still come from the source.
POSTCOPY: Final = frozenset({MS.POSTCOPY_ACTIVE, MS.POSTCOPY_PAUSED, MS.POSTCOPY_RECOVER})
# A migration in progress (QEMU's migration_is_running): another may not start, nor may
# a capability change under it.
RUNNING: Final = frozenset({MS.SETUP, MS.ACTIVE, MS.DEVICE, MS.CANCELLING}) | POSTCOPY
# Where migrate-pause can cut the link (QEMU's migration_postcopy_is_alive).
PAUSABLE: Final = frozenset({MS.POSTCOPY_ACTIVE, MS.POSTCOPY_RECOVER})
_ENDED: Final = frozenset({MS.COMPLETED, MS.FAILED, MS.CANCELLED})
_START: Final = "migrate-start-postcopy"

PAUSE_REFUSAL: Final = (
    "migrate-pause is currently only supported during postcopy-active or postcopy-recover state"
)


def start_refusal(postcopy_ram: bool, status: str | None, scheme: str = "tcp") -> str | None:
    """migrate-start-postcopy: the capability first, then whether there is a migration
    (QEMU's two checks), then vmferry's: one that ended, is in post-copy already, is
    being cancelled, or goes to a file. ``status`` None: no migration was started."""
    if not postcopy_ram:
        return "Enable postcopy with migrate_set_capability before the start of migration"
    if status is None:
        return "Postcopy must be started after migration has been started"
    if status in _ENDED:
        # QEMU says nothing here (it would race with the end); vmferry says it is late.
        ended = "been cancelled" if status == MS.CANCELLED else status
        return f"{_START}: the migration has already {ended}"
    if status in POSTCOPY:
        return f"{_START}: the migration is already in post-copy ({status})"
    if status == MS.CANCELLING:
        return f"{_START}: the migration is being cancelled"
    if scheme != "tcp":
        # No VM runs at the other end of a file to ask for the pages.
        return f"{_START}: a migration to a file cannot switch to post-copy"
    return None


def recover_refusal(incoming_status: str | None) -> str | None:
    """migrate-recover, on the destination: only in postcopy-paused (vmferry adds where
    it is; None: nothing is incoming)."""
    if incoming_status == MS.POSTCOPY_PAUSED:
        return None
    now = incoming_status or "no incoming migration"
    return f"Migrate recover can only be run when postcopy is paused. (now: {now})"


def resume_refusal(status: str | None) -> str | None:
    """migrate with resume: true, on the source: only in postcopy-paused."""
    if status == MS.POSTCOPY_PAUSED:
        return None
    return f"Cannot resume if there is no paused migration (now: {status or 'no migration'})"


def cancel_refusal(status: str) -> str | None:
    """migrate_cancel after the switch: there is nothing to roll back to."""
    if status not in POSTCOPY:
        return None
    return (
        f"migrate_cancel: the migration is in post-copy ({status}): the VM runs on the "
        "destination and cannot come back; it completes once every page is there (after "
        "a broken link: migrate-recover, then migrate resume)"
    )


def cont_refusal(status: str) -> str | None:
    """cont on the source after the switch: the VM runs at the destination."""
    if status not in POSTCOPY:
        return None
    return (
        f"the VM runs on the migration destination in post-copy ({status}); only the "
        "pages it still needs are here, and running it here too would make two copies of it"
    )

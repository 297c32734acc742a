"""What the QMP socket needs from the VM: one method per command, and the error it may raise."""

from __future__ import annotations

from typing import Any, Protocol

from vmferry.errors import VmferryError


class QmpError(VmferryError):
    """A command failed; becomes `{"error": {"class": ..., "desc": ...}}` on the wire.

    Raised by backends to choose the reply, by the schema for bad arguments, and by
    `QmpClient.execute` when the server answers with an error.
    """

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def __repr__(self) -> str:
        return f"QmpError({self.desc!r}, error_class={self.error_class!r})"


class QmpBackend(Protocol):
    """The VM behind a `QmpServer`.

    Arguments arrive already validated against `vmferry.qmp.schema`; only the arguments
    the client gave are passed, so defaults here apply. The server calls one method at a
    time (a lock, like QEMU's big lock), from its client threads. A method that does not
    exist makes its command answer CommandNotFound and drop out of query-commands.
    Raise `QmpError` to choose the error reply; any other exception becomes a GenericError
    carrying its text. `quit` must return before the VM goes away: the reply is written
    after it returns.
    """

    def query_status(self) -> dict[str, Any]:
        """`{"running": bool, "status": "running" | "paused" | ...}`; singlestep is added."""
        ...

    def stop(self) -> None: ...

    def cont(self) -> None: ...

    def quit(self) -> None: ...

    def migrate(self, uri: str, detach: bool = True, resume: bool = False) -> None:
        """``resume``: go on with a migration in postcopy-paused over ``uri`` (where the
        destination's migrate-recover listens)."""
        ...

    def migrate_start_postcopy(self) -> None:
        """Switch the running migration to post-copy at the end of the round in flight."""
        ...

    def migrate_pause(self) -> None:
        """Cut the link of a migration in post-copy: both sides go to postcopy-paused."""
        ...

    def migrate_recover(self, uri: str) -> None:
        """Destination, in postcopy-paused: listen on ``uri`` for the source's resume."""
        ...

    def migrate_incoming(self, uri: str) -> None: ...

    def migrate_cancel(self) -> None: ...

    def query_migrate(self) -> dict[str, Any]:
        """QEMU's MigrationInfo fields (`status`, `ram`, `downtime`, ...), as JSON values."""
        ...

    def migrate_set_parameters(self, params: dict[str, Any]) -> None:
        """Only the parameters given, keyed by their QMP (dashed) names, range-checked."""
        ...

    def query_migrate_parameters(self) -> dict[str, Any]:
        """All parameters, keyed by their QMP (dashed) names."""
        ...

    def migrate_set_capabilities(self, caps: dict[str, bool]) -> None:
        """Only the capabilities given; every name is one of the schema's known ones."""
        ...

    def query_migrate_capabilities(self) -> dict[str, bool]: ...

    def x_query_migrate_report(self) -> dict[str, Any]:
        """vmferry's full report of the last migration (the `--report` JSON)."""
        ...

    def human_monitor_command(self, command_line: str, cpu_index: int | None = None) -> str:
        """The human monitor's text reply (`info status`, `info migrate`)."""
        ...

    def x_mdev_types(self, parent: str = "gpu0") -> list[dict[str, Any]]:
        """The parent's vGPU types with their `available-instances`."""
        ...

    def x_mdev_create(
        self, type: str, uuid: str | None = None, parent: str = "gpu0", vram: int | None = None
    ) -> dict[str, Any]:
        """Create a vGPU on the host; returns it (with its `uuid`)."""
        ...

    def x_mdev_remove(self, uuid: str) -> None: ...

    def x_mdev_list(self) -> list[dict[str, Any]]:
        """The host's vGPUs and the processes using them."""
        ...

    def x_sriov_set_numvfs(self, pf: str, numvfs: int) -> dict[str, Any]: ...

    def x_sriov_config_vf(
        self,
        pf: str,
        index: int,
        mac: str | None = None,
        vlan: int | None = None,
        queues: int | None = None,
    ) -> dict[str, Any]: ...

    def x_query_sriov(self) -> list[dict[str, Any]]:
        """The host's PFs and VFs, as `vmferry sriov list --json` prints them."""
        ...

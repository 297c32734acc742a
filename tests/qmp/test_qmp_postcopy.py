"""Post-copy's control surface: migrate-start-postcopy, migrate-pause, migrate-recover and
migrate's resume, with QEMU's checks and words, on a VmController whose engine is a fake
(the engine's own refusals arrive as MigrationError and leave as one QMP error line)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

from vmferry.controller import VmController
from vmferry.errors import ConfigError, MigrationError
from vmferry.migration.channel import parse_uri
from vmferry.migration.metrics import MigrationStats, PostcopyFigures
from vmferry.migration.params import MigrationCapabilities
from vmferry.migration.status import MigrationStatus as MS
from vmferry.qmp import QmpError, QmpServer
from vmferry.qmp.client import QmpClient

POSTCOPY_ON = MigrationCapabilities(postcopy_ram=True)


class FakeSource:
    """What the controller uses of MigrationSource; `refuse` makes the engine say no."""

    def __init__(
        self,
        status: MS,
        caps: MigrationCapabilities = POSTCOPY_ON,
        uri: str = "tcp:127.0.0.1:4444",
        refuse: str = "",
    ) -> None:
        self.stats = MigrationStats(status=status)
        self.caps = caps
        self.uri = parse_uri(uri)
        self.refuse = refuse
        self.released = False
        self.calls: list[tuple[str, Any]] = []

    def _act(self, name: str, arg: Any = None) -> None:
        if self.refuse:
            raise MigrationError(self.refuse)
        self.calls.append((name, arg))

    def request_postcopy(self) -> None:
        self._act("request_postcopy")

    def pause_postcopy(self) -> None:
        self._act("pause_postcopy")

    def resume_postcopy(self, uri: str) -> None:
        self._act("resume_postcopy", uri)

    def cancel(self, reason: str = "cancelled by the user") -> None:
        self.calls.append(("cancel", reason))

    def snapshot(self) -> MigrationStats:
        return self.stats


class FakeIncoming:
    def __init__(self, status: MS, refuse: str = "") -> None:
        self.status = status
        self.refuse = refuse
        self.calls: list[tuple[str, Any]] = []

    def pause_postcopy(self) -> None:
        if self.refuse:
            raise MigrationError(self.refuse)
        self.calls.append(("pause_postcopy", None))

    def recover(self, uri: str) -> None:
        if self.refuse:
            raise ConfigError(self.refuse)
        self.calls.append(("recover", uri))


def _source(
    mig: FakeSource | None = None, caps: MigrationCapabilities = POSTCOPY_ON
) -> VmController:
    c = VmController(None)
    # A VM that runs here (the run state reads only these).
    c._machine = SimpleNamespace(exit=None, running=False)  # type: ignore[assignment]
    c.caps = caps
    c.migration = mig  # type: ignore[assignment]
    return c


def _destination(inc: FakeIncoming) -> VmController:
    c = VmController(None)
    c.incoming = inc  # type: ignore[assignment]
    c.incoming_status = MS.ACTIVE
    return c


# ---- migrate-start-postcopy


def test_start_postcopy_without_the_capability_is_qemus_error() -> None:
    mig = FakeSource(MS.ACTIVE, caps=MigrationCapabilities())
    with pytest.raises(QmpError, match=r"^Enable postcopy with migrate_set_capability before"):
        _source(mig, caps=MigrationCapabilities()).migrate_start_postcopy()
    # Setting it now does not help a migration started without it (QEMU: "before the start").
    with pytest.raises(QmpError, match=r"^Enable postcopy with migrate_set_capability"):
        _source(mig, caps=POSTCOPY_ON).migrate_start_postcopy()
    assert mig.calls == []


def test_start_postcopy_before_any_migration_is_qemus_error() -> None:
    with pytest.raises(
        QmpError, match=r"^Postcopy must be started after migration has been started$"
    ):
        _source(None).migrate_start_postcopy()
    # Without the capability QEMU names the capability first.
    with pytest.raises(QmpError, match=r"^Enable postcopy"):
        _source(None, caps=MigrationCapabilities()).migrate_start_postcopy()


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (MS.COMPLETED, "the migration has already completed"),
        (MS.FAILED, "the migration has already failed"),
        (MS.CANCELLED, "the migration has already been cancelled"),
        (MS.POSTCOPY_ACTIVE, "already in post-copy (postcopy-active)"),
        (MS.POSTCOPY_PAUSED, "already in post-copy (postcopy-paused)"),
        (MS.CANCELLING, "being cancelled"),
    ],
)
def test_start_postcopy_when_it_cannot_start_says_why(status: MS, words: str) -> None:
    mig = FakeSource(status)
    with pytest.raises(QmpError) as e:
        _source(mig).migrate_start_postcopy()
    assert e.value.desc.startswith("migrate-start-postcopy: ") and words in e.value.desc
    assert mig.calls == []


def test_start_postcopy_of_a_migration_to_a_file_is_refused() -> None:
    mig = FakeSource(MS.ACTIVE, uri="file:/tmp/vm.state")
    with pytest.raises(QmpError, match=r"a migration to a file cannot switch to post-copy"):
        _source(mig).migrate_start_postcopy()


@pytest.mark.parametrize("status", [MS.SETUP, MS.ACTIVE])
def test_start_postcopy_asks_the_engine(status: MS) -> None:
    mig = FakeSource(status)
    _source(mig).migrate_start_postcopy()
    assert mig.calls == [("request_postcopy", None)]


def test_the_engines_refusal_is_one_qmp_error_line() -> None:
    why = "migrate-start-postcopy: the switchover has begun (device)"
    with pytest.raises(QmpError) as e:
        _source(FakeSource(MS.DEVICE, refuse=why)).migrate_start_postcopy()
    assert (e.value.desc, e.value.error_class) == (why, "GenericError")


# ---- migrate-pause


def test_pause_outside_post_copy_is_qemus_error() -> None:
    for c in (_source(None), _source(FakeSource(MS.ACTIVE)), _destination(FakeIncoming(MS.ACTIVE))):
        with pytest.raises(QmpError, match=r"^migrate-pause is currently only supported during"):
            c.migrate_pause()
    with pytest.raises(QmpError, match=r"postcopy-active or postcopy-recover state"):
        _source(FakeSource(MS.POSTCOPY_PAUSED)).migrate_pause()


@pytest.mark.parametrize("status", [MS.POSTCOPY_ACTIVE, MS.POSTCOPY_RECOVER])
def test_pause_cuts_the_link_on_either_side(status: MS) -> None:
    mig = FakeSource(status)
    _source(mig).migrate_pause()
    assert mig.calls == [("pause_postcopy", None)]
    inc = FakeIncoming(status)
    _destination(inc).migrate_pause()
    assert inc.calls == [("pause_postcopy", None)]


def test_pause_refused_by_the_engine() -> None:
    with pytest.raises(QmpError, match=r"^migrate-pause: the link is already down$"):
        _source(FakeSource(MS.POSTCOPY_ACTIVE, refuse="the link is already down")).migrate_pause()


# ---- migrate-recover (destination) and migrate resume (source)


@pytest.mark.parametrize(
    "status", [MS.ACTIVE, MS.POSTCOPY_ACTIVE, MS.POSTCOPY_RECOVER, MS.COMPLETED]
)
def test_recover_needs_a_paused_destination(status: MS) -> None:
    inc = FakeIncoming(status)
    with pytest.raises(QmpError) as e:
        _destination(inc).migrate_recover("tcp:127.0.0.1:5555")
    assert e.value.desc == (
        f"Migrate recover can only be run when postcopy is paused. (now: {status})"
    )
    assert inc.calls == []
    with pytest.raises(QmpError, match=r"paused\. \(now: no incoming migration\)"):
        _source(FakeSource(MS.POSTCOPY_PAUSED)).migrate_recover("tcp:127.0.0.1:5555")


def test_recover_listens_on_the_new_uri() -> None:
    inc = FakeIncoming(MS.POSTCOPY_PAUSED)
    _destination(inc).migrate_recover("tcp:127.0.0.1:5555")
    assert inc.calls == [("recover", "tcp:127.0.0.1:5555")]
    bad = FakeIncoming(MS.POSTCOPY_PAUSED, refuse="port 5555 is in use")
    with pytest.raises(
        QmpError, match=r"^migrate-recover tcp:127.0.0.1:5555: port 5555 is in use$"
    ):
        _destination(bad).migrate_recover("tcp:127.0.0.1:5555")


@pytest.mark.parametrize("mig", [None, FakeSource(MS.ACTIVE), FakeSource(MS.POSTCOPY_ACTIVE)])
def test_resume_without_a_paused_migration_is_qemus_error(mig: FakeSource | None) -> None:
    with pytest.raises(QmpError, match=r"^Cannot resume if there is no paused migration"):
        _source(mig).migrate("tcp:127.0.0.1:5555", resume=True)
    assert mig is None or mig.calls == []


def test_resume_goes_on_over_the_new_uri() -> None:
    mig = FakeSource(MS.POSTCOPY_PAUSED)
    _source(mig).migrate("tcp:127.0.0.1:5555", resume=True)
    assert mig.calls == [("resume_postcopy", "tcp:127.0.0.1:5555")]
    mig = FakeSource(MS.POSTCOPY_PAUSED, refuse="connection refused")
    with pytest.raises(QmpError, match=r"^migrate resume tcp:127.0.0.1:5555: connection refused$"):
        _source(mig).migrate("tcp:127.0.0.1:5555", resume=True)


# ---- what post-copy forbids meanwhile


@pytest.mark.parametrize("status", [MS.POSTCOPY_ACTIVE, MS.POSTCOPY_PAUSED, MS.POSTCOPY_RECOVER])
def test_during_post_copy_the_source_holds_still(status: MS) -> None:
    mig = FakeSource(status)
    c = _source(mig)
    assert c.query_status() == {"running": False, "status": "finish-migrate"}
    with pytest.raises(QmpError, match=r"runs on the migration destination in post-copy"):
        c.cont()
    with pytest.raises(QmpError, match=r"^migrate_cancel: the migration is in post-copy"):
        c.migrate_cancel()
    with pytest.raises(QmpError, match=r"^There's a migration process in progress$"):
        c.migrate_set_capabilities({"postcopy-ram": False})
    with pytest.raises(QmpError, match=r"^There's a migration process in progress$"):
        c.migrate("tcp:127.0.0.1:5555")
    c.end_migration()  # no rollback after the switch: nothing is cancelled
    assert mig.calls == []
    assert c.caps.postcopy_ram


def test_capability_and_parameter_set_and_refused_through_the_socket(sock_path: str) -> None:
    c = VmController(None)
    with QmpServer(sock_path, c), QmpClient(sock_path) as qmp:
        caps = [
            {"capability": "postcopy-ram", "state": True},
            {"capability": "postcopy-blocktime", "state": True},
        ]
        qmp.execute("migrate-set-capabilities", capabilities=caps)
        got = {c["capability"]: c["state"] for c in qmp.execute("query-migrate-capabilities")}
        assert got["postcopy-ram"] and got["postcopy-blocktime"]
        qmp.execute("migrate-set-parameters", **{"x-postcopy-after": "5,30s"})
        assert qmp.execute("query-migrate-parameters")["x-postcopy-after"] == "5,30s"
        with pytest.raises(QmpError, match=r"x-postcopy-after = 'soon'"):
            qmp.execute("migrate-set-parameters", **{"x-postcopy-after": "soon"})
        with pytest.raises(QmpError, match=r"expected: string"):
            qmp.execute("migrate-set-parameters", **{"x-postcopy-after": 5})
        assert qmp.execute("query-migrate-parameters")["x-postcopy-after"] == "5,30s"
        with pytest.raises(QmpError, match=r"^Postcopy must be started after migration"):
            qmp.execute("migrate-start-postcopy")
        with pytest.raises(QmpError, match=r"^migrate-pause is currently only supported"):
            qmp.execute("migrate-pause")
        with pytest.raises(QmpError, match=r"Parameter 'uri' is missing"):
            qmp.execute("migrate-recover")
        with pytest.raises(QmpError, match=r"^Migrate recover can only be run"):
            qmp.execute("migrate-recover", uri="tcp:127.0.0.1:1")
        names = {c["name"] for c in qmp.execute("query-commands")}
        assert {"migrate-start-postcopy", "migrate-pause", "migrate-recover"} <= names


# ---- query-migrate and the report


def _in_postcopy() -> MigrationStats:
    return MigrationStats(
        status=MS.POSTCOPY_ACTIVE,
        postcopy=PostcopyFigures(
            active=True,
            switch_s=1.25,
            requests=37,
            bytes=5 << 20,
            urgent_pages=40,
            pushed_pages=1240,
            owed_pages=2000,
            blocktime_ms=12.6,
            vcpu_blocktime_ms=[8.4, 4.2],
            latency_ms={"p50": 0.4, "p99": 2.5, "max": 3.1},
            recoveries=1,
        ),
    )


def test_query_migrate_in_post_copy_has_qemus_post_copy_fields() -> None:
    c = _source(FakeSource(MS.POSTCOPY_ACTIVE))
    assert c.migration is not None
    c.migration.stats = _in_postcopy()
    info = c.query_migrate()
    assert info["status"] == "postcopy-active"
    assert (info["ram"]["postcopy-requests"], info["ram"]["postcopy-bytes"]) == (37, 5 << 20)
    assert info["postcopy-blocktime"] == 13  # whole ms, as QEMU's uint32
    assert info["postcopy-vcpu-blocktime"] == [8, 4]
    assert "downtime" in info and "expected-downtime" not in info
    # Before the switch: no blocktime at all (QEMU shows it only once known).
    c.migration.stats = MigrationStats(status=MS.ACTIVE)
    info = c.query_migrate()
    assert "postcopy-blocktime" not in info and info["ram"]["postcopy-requests"] == 0


def test_destination_status_follows_the_engine_in_post_copy() -> None:
    inc = FakeIncoming(MS.POSTCOPY_PAUSED)
    c = _destination(inc)
    assert c.query_migrate()["status"] == "postcopy-paused"
    # The guest runs here already (QEMU's destination says running in post-copy) but is
    # not this controller's to stop until every page has arrived.
    assert c.query_status() == {"running": True, "status": "running"}
    with pytest.raises(QmpError, match=r"^the VM runs here in post-copy \(postcopy-paused\)"):
        c.stop()
    inc.status = MS.ACTIVE  # before the switch the controller's own record says
    assert c.query_migrate()["status"] == "active"
    assert c.query_status() == {"running": False, "status": "inmigrate"}


def test_report_has_every_post_copy_figure_and_reads_back() -> None:
    from vmferry.migration import report

    stats = _in_postcopy()
    rep = report.report_dict(stats, c_params(), POSTCOPY_ON)
    pc = rep["postcopy"]
    assert pc == {
        "active": True,
        "switch-time": 1.25,
        "requests": 37,
        "bytes": 5 << 20,
        "urgent-pages": 40,
        "pushed-pages": 1240,
        "owed-pages": 2000,
        "blocktime": 12.6,
        "vcpu-blocktime": [8.4, 4.2],
        "latency": {"p50": 0.4, "p99": 2.5, "max": 3.1},
        "recoveries": 1,
        "complete-time": 0.0,
    }
    # One key per PostcopyFigures field: a new figure cannot be left out unseen.
    assert len(pc) == len(dataclasses.fields(PostcopyFigures))
    assert report.stats_from_report(rep).postcopy == stats.postcopy
    assert rep["capabilities"]["postcopy-ram"] is True


def c_params() -> Any:
    from vmferry.migration.params import MigrationParameters

    return MigrationParameters(postcopy_after="5")


def test_destination_reports_its_blocktime_once_the_vm_has_arrived() -> None:
    c = _destination(FakeIncoming(MS.COMPLETED))
    c.incoming_status = MS.COMPLETED
    assert "postcopy-blocktime" not in c.query_migrate()
    c.incoming_result = SimpleNamespace(postcopy={"blocktime_ms": 81.6, "requests": 30})  # type: ignore[assignment]
    assert c.query_migrate() == {"status": "completed", "postcopy-blocktime": 82}


def test_per_vcpu_blocktime_is_absent_where_it_was_not_measured() -> None:
    from vmferry.migration import report

    assert report.blocktime_dict(PostcopyFigures(active=True, blocktime_ms=5.0)) == {
        "postcopy-blocktime": 5
    }
    assert report.blocktime_dict(PostcopyFigures(active=False, blocktime_ms=5.0)) == {}


def test_refusals_are_pure_and_say_nothing_when_allowed() -> None:
    from vmferry.migration import postcopy_commands as commands

    assert commands.start_refusal(True, MS.ACTIVE) is None
    assert commands.start_refusal(True, MS.SETUP, "tcp") is None
    assert commands.recover_refusal(MS.POSTCOPY_PAUSED) is None
    assert commands.resume_refusal(MS.POSTCOPY_PAUSED) is None
    for status in (MS.ACTIVE, MS.DEVICE, MS.COMPLETED):
        assert commands.cancel_refusal(status) is None
        assert commands.cont_refusal(status) is None
    assert commands.RUNNING >= commands.POSTCOPY >= commands.PAUSABLE

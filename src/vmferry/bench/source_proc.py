"""The benches' vmferry source process (``python -m vmferry.bench.migrate source``,
``python -m vmferry.bench.postcopy_vmferry source``): a guest booted with a QMP socket,
its RAM optionally filled from the host, whose migration report is written to a file
before the process exits (``vmferry run`` exits the moment a migration completes, which
can race a last ``x-query-migrate-report``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vmferry.bench import fill as bench_fill
from vmferry.controller import VmController
from vmferry.machine import Machine, MachineConfig
from vmferry.migration.source import MigrationSource

C = TypeVar("C", bound=VmController)


def source_parser(prog: str, timeout_s: float) -> argparse.ArgumentParser:
    """The options every source takes; the guest's command line follows ``--``."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--memory", type=int, required=True)
    p.add_argument("--serial", required=True)
    p.add_argument("--qmp", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--timeout", type=float, default=timeout_s)
    return p


def split_guest(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the source's own arguments, the guest's command line after ``--``)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def serve(
    args: argparse.Namespace,
    config: MachineConfig,
    controller_of: Callable[[Machine], C],
    until: Callable[[C, float], str],
    *,
    fill: bool,
    report_extra: Callable[[MigrationSource], dict[str, Any]] | None = None,
) -> str:
    """Boots the guest, serves QMP on ``args.qmp`` and runs it until ``until(controller,
    args.timeout)`` returns (its outcome, "" for timed out); then writes the migration's
    report (x-query-migrate-report's, plus ``report_extra``'s keys) to ``args.report``."""
    from vmferry.migration import report as mig_report
    from vmferry.qmp.server import QmpServer

    outcome = ""
    with open(args.serial, "ab") as serial, Machine.boot(config, serial=serial) as m:
        if fill:
            bench_fill.fill_memory(m.memory)
        controller = controller_of(m)
        server = QmpServer(args.qmp, controller)
        controller.emit = server.emit
        try:
            server.start()
            m.start()
            outcome = until(controller, args.timeout)
            mig = controller.migration
            if mig is not None:
                mig.wait(60)
                doc = mig_report.report_dict(mig.stats, mig.params, mig.caps)
                if report_extra is not None:
                    doc.update(report_extra(mig))
                Path(args.report).write_text(json.dumps(doc, indent=2))
        finally:
            server.close()
    return outcome


__all__ = ["serve", "source_parser", "split_guest"]

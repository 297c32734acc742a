"""``vmferry run``: boot a guest image, or take one in from a file or a migration, and run
it until it ends, is migrated away, or is told to quit."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from vmferry.cli import run_checks
from vmferry.cli import tls as tls_cmd
from vmferry.controller import VmController
from vmferry.errors import ConfigError, GuestError, MigrationError, VmferryError
from vmferry.kvm.system import DEFAULT_DEVICE
from vmferry.machine import GuestExit, Machine, MachineConfig
from vmferry.machine.vcpu_thread import install_kick_handler
from vmferry.migration.channel import parse_uri
from vmferry.migration.destination import IncomingMigration
from vmferry.migration.restore import restore_from_file
from vmferry.migration.snapshot import save_to_file
from vmferry.qmp.server import QmpServer

LINGER_S = 10.0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a guest image (or take one in from a file or a migration)",
        description="Run a multiboot guest image on KVM. Guest arguments go after '--'. "
        "The exit status is the value the guest wrote to the debug-exit port; vmferry's own "
        "errors exit with 125.",
    )
    p.add_argument(
        "image",
        nargs="?",
        help="built-in guest name (memtouch, cpustate, …) or path to a multiboot ELF",
    )
    p.add_argument(
        "--memory",
        "-m",
        metavar="SIZE",
        help="guest RAM: MiB, or with a suffix K, M, G or T, e.g. 1.5G (default 1G)",
    )
    p.add_argument("--vcpus", type=int, help="number of vCPUs, 1-8 (default 1)")
    p.add_argument(
        "--overcommit",
        action="store_true",
        help="run a guest with more RAM than this host has (RAM and swap): it works as "
        "long as the guest touches less (guest RAM is allocated on first touch)",
    )
    p.add_argument(
        "--serial", metavar="FILE", help="write the guest's serial output to FILE (default: stdout)"
    )
    p.add_argument(
        "--save-after",
        nargs=2,
        metavar=("SECONDS", "FILE"),
        help="stop the VM after SECONDS and save its complete state to FILE",
    )
    p.add_argument(
        "--incoming",
        metavar="URI",
        help="take the VM in instead of booting one: file:PATH (a saved or "
        "migrated state) or tcp:HOST:PORT (wait for a live migration)",
    )
    p.add_argument(
        "--device",
        action="append",
        metavar="MODEL[,dirty=MODE…]",
        help="attach a device (e.g. dmaengine,dirty=iommu; modes: iommu, device, none, "
        "broken); repeat for more",
    )
    p.add_argument(
        "--x-device-version",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="on a destination: make this host's MODEL report version N (to see what an "
        "incompatible destination does)",
    )
    p.add_argument(
        "--prealloc",
        metavar="SIZE",
        help="with --incoming tcp: allocate SIZE of guest RAM before the migration starts "
        "(the VM's RAM size): receiving into fresh memory costs more than the network",
    )
    tls_cmd.add_run_arguments(p)
    p.add_argument(
        "--qmp", metavar="[unix:]PATH", help="open a QMP control socket (mode 0600) at PATH"
    )
    p.add_argument(
        "--timeout",
        default=None,
        metavar="SECONDS",
        help="give up (error) if the guest has not finished after this many seconds; "
        "with --incoming, it bounds only the wait for the VM to arrive: a VM that has "
        "arrived runs to its end",
    )
    p.add_argument("--kvm-device", default=DEFAULT_DEVICE, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)


def _exit_status(result: GuestExit | None, timeout: float | None) -> int:
    if result is None:
        raise GuestError(f"the guest did not finish within {timeout} s")
    if result.error is not None:
        raise result.error
    assert result.code is not None
    return result.code & 0xFF


def _note(msg: str) -> None:
    print(f"vmferry: {msg}", file=sys.stderr, flush=True)


def _qmp_path(arg: str | None) -> str | None:
    """unix:PATH (QEMU's -qmp form) or a bare PATH, as vmferry migrate --qmp takes."""
    if arg is None:
        return None
    path = arg.removeprefix("unix:")
    if not path:
        raise ConfigError(f"--qmp {arg}: expected PATH or unix:PATH")
    if ":" in path.split("/", 1)[0]:
        # tcp:…, telnet:…: QEMU's other -qmp back-ends, not a file name with a colon.
        raise ConfigError(f"--qmp {arg}: vmferry's QMP is a Unix socket: PATH or unix:PATH")
    return path


def _versions(args: argparse.Namespace) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in args.x_device_version:
        model, _, n = item.partition("=")
        if not model or not n.isdigit():
            raise ConfigError(f"--x-device-version {item}: expected MODEL=N")
        out[model] = int(n)
    return out


def _from_file(path: str, args: argparse.Namespace, serial: BinaryIO) -> Machine:
    try:
        restored = restore_from_file(path, kvm_device=args.kvm_device, serial=serial)
    except OSError as e:  # a file that opens but cannot be read (EIO, a FIFO gone, …)
        raise ConfigError(f"--incoming file:{path}: cannot read it: {e.strerror or e}") from e
    snap = restored.loaded
    _note(
        f"restored {snap.state.config.image or 'guest'} from {path} "
        f"({snap.ram.normal} pages, {snap.ram.zero} zero; verification "
        f"{restored.verify.status}) in {restored.seconds:.3f} s"
    )
    return restored.machine


def _note_arrival(controller: VmController) -> None:
    result = controller.incoming_result
    if result is not None:
        _note(
            f"migration received ({result.rounds} rounds, {result.ram_pages} pages; "
            f"verification {result.verify.status}); the VM runs here now"
        )


def cmd_run(args: argparse.Namespace) -> int:
    # Machines may be built later on other threads (migrate-incoming): arm the vCPU kick
    # signal now, on the main thread, where Python lets a handler be installed.
    install_kick_handler()
    # Everything that can be refused is refused here, before a guest boots or a migration
    # is awaited: one line, exit 125, nothing lost.
    timeout = None if args.timeout is None else run_checks.seconds("--timeout", args.timeout)
    save_after: tuple[float, str] | None = None
    if args.incoming:
        run_checks.check_incoming(args)
        if args.incoming == "defer" and not args.qmp:
            raise ConfigError(
                "--incoming defer needs --qmp: the QMP command migrate-incoming starts it"
            )
        uri = None if args.incoming == "defer" else parse_uri(args.incoming)
        prealloc = run_checks.prealloc_size(args)
    else:
        if not args.image:
            raise ConfigError("vmferry run needs a guest image (or --incoming URI)")
        run_checks.check_boot(args)
        config = MachineConfig(
            memory=run_checks.memory_size(args),
            vcpus=run_checks.DEFAULT_VCPUS if args.vcpus is None else args.vcpus,
            image=args.image,
            cmdline=args.guest_cmdline,
            devices=tuple(args.device or ()),
        )
        if args.save_after:
            save_after = (
                run_checks.seconds("--save-after", args.save_after[0]),
                args.save_after[1],
            )
            run_checks.check_save_path(save_after[1])
    serial = run_checks.open_serial(args.serial)
    qmp_path = _qmp_path(args.qmp)

    def make_incoming(uri: str) -> IncomingMigration:
        return IncomingMigration(
            parse_uri(uri),
            kvm_device=args.kvm_device,
            serial=serial,
            device_versions=_versions(args),
            tls=tls_cmd.incoming_tls(controller.params),
        )

    controller = VmController(None, make_incoming=make_incoming)
    tls_server = tls_cmd.apply_run_flags(args, controller)  # refused before anything runs
    with contextlib.ExitStack() as stack:
        # Closed last: the machine, whether it was booted here or arrived later.
        stack.callback(_close_machine, controller)
        server: QmpServer | None = None
        if qmp_path:
            server = QmpServer(qmp_path, controller)
            run_checks.listen_qmp(server)
            stack.callback(server.close)
            stack.push(_shutdown_event(server))
            controller.emit = server.emit
        deadline = None if timeout is None else time.monotonic() + timeout
        if not args.incoming:
            machine = Machine.boot(config, kvm_device=args.kvm_device, serial=serial)
            controller.attach(machine)
            if save_after is not None:
                return _save_after(machine, *save_after, timeout)
            machine.start()
        elif uri is not None and uri.scheme == "file":
            controller.attach(_from_file(uri.path, args, serial))
        elif uri is not None:
            incoming = IncomingMigration(
                uri,
                kvm_device=args.kvm_device,
                serial=serial,
                device_versions=_versions(args),
                prealloc=prealloc,
                tls=tls_server,
            )
            controller.receive(incoming)
        stack.callback(controller.abandon_incoming)
        if server is not None:
            server.start()
        arrived = controller.current_machine is not None
        if args.incoming and arrived:
            deadline = None  # restored from a file: it has arrived, see below
        while True:
            outcome = controller.wait_for(0.5)
            if deadline is not None and args.incoming and controller.incoming_status == "active":
                # A source has connected (and, with TLS, been admitted): from now on the
                # migration's own peer-timeout bounds it, not --timeout.
                deadline = None
            if not arrived and controller.current_machine is not None:
                arrived = True
                _note_arrival(controller)
                # On a destination --timeout bounds only the wait for the VM: once it has
                # arrived it is the only copy (the source has let it go), so no deadline
                # may destroy it.
                deadline = None
            if outcome or (deadline is not None and time.monotonic() > deadline):
                break
        if outcome == "migrated":
            assert controller.migration is not None
            if server is not None:
                _linger(server)
            st = controller.migration.stats
            _note(
                f"migrated to {controller.migration.uri} in {st.total_ms:.0f} ms "
                f"(downtime {st.downtime_ms:.1f} ms, verification {st.verify.status}); "
                "the VM runs there now"
            )
            return 0
        if outcome == "quit":
            return 0
        if outcome == "incoming-failed":
            raise MigrationError(controller.incoming_error)
        if controller.current_machine is None:
            raise GuestError(f"no VM arrived within {timeout} s")
        mig = controller.migration
        if server is not None and mig is not None and mig.stats.status == "failed":
            # The guest ended while a migration was under way: the migration has failed
            # ("the guest ended during the migration"); let QMP clients read that.
            _linger(server)
        return _exit_status(controller.current_machine.exit, timeout)


def _shutdown_event(server: QmpServer) -> Callable[..., None]:
    """Ended by Ctrl-C or SIGTERM: tell QMP clients so before hanging up on them, as QEMU
    does (SHUTDOWN, reason host-signal), so that `vmferry migrate` can say why the source
    went rather than guess."""

    def on_exit(exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            server.emit("SHUTDOWN", {"guest": False, "reason": "host-signal"})

    return on_exit


def _linger(server: QmpServer) -> None:
    """The VM runs elsewhere now (or ended mid-migration); stay a moment for a QMP client
    (``vmferry migrate``) to read the final report, then go."""
    deadline = time.monotonic() + LINGER_S
    while server.client_count and time.monotonic() < deadline:
        time.sleep(0.05)


def _close_machine(controller: VmController) -> None:
    controller.end_migration()  # a migration under way tells its destination why first
    if controller.current_machine is not None:
        controller.current_machine.close()


def _save_after(machine: Machine, seconds: float, path: str, timeout: float | None) -> int:
    machine.start()
    early = machine.wait(seconds)
    if early is not None:
        if early.error:
            raise early.error
        raise GuestError(
            f"the guest finished (exit {early.code}) before the save point "
            f"at {seconds} s; nothing was saved"
        )
    pause_s = machine.pause()
    t0 = time.perf_counter()
    try:
        stats = save_to_file(machine, path)
    except (OSError, VmferryError) as e:
        # The VM is not lost for a failed save: it goes on as if none had been asked for.
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        machine.resume()
        _note(f"could not save to {path} ({why}); the VM was resumed and runs on")
        result = machine.wait(None if timeout is None else max(0.0, timeout - seconds))
        status = _exit_status(result, timeout)
        raise MigrationError(
            f"the VM was not saved to {path} ({why}); it ran on to its end (exit {status})"
        ) from e
    _note(
        f"saved to {path}: {stats.bytes / 2**20:.1f} MiB ({stats.normal} pages, "
        f"{stats.zero} zero) in {time.perf_counter() - t0:.3f} s "
        f"(pause took {pause_s * 1e3:.1f} ms)"
    )
    return 0

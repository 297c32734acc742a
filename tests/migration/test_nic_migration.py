"""netecho under traffic, live-migrated between two hosts in every DMA dirty-tracking
mode: the VM arrives intact, and the connection survives — no frame corrupted or
duplicated, none lost unless a switch buffer overflowed (and then counted)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RESULT_RE, ROOT, vmferry
from vmferry.devices.nic import HostConfig
from vmferry.traffic.lab import Outcome, close_hosts, make_hosts, migrate_under_traffic

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Path]]:
    with tempfile.TemporaryDirectory(prefix="vmferry-hosts-") as d:
        hs = make_hosts(Path(d))
        yield hs
        close_hosts(hs)


def check_service(o: Outcome) -> None:
    t = o.traffic
    assert t.sent > 500, t.summary()
    assert t.corrupted == 0 and t.duplicated == 0, t.summary()
    assert t.lost == o.dropped, f"{t.summary()}; switches dropped {o.dropped}"
    assert t.moves, "the peer never learned the VM's new place"
    assert t.guest is not None, "netecho did not answer the STOP"
    assert t.guest["received"] >= t.echoed and t.guest["bad"] == 0
    assert o.guest_exit == 0


@pytest.mark.parametrize("mode", ["iommu", "device", "mediated", "none"])
def test_traffic_survives_migration_in_every_tracking_mode(hosts: list[Path], mode: str) -> None:
    o = migrate_under_traffic(hosts, mode)
    st = o.source.stats
    assert st.status == "completed", st.error
    assert st.verify.status == "passed"
    assert o.dest is not None and o.dest.verify.status == "passed"
    check_service(o)
    assert o.dropped == 0, "a 4096-frame buffer overflowed during a short downtime"
    # Everything the guest answered reached the peer: its RESULT is the peer's.
    assert o.result(o.dest_out) == o.traffic.expected_result
    assert o.result(o.source_out) is None, "the source ran the guest to its end too"


def test_frames_over_the_switch_buffer_bound_are_dropped_and_counted() -> None:
    with tempfile.TemporaryDirectory(prefix="vmferry-hosts-") as d:
        hs = make_hosts(Path(d), buffer=2)
        try:
            o = migrate_under_traffic(hs, "iommu", rate=3000, after_s=0.5)
        finally:
            close_hosts(hs)
    assert o.source.stats.status == "completed", o.source.stats.error
    check_service(o)  # lost == dropped: nothing vanishes uncounted
    assert o.dropped > 0, "3000 frames/s into a 2-frame buffer should overflow"


def test_untracked_vf_dma_is_caught_by_verification(hosts: list[Path]) -> None:
    # Broken tracking loses a write only if a frame lands in a page after that page's last
    # copy: on a loaded host a short migration can miss that window (CI saw one in ~10).
    # Up to three tries, each honest: a migration that completes has passed verification.
    for _ in range(3):
        o = migrate_under_traffic(hosts, "broken", before_s=0.5, after_s=0.2)
        st = o.source.stats
        if st.status != "completed":
            break
        assert st.verify.status == "passed"
    assert st.status == "failed" and "verification failed" in st.error
    assert o.dest is None
    assert o.traffic.corrupted == 0 and o.traffic.duplicated == 0


def test_a_vf_without_migration_support_blocks_the_migration(hosts: list[Path]) -> None:
    o = migrate_under_traffic(
        hosts, "iommu", before_s=0.3, after_s=0.2, device_options=",migration=off"
    )
    st = o.source.stats
    assert st.status == "failed"
    assert "migration blocked: vf0 (pf0 VF 0) does not support migration" in st.error
    assert o.traffic.lost == 0 and o.traffic.echoed == o.traffic.sent, o.traffic.summary()


# ---- two hosts in network namespaces, the peer in a third


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def namespaces(tag: str) -> Iterator[dict[str, str]]:
    """Namespaces a (10.77.0.1), b (.2), peer (.3), each on a veth into a bridge in a
    fourth; the hosts' links shaped to 1 Gbit/s with tbf. Always removed afterwards."""
    ns = {k: f"vmf{tag}{k}" for k in ("a", "b", "p", "n")}
    try:
        for name in ns.values():
            _sh("ip", "netns", "add", name)
        _sh("ip", "-n", ns["n"], "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", ns["n"], "link", "set", "br0", "up")
        for i, k in enumerate(("a", "b", "p"), start=1):
            _sh("ip", "link", "add", f"v{tag}{k}", "type", "veth", "peer", "name", f"b{tag}{k}")
            _sh("ip", "link", "set", f"v{tag}{k}", "netns", ns[k], "name", "eth0")
            _sh("ip", "link", "set", f"b{tag}{k}", "netns", ns["n"])
            _sh("ip", "-n", ns["n"], "link", "set", f"b{tag}{k}", "master", "br0", "up")
            _sh("ip", "-n", ns[k], "addr", "add", f"10.77.0.{i}/24", "dev", "eth0")
            _sh("ip", "-n", ns[k], "link", "set", "eth0", "up")
            _sh("ip", "-n", ns[k], "link", "set", "lo", "up")
            if k != "p":
                _sh("ip", "netns", "exec", ns[k], "tc", "qdisc", "add", "dev", "eth0", "root",
                    "tbf", "rate", "1gbit", "burst", "256kb", "latency", "5ms")  # fmt: skip
        yield ns
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _in_ns(ns: str, state: Path | None, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if state is not None:
        env["VMFERRY_STATE_DIR"] = str(state)
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "vmferry.cli.main", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)


@pytest.mark.root
def test_migration_between_namespaces_keeps_the_peer_connected(tmp_path: Path) -> None:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs iproute2 (ip, tc)")
    procs: list[subprocess.Popen[bytes]] = []
    with namespaces(str(os.getpid() % 10000)) as ns:
        for host, me, other in (("a", 1, 2), ("b", 2, 1)):
            HostConfig(tmp_path / host).set_numvfs(
                "pf0", 1, uplink=f"10.77.0.{me}:4790", neighbours=[f"10.77.0.{other}:4790"]
            )
        mac = HostConfig(tmp_path / "a").read().vf("pf0", 0).mac
        qmp = tmp_path / "a.qmp"
        try:
            dst = _in_ns(ns["b"], tmp_path / "b", "run", "--incoming", "tcp:10.77.0.2:4444")
            src = _in_ns(
                ns["a"], tmp_path / "a", "run", "netecho", "--memory", "64M",
                "--device", "vf,pf=pf0,index=0", "--qmp", f"unix:{qmp}", "--", "idle=30",
            )  # fmt: skip
            procs += [dst, src]
            deadline = time.monotonic() + 20
            while not qmp.exists():
                assert time.monotonic() < deadline and src.poll() is None, "source did not start"
                time.sleep(0.05)
            report = tmp_path / "traffic.json"
            peer = _in_ns(
                ns["p"], None, "traffic", "--to", "10.77.0.1:4790", "--mac", mac,
                "--rate", "1000", "--duration", "3", "--json", str(report),
            )  # fmt: skip
            procs.append(peer)
            time.sleep(1.0)
            mig = vmferry("migrate", "--qmp", str(qmp), "tcp:10.77.0.2:4444", timeout=60)
            assert mig.returncode == 0, mig.stderr
            peer_out, peer_err = peer.communicate(timeout=30)
            assert peer.returncode == 0, peer_out.decode() + peer_err.decode()
            dst_out, _ = dst.communicate(timeout=30)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
    t = json.loads(report.read_text())
    assert t["sent"] > 2000 and t["lost"] == 0, t
    assert t["corrupted"] == 0 and t["duplicated"] == 0, t
    assert [m[1] for m in t["moves"]] == ["10.77.0.2:4790"], t["moves"]
    assert RESULT_RE.findall(dst_out)[-1].decode() == t["expected_result"]

"""The host's mdev registry: types and available instances, create/remove by UUID, limits,
attach by UUID or type, and processes that died."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.devices.vgpu.helpers import make_vgpu
from vmferry.devices.base import INCOMING_OPTION
from vmferry.devices.registry import DeviceSpec, create_device
from vmferry.devices.vgpu import mdev
from vmferry.devices.vgpu.mdev import MdevError
from vmferry.devices.vgpu.types import MAX_VGPUS, TYPES
from vmferry.errors import ConfigError
from vmferry.memory import GuestMemory

GIB = 1 << 30


def available() -> dict[str, int]:
    return {t.name: t.available_instances for t in mdev.list_types()}


def test_four_types_split_vram_with_fences_and_weights() -> None:
    infos = {t.name: t for t in mdev.list_types()}
    assert sorted(infos) == ["vgpu-1", "vgpu-2", "vgpu-4", "vgpu-8"]
    assert [infos[f"vgpu-{p}"].share for p in (1, 2, 4, 8)] == [4 * GIB >> i for i in range(4)]
    assert [TYPES[f"vgpu-{p}"].weight for p in (1, 2, 4, 8)] == [16, 8, 4, 2]
    assert [TYPES[f"vgpu-{p}"].fences for p in (1, 2, 4, 8)] == [32, 16, 8, 4]
    assert available() == {"vgpu-1": 1, "vgpu-2": 2, "vgpu-4": 4, "vgpu-8": 8}


def test_available_instances_go_down_as_vgpus_are_created_and_up_when_removed() -> None:
    a = mdev.create(None, "vgpu-4")
    assert available() == {"vgpu-1": 0, "vgpu-2": 1, "vgpu-4": 3, "vgpu-8": 6}
    b = mdev.create(None, "vgpu-8")
    assert available() == {"vgpu-1": 0, "vgpu-2": 1, "vgpu-4": 2, "vgpu-8": 5}
    assert a.vram_offset != b.vram_offset
    mdev.remove(a.uuid)
    assert available() == {"vgpu-1": 0, "vgpu-2": 1, "vgpu-4": 3, "vgpu-8": 7}
    mdev.remove(b.uuid)
    assert available()["vgpu-1"] == 1 and mdev.list_instances() == []


def test_at_most_eight_vgpus_and_no_room_is_a_clear_error() -> None:
    for _ in range(MAX_VGPUS):
        mdev.create(None, "vgpu-8")
    with pytest.raises(MdevError, match="already has 8 vGPUs"):
        mdev.create(None, "vgpu-8")
    for i in mdev.list_instances():
        mdev.remove(i.uuid)
    mdev.create(None, "vgpu-2")
    mdev.create(None, "vgpu-2")
    with pytest.raises(MdevError, match=r"no room for a vgpu-4.*available_instances is 0"):
        mdev.create(None, "vgpu-4")


def test_uuids_are_unique_and_checked() -> None:
    u = str(uuid.uuid4())
    assert mdev.create(u, "vgpu-4").uuid == u
    with pytest.raises(MdevError, match=f"{u} already exists"):
        mdev.create(u.upper(), "vgpu-8")
    with pytest.raises(ConfigError, match="not a UUID"):
        mdev.create("not-a-uuid", "vgpu-4")
    with pytest.raises(ConfigError, match="unknown vGPU type"):
        mdev.create(None, "vgpu-3")
    with pytest.raises(MdevError, match="no vGPU"):
        mdev.remove(str(uuid.uuid4()))


def test_parent_vram_is_configurable_while_the_parent_is_empty() -> None:
    mdev.create(None, "vgpu-2", vram=1 * GIB)
    assert {t.name: t.share for t in mdev.list_types()}["vgpu-2"] == GIB // 2
    with pytest.raises(MdevError, match="cannot become"):
        mdev.create(None, "vgpu-2", vram=2 * GIB)


def test_a_vm_attaches_by_uuid_and_cannot_remove_it_while_in_use() -> None:
    inst = mdev.create(None, "vgpu-8", vram=64 << 20)
    memory = GuestMemory(32 << 20)
    dev = make_vgpu(memory, f"vgpu,uuid={inst.uuid}")
    try:
        assert dev.config()["vram_share"] == 8 << 20
        assert mdev.list_instances()[0].holders == [os.getpid()]
        with pytest.raises(MdevError, match="in use by process"):
            mdev.remove(inst.uuid)
        with pytest.raises(MdevError, match="is a vgpu-8, not a vgpu-4"):
            make_vgpu(memory, f"vgpu,uuid={inst.uuid},type=vgpu-4")
    finally:
        dev.close()
        memory.close()
    mdev.remove(inst.uuid)


def test_a_vgpu_in_use_is_refused_to_a_second_vm_but_shared_with_an_incoming_one() -> None:
    """Only the destination of a migration takes the second place (VFIO would refuse a
    second open of the mdev); a third holder never."""
    inst = mdev.create(None, "vgpu-8", vram=64 << 20)
    memory = GuestMemory(32 << 20)
    spec = DeviceSpec.parse(f"vgpu,uuid={inst.uuid}")
    first = make_vgpu(memory, f"vgpu,uuid={inst.uuid}")
    try:
        with pytest.raises(MdevError) as e:
            make_vgpu(memory, f"vgpu,uuid={inst.uuid}", index=1)
        assert str(e.value) == (
            f"vGPU {inst.uuid} is in use by process {os.getpid()}: a second VM cannot "
            "attach it (only a migration of that VM can take it over)"
        )
        assert mdev.list_instances()[0].holders == [os.getpid()]
        incoming = create_device(spec, 1, memory, incoming=True)
        try:
            assert mdev.list_instances()[0].holders == [os.getpid()] * 2
            with pytest.raises(MdevError, match="a migration to it is under way"):
                create_device(spec, 2, memory, incoming=True)
        finally:
            incoming.close()
        assert mdev.list_instances()[0].holders == [os.getpid()]
    finally:
        first.close()
        memory.close()
    assert mdev.list_instances()[0].holders == []
    mdev.remove(inst.uuid)


def test_the_incoming_option_cannot_be_given_on_the_command_line() -> None:
    with pytest.raises(ConfigError, match="unknown option '_incoming'"):
        DeviceSpec.parse(f"vgpu,uuid={uuid.uuid4()},{INCOMING_OPTION}=on")


def test_a_vm_with_a_type_gets_a_transient_vgpu_removed_at_exit() -> None:
    memory = GuestMemory(32 << 20)
    dev = make_vgpu(memory, "vgpu,type=vgpu-4,vram=64M")
    assert [i.type for i in mdev.list_instances()] == ["vgpu-4"]
    dev.close()
    memory.close()
    assert mdev.list_instances() == []


def test_records_of_processes_that_died_are_pruned() -> None:
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    with mdev.host_state() as s:
        inst = s.create(str(uuid.uuid4()), "vgpu-4", "gpu0", None, transient_pid=dead)
        kept = s.create(str(uuid.uuid4()), "vgpu-4", "gpu0", None)
        kept.holders.append(dead)
        del inst
    assert [(i.uuid, i.holders) for i in mdev.list_instances()] == [(kept.uuid, [])]

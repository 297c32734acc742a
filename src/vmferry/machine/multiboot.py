"""Loading multiboot (v1) ELF images and writing the multiboot information for them."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from vmferry.errors import GuestImageError, VmferryError
from vmferry.memory.guest_memory import LOW_RAM_LIMIT, GuestMemory

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192
MB_FLAG_AOUT_KLUDGE = 1 << 16
MBI_FLAG_MEM, MBI_FLAG_CMDLINE, MBI_FLAG_MMAP = 1 << 0, 1 << 2, 1 << 6
MMAP_AVAILABLE, MMAP_RESERVED = 1, 2

# Where the VMM puts the multiboot information (conventional memory, below any image).
MBI_ADDR = 0x9000
CMDLINE_ADDR = 0x9100
CMDLINE_MAX = 0x600
MMAP_ADDR = 0x9800
LOW_MEM_END = 0x9FC00  # start of the EBDA/VGA/BIOS area, reserved as on a PC
IMAGE_MIN_ADDR = 0x100000


@dataclass(frozen=True)
class LoadedImage:
    entry: int
    segments: list[tuple[int, int]]  # (gpa, memsz)


def find_multiboot_header(head: bytes) -> int:
    """The multiboot header's flags, or raise: it must be 4-aligned in the first 8 KiB."""
    for off in range(0, min(len(head), MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", head, off)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return int(flags)
    raise GuestImageError("no multiboot header (magic 0x1BADB002) in the first 8 KiB")


def load_image(path: Path, memory: GuestMemory) -> LoadedImage:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GuestImageError(f"cannot read guest image {path}: {e.strerror}") from e
    try:
        flags = find_multiboot_header(data)
        if flags & MB_FLAG_AOUT_KLUDGE:
            raise GuestImageError("a.out-kludge multiboot images are not supported; use ELF")
        import io

        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] not in ("EM_X86_64", "EM_386"):
            raise GuestImageError(f"image is for {elf['e_machine']}, not x86")
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            gpa, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
            if gpa < IMAGE_MIN_ADDR:
                raise GuestImageError(f"segment at {gpa:#x} is below 1 MiB")
            try:
                memory.write_gpa(gpa, seg.data()[:filesz])
                # Memory from a fresh memfd is zero; BSS needs nothing more, but check it fits.
                memory.gpa_to_offset(gpa, memsz)
            except VmferryError as e:
                raise GuestImageError(f"segment {gpa:#x}+{memsz:#x} does not fit: {e}") from e
            segments.append((gpa, memsz))
        if not segments:
            raise GuestImageError("image has no loadable segments")
        return LoadedImage(entry=elf["e_entry"], segments=segments)
    except ELFError as e:
        raise GuestImageError(f"{path} is not a valid ELF file: {e}") from e


def write_boot_info(memory: GuestMemory, cmdline: str) -> int:
    """Write the multiboot information structure; returns its guest-physical address."""
    raw_cmd = cmdline.encode() + b"\0"
    if len(raw_cmd) > CMDLINE_MAX:
        raise GuestImageError(f"command line is {len(raw_cmd)} bytes, at most {CMDLINE_MAX}")
    memory.write_gpa(CMDLINE_ADDR, raw_cmd)

    ranges = [
        (0, LOW_MEM_END, MMAP_AVAILABLE),
        (LOW_MEM_END, IMAGE_MIN_ADDR - LOW_MEM_END, MMAP_RESERVED),
    ]
    for r in memory.regions:
        start = max(r.gpa, IMAGE_MIN_ADDR)
        ranges.append((start, r.gpa_end - start, MMAP_AVAILABLE))
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in ranges)
    memory.write_gpa(MMAP_ADDR, mmap)

    mem_upper_kib = (min(memory.size, LOW_RAM_LIMIT) - IMAGE_MIN_ADDR) // 1024
    info = bytearray(88)
    struct.pack_into(
        "<III",
        info,
        0,
        MBI_FLAG_MEM | MBI_FLAG_CMDLINE | MBI_FLAG_MMAP,
        LOW_MEM_END // 1024,
        mem_upper_kib,
    )
    struct.pack_into("<I", info, 16, CMDLINE_ADDR)
    struct.pack_into("<II", info, 44, len(mmap), MMAP_ADDR)
    memory.write_gpa(MBI_ADDR, bytes(info))
    return MBI_ADDR

"""A stream's RAM sections loaded into a receiver, every other section skipped, up to END
(the RAM tests' reader: no CONF, no devices)."""

from __future__ import annotations

from vmferry.migration import codec
from vmferry.migration.ram import RamReceiver
from vmferry.migration.stream import StreamReader
from vmferry.testing.transport import MemorySource


def load_ram(data: bytes, rx: RamReceiver, *, sealed: bool = False) -> RamReceiver:
    """Load ``data``'s RAM sections into ``rx``, up to END; ``rx``. ``sealed``: read as
    a saved file is (every section checksummed whole)."""
    r = StreamReader(MemorySource(data), sealed=sealed)
    while True:
        hdr, h = r.next_section()
        if hdr.tag == codec.RAM:
            rx.load(r, hdr, h)
        else:
            r.read_payload(hdr, h)
            if hdr.tag == codec.END:
                return rx

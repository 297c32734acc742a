"""The extra channels of an incoming migration: CHAN, RAM sections, CEND, each channel
read on its own thread into its own RamReceiver while the main stream is read."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from vmferry.errors import StreamError
from vmferry.migration.codec import CEND, RAM, ChannelRecord, check_empty
from vmferry.migration.ram import RamReceiver
from vmferry.migration.stream import StreamReader


def read_channel(reader: StreamReader, receiver: RamReceiver, mig_id: str, index: int) -> None:
    """An extra channel: CHAN naming this migration, RAM sections, CEND."""
    hdr, h = reader.next_section()
    chan = ChannelRecord.decode(reader.read_payload(hdr, h), hdr.describe())
    if chan != ChannelRecord(mig_id, index):
        raise StreamError(f"channel {index} belongs to another migration: {chan!r}")
    while True:
        hdr, h = reader.next_section()
        if hdr.tag == RAM:
            receiver.load(reader, hdr, h)
        else:
            assert hdr.tag == CEND
            check_empty(reader.read_payload(hdr, h), hdr.describe())
            return


class ChannelReaders:
    """The extra channels, each read on its own thread into its own RamReceiver; the
    first error is kept, and ``wake_main`` ends a read blocked on the main stream (idle,
    perhaps, while a channel fails)."""

    def __init__(
        self,
        channels: Sequence[StreamReader],
        receivers: Sequence[RamReceiver],
        mig_id: str,
        wake_main: Callable[[], None] | None,
    ) -> None:
        self.errors: list[BaseException] = []
        self._wake_main = wake_main
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(r, rx, mig_id, i),
                name=f"incoming-ch{i}",
                daemon=True,
            )
            for i, (r, rx) in enumerate(zip(channels, receivers, strict=True), start=1)
        ]
        for t in self._threads:
            t.start()

    def _run(self, reader: StreamReader, rx: RamReceiver, mig_id: str, index: int) -> None:
        try:
            read_channel(reader, rx, mig_id, index)
        except BaseException as e:
            self.errors.append(e)
            if self._wake_main is not None:
                self._wake_main()

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def join(self) -> None:
        for t in self._threads:
            t.join()
        self.check()


__all__ = ["ChannelReaders", "read_channel"]

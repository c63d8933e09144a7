"""TensorBoard metrics (event files any TensorBoard reads), written by process 0 only.

Events are written synchronously into the file (no writer thread, no queue), so
`flush()` is a real barrier: the loop flushes before it saves a checkpoint, and every
point logged up to a checkpoint's step is on disk before that checkpoint can exist.

A resumed run opens a new event file that starts with a `SessionLog.START` at
`purge_step` (the restored step + 1). TensorBoard then hides the points an earlier,
killed run logged at steps >= purge_step (they are logged again by the resumed run),
so every step's point appears once. `read_scalars` reads a logdir the same way.
"""

from __future__ import annotations

import glob
import os
import socket
import struct
import time
from typing import Mapping

import numpy as np


class MetricWriter:
    """Scalars, images and text to TensorBoard event files under `logdir`.

    Uses tensorboardX's protos and summaries (no TensorFlow needed). A disabled writer
    (non-main hosts) accepts every call and writes nothing.
    """

    def __init__(self, logdir: str, enabled: bool = True, purge_step: int | None = None,
                 flush_secs: float = 10.0):
        self.enabled = enabled
        self.logdir = logdir
        self._w = None
        self._flush_secs = flush_secs
        self._last_flush = time.monotonic()
        if enabled:
            from tensorboardX.proto.event_pb2 import Event, SessionLog
            from tensorboardX.record_writer import RecordWriter

            os.makedirs(logdir, exist_ok=True)
            now = time.time()
            # Name order is TensorBoard's read order: the nanosecond field orders two
            # files of one host opened within the same second.
            name = (f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}."
                    f"{time.time_ns():020d}.{os.getpid()}")
            self._w = RecordWriter(os.path.join(logdir, name))
            self._write(Event(wall_time=now, file_version="brain.Event:2"))
            if purge_step is not None:
                self._write(Event(wall_time=now, step=int(purge_step),
                                  session_log=SessionLog(status=SessionLog.START)))
            self.flush()

    def _write(self, event) -> None:
        self._w.write(event.SerializeToString())
        if time.monotonic() - self._last_flush > self._flush_secs:
            self.flush()

    def _summary(self, summary, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event

        if self._w:
            self._write(Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._w:
            from tensorboardX import summary

            self._summary(summary.scalar(tag, float(value)), step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.scalar(k, v, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """image: (H, W, 3) uint8."""
        if self._w:
            from tensorboardX import summary

            self._summary(summary.image(tag, np.asarray(image), dataformats="HWC"), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self._w:
            from tensorboardX import summary

            self._summary(summary.text(tag, text), step)

    def flush(self) -> None:
        """Everything written so far is in the file (the OS's page cache): it survives
        a kill of this process."""
        if self._w:
            self._w.flush()
            self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._w:
            self.flush()
            self._w.close()
            self._w = None


def _records(path: str):
    """The records of one event file; stops at a truncated or corrupt tail (a write
    cut short by a kill)."""
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        end = pos + 12 + length + 4
        if header_crc != masked_crc32c(header) or end > len(data):
            return
        payload = data[pos + 12:pos + 12 + length]
        if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(payload):
            return
        yield payload
        pos = end


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Scalars as TensorBoard shows them: `{tag: [(step, value), ...]}` in write order.

    Event files are read in name order; a `SessionLog.START` at step s hides the points
    read so far at steps >= s (TensorBoard's purge of a restarted run's orphans).
    """
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
        for record in _records(path):
            event = Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                out = {tag: [(s, v) for s, v in points if s < event.step]
                       for tag, points in out.items()}
            if event.HasField("summary"):
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        out.setdefault(value.tag, []).append((int(event.step), value.simple_value))
    return out

"""JSON lines appended to a file, rotated by size: path, path.1 … path.<keep>."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from leaktap.analytics.sinks.base import AlertEvent, RetryableDelivery, SinkSettings


class FileSettings(SinkSettings):
    type: Literal["file"]
    path: Annotated[str, Field(min_length=1)]
    max_bytes: Annotated[int, Field(ge=1024, le=2**40)] = 10 * 2**20
    keep: Annotated[int, Field(ge=0, le=1000)] = 5  # rotated files kept besides the live one
    fsync: bool = True  # a delivery counts once the line is on disk


class FileSink:
    def __init__(self, settings: FileSettings) -> None:
        self.name = settings.sink_name
        self.path = Path(settings.path)
        self.max_bytes = settings.max_bytes
        self.keep = settings.keep
        self.fsync = settings.fsync
        self._lock = threading.Lock()

    def _rotate(self) -> None:
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def send(self, event: AlertEvent) -> None:
        line = (json.dumps(event.as_dict(), separators=(",", ":"), sort_keys=True) + "\n").encode()
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                size = self.path.stat().st_size if self.path.exists() else 0
                if size and size + len(line) > self.max_bytes:
                    self._rotate()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:  # disk full, permissions: may clear up
                raise RetryableDelivery(f"{self.path}: {e}") from e

    def close(self) -> None:
        pass

"""Detection settings (the `detection:` section of the config).

Owned by the analytics package; controller/config.py embeds it. Placeholder
defaults until the detectors land.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class DetectionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

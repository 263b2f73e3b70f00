"""Alert sinks: PagerDuty Events v2, webhook, syslog (RFC 5424 + CEF), JSON-lines file.

`SinkConfig` is the tagged union the configuration's `sinks:` list validates
against; `build_sink` makes the sink for one entry.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from leaktap.analytics.sinks.base import AlertEvent, Sink, SinkConfigError
from leaktap.analytics.sinks.file import FileSettings, FileSink
from leaktap.analytics.sinks.pagerduty import PagerDutySettings, PagerDutySink
from leaktap.analytics.sinks.syslog import SyslogSettings, SyslogSink
from leaktap.analytics.sinks.webhook import WebhookSettings, WebhookSink

SinkConfig = Annotated[
    PagerDutySettings | WebhookSettings | SyslogSettings | FileSettings,
    Field(discriminator="type"),
]

__all__ = ["AlertEvent", "Sink", "SinkConfig", "SinkConfigError", "build_sink"]


def build_sink(settings: SinkConfig) -> Sink:
    if isinstance(settings, PagerDutySettings):
        return PagerDutySink(settings)
    if isinstance(settings, WebhookSettings):
        return WebhookSink(settings)
    if isinstance(settings, SyslogSettings):
        return SyslogSink(settings)
    return FileSink(settings)

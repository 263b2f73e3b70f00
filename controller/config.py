"""The agent's YAML configuration, validated with pydantic.

An error names the file, the line and the dotted key, e.g.
``leaktap.yaml:14: tenants[0].match.cidrs[1]: not a CIDR: '198.18.1.0/33'``.
Unknown keys are errors too: a typo must not silently disable a detector.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from leaktap.analytics.alert_settings import AlertsSettings
from leaktap.analytics.settings import DetectionSettings
from leaktap.analytics.sinks import SinkConfig
from leaktap.controller.config_files import SecretFile, file_problems, tls_pair_problem
from leaktap.controller.errors import ConfigError
from leaktap.controller.kernel import abi

DEFAULT_LISTEN = "127.0.0.1:8470"
DEFAULT_DB = "/var/lib/leaktap/leaktap.db"
UNASSIGNED_TENANT = "unassigned"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError as e:
        raise ValueError(f"not a CIDR: {value!r}") from e


def _check_glob(value: str) -> str:
    if not value or "\x00" in value:
        raise ValueError(f"not a pattern: {value!r}")
    try:
        re.compile(fnmatch.translate(value))
    except re.error as e:
        raise ValueError(f"bad pattern {value!r}: {e}") from e
    return value


Cidr = Annotated[str, AfterValidator(_check_cidr)]


class TenantMatch(_Strict):
    """Rules tried in order cgroup, uid, source CIDR, SNI pattern (first tenant wins)."""

    cgroup: str | None = None  # glob on the cgroup v2 path, e.g. "/tenants/acme*"
    uids: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = []
    cidrs: list[Cidr] = []
    sni: str | None = None  # host pattern with an optional {tenant} capture

    @field_validator("cgroup")
    @classmethod
    def _cgroup(cls, v: str | None) -> str | None:
        return None if v is None else _check_glob(v)

    @field_validator("sni")
    @classmethod
    def _sni(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if v.count("{tenant}") > 1:
            raise ValueError("an SNI pattern may capture {tenant} once")
        return _check_glob(v.replace("{tenant}", "x")) and v.lower()


def _check_allow_entry(value: str) -> str:
    # "vendor:*" allows every instance (vendors whose hosts are all shared);
    # a partial wildcard would read as a pattern that nothing implements
    instance = value.partition(":")[2]
    if "*" in instance and instance != "*":
        raise ValueError(f"a wildcard is the whole instance ('vendor:*'), got {value!r}")
    return value


AllowEntry = Annotated[
    str, Field(pattern=r"^[a-z0-9_-]+:[^\s:]+$"), AfterValidator(_check_allow_entry)
]


class TenantConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    match: TenantMatch = TenantMatch()
    allow: list[AllowEntry] = []  # "vendor:instance" or "vendor:*"
    environment: str | None = None  # label used by oauth_token_reuse
    # monitor: page only; dry-run: decide as block would, record would_block;
    # block: the kernel refuses CRM instances outside `allow` (issue 12)
    enforce: Literal["monitor", "dry-run", "block"] = "monitor"

    @field_validator("enforce")
    @classmethod
    def _enforce_needs_kernel_match(cls, v: str, info: ValidationInfo) -> str:
        # the kernel knows a packet's cgroup, uid and source address, not the
        # SNI-pattern tenant (that is only known once the name is read)
        match = info.data.get("match")
        if v != "monitor" and match is not None and not (match.cgroup or match.uids or match.cidrs):
            raise ValueError(
                f"{v} needs a tenant matched by cgroup, uids or cidrs "
                "(a tenant matched only by an SNI pattern cannot be enforced in the kernel)"
            )
        return v


class EnforcementConfig(_Strict):
    """Edge cases of block-mode tenants (tenants[].enforce: block or dry-run)."""

    # QUIC Initials to CRM addresses: their name is unreadable in the kernel;
    # refusing UDP 443 makes clients fall back to TCP, where the hello is judged
    quic: Literal["block", "allow"] = "block"
    # ClientHellos with Encrypted Client Hello towards CRM addresses: the real name is hidden
    ech: Literal["block", "allow"] = "block"
    # shared vendor hosts (sign-in / API gateways) name no instance
    shared_hosts: Literal["allow", "block"] = "allow"


class CatalogueEntry(_Strict):
    """A site-specific CRM host pattern added to the shipped catalogue."""

    vendor: Annotated[str, Field(pattern=r"^[a-z0-9_-]+$")]
    pattern: str  # glob on the host name; {instance} captures the instance label
    instance: str | None = None  # fixed instance when the pattern has no capture
    shared: bool = False  # the host serves every customer: it names the vendor only

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return _check_glob(v.replace("{instance}", "x")) and v.lower()


TOKEN_MIN_LENGTH = 16
# plaintext.hmac_secret_file: the key of the token hashes, in bytes
HMAC_KEY_MIN_BYTES = 16


class TokensConfig(_Strict):
    reader: list[Annotated[str, Field(min_length=TOKEN_MIN_LENGTH)]] = []
    admin: list[Annotated[str, Field(min_length=TOKEN_MIN_LENGTH)]] = []


class TokenFilesConfig(_Strict):
    """Files holding one token each; held to the inline tokens' minimum length."""

    reader: list[Annotated[str, SecretFile(TOKEN_MIN_LENGTH)]] = []
    admin: list[Annotated[str, SecretFile(TOKEN_MIN_LENGTH)]] = []


class StorageConfig(_Strict):
    path: str = DEFAULT_DB
    retention_days: Annotated[int, Field(ge=1, le=3650)] = 30
    # the database and its WAL are 0600; with a group (name or gid) 0640 for its readers
    group: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")] | None = None


def _kernel_limit(name: str) -> AfterValidator:
    """Checks a kernel knob against the range lt_types.h gives the -D it sets."""

    def check(value: int) -> int:
        problem = abi.limit(name).problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    return AfterValidator(check)


class KernelConfig(_Strict):
    """Kernel map sizes; reach C only as integers (-DLT_X=%d)."""

    flows_max: Annotated[int, _kernel_limit("LT_FLOWS_MAX")] = abi.limit("LT_FLOWS_MAX").default
    ringbuf_pages: Annotated[int, _kernel_limit("LT_RINGBUF_PAGES")] = abi.limit(
        "LT_RINGBUF_PAGES").default
    hello_segments_max: Annotated[int, _kernel_limit("LT_HELLO_SEGS_MAX")] = abi.limit(
        "LT_HELLO_SEGS_MAX").default
    # where the counting maps are pinned (a directory on bpffs); None: /sys/fs/bpf/leaktap
    pin_root: str | None = None


class DnsConfig(_Strict):
    """Which DNS answers may name addresses: only those answering a query this host sent."""

    # an answer later than this after its query is rejected (`rejected_expired`)
    query_window_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    # queries awaiting an answer; beyond it the oldest is dropped (`queries_evicted`)
    pending_max: Annotated[int, Field(ge=16, le=1_048_576)] = 4096
    # resolvers whose answers are trusted; empty: whichever resolver the query went to
    resolvers: list[Cidr] = []


Glob = Annotated[str, AfterValidator(_check_glob)]
Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class PlaintextSelect(_Strict):
    """Processes whose TLS writes are probed (any rule matching selects)."""

    cgroups: list[Glob] = []  # glob on the cgroup v2 path, e.g. "/crm-sync/*"
    exes: list[Glob] = []  # glob on the executable path or argv[0]
    uids: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = []


class CanaryRecord(_Strict):
    """A planted token and what it was planted in; a bare string is a token alone."""

    token: Annotated[str, Field(min_length=8, max_length=512)]
    tenant: str | None = None  # whose data the record is
    record: str = "canary"  # e.g. "Account/001xx000003DGb2"
    environment: Label | None = None


class PlaintextTenantPolicy(_Strict):
    """Per-tenant content rules, under plaintext.tenants.<tenant name>."""

    # CRM fields that must only leave encrypted (field-level encryption)
    encrypted_fields: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.$-]{1,128}$")]] = []
    # a value starting with one of these is ciphertext (e.g. "enc:v1:")
    envelope_prefixes: list[Annotated[str, Field(min_length=2, max_length=64)]] = []
    # bulk operations allowed without an alert, e.g. "salesforce:bulk2.ingest",
    # "hubspot:export", "zendesk:incremental", globs allowed
    bulk_operations: list[
        Annotated[str, Field(pattern=r"^[a-z0-9_-]+:[A-Za-z0-9_.*?\[\]-]+$")]] = []


class EnvironmentLabel(_Strict):
    """An environment (prod, staging...) by cgroup or uid, for oauth_token_reuse."""

    label: Label
    cgroup: Glob | None = None
    uids: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = []


class PlaintextStreams(_Strict):
    """Bounds of stream inspection (plaintext.streams): every byte held is counted here."""

    # connections (x direction) followed at once; the least recently used is evicted
    max: Annotated[int, Field(ge=16, le=1_000_000)] = 8192
    # bytes all stream parsers hold together; past it bodies are scanned early, in windows
    total_bytes: Annotated[int, Field(ge=1 << 20, le=1 << 32)] = 64 << 20
    # body bytes held per message before they are scanned as a window (with overlap)
    body_window_bytes: Annotated[int, Field(ge=4096, le=1 << 28)] = 1 << 20
    overlap_bytes: Annotated[int, Field(ge=64, le=65536)] = 512
    # one decompression: absolute output and output/input ratio (past either: a bomb)
    decode_max_bytes: Annotated[int, Field(ge=65536, le=1 << 30)] = 8 << 20
    decode_max_ratio: Annotated[int, Field(ge=10, le=100_000)] = 200
    # a CRM connection with a larger unseen share than this (after min bytes) alerts
    unseen_alert_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    unseen_alert_min_bytes: Annotated[int, Field(ge=0)] = 64 << 10
    # a CRM call's request and response bodies handed to the data-flow map, decoded
    # (past it the body is cut and marked so; never stored)
    exchange_body_bytes: Annotated[int, Field(ge=0, le=1 << 30)] = 1 << 20
    # a request unanswered this long is an exchange without a response (status None)
    exchange_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0


class PlaintextDataflows(_Strict):
    """The CRM data-flow map (plaintext.dataflows, issue 14): new_data_flow's warm-up,
    the crm_access_refused storm, and how often the map is written to the database."""

    # an executable's calls in its first warmup_s are learned without new_data_flow alerts
    warmup_s: Annotated[float, Field(ge=0, le=90 * 86400)] = 86400.0
    # this many 401/403 answers to one process within the window: crm_access_refused
    refused_storm_count: Annotated[int, Field(ge=1, le=100_000)] = 20
    refused_storm_window_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
    flush_interval_s: Annotated[float, Field(ge=0.5, le=3600)] = 10.0
    # data flows (rows) held; past it new flows are counted, not kept
    keys_max: Annotated[int, Field(ge=100, le=10_000_000)] = 50_000


class PlaintextConfig(_Strict):
    enabled: bool = False
    select: PlaintextSelect | Literal["all"] = PlaintextSelect()
    max_bytes: Annotated[int, _kernel_limit("LT_SSL_SNAP")] = abi.limit("LT_SSL_SNAP").default
    # plaintext events per second per process before the kernel drops (counted)
    events_per_second: Annotated[int, _kernel_limit("LT_SSL_EVENTS_PER_SEC")] = abi.limit(
        "LT_SSL_EVENTS_PER_SEC").default
    canaries: list[CanaryRecord] = []
    tenants: dict[str, PlaintextTenantPolicy] = {}
    environments: list[EnvironmentLabel] = []
    # the per-install HMAC key for token hashes; created (0600) when missing.
    # Default: plaintext-hmac.key beside the database
    hmac_secret_file: Annotated[
        str, SecretFile(HMAC_KEY_MIN_BYTES, may_be_missing=True, raw=True)] | None = None
    # full /proc rescans for processes that changed cgroup or uid without exec
    rescan_interval_s: Annotated[float, Field(ge=0.5, le=3600)] = 5.0
    streams: PlaintextStreams = PlaintextStreams()
    dataflows: PlaintextDataflows = PlaintextDataflows()

    @field_validator("canaries", mode="before")
    @classmethod
    def _bare_tokens(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"token": c} if isinstance(c, str) else c for c in v]
        return v


class TlsConfig(_Strict):
    """Serve the API over HTTPS (uvicorn's ssl_certfile / ssl_keyfile)."""

    certfile: Annotated[str, Field(min_length=1), SecretFile()]
    keyfile: Annotated[str, Field(min_length=1), SecretFile()]


class LeaktapConfig(_Strict):
    interfaces: list[str] = []  # empty: the default route's interface
    mode: Literal["tc", "xdp"] = "tc"
    inside: list[Cidr] = []  # gateway mode: the networks whose initiators are tenants
    dedup: bool = False  # gateway mode on a mirror (SPAN/TAP) port that repeats packets
    listen: str = DEFAULT_LISTEN
    tls: TlsConfig | None = None
    # a label for this node's deployment (e.g. prod), sent with every alert
    environment: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] | None = None
    tokens: TokensConfig = TokensConfig()
    token_files: TokenFilesConfig = TokenFilesConfig()
    storage: StorageConfig = StorageConfig()
    kernel: KernelConfig = KernelConfig()
    dns: DnsConfig = DnsConfig()
    tenants: list[TenantConfig] = []
    enforcement: EnforcementConfig = EnforcementConfig()
    catalogue: list[CatalogueEntry] = []
    plaintext: PlaintextConfig = PlaintextConfig()
    detection: DetectionSettings = DetectionSettings()
    alerts: AlertsSettings = AlertsSettings()
    sinks: list[SinkConfig] = []

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @model_validator(mode="after")
    def _unique_tenants(self) -> LeaktapConfig:
        names = [t.name for t in self.tenants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate tenant names: {', '.join(dupes)}")
        if UNASSIGNED_TENANT in names:
            raise ValueError(f"{UNASSIGNED_TENANT!r} is reserved for unmatched traffic")
        return self

    @model_validator(mode="after")
    def _unique_sinks(self) -> LeaktapConfig:
        # outbox entries name their sink: names must be unique and stable
        names = [s.sink_name for s in self.sinks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"sinks: more than one sink named {', '.join(dupes)}; give each a distinct name"
            )
        return self


def with_database(config: LeaktapConfig, db: str | os.PathLike[str] | None) -> LeaktapConfig:
    """The config with `--db PATH` as storage.path: the files kept beside the
    database (plaintext key, API token files) follow the database a command uses."""
    if db is None:
        return config
    storage = config.storage.model_copy(update={"path": str(db)})
    return config.model_copy(update={"storage": storage})


def parse_listen(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError names what is wrong."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value.strip())
    if not m:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


def _node_line(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest YAML node on the pydantic error path."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            # an unknown key is present in the YAML; a missing one leaves the parent's line
            key_value = next(((k, v) for k, v in node.value if k.value == part), None)
            node = None
            if key_value is not None:
                line, node = key_value[0].start_mark.line + 1, key_value[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
            if node is not None:
                line = node.start_mark.line + 1
        else:
            node = None
    return line


def _without_union_tags(loc: tuple[int | str, ...], data: Any) -> tuple[int | str, ...]:
    """Drop the tag pydantic puts in the path of a tagged union (sinks[0].webhook.url)."""
    out: list[int | str] = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and isinstance(part, str) and part not in node
                and node.get("type") == part):
            continue
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_config(text: str, source: str = "<config>", check_files: bool = False) -> LeaktapConfig:
    """Validate YAML text; ConfigError names the source, line and key of each problem.
    `check_files`: also the files it names (config_files.py), as load_config does."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
    # YAML keeps the last of two equal keys: a second `tokens:` would silently drop the first
    duplicates = _duplicate_keys(root)
    if duplicates:
        raise ConfigError("\n".join(
            f"{source}:{line}: {_dotted(loc)}: given twice (first at line {first})"
            for line, loc, first in duplicates
        ))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the configuration must be a mapping of keys")
    try:
        config = LeaktapConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            loc = _without_union_tags(loc, data)
            line = _node_line(root, loc)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"{source}:{line or 1}: {_dotted(loc)}: {msg}")
        raise ConfigError("\n".join(lines)) from e
    problems = _unknown_tenant_references(config)
    if check_files and not problems:
        problems = _named_file_problems(config)
    if problems:
        raise ConfigError("\n".join(
            f"{source}:{_node_line(root, loc) or 1}: {_dotted(loc)}: {msg}" for loc, msg in problems
        ))
    return config


def _duplicate_keys(
    node: yaml.Node | None, loc: tuple[int | str, ...] = (), seen: set[int] | None = None,
) -> list[tuple[int, tuple[int | str, ...], int]]:
    """(line, key path, line of the first) for each key given twice in one mapping."""
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:  # an alias repeats a node: walk it once
        return []
    seen.add(id(node))
    out: list[tuple[int, tuple[int | str, ...], int]] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = str(key.value)
            if isinstance(key, yaml.ScalarNode) and name != "<<":
                line = key.start_mark.line + 1
                if (key.tag, name) in first:
                    out.append((line, (*loc, name), first[key.tag, name]))
                first.setdefault((key.tag, name), line)
            out.extend(_duplicate_keys(value, (*loc, name), seen))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.extend(_duplicate_keys(item, (*loc, i), seen))
    return out


def _named_file_problems(config: LeaktapConfig) -> list[tuple[tuple[int | str, ...], str]]:
    """Token, secret, routing-key and TLS files that are missing, unreadable or short."""
    problems = file_problems(config)
    if not problems and config.tls is not None:
        tls = tls_pair_problem(config.tls.certfile, config.tls.keyfile)
        if tls is not None:
            problems.append((("tls",), tls))
    return problems


def _unknown_tenant_references(config: LeaktapConfig) -> list[tuple[tuple[int | str, ...], str]]:
    """Tenant names used by the plaintext rules must be configured tenants."""
    names = {t.name for t in config.tenants}
    out: list[tuple[tuple[int | str, ...], str]] = []
    for name in config.plaintext.tenants:
        if name not in names:
            out.append((("plaintext", "tenants", name), f"no tenant named {name!r}"))
    for i, canary in enumerate(config.plaintext.canaries):
        if canary.tenant is not None and canary.tenant not in names:
            out.append((("plaintext", "canaries", i, "tenant"),
                        f"no tenant named {canary.tenant!r}"))
    return out


def load_config(path: str | os.PathLike[str] | None) -> LeaktapConfig:
    """Load the file at `path`, or the defaults when no file is given."""
    if path is None:
        return LeaktapConfig()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return parse_config(text, str(p), check_files=True)

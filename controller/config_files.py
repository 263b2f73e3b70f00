"""Files the configuration names (tokens, secrets, routing keys, TLS): checked when
the configuration is loaded, so that a missing or short file is refused with the
key and line that name it, before anything starts.

A secret kept in a file is held to the rules of the same secret given inline:
`routing_key_file` must hold what `routing_key` would accept (any `<key>_file`
beside a `<key>` field is checked this way, sinks included), and a field marked
with `SecretFile` must hold at least its `min_length`. Nothing read here is ever
put in a message.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

Loc = tuple[int | str, ...]
# more than any token, key or certificate chain: a path to /dev/zero ends here
READ_MAX = 1 << 20


@dataclass(frozen=True)
class SecretFile:
    """Marks a config value (or list of values) naming a file that must exist when the
    configuration is loaded and hold at least `min_length` characters once stripped
    (`raw`: bytes, unstripped). `may_be_missing`: the agent creates it on first start."""

    min_length: int = 1
    may_be_missing: bool = False
    raw: bool = False


@dataclass(frozen=True)
class _LikeInline:
    """The file of `<key>_file` holds what the `<key>` field would accept."""

    key: str
    adapter: TypeAdapter[Any]


def file_problems(model: BaseModel, loc: Loc = ()) -> list[tuple[Loc, str]]:
    """(path in the config, what is wrong) for every named file that cannot serve."""
    out: list[tuple[Loc, str]] = []
    fields = type(model).model_fields
    for name, info in fields.items():
        value = getattr(model, name)
        here = (*loc, name)
        rule = _rule(name, info, fields)
        if rule is not None and value is not None:
            if isinstance(value, str):
                out.extend((here, p) for p in _check(value, rule))
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    out.extend(((*here, i), p) for p in _check(item, rule))
        elif isinstance(value, BaseModel):
            out.extend(file_problems(value, here))
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    out.extend(file_problems(item, (*here, i)))
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    out.extend(file_problems(item, (*here, key)))
    return out


def tls_pair_problem(certfile: str, keyfile: str) -> str | None:
    """Why uvicorn could not serve with this certificate and key, or None."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as e:
        return f"certificate {certfile} and key {keyfile} do not load: {e.strerror or e}"
    return None


def _rule(name: str, info: FieldInfo,
          fields: dict[str, FieldInfo]) -> SecretFile | _LikeInline | None:
    marker = _marker(info.metadata) or _marker_in(info.annotation)
    if marker is not None:
        return marker
    inline = name.removesuffix("_file")
    if name.endswith("_file") and inline in fields:
        annotation = fields[inline].annotation
        if annotation is not None:
            return _LikeInline(inline, TypeAdapter(annotation))
    return None


def _marker(metadata: Any) -> SecretFile | None:
    return next((m for m in metadata if isinstance(m, SecretFile)), None)


def _marker_in(annotation: Any) -> SecretFile | None:
    """A SecretFile inside Annotated[...], also under `| None` or list[...]."""
    if get_origin(annotation) is Annotated:
        found = _marker(get_args(annotation)[1:])
        if found is not None:
            return found
    for arg in get_args(annotation):
        found = _marker_in(arg)
        if found is not None:
            return found
    return None


def _check(path: str, rule: SecretFile | _LikeInline) -> list[str]:
    try:
        with open(path, "rb") as f:
            data = f.read(READ_MAX)
    except FileNotFoundError:
        if isinstance(rule, SecretFile) and rule.may_be_missing:
            return []
        return [f"{path}: no such file"]
    except OSError as e:
        return [f"{path}: cannot read: {e.strerror or e}"]
    if isinstance(rule, _LikeInline):
        try:
            rule.adapter.validate_python(data.decode("utf-8", "replace").strip())
        except ValidationError as e:
            # the error's message only: its input is the secret
            reason = e.errors()[0]["msg"].removeprefix("Value error, ")
            return [f"{path} does not hold a valid {rule.key}: {reason}"]
        return []
    size = len(data) if rule.raw else len(data.decode("utf-8", "replace").strip())
    if size < rule.min_length:
        unit = "bytes" if rule.raw else "characters"
        return [f"{path} holds {size} {unit}, fewer than the {rule.min_length} required"]
    return []

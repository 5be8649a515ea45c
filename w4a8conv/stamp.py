"""The stamp: the record a converted directory carries under `w4a8conv` in its description.

It is the contract between the converter (which builds a `Stamp` and writes `to_json()` last), and
`verify`, `inspect`, the runtime view and the vLLM plugin, which read a directory only through
`Stamp.parse`: every field is checked for its type and value there, and a stamp that breaks a rule
is a `NotConvertedError` naming the field (`stamp.modules['model.layers.1.mlp'].variant: ...`).
Keys this version does not know are ignored; an incompatible change is a new `LAYOUT_VERSION`.
Format: docs/format.md, "The description and the stamp".
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import ClassVar

from .constants import LAYOUT_NAME, LAYOUT_VERSION, STAMP_KEY, GroupSizeFrom, QuantVersion, Variant
from .dtypes import MAX_DIM, MODEL_DTYPES
from .errors import NotConvertedError
from .layout import LINEAR_BIAS_NAMES

__all__ = ["Stamp", "SourceRecord", "ModuleRecord", "MoeRecord", "LinearRecord", "ShardRecord", "plain_file_name"]

_SHA256, _SHA256_WHAT = re.compile(r"sha256:[0-9a-f]{64}"), "'sha256:' and 64 hex digits"
_RELEASE_LINE = re.compile(r"\d+\.\d+")


def plain_file_name(name: str) -> bool:
    """A file name inside the directory: no separators, no parent references."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and "\0" not in name


def _shown(value: object) -> str:
    kind = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text[:60]}{'...' if len(text) > 60 else ''}" if kind not in ("null", "object") else kind


class _Fields:
    """The members of one JSON object of the stamp; each read names its path when it fails."""

    def __init__(self, value: object, path: str, file: Path | str):
        self.path, self.file = path, file
        if not isinstance(value, dict):
            raise self.refuse(path, f"expected an object, got {_shown(value)}")
        self.value: dict = value

    def refuse(self, path: str, rule: str) -> NotConvertedError:
        return NotConvertedError(f"{path}: {rule}", file=self.file)

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}"

    def raw(self, key: str) -> object:
        if key not in self.value:
            raise self.refuse(self.sub(key), "missing")
        return self.value[key]

    def object(self, key: str) -> _Fields:
        return _Fields(self.raw(key), self.sub(key), self.file)

    def integer(self, key: str, minimum: int = 0) -> int:
        value = self.raw(key)
        if type(value) is not int or not minimum <= value <= MAX_DIM:
            raise self.refuse(self.sub(key), f"expected an integer from {minimum} to {MAX_DIM}, got {_shown(value)}")
        return value

    def string(self, key: str, pattern: re.Pattern[str] | None = None, what: str = "a non-empty string") -> str:
        value = self.raw(key)
        if not isinstance(value, str) or not value or (pattern is not None and not pattern.fullmatch(value)):
            raise self.refuse(self.sub(key), f"expected {what}, got {_shown(value)}")
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value = self.raw(key)
        if not isinstance(value, str) or value not in options:
            raise self.refuse(self.sub(key), f"expected one of {', '.join(map(repr, options))}, got {_shown(value)}")
        return value

    def enum(self, key: str, kind: type[Enum], options: tuple[str, ...] | None = None) -> Enum:
        return kind(self.choice(key, options or tuple(member.value for member in kind)))

    def strings(self, key: str, pattern: re.Pattern[str] | None = None,
                what: str = "a non-empty string") -> tuple[str, ...]:
        value = self.raw(key)
        if not isinstance(value, list):
            raise self.refuse(self.sub(key), f"expected an array, got {_shown(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item or (pattern is not None and not pattern.fullmatch(item)):
                raise self.refuse(f"{self.sub(key)}[{i}]", f"expected {what}, got {_shown(item)}")
        return tuple(value)

    def entries(self, key: str) -> dict[str, _Fields]:
        """An object of named records (modules, shards): name -> the record's fields."""
        members = self.object(key)
        return {name: _Fields(value, f"{members.path}[{name!r}]", self.file) for name, value in members.value.items()}


@dataclass(frozen=True)
class ShardRecord:
    """One shard file: its exact size and the sha256 of its whole content."""

    bytes: int
    sha256: str  # "sha256:<64 hex digits>"

    def to_json(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def parse(cls, fields: _Fields) -> ShardRecord:
        return cls(bytes=fields.integer("bytes"), sha256=fields.string("sha256", _SHA256, _SHA256_WHAT))


@dataclass(frozen=True)
class SourceRecord:
    """What the output was converted from, and how the conversion read it."""

    producer: str  # "msmodelslim" or "compressed-tensors"
    version: QuantVersion
    group_size: int  # 0: per-channel
    group_size_from: GroupSizeFrom
    model_dtype: str | None  # a MODEL_DTYPES name; None when config.json names none
    fingerprint: str  # "sha256:..." over the source's description, index and headers

    def to_json(self) -> dict:
        return {"producer": self.producer, "version": self.version.value, "group_size": self.group_size,
                "group_size_from": self.group_size_from.value, "model_dtype": self.model_dtype,
                "fingerprint": self.fingerprint}

    @classmethod
    def parse(cls, fields: _Fields) -> SourceRecord:
        model_dtype = fields.raw("model_dtype")
        if model_dtype is not None:
            model_dtype = fields.choice("model_dtype", tuple(MODEL_DTYPES))
        return cls(producer=fields.string("producer"), version=fields.enum("version", QuantVersion),
                   group_size=fields.integer("group_size"),
                   group_size_from=fields.enum("group_size_from", GroupSizeFrom),
                   model_dtype=model_dtype,
                   fingerprint=fields.string("fingerprint", _SHA256, _SHA256_WHAT))


def _variants(kind: str) -> tuple[str, ...]:
    return tuple(v.value for v in Variant if v.kind == kind)


@dataclass(frozen=True)
class MoeRecord:
    """A converted MoE layer: every expert's three projections, in the variant's layout."""

    kind: ClassVar[str] = "moe"
    variant: Variant
    num_experts: int
    projections: tuple[str, str, str]  # gate, up, down (the source's names)
    hidden: int
    intermediate: int
    group_size: int  # 0: per-channel

    def to_json(self) -> dict:
        return {"kind": self.kind, "variant": self.variant.value, "num_experts": self.num_experts,
                "projections": list(self.projections), "hidden": self.hidden, "intermediate": self.intermediate,
                "group_size": self.group_size}

    @classmethod
    def parse(cls, fields: _Fields) -> MoeRecord:
        projections = fields.strings("projections")
        if len(projections) != 3 or len(set(projections)) != 3:
            raise fields.refuse(fields.sub("projections"), f"expected three different projection names (gate, up, "
                                                            f"down), got {list(projections)[:4]}")
        return cls(variant=fields.enum("variant", Variant, _variants(cls.kind)),
                   num_experts=fields.integer("num_experts", 1), projections=projections,
                   hidden=fields.integer("hidden", 1), intermediate=fields.integer("intermediate", 1),
                   group_size=fields.integer("group_size"))


@dataclass(frozen=True)
class LinearRecord:
    """A converted W4A8 Linear layer, with the name vllm-ascend gives its bias."""

    kind: ClassVar[str] = "linear"
    variant: Variant
    out_features: int
    in_features: int
    group_size: int  # per-group only: per-channel W4A8 Linear layers are refused
    bias: str  # one of LINEAR_BIAS_NAMES
    bias_columns: int  # 1, or a row-parallel layer's chunks

    def to_json(self) -> dict:
        return {"kind": self.kind, "variant": self.variant.value, "out_features": self.out_features,
                "in_features": self.in_features, "group_size": self.group_size, "bias": self.bias,
                "bias_columns": self.bias_columns}

    @classmethod
    def parse(cls, fields: _Fields) -> LinearRecord:
        return cls(variant=fields.enum("variant", Variant, _variants(cls.kind)),
                   out_features=fields.integer("out_features", 1), in_features=fields.integer("in_features", 1),
                   group_size=fields.integer("group_size", 1), bias=fields.choice("bias", LINEAR_BIAS_NAMES),
                   bias_columns=fields.integer("bias_columns", 1))


ModuleRecord = MoeRecord | LinearRecord
_RECORDS: dict[str, type[MoeRecord] | type[LinearRecord]] = {r.kind: r for r in (MoeRecord, LinearRecord)}


@dataclass(frozen=True)
class Stamp:
    """Layout, source, converted modules and shard hashes of one converted directory."""

    layout: ClassVar[str] = LAYOUT_NAME
    layout_version: ClassVar[int] = LAYOUT_VERSION
    # vllm-ascend release lines ("0.11", ...) the plugin of the writing w4a8conv serves; None in an
    # output written before they were recorded, which has the version range `vllm_ascend` instead
    serving_releases: tuple[str, ...] | None
    tool_version: str
    source: SourceRecord
    modules: Mapping[str, ModuleRecord]  # module prefix -> record, in the order the plan lists them
    shards: Mapping[str, ShardRecord]  # shard file name -> record
    vllm_ascend: str | None = None

    @property
    def release_lines(self) -> tuple[str, ...]:
        """What the stamp says it was written to be served on (the lines, or the older version range)."""
        return self.serving_releases if self.serving_releases is not None else (self.vllm_ascend or "",)

    @property
    def linear_bias_name(self) -> str | None:
        """The name every Linear record gives its bias (one source version names them alike), or None."""
        return next((m.bias for m in self.modules.values() if isinstance(m, LinearRecord)), None)

    def records(self, kind: type[MoeRecord] | type[LinearRecord]) -> dict[str, ModuleRecord]:
        """The module records of one kind, by prefix."""
        return {prefix: m for prefix, m in self.modules.items() if isinstance(m, kind)}

    def to_json(self) -> dict:
        """The stamp as the description holds it (key order is the written order)."""
        releases = ({"serving_releases": list(self.serving_releases)} if self.serving_releases is not None
                    else {"vllm_ascend": self.vllm_ascend})
        return {"layout": self.layout, "layout_version": self.layout_version, **releases,
                "tool_version": self.tool_version, "source": self.source.to_json(),
                "modules": {prefix: m.to_json() for prefix, m in self.modules.items()},
                "shards": {name: s.to_json() for name, s in self.shards.items()}}

    @classmethod
    def parse(cls, value: object, *, file: Path | str) -> Stamp:
        """A stamp from its JSON object; `NotConvertedError` naming `file` and the first field that breaks
        a rule. Layout and version are checked first: another layout's stamp is refused for that."""
        stamp = _Fields(value, "stamp", file)
        layout = stamp.value.get("layout")
        if layout != LAYOUT_NAME:
            raise stamp.refuse("stamp.layout", "missing: not a stamp w4a8conv wrote" if "layout" not in stamp.value
                               else f"layout {layout!r} is not {LAYOUT_NAME!r}: another tool's layout")
        version = stamp.value.get("layout_version")
        if type(version) is not int or version != LAYOUT_VERSION:
            raise stamp.refuse("stamp.layout_version", f"layout version {version!r}; this w4a8conv serves version "
                                                       f"{LAYOUT_VERSION} only (convert again, or upgrade w4a8conv)")
        if "serving_releases" in stamp.value or "vllm_ascend" not in stamp.value:
            releases, legacy = stamp.strings("serving_releases", _RELEASE_LINE, "a release line such as '0.11'"), None
        else:
            releases, legacy = None, stamp.string("vllm_ascend")
        modules: dict[str, ModuleRecord] = {}
        for prefix, fields in stamp.entries("modules").items():
            kind = fields.choice("kind", tuple(_RECORDS))
            modules[prefix] = _RECORDS[kind].parse(fields)
        biases = {m.bias: prefix for prefix, m in modules.items() if isinstance(m, LinearRecord)}
        if len(biases) > 1:
            (first, _), (second, prefix) = list(biases.items())[:2]
            raise stamp.refuse(f"stamp.modules[{prefix!r}].bias",
                               f"{second!r}, where other Linear records have {first!r} (one source version names "
                               "every bias alike)")
        shards = {}
        for name, fields in stamp.entries("shards").items():
            if not plain_file_name(name):
                raise stamp.refuse(fields.path, "not a file name in this directory")
            shards[name] = ShardRecord.parse(fields)
        return cls(serving_releases=releases, tool_version=stamp.string("tool_version"),
                   source=SourceRecord.parse(stamp.object("source")), modules=modules, shards=shards,
                   vllm_ascend=legacy)

    @classmethod
    def of_description(cls, description: object, *, file: Path | str) -> Stamp:
        """The stamp of a converted description (`file` names it in errors)."""
        if not isinstance(description, dict) or STAMP_KEY not in description:
            raise NotConvertedError(f"no {STAMP_KEY!r} stamp: not converted by w4a8conv (run w4a8conv convert)",
                                    file=file)
        return cls.parse(description[STAMP_KEY], file=file)

"""Read-only view of an msModelSlim W4A8_DYNAMIC checkpoint directory (headers and JSON only).

The three exporters write: `quant_model_description.json` or `quant_model_description_<type>.json`;
one safetensors file, or shards with a `*.safetensors.index.json`. `version` and `group_size` are
read as vllm-ascend 0.11 reads them: absent version -> "0", 0 -> per-channel. An absent group_size
(the legacy `llm_ptq` exporter writes none) is taken from the `weight_scale_second` shapes, where
vllm-ascend would assume 256; with no per-group tensor at all it stays 256.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..constants import SOURCE_TYPE, GroupSizeFrom, QuantVersion
from ..dtypes import MODEL_DTYPES
from ..errors import InvalidCheckpointError, UsageError
from .safetensors_file import SafetensorsHeader, TensorRef, parse_json, read_header

__all__ = ["SourceCheckpoint", "GroupSizeFrom", "open_source", "read_json", "read_weight_files", "model_dtype_of",
           "model_type_of", "MODEL_DTYPES", "MODEL_DTYPE_ALIASES", "canonical_model_dtype", "DEFAULT_GROUP_SIZE",
           "MSMODELSLIM", "OPTIONAL_KEY", "described_files"]

MSMODELSLIM = "msmodelslim"
OPTIONAL_KEY = "optional"  # the description's section naming the files msModelSlim writes beside the weights

DEFAULT_GROUP_SIZE = 256  # vllm-ascend's default when the description has no group_size
# The short names users type (as vLLM's --dtype and torch do); config.json must use the full ones.
MODEL_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                       "float": "float32"}


def canonical_model_dtype(name: str) -> str | None:
    """The MODEL_DTYPES name a user's dtype name (any case, alias or full) stands for, or None."""
    key = name.strip().lower()
    key = MODEL_DTYPE_ALIASES.get(key, key)
    return key if key in MODEL_DTYPES else None


def read_json(file: Path) -> tuple[bytes, object]:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise InvalidCheckpointError(f"cannot read: {exc.strerror or exc}", file=file) from None
    return raw, parse_json(raw, file)


@dataclass(frozen=True)
class SourceCheckpoint:
    """What a source directory holds, validated; tensor data is read only through `TensorReader`."""

    root: Path
    description_file: Path
    description_bytes: bytes
    description: dict
    version: QuantVersion
    group_size: int  # 0 = per-channel
    group_size_from: GroupSizeFrom
    model_dtype: torch.dtype | None
    index_file: Path | None
    headers: tuple[SafetensorsHeader, ...]
    tensors: dict[str, TensorRef] = field(repr=False)
    producer: str = MSMODELSLIM
    # config.json's model_type, read with the rest of the source: which serving releases have the model.
    model_type: str | None = None
    # Modules whose source format the output re-expresses for the description's type (prefix -> translation).
    translated: dict[str, str] = field(default_factory=dict)
    # JSON files written with new content instead of copied (name -> object): config.json without the
    # quantization_config that would make vLLM pick another quantization method for the output.
    rewritten_json: dict[str, dict] = field(default_factory=dict, repr=False)

    def type_of(self, name: str) -> str:
        return self.description[name]

    @property
    def group_size_given(self) -> bool:
        """The description itself names the group size."""
        return self.group_size_from is GroupSizeFrom.DESCRIPTION


    @property
    def weight_files(self) -> tuple[Path, ...]:
        return tuple(h.file for h in self.headers)

    def non_weight_files(self) -> list[Path]:
        """Regular files that are neither weights, their index, nor a quant description: the top level's,
        then every file under its sub-directories (msModelSlim's `optional/quarot.safetensors`), except
        hidden ones at the top (`.cache/`, `.git/`: tools' records, not the model).

        They are copied into the output under the same relative paths, so a link (to a file or a
        directory) that leaves the directory is refused."""
        skip = {self.description_file.name, *(f.name for f in self.weight_files)}
        if self.index_file:
            skip.add(self.index_file.name)
        entries = _entries(self.root)
        files = [p for p in entries
                 if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors")
                 and not p.name.startswith("quant_model_description")]
        for p in files:
            _check_inside(self.root, p)
        for directory in [p for p in entries if p.is_dir() and not p.name.startswith(".")]:
            files += _files_under(self.root, directory, ())
        return files

    def named_files(self) -> list[str]:
        """The files the description names (`optional.<scope>.<kind>_map`), each a relative path that
        must be one of the copied files: refused otherwise, naming the path."""
        copied = {p.relative_to(self.root).as_posix() for p in self.non_weight_files()}
        names = described_files(self.description)
        for name in names:
            if name not in copied:
                raise InvalidCheckpointError(f"names the file {name!r} ({OPTIONAL_KEY} section), which is not a "
                                             "file inside the checkpoint directory", file=self.description_file,
                                             tensor=OPTIONAL_KEY)
        return names

    def fingerprint(self) -> str:
        """sha256 over the description, the index and every shard's name, size and header."""
        h = hashlib.sha256()
        h.update(self.description_bytes)
        if self.index_file:
            h.update(self.index_file.read_bytes())
        for header in self.headers:
            h.update(f"\0{header.file.name}\0{header.file.stat().st_size}\0".encode())
            h.update(header.header_bytes)
        return "sha256:" + h.hexdigest()


def _find_description(root: Path) -> Path:
    plain = root / "quant_model_description.json"
    if plain.is_file():
        return plain
    typed = sorted(root.glob("quant_model_description_*.json"))
    if len(typed) == 1:
        return typed[0]
    if not typed:
        raise InvalidCheckpointError("no quant_model_description.json or quant_model_description_<type>.json; "
                                     "this is not an msModelSlim checkpoint", file=root)
    raise InvalidCheckpointError(f"several quant descriptions ({', '.join(p.name for p in typed)}); "
                                 "keep exactly one", file=root)


def _check_keys(description: dict, file: Path) -> None:
    """Refuse names with non-ASCII digits: Python's int() and vLLM read "layers.٣" as layer 3, so such a
    name could mean the same layer or expert as another one."""
    for key in description:
        foreign = next((ch for ch in key if ch.isdigit() and not ch.isascii()), None)
        if foreign is not None:
            raise InvalidCheckpointError(f"name holds the non-ASCII digit {foreign!r} (U+{ord(foreign):04X}); "
                                         "layer and expert numbers must be ASCII digits", file=file,
                                         tensor=key if len(key) <= 200 else key[:200] + "...")


def _parse_version(description: dict, file: Path) -> QuantVersion:
    raw = description.get("version", QuantVersion.V0.value)
    try:
        return QuantVersion(raw)
    except ValueError:
        known = ", ".join(repr(v.value) for v in QuantVersion)
        raise InvalidCheckpointError(f"unknown version {raw!r} (known: {known})", file=file,
                                     tensor="version") from None


def _parse_group_size(description: dict, file: Path) -> int | None:
    if "group_size" not in description:
        return None
    raw = description["group_size"]
    if type(raw) is not int or raw < 0:
        raise InvalidCheckpointError(f"group_size {raw!r} is not a non-negative integer", file=file,
                                     tensor="group_size")
    return raw


def _implied_group_sizes(tensors: dict[str, TensorRef], description: dict) -> dict[str, int]:
    """weight_scale_second name -> the group size its shape implies (`in / columns`)."""
    implied = {}
    for name, ref in tensors.items():
        if not name.endswith(".weight_scale_second") or description.get(name) != SOURCE_TYPE:
            continue
        weight = tensors.get(name[: -len("_scale_second")])
        if weight is None or len(weight.shape) != 2 or len(ref.shape) != 2:
            continue  # the plan names the missing or malformed tensor
        inp, columns = weight.shape[1], ref.shape[1]
        if not columns or inp % columns:
            raise InvalidCheckpointError(f"{columns} group columns do not divide the input dimension {inp} of "
                                         f"{weight.name}", file=ref.file, tensor=name)
        implied[name] = inp // columns
    return implied


def _resolve_group_size(described: int | None, stated: int | None, tensors: dict[str, TensorRef],
                        description: dict, file: Path) -> tuple[int, GroupSizeFrom]:
    """The group size every W4A8 module uses, and where it came from; refuses disagreements."""
    if stated is not None and stated < 0:
        raise InvalidCheckpointError(f"--group-size {stated} is not a non-negative integer")
    if described is not None:
        if stated is not None and stated != described:
            raise InvalidCheckpointError(f"--group-size {stated} disagrees with the description's group_size "
                                         f"{described}", file=file, tensor="group_size")
        return described, GroupSizeFrom.DESCRIPTION
    implied = _implied_group_sizes(tensors, description)
    values = sorted(set(implied.values()))
    if len(values) > 1:
        first = next(n for n, g in implied.items() if g == values[0])
        other = next(n for n, g in implied.items() if g == values[1])
        raise InvalidCheckpointError(f"the description has no group_size and the shapes disagree: {first} means "
                                     f"group size {values[0]}, {other} means {values[1]}", file=file,
                                     tensor="group_size")
    if stated is not None:
        if stated != (values[0] if values else 0):  # without a per-group tensor only per-channel (0) fits
            shown = (f"{next(iter(implied))} means group size {values[0]}" if values
                     else "no W4A8 module has a weight_scale_second, so it is per-channel (0)")
            raise InvalidCheckpointError(f"--group-size {stated} disagrees with the shapes ({shown})", file=file,
                                         tensor="group_size")
        return stated, GroupSizeFrom.OPTION
    if values:
        return values[0], GroupSizeFrom.SHAPES
    return DEFAULT_GROUP_SIZE, GroupSizeFrom.DEFAULT


def model_dtype_of(root: Path, override: str | None) -> torch.dtype | None:
    """`override`, else config.json's torch_dtype (or dtype), else None."""
    if override is not None:
        name = canonical_model_dtype(override)
        if name is None:
            known = ", ".join([*MODEL_DTYPES, *MODEL_DTYPE_ALIASES])
            raise UsageError(f"model dtype {override!r} is not one of {known}")
        return MODEL_DTYPES[name]
    config = root / "config.json"
    if not config.is_file():
        return None
    _raw, parsed = read_json(config)
    name = parsed.get("torch_dtype", parsed.get("dtype")) if isinstance(parsed, dict) else None
    if name is None:
        return None
    if not isinstance(name, str) or name not in MODEL_DTYPES:
        raise InvalidCheckpointError(f"torch_dtype {name!r} is not one of {', '.join(MODEL_DTYPES)}",
                                     file=config, tensor="torch_dtype")
    return MODEL_DTYPES[name]


def model_type_of(root: Path) -> str | None:
    """config.json's model_type (which vLLM model serves the checkpoint), or None where it names none or
    cannot be read: that file is copied as it is, and its other checks belong to the serving stack."""
    try:
        _raw, parsed = read_json(root / "config.json")
    except InvalidCheckpointError:
        return None
    model_type = parsed.get("model_type") if isinstance(parsed, dict) else None
    return model_type if isinstance(model_type, str) else None


def _cache_blobs(real_root: str) -> str | None:
    """The `blobs` directory of the Hugging Face cache repository whose snapshot `real_root` is
    (`.../models--org--name/snapshots/<revision>`), or None for any other directory."""
    snapshots = os.path.dirname(real_root)
    repository = os.path.dirname(snapshots)
    if os.path.basename(snapshots) != "snapshots" or not os.path.basename(repository).startswith("models--"):
        return None
    return os.path.realpath(os.path.join(repository, "blobs"))


def _inside(root: Path, candidate: Path) -> bool:
    """`candidate` lies in `root`, following links; in a Hugging Face cache snapshot a name in the
    directory may also be a link to a blob of the same cache repository (how the cache stores files)."""
    real_root, real = os.path.realpath(root), os.path.realpath(candidate)
    if os.path.commonpath([real_root, real]) == real_root:
        return True
    named_inside = os.path.commonpath([os.path.abspath(root), os.path.abspath(candidate)]) == os.path.abspath(root)
    blobs = _cache_blobs(real_root)
    return named_inside and blobs is not None and os.path.dirname(real) == blobs


def _check_inside(root: Path, file: Path, what: str = "file") -> None:
    if not _inside(root, file):
        raise InvalidCheckpointError(f"is a link to a {what} outside the checkpoint directory (only links into "
                                     "the same Hugging Face cache repository's blobs are followed; copy the "
                                     "checkpoint with `cp -rL` or download it with `hf download --local-dir`)",
                                     file=file)


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError as exc:
        raise InvalidCheckpointError(f"cannot list: {exc.strerror or exc}", file=directory) from None


def _files_under(root: Path, directory: Path, above: tuple[str, ...]) -> list[Path]:
    """Every regular file under `directory`, sorted; links followed while they stay inside `root`, a
    link back to a directory above refused (it would be copied without end)."""
    _check_inside(root, directory, "directory")
    real = os.path.realpath(directory)
    if real in above:
        raise InvalidCheckpointError("is a link to a directory above it: it would be copied without end",
                                     file=directory)
    files: list[Path] = []
    for p in _entries(directory):
        if p.is_dir():
            files += _files_under(root, p, (*above, real))
        elif p.is_file():
            _check_inside(root, p)
            files.append(p)
    return files


def described_files(description: dict) -> list[str]:
    """The relative file paths msModelSlim's description names: `optional.<scope>.<kind>_map` maps a
    name to a file it wrote beside the weights (the ascendV1 saver's `optional/quarot.safetensors`)."""
    optional = description.get(OPTIONAL_KEY)
    scopes = optional.values() if isinstance(optional, dict) else ()
    return sorted({path for scope in scopes if isinstance(scope, dict)
                   for key, mapping in scope.items() if key.endswith("_map") and isinstance(mapping, dict)
                   for path in mapping.values() if isinstance(path, str)})


def _indexed_files(root: Path, index_file: Path) -> tuple[list[Path], dict[str, str]]:
    _raw, index = read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidCheckpointError("weight_map is missing or not a map of file names", file=index_file)
    names = sorted(set(weight_map.values()))
    for name in names:
        path = root / name
        try:
            outside = os.path.isabs(name) or not _inside(root, path)
            exists = path.is_file()
        except (OSError, ValueError) as exc:  # NUL bytes, lone surrogates, names too long
            raise InvalidCheckpointError(f"weight_map names {name!r}, which is not a usable file name ({exc})",
                                         file=index_file) from None
        if outside:
            raise InvalidCheckpointError(f"weight_map names {name!r}, which lies outside the checkpoint directory",
                                         file=index_file)
        if not exists:
            raise InvalidCheckpointError(f"weight_map names {name!r}, which does not exist", file=index_file)
    return [root / n for n in names], weight_map


def read_weight_files(root: Path) -> tuple[Path | None, tuple[SafetensorsHeader, ...], dict[str, TensorRef]]:
    """The index (if any), every weight file's header and the tensors by name, checked against each other."""
    indexes = sorted(root.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise InvalidCheckpointError(f"several indexes ({', '.join(p.name for p in indexes)})", file=root)
    index_file = indexes[0] if indexes else None
    if index_file:
        _check_inside(root, index_file)
        files, weight_map = _indexed_files(root, index_file)
    else:
        files, weight_map = sorted(root.glob("*.safetensors")), None
        if not files:
            raise InvalidCheckpointError("no *.safetensors file", file=root)
        for f in files:
            _check_inside(root, f)

    headers = tuple(read_header(f) for f in files)
    tensors: dict[str, TensorRef] = {}
    for header in headers:
        for name, ref in header.tensors.items():
            if name in tensors:
                raise InvalidCheckpointError(f"tensor also stored in {tensors[name].file.name}",
                                             file=header.file, tensor=name)
            if weight_map is not None and name not in weight_map:
                raise InvalidCheckpointError(f"tensor is stored in {header.file.name} but not in the index",
                                             file=index_file, tensor=name)
            if weight_map is not None and weight_map[name] != header.file.name:
                raise InvalidCheckpointError(
                    f"tensor is stored in {header.file.name} but the index maps it to {weight_map[name]!r}",
                    file=index_file, tensor=name)
            tensors[name] = ref
    if weight_map is not None:
        for name, file_name in weight_map.items():
            if name not in tensors:
                raise InvalidCheckpointError(f"indexed in {file_name!r} but that file does not hold it",
                                             file=index_file, tensor=name)
    return index_file, headers, tensors


def open_source(root: Path | str, *, model_dtype: str | None = None, group_size: int | None = None) -> SourceCheckpoint:
    """Validate a source directory's description, index and headers; read no tensor data.

    `group_size` states the group size of a description that has none (checked against the shapes)."""
    root = Path(root)
    try:
        is_dir = stat.S_ISDIR(os.stat(root).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_dir = False
    except OSError as exc:  # a component over the name limit, a loop of links, no permission to look
        raise InvalidCheckpointError(f"cannot read: {exc.strerror or exc}", file=root) from None
    if not is_dir:
        raise InvalidCheckpointError("not a directory", file=root)
    description_file = _find_description(root)
    _check_inside(root, description_file)
    description_bytes, description = read_json(description_file)
    if not isinstance(description, dict):
        raise InvalidCheckpointError("description is not a JSON object", file=description_file)
    _check_keys(description, description_file)
    version = _parse_version(description, description_file)
    described_group_size = _parse_group_size(description, description_file)

    index_file, headers, tensors = read_weight_files(root)
    for name in tensors:
        kind = description.get(name)
        if not isinstance(kind, str):
            raise InvalidCheckpointError("tensor has no quantization type in the description",
                                         file=description_file, tensor=name)
    group, group_from = _resolve_group_size(described_group_size, group_size, tensors, description,
                                            description_file)
    checkpoint = SourceCheckpoint(
        root=root, description_file=description_file, description_bytes=description_bytes,
        description=description, version=version, group_size=group, group_size_from=group_from,
        model_dtype=model_dtype_of(root, model_dtype), model_type=model_type_of(root),
        index_file=index_file, headers=headers, tensors=tensors)
    checkpoint.named_files()  # refuses links that leave the directory, and named files that are missing
    return checkpoint

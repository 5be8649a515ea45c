"""A corpus of bad inputs, generated here from synthetic checkpoints: every one must fail with one clear
`error:` line naming the file and/or tensor and the rule, the documented exit code, the source tree
unchanged, and nothing left behind that looks complete.

Every case runs through `w4a8conv.cli.main()` in this process (the console script's code path, cheap),
and a sample of them also through `python -m w4a8conv.cli` in parallel subprocesses (real exit codes
and stderr). docs/reliability.md lists every case.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from w4a8conv.constants import ExitCode

from robustness_support import (DESCRIPTION, INDEX, MOE, REPO, WEIGHTS, assert_clean_failure, assert_nothing_complete,
                                build, edit_header, edit_json, expert, read_raw, rewrite_tensors, run_cli, run_main,
                                shard, tree_digest, write_raw)

INVALID, USAGE = ExitCode.INVALID_INPUT, ExitCode.USAGE
IS_ROOT = os.geteuid() == 0


@dataclass
class Ctx:
    """Where a case lives: `src` (the source), `outside` (files beyond it), `sandbox` (their parent)."""

    sandbox: Path

    @property
    def src(self) -> Path:
        return self.sandbox / "src"

    @property
    def outside(self) -> Path:
        return self.sandbox / "outside"


@dataclass(frozen=True)
class Case:
    id: str
    preset: str
    mutate: Callable[[Ctx], list[str] | None]  # breaks ctx.src; may return more expected pieces
    code: int
    pieces: tuple[str, ...]  # "{src}" / "{sandbox}" are replaced by the case's paths
    out: Callable[[Ctx], Path] = lambda c: c.sandbox / "out"
    args: tuple[str, ...] = ()
    cli: bool = False  # also run through a subprocess
    as_root: bool = True  # False: skipped as root, whom permission bits do not stop


CASES: list[Case] = []


def case(id: str, preset: str, code: int, *pieces: str, **kwargs):
    def register(mutate):
        CASES.append(Case(id, preset, mutate, code, pieces, **kwargs))
        return mutate
    return register


def W(c: Ctx) -> Path:  # noqa: N802 - the one weights file of a single-file preset
    return c.src / WEIGHTS


def data_order(header: dict) -> list[str]:
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])


# -- safetensors structure ----------------------------------------------------------------------------


@case("st-empty-file", "v1", INVALID, "{src}/" + WEIGHTS, "safetensors file of 3 bytes is shorter than its 8-byte "
      "header length")
def _(c):
    W(c).write_bytes(b"\x10\x00\x00")


@case("st-truncated", "v1", INVALID, "{src}/" + WEIGHTS, "is past the data region of", cli=True)
def _(c):
    blob = W(c).read_bytes()
    W(c).write_bytes(blob[: len(blob) * 6 // 10])
    header, data = read_raw(W(c))
    first = next(n for n in header if n != "__metadata__" and header[n]["data_offsets"][1] > len(data))
    return [first, f"data_offsets end {header[first]['data_offsets'][1]}"]


@case("st-header-past-eof", "v1", INVALID, "{src}/" + WEIGHTS, "runs past the end of the")
def _(c):
    blob = bytearray(W(c).read_bytes())
    size = len(blob)
    blob[:8] = size.to_bytes(8, "little")  # 8 + size > size
    W(c).write_bytes(blob)
    return [f"header length {size} runs past the end of the {size}-byte file"]


@case("st-header-oversized", "v1", INVALID, "{src}/" + WEIGHTS,
      "header length 209715200 exceeds the 104857600-byte limit")
def _(c):
    header, data = read_raw(W(c))
    write_raw(W(c), header, data, declared=200 * 2**20)


@case("st-header-bad-json", "v1", INVALID, "{src}/" + WEIGHTS, "header is not valid JSON")
def _(c):
    write_raw(W(c), b'{"a": ' + b"x" * 100, b"")


@case("st-header-not-utf8", "v1", INVALID, "{src}/" + WEIGHTS, "header is not valid JSON")
def _(c):
    write_raw(W(c), b"\xff\xfe" * 50, b"")


@case("st-header-deep-nesting", "v1", INVALID, "{src}/" + WEIGHTS, "header is not valid JSON (nested too deeply)")
def _(c):
    write_raw(W(c), b"[" * 100_000 + b"]" * 100_000, b"")


@case("st-header-not-object", "v1", INVALID, "{src}/" + WEIGHTS, "header is not a JSON object")
def _(c):
    write_raw(W(c), b"[]" + b" " * 6, b"")


@case("st-overlap", "v1", INVALID, "{src}/" + WEIGHTS, "overlaps")
def _(c):
    big, small = expert(0, "gate_proj", "weight"), expert(0, "gate_proj", "weight_scale")

    def change(header):
        begin = header[big]["data_offsets"][0]
        size = header[small]["data_offsets"][1] - header[small]["data_offsets"][0]
        header[small]["data_offsets"] = [begin, begin + size]  # inside `big`, sorting before it
    edit_header(W(c), change)
    return [f"{big}: data of {big} overlaps {small}"]


@case("st-offsets-past-end", "v1", INVALID, "{src}/" + WEIGHTS, "is past the data region of")
def _(c):
    header, data = read_raw(W(c))
    last = data_order(header)[-1]
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 64, end + 64]
    write_raw(W(c), header, data)
    return [last, f"data_offsets end {end + 64} is past the data region of {len(data)} bytes"]


@case("st-offsets-reversed", "v1", INVALID, "{src}/" + WEIGHTS, expert(1, "up_proj", "weight_scale"),
      "data_offsets [128, 0] are not [begin, end] with 0 <= begin <= end")
def _(c):
    edit_header(W(c), lambda h: h[expert(1, "up_proj", "weight_scale")].update(data_offsets=[128, 0]))


@case("st-dtype-vs-bytes", "v1", INVALID, "{src}/" + WEIGHTS, expert(2, "down_proj", "weight_scale"),
      "F16 [64, 1] needs 128 bytes but data_offsets span 256")
def _(c):
    edit_header(W(c), lambda h: h[expert(2, "down_proj", "weight_scale")].update(dtype="F16"))


@case("st-shape-vs-bytes", "v1", INVALID, "{src}/" + WEIGHTS, expert(2, "up_proj", "weight_scale"),
      "F32 [33, 1] needs 132 bytes but data_offsets span 128")
def _(c):
    edit_header(W(c), lambda h: h[expert(2, "up_proj", "weight_scale")].update(shape=[33, 1]))


@case("st-shape-not-integers", "v1", INVALID, "{src}/" + WEIGHTS, "model.norm.weight",
      "shape [64.0] is not a list of non-negative integers")
def _(c):
    edit_header(W(c), lambda h: h["model.norm.weight"].update(shape=[64.0]))


@case("st-unknown-dtype", "v1", INVALID, "{src}/" + WEIGHTS, "model.norm.weight", "unknown dtype 'F4'")
def _(c):
    edit_header(W(c), lambda h: h["model.norm.weight"].update(dtype="F4"))


@case("st-dtype-not-a-string", "v1", INVALID, "{src}/" + WEIGHTS, "model.norm.weight", "unknown dtype ['BF16']")
def _(c):
    edit_header(W(c), lambda h: h["model.norm.weight"].update(dtype=["BF16"]))


@case("st-entry-extra-field", "v1", INVALID, "{src}/" + WEIGHTS, "lm_head.weight",
      "entry needs exactly dtype, shape and data_offsets")
def _(c):
    edit_header(W(c), lambda h: h["lm_head.weight"].update(crc32=0))


@case("st-metadata-not-strings", "v1", INVALID, "{src}/" + WEIGHTS, "__metadata__ is not a map of strings")
def _(c):
    edit_header(W(c), lambda h: h.update(__metadata__={"format": 1}))


@case("st-fifo", "v1", INVALID, "{src}/" + WEIGHTS, "is not a regular file")
def _(c):
    W(c).unlink()
    os.mkfifo(W(c))  # opening it would block forever


@case("st-no-weights", "v1", INVALID, "{src}", "no *.safetensors file")
def _(c):
    W(c).unlink()


@case("st-duplicate-across-shards", "v1-sharded", INVALID, "{src}/" + shard(2), "model.embed_tokens.weight",
      f"tensor also stored in {shard(1)}")
def _(c):
    value = load_file(str(c.src / shard(1)))["model.embed_tokens.weight"]  # the first shard holds it
    rewrite_tensors(c.src / shard(2), lambda t: t.update({"model.embed_tokens.weight": value}))


# -- index and description ----------------------------------------------------------------------------


def _evil_copy(c: Ctx) -> Path:
    c.outside.mkdir(exist_ok=True)
    evil = c.outside / "evil.safetensors"
    shutil.copyfile(c.src / shard(5), evil)
    return evil


@case("idx-dotdot", "v1-sharded", INVALID, "{src}/" + INDEX,
      "weight_map names '../outside/evil.safetensors', which lies outside the checkpoint directory", cli=True)
def _(c):
    _evil_copy(c)
    edit_json(c.src / INDEX, lambda d: d["weight_map"].update({"model.norm.weight": "../outside/evil.safetensors"}))


@case("idx-absolute", "v1-sharded", INVALID, "{src}/" + INDEX, "which lies outside the checkpoint directory")
def _(c):
    evil = _evil_copy(c)
    edit_json(c.src / INDEX, lambda d: d["weight_map"].update({"model.norm.weight": str(evil)}))
    return [f"weight_map names {str(evil)!r}"]


@case("idx-symlink-outside", "v1-sharded", INVALID, "{src}/" + INDEX,
      f"weight_map names {shard(5)!r}, which lies outside the checkpoint directory")
def _(c):
    evil = _evil_copy(c)
    (c.src / shard(5)).unlink()
    (c.src / shard(5)).symlink_to(evil)


@case("st-symlink-outside", "v1", INVALID, "{src}/" + WEIGHTS, "is a link to a file outside the checkpoint directory")
def _(c):
    c.outside.mkdir()
    shutil.move(W(c), c.outside / WEIGHTS)
    W(c).symlink_to(c.outside / WEIGHTS)


@case("idx-index-symlink-outside", "v1-sharded", INVALID, "{src}/" + INDEX,
      "is a link to a file outside the checkpoint directory")
def _(c):
    c.outside.mkdir()
    shutil.move(c.src / INDEX, c.outside / INDEX)
    (c.src / INDEX).symlink_to(c.outside / INDEX)


@case("desc-symlink-outside", "v1", INVALID, "{src}/" + DESCRIPTION,
      "is a link to a file outside the checkpoint directory")
def _(c):
    c.outside.mkdir()
    shutil.move(c.src / DESCRIPTION, c.outside / DESCRIPTION)
    (c.src / DESCRIPTION).symlink_to(c.outside / DESCRIPTION)


@case("copy-symlink-outside", "v1", INVALID, "{src}/tokenizer_config.json",
      "is a link to a file outside the checkpoint directory")
def _(c):
    """A file that would be copied into the output must not pull in a file from elsewhere (/etc/shadow)."""
    c.outside.mkdir()
    (c.outside / "secret.txt").write_text("not for the output\n")
    (c.src / "tokenizer_config.json").unlink()
    (c.src / "tokenizer_config.json").symlink_to(c.outside / "secret.txt")


@case("copy-dir-symlink-outside", "v1", INVALID, "{src}/optional",
      "is a link to a directory outside the checkpoint directory")
def _(c):
    """A sub-directory is copied into the output too (msModelSlim's optional/): a link to a directory
    elsewhere must not pull that directory in."""
    (c.outside / "rotations").mkdir(parents=True)
    (c.outside / "rotations" / "quarot.safetensors").write_bytes(b"not for the output")
    (c.src / "optional").symlink_to(c.outside / "rotations")


@case("copy-dir-symlink-loop", "v1", INVALID, "{src}/inference/again",
      "is a link to a directory above it: it would be copied without end")
def _(c):
    (c.src / "inference").mkdir()
    (c.src / "inference" / "model.py").write_text("# reference code\n")
    (c.src / "inference" / "again").symlink_to(c.src / "inference")


@case("desc-optional-file-missing", "v1", INVALID, "{src}/" + DESCRIPTION, "optional",
      "names the file 'optional/quarot.safetensors' (optional section), which is not a file inside the "
      "checkpoint directory")
def _(c):
    """msModelSlim's ascendV1 saver names the files it writes beside the weights; one that is not there
    would be missing from the output too."""
    edit_json(c.src / DESCRIPTION, lambda d: d.update(
        optional={"quarot": {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}}))


@case("desc-optional-file-outside", "v1", INVALID, "{src}/" + DESCRIPTION, "optional",
      "names the file '../outside/quarot.safetensors' (optional section), which is not a file inside the "
      "checkpoint directory")
def _(c):
    c.outside.mkdir()
    (c.outside / "quarot.safetensors").write_bytes(b"elsewhere")
    edit_json(c.src / DESCRIPTION, lambda d: d.update(
        optional={"quarot": {"rotation_map": {"global_rotation": "../outside/quarot.safetensors"}}}))


@case("idx-missing-file", "v1-sharded", INVALID, "{src}/" + INDEX,
      f"weight_map names {shard(5)!r}, which does not exist")
def _(c):
    (c.src / shard(5)).unlink()


@case("idx-unusable-name", "v1-sharded", INVALID, "{src}/" + INDEX, "which is not a usable file name")
def _(c):
    edit_json(c.src / INDEX, lambda d: d["weight_map"].update({"model.norm.weight": "a\u0000b.safetensors"}))


@case("idx-name-too-long", "v1-sharded", INVALID, "{src}/" + INDEX, "which is not a usable file name",
      "File name too long")
def _(c):
    edit_json(c.src / INDEX, lambda d: d["weight_map"].update({"model.norm.weight": "x" * 300 + ".safetensors"}))


@case("idx-tensor-not-indexed", "v1-sharded", INVALID, "{src}/" + INDEX, "model.norm.weight",
      "tensor is stored in", "but not in the index")
def _(c):
    edit_json(c.src / INDEX, lambda d: d["weight_map"].pop("model.norm.weight"))


@case("idx-wrong-file", "v1-sharded", INVALID, "{src}/" + INDEX, "model.embed_tokens.weight",
      f"tensor is stored in {shard(1)} but the index maps it to {shard(2)!r}")
def _(c):
    edit_json(c.src / INDEX, lambda d: d["weight_map"].update({"model.embed_tokens.weight": shard(2)}))


@case("idx-ghost-tensor", "v1-sharded", INVALID, "{src}/" + INDEX, "model.ghost.weight",
      f"indexed in {shard(1)!r} but that file does not hold it")
def _(c):
    edit_json(c.src / INDEX, lambda d: d["weight_map"].update({"model.ghost.weight": shard(1)}))


@case("idx-not-json", "v1-sharded", INVALID, "{src}/" + INDEX, "not valid JSON")
def _(c):
    (c.src / INDEX).write_text('{"weight_map": {')


@case("idx-no-weight-map", "v1-sharded", INVALID, "{src}/" + INDEX, "weight_map is missing or not a map of file names")
def _(c):
    edit_json(c.src / INDEX, lambda d: d.pop("weight_map"))


@case("idx-two-indexes", "v1-sharded", INVALID, "{src}", "several indexes")
def _(c):
    shutil.copyfile(c.src / INDEX, c.src / "other.safetensors.index.json")


@case("desc-type-missing", "v1", INVALID, "{src}/" + DESCRIPTION, expert(2, "down_proj", "weight_scale"),
      "tensor has no quantization type in the description")
def _(c):
    edit_json(c.src / DESCRIPTION, lambda d: d.pop(expert(2, "down_proj", "weight_scale")))


@case("desc-type-not-a-string", "v1", INVALID, "{src}/" + DESCRIPTION, "lm_head.weight",
      "tensor has no quantization type in the description")
def _(c):
    edit_json(c.src / DESCRIPTION, lambda d: d.update({"lm_head.weight": 5}))


@case("desc-unknown-version", "v1", INVALID, "{src}/" + DESCRIPTION, "version",
      "unknown version '2.0.0' (known: '0', '1.0.0')", cli=True)
def _(c):
    edit_json(c.src / DESCRIPTION, lambda d: d.update(version="2.0.0"))


@case("desc-version-not-a-string", "v1", INVALID, "{src}/" + DESCRIPTION, "unknown version 1 ")
def _(c):
    edit_json(c.src / DESCRIPTION, lambda d: d.update(version=1))


@case("desc-group-negative", "v1", INVALID, "{src}/" + DESCRIPTION, "group_size",
      "group_size -32 is not a non-negative integer")
def _(c):
    edit_json(c.src / DESCRIPTION, lambda d: d.update(group_size=-32))


@case("desc-group-float", "v1", INVALID, "{src}/" + DESCRIPTION, "group_size 32.0 is not a non-negative integer")
def _(c):
    edit_json(c.src / DESCRIPTION, lambda d: d.update(group_size=32.0))


@case("desc-group-string", "v1", INVALID, "{src}/" + DESCRIPTION, "group_size '32' is not a non-negative integer")
def _(c):
    edit_json(c.src / DESCRIPTION, lambda d: d.update(group_size="32"))


@case("desc-group-bool", "v1", INVALID, "{src}/" + DESCRIPTION, "group_size True is not a non-negative integer")
def _(c):
    edit_json(c.src / DESCRIPTION, lambda d: d.update(group_size=True))


@case("desc-not-an-object", "v1", INVALID, "{src}/" + DESCRIPTION, "description is not a JSON object")
def _(c):
    (c.src / DESCRIPTION).write_text("[]")


@case("desc-not-json", "v1", INVALID, "{src}/" + DESCRIPTION, "not valid JSON")
def _(c):
    (c.src / DESCRIPTION).write_bytes(b'{"version": "1.0.0",')


@case("desc-missing", "v1", INVALID, "{src}", "no quant_model_description.json or "
      "quant_model_description_<type>.json; this is not an msModelSlim checkpoint")
def _(c):
    (c.src / DESCRIPTION).unlink()


@case("desc-two-typed", "v1", INVALID, "{src}", "several quant descriptions (quant_model_description_a.json, "
      "quant_model_description_b.json); keep exactly one")
def _(c):
    shutil.copyfile(c.src / DESCRIPTION, c.src / "quant_model_description_a.json")
    shutil.move(c.src / DESCRIPTION, c.src / "quant_model_description_b.json")


@case("config-unknown-dtype", "v1", INVALID, "{src}/config.json", "torch_dtype",
      "torch_dtype 'float8' is not one of bfloat16, float16, float32")
def _(c):
    edit_json(c.src / "config.json", lambda d: d.update(torch_dtype="float8"))


@case("config-dtype-not-a-string", "v1", INVALID, "{src}/config.json", "torch_dtype ['bfloat16'] is not one of")
def _(c):
    edit_json(c.src / "config.json", lambda d: d.update(torch_dtype=["bfloat16"]))


# -- quantization content -----------------------------------------------------------------------------


def _drop(c: Ctx, *names: str, description: bool = False) -> None:
    rewrite_tensors(W(c), lambda t: [t.pop(n) for n in names])
    if description:
        edit_json(c.src / DESCRIPTION, lambda d: [d.pop(n) for n in names])


def _set(c: Ctx, name: str, index: tuple, value: float) -> None:
    def change(t):
        t[name][index] = value
    rewrite_tensors(W(c), change)


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


for _suffix, _e, _proj in (("weight_scale", 1, "gate_proj"), ("weight_scale_second", 2, "up_proj"),
                           ("scale_bias", 3, "down_proj"), ("weight_offset", 0, "gate_proj")):
    _name = expert(_e, _proj, _suffix)
    case(f"q-missing-{_suffix.replace('_', '-')}", "v1", INVALID, "{src}", _name,
         f"missing; W4A8_DYNAMIC module {_module_of(_name)} needs it")(lambda c, n=_name: _drop(c, n))


@case("q-scale-shape", "v1", INVALID, "{src}/" + WEIGHTS, expert(1, "up_proj", "weight_scale"),
      "shape [32, 2], expected [32, 1]")
def _(c):
    rewrite_tensors(W(c), lambda t: t.update({expert(1, "up_proj", "weight_scale"): torch.ones(32, 2)}))


@case("q-scale-second-shape", "v1", INVALID, "{src}/" + WEIGHTS, expert(1, "gate_proj", "weight_scale_second"),
      "shape [32, 4], expected [32, 2] for group_size 32", 'these columns mean group size 16')
def _(c):
    rewrite_tensors(W(c), lambda t: t.update({expert(1, "gate_proj", "weight_scale_second"): torch.ones(32, 4)}))


@case("q-scale-bias-shape", "v1", INVALID, "{src}/" + WEIGHTS, expert(0, "down_proj", "scale_bias"),
      "shape [64, 8], expected [64, 16]")
def _(c):
    rewrite_tensors(W(c), lambda t: t.update({expert(0, "down_proj", "scale_bias"): torch.zeros(64, 8)}))


@case("q-weight-dtype", "v1", INVALID, "{src}/" + WEIGHTS, expert(0, "down_proj", "weight"),
      "dtype I16, expected I8")
def _(c):
    name = expert(0, "down_proj", "weight")
    rewrite_tensors(W(c), lambda t: t.update({name: t[name].to(torch.int16)}))


@case("q-gate-up-shapes-differ", "v1", INVALID, "{src}/" + WEIGHTS, expert(0, "up_proj", "weight"),
      "shape [20, 64], expected [16, 64] (same as expert 0's)")
def _(c):
    """Every expert's up_proj is consistently 40 wide while gate_proj is 32: stacking would be wrong."""
    def change(t):
        for e in range(4):
            n = lambda s: expert(e, "up_proj", s)  # noqa: E731
            t[n("weight")] = torch.zeros(20, 64, dtype=torch.int8)
            t[n("weight_scale")], t[n("weight_offset")] = torch.full((40, 1), 0.01), torch.zeros(40, 1)
            t[n("weight_scale_second")], t[n("weight_offset_second")] = torch.ones(40, 2), torch.zeros(40, 2)
            t[n("scale_bias")] = torch.zeros(40, 1)
    rewrite_tensors(W(c), change)


@case("q-expert-shape-differs", "v1", INVALID, "{src}/" + WEIGHTS, expert(3, "down_proj", "weight"),
      "shape [32, 48], expected [32, 32] (same as expert 0's)")
def _(c):
    rewrite_tensors(W(c), lambda t: t.update({expert(3, "down_proj", "weight"): torch.zeros(32, 48, dtype=torch.int8)}))


@case("q-group-does-not-divide-in", "v1", INVALID, "{src}/" + WEIGHTS, expert(0, "gate_proj", "weight_scale_second"),
      "input dimension 64 is not a multiple of group_size 48")
def _(c):
    edit_json(c.src / DESCRIPTION, lambda d: d.update(group_size=48))


@case("q-int4-out-of-range-v0", "v0", INVALID, "{src}/" + WEIGHTS, expert(3, "up_proj", "weight"),
      "int4 value 9 at [5, 7] outside [-8, 7]", args=("--max-shard-size", "1"), cli=True)
def _(c):
    """Found while packing, after several shards were written: the run must remove them."""
    _set(c, expert(3, "up_proj", "weight"), (5, 7), 9)


@case("q-int4-out-of-range-v0-channel", "v0-channel", INVALID, "{src}/" + WEIGHTS, expert(0, "gate_proj", "weight"),
      "int4 value -9 at [0, 0] outside [-8, 7]")
def _(c):
    _set(c, expert(0, "gate_proj", "weight"), (0, 0), -9)


@case("q-scale-nan", "v1", INVALID, "{src}/" + WEIGHTS, expert(2, "gate_proj", "weight_scale"),
      "scale nan at [3, 0] is not finite and non-negative", cli=True)
def _(c):
    _set(c, expert(2, "gate_proj", "weight_scale"), (3, 0), math.nan)


@case("q-scale-inf", "v1", INVALID, "{src}/" + WEIGHTS, expert(1, "down_proj", "weight_scale_second"),
      "scale inf at [7, 0] is not finite and non-negative")
def _(c):
    _set(c, expert(1, "down_proj", "weight_scale_second"), (7, 0), math.inf)


@case("q-scale-negative", "v1", INVALID, "{src}/" + WEIGHTS, expert(0, "up_proj", "weight_scale"),
      "scale -0.5 at [4, 0] is not finite and non-negative")
def _(c):
    _set(c, expert(0, "up_proj", "weight_scale"), (4, 0), -0.5)


@case("q-scale-second-negative", "v1", INVALID, "{src}/" + WEIGHTS, expert(3, "gate_proj", "weight_scale_second"),
      "scale -2.0 at [6, 1] is not finite and non-negative")
def _(c):
    _set(c, expert(3, "gate_proj", "weight_scale_second"), (6, 1), -2.0)


@case("q-scale-negative-channel", "v0-channel", INVALID, "{src}/" + WEIGHTS, expert(1, "down_proj", "weight_scale"),
      "scale -0.25 at [0, 0] is not finite and non-negative")
def _(c):
    _set(c, expert(1, "down_proj", "weight_scale"), (0, 0), -0.25)


@case("q-offset-nonzero", "v1", INVALID, "{src}/" + WEIGHTS, expert(1, "gate_proj", "weight_offset"),
      "non-zero offset 0.5 at [2, 0]: asymmetric quantization is not served by the A8W4 kernel")
def _(c):
    _set(c, expert(1, "gate_proj", "weight_offset"), (2, 0), 0.5)


@case("q-offset-second-nonzero", "v1", INVALID, "{src}/" + WEIGHTS, expert(1, "down_proj", "weight_offset_second"),
      "non-zero offset -1.0 at [3, 0]")
def _(c):
    _set(c, expert(1, "down_proj", "weight_offset_second"), (3, 0), -1.0)


@case("q-scale-bias-nan", "v1", INVALID, "{src}/" + WEIGHTS, expert(2, "up_proj", "scale_bias"),
      "value nan at [1, 0] is not finite")
def _(c):
    _set(c, expert(2, "up_proj", "scale_bias"), (1, 0), math.nan)


@case("q-fused-scale-overflows-fp16", "v1", INVALID, "{src}/" + WEIGHTS, expert(0, "gate_proj", "weight_scale_second"),
      "fused scale at [0, 0] overflows fp16 (|scale x scale_second| > 65504)")
def _(c):
    def change(t):
        t[expert(0, "gate_proj", "weight_scale")][0, 0] = 1000.0
        t[expert(0, "gate_proj", "weight_scale_second")][0, :] = 100.0
    rewrite_tensors(W(c), change)


@case("q-linear-scale-overflows-dtype", "v1-linear-fp16", INVALID, "{src}/" + WEIGHTS,
      "model.layers.0.mlp.gate_proj.weight_scale", "scale overflows the model dtype torch.float16")
def _(c):
    _set(c, "model.layers.0.mlp.gate_proj.weight_scale", (0, 0), 1e6)


def _expert_names(c: Ctx, e: int, projs=("gate_proj", "up_proj", "down_proj")) -> list[str]:
    header, _ = read_raw(W(c))
    return [n for n in header if any(n.startswith(f"{MOE}.experts.{e}.{p}.") for p in projs)]


@case("q-expert-ids-gap", "v1", INVALID, "{src}/" + DESCRIPTION, f"{MOE}.experts",
      "expert ids are not 0..3 without gaps (missing [2])")
def _(c):
    _drop(c, *_expert_names(c, 2), description=True)


@case("q-expert-missing-projection", "v1", INVALID, "{src}/" + DESCRIPTION, f"{MOE}.experts.3",
      "projections ['gate_proj', 'up_proj'] differ from expert 0's")
def _(c):
    _drop(c, *_expert_names(c, 3, ("down_proj",)), description=True)


@case("q-expert-id-huge", "v1", INVALID, "{src}/" + DESCRIPTION, f"{MOE}.experts",
      "expert ids are not 0..1000000000000 without gaps (missing [4, 5, 6, 7, 8, 9, 10, 11])")
def _(c):
    """An id taken from a tensor name must not size anything (range(10**12) would never finish)."""
    name = f"{MOE}.experts.1000000000000.gate_proj.weight"
    rewrite_tensors(W(c), lambda t: t.update({name: torch.zeros(16, 64, dtype=torch.int8)}))
    edit_json(c.src / DESCRIPTION, lambda d: d.update({name: "W4A8_DYNAMIC"}))


@case("q-stray-w4a8-tensor", "v1", INVALID, "{src}/" + WEIGHTS, expert(0, "gate_proj", "weight_extra"),
      "W4A8_DYNAMIC tensor belongs to no W4A8 module")
def _(c):
    name = expert(0, "gate_proj", "weight_extra")
    rewrite_tensors(W(c), lambda t: t.update({name: torch.zeros(4)}))
    edit_json(c.src / DESCRIPTION, lambda d: d.update({name: "W4A8_DYNAMIC"}))


@case("q-module-part-typed-float", "v1", INVALID, "{src}/" + DESCRIPTION, expert(1, "up_proj", "weight_scale"),
      f"typed 'FLOAT' but its module {MOE}.experts.1.up_proj is W4A8_DYNAMIC")
def _(c):
    edit_json(c.src / DESCRIPTION, lambda d: d.update({expert(1, "up_proj", "weight_scale"): "FLOAT"}))


@case("q-linear-per-channel", "v0-channel-linear", INVALID, "{src}/" + DESCRIPTION,
      "model.layers.0.mlp.down_proj.weight",
      "per-channel (group_size 0) W4A8_DYNAMIC Linear layer: no vllm-ascend release serves one")
def _(c):
    pass


@case("q-linear-no-model-dtype", "v1-linear", INVALID, "{src}/config.json", "pass --model-dtype")
def _(c):
    edit_json(c.src / "config.json", lambda d: d.pop("torch_dtype"))


# -- parser limits: integers past Python's int-string limit, non-ASCII digits, surrogates, sizes ---------

BIG_INT = "9" * (sys.get_int_max_str_digits() + 1)  # json.loads refuses it; json.dumps cannot write it


def with_big_int(path: Path, old: str, new: str) -> None:
    """Replace text `old` in a JSON file by `new`, with {big} standing for BIG_INT."""
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new.replace("{big}", BIG_INT), 1))


def big_int_header(path: Path) -> None:
    header, data = read_raw(path)
    header["__metadata__"] = {"format": "pt", "note": "@@"}
    write_raw(path, json.dumps(header).encode().replace(b'{"format": "pt", "note": "@@"}',
                                                        b'{"format": "pt", "count": ' + BIG_INT.encode() + b'}'), data)


@case("lim-int-past-limit-description", "v1", INVALID, "{src}/" + DESCRIPTION,
      f"not valid JSON (an integer of more than {sys.get_int_max_str_digits()} digits)")
def _(c):
    with_big_int(c.src / DESCRIPTION, '"version"', '"padding": {big}, "version"')


@case("lim-int-past-limit-header", "v1", INVALID, "{src}/" + WEIGHTS, "header is not valid JSON (an integer of more "
      "than", cli=True)
def _(c):
    big_int_header(W(c))


@case("lim-int-past-limit-index", "v1-sharded", INVALID, "{src}/" + INDEX, "not valid JSON (an integer of more than")
def _(c):
    with_big_int(c.src / INDEX, '"total_size": ', '"total_size": {big}, "was": ')


@case("lim-int-past-limit-config", "v1", INVALID, "{src}/config.json", "not valid JSON (an integer of more than")
def _(c):
    with_big_int(c.src / "config.json", '"hidden_size": ', '"hidden_size": {big}, "was": ')


@case("lim-expert-id-past-limit", "v1", INVALID, "{src}/" + DESCRIPTION, "expert id 999999999999...9999 (4301 "
      "characters) has more than 18 digits")
def _(c):
    name = f"{MOE}.experts.{BIG_INT[:-1]}9.gate_proj.weight"
    rewrite_tensors(W(c), lambda t: t.update({name: torch.zeros(16, 64, dtype=torch.int8)}))
    edit_json(c.src / DESCRIPTION, lambda d: d.update({name: "W4A8_DYNAMIC"}))


@case("lim-desc-key-non-ascii-digit", "v1", INVALID, "{src}/" + DESCRIPTION, "model.layers.\u00b2.mlp.gate.weight",
      "name holds the non-ASCII digit '\u00b2' (U+00B2); layer and expert numbers must be ASCII digits")
def _(c):
    """A superscript two: str.isdigit() says yes, int() says no (this used to crash after every shard)."""
    edit_json(c.src / DESCRIPTION, lambda d: d.update({"model.layers.\u00b2.mlp.gate.weight": "FLOAT"}))


@case("lim-expert-id-non-ascii", "v1", INVALID, "{src}/" + DESCRIPTION, f"{MOE}.experts.\u0663.gate_proj.weight",
      "non-ASCII digit '\u0663' (U+0663)")
def _(c):
    """An Arabic-Indic three: int() reads it as 3, so it would be a second expert 3."""
    name = f"{MOE}.experts.\u0663.gate_proj.weight"
    rewrite_tensors(W(c), lambda t: t.update({name: torch.zeros(16, 64, dtype=torch.int8)}))
    edit_json(c.src / DESCRIPTION, lambda d: d.update({name: "W4A8_DYNAMIC"}))


@case("lim-tensor-name-surrogate", "v1", INVALID, "{src}/" + WEIGHTS,
      "tensor name 'lm_head\\ud800' is not valid Unicode (a lone surrogate)")
def _(c):
    edit_header(W(c), lambda h: h.update({"lm_head\ud800": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}))


@case("lim-dim-past-int64", "v1", INVALID, "{src}/" + WEIGHTS, "empty",
      f"shape [0, {2**63}] is not a list of non-negative integers below 2^63")
def _(c):
    """A zero next to a huge dimension is zero bytes, but no torch tensor can have that shape."""
    edit_header(W(c), lambda h: h.update({"empty": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}))


@case("lim-strides-past-int64", "v1", INVALID, "{src}/" + WEIGHTS, "empty",
      f"shape [0, 2, {2**63 - 1}] has a contiguous stride of {2 * (2**63 - 1)}, past 2^63 - 1 (torch's int64 strides)")
def _(c):
    """Every size fits int64 and the tensor is zero bytes, but its first stride, 2 x (2^63 - 1), does not."""
    edit_header(W(c), lambda h: h.update({"empty": {"dtype": "F32", "shape": [0, 2, 2**63 - 1],
                                                   "data_offsets": [0, 0]}}))


@case("lim-storage-past-uint64", "v1", INVALID, "{src}/" + WEIGHTS, "empty",
      f"shape [8, {2**63 - 1}, 0] has sizes whose product before the first zero, {8 * (2**63 - 1)}, passes 2^64 - 1: "
      "torch's storage size computation overflows, although the tensor holds no bytes")
def _(c):
    """Sizes and strides fit int64 and the tensor is zero bytes, but torch multiplies the sizes in order as
    unsigned 64-bit integers when it sizes the storage, and 8 x (2^63 - 1) overflows before the zero."""
    edit_header(W(c), lambda h: h.update({"empty": {"dtype": "F32", "shape": [8, 2**63 - 1, 0],
                                                   "data_offsets": [0, 0]}}))


@case("lim-intermediate-zero", "v1", INVALID, "{src}/" + WEIGHTS, expert(0, "gate_proj", "weight_scale"),
      "intermediate size 0 (from [0, 1]): a W4A8 module needs non-zero dimensions")
def _(c):
    def change(t):
        for name in [n for n in t if n.startswith(f"{MOE}.experts.")]:
            shape = list(t[name].shape)
            if ".down_proj." in name and (name.endswith(".weight") or name.endswith("_second")):
                shape[1] = 0  # the input dimension of down_proj is the intermediate size
            elif ".down_proj." not in name:
                shape[0] = 0
            t[name] = torch.zeros(shape, dtype=t[name].dtype)
    rewrite_tensors(W(c), change)


# -- environment: the output location -----------------------------------------------------------------


@case("env-output-is-source", "v1", USAGE, "{src}", "must not be the source directory or inside it",
      out=lambda c: c.src)
def _(c):
    pass


@case("env-output-inside-source-via-link", "v1", USAGE, "{sandbox}/link/out",
      "must not be the source directory or inside it", out=lambda c: c.sandbox / "link" / "out")
def _(c):
    (c.sandbox / "link").symlink_to(c.src, target_is_directory=True)


@case("env-output-contains-source", "v1", USAGE,
      "{sandbox}: the output directory must not contain the source directory", out=lambda c: c.sandbox)
def _(c):
    pass


@case("env-output-not-empty", "v1", USAGE, "{sandbox}/out", "exists and is not empty (use --resume")
def _(c):
    (c.sandbox / "out").mkdir()
    (c.sandbox / "out" / "notes.txt").write_text("mine\n")


@case("env-output-is-a-file", "v1", USAGE, "{sandbox}/out", "exists and is not a directory")
def _(c):
    (c.sandbox / "out").write_text("a file\n")


@case("env-output-under-a-file", "v1", USAGE, "{sandbox}/afile/out", "cannot create",
      out=lambda c: c.sandbox / "afile" / "out", cli=True)
def _(c):
    """What a read-only location looks like to root, for whom permission bits do not stop mkdir."""
    (c.sandbox / "afile").write_text("a file\n")


@case("env-output-in-proc", "v1", USAGE, "/proc/w4a8conv-no-such-dir/out", "cannot create",
      out=lambda c: Path("/proc/w4a8conv-no-such-dir/out"))
def _(c):
    pass


@case("env-output-read-only-dir", "v1", USAGE, "{sandbox}/ro/out", "cannot create",
      out=lambda c: c.sandbox / "ro" / "out", as_root=False)
def _(c):
    (c.sandbox / "ro").mkdir()
    (c.sandbox / "ro").chmod(0o555)


@case("env-force-foreign-files", "v1", USAGE, "{sandbox}/out", "--force replaces only a previous w4a8conv output",
      "notes.txt is not part of one", args=("--force",))
def _(c):
    (c.sandbox / "out").mkdir()
    (c.sandbox / "out" / "notes.txt").write_text("mine\n")


@case("env-resume-without-journal", "v1", USAGE, "{sandbox}/out", "nothing to resume", args=("--resume",))
def _(c):
    (c.sandbox / "out").mkdir()


@case("env-force-entry-is-a-directory", "v1", USAGE, "{sandbox}/out", "--force replaces only a previous w4a8conv "
      "output, and model-00001-of-00001.safetensors is not part of one", args=("--force",))
def _(c):
    """A directory where a previous output had a shard: --force removes files only, and nothing at all
    unless every entry is one of its own files."""
    (c.sandbox / "out" / "model-00001-of-00001.safetensors").mkdir(parents=True)
    (c.sandbox / "out" / "model.safetensors.index.json").write_text("{}\n")


@case("env-output-name-too-long", "v1", USAGE, "{sandbox}/" + "o" * 300 + "/out",
      "cannot use as the output directory: File name too long", out=lambda c: c.sandbox / ("o" * 300) / "out")
def _(c):
    pass


@case("env-source-name-too-long", "v1", INVALID, "{sandbox}/" + "s" * 300 + ": cannot read: File name too long",
      out=lambda c: c.sandbox / "out")
def _(c):
    pass


@case("env-source-missing", "v1", INVALID, "{sandbox}/nowhere: not a directory", out=lambda c: c.sandbox / "out")
def _(c):
    shutil.rmtree(c.src)


SOURCE_ARG = {"env-source-missing": lambda c: c.sandbox / "nowhere",
              "env-source-name-too-long": lambda c: c.sandbox / ("s" * 300)}
IDS = [c.id for c in CASES]
assert len(IDS) == len(set(IDS)), "duplicate case id"
BY_ID = {c.id: c for c in CASES}


# ------------------------------------------------------------------------------------------------------


@dataclass
class Built:
    case: Case
    ctx: Ctx
    out: Path
    pieces: list[str]
    digest: dict[str, str]
    out_before: dict[str, str] = field(default_factory=dict)

    @property
    def source_arg(self) -> Path:
        return SOURCE_ARG.get(self.case.id, lambda c: c.src)(self.ctx)


def _make(case_: Case, sandbox: Path) -> Built:
    sandbox.mkdir(parents=True)
    ctx = Ctx(sandbox)
    build(case_.preset, ctx.src)
    extra = case_.mutate(ctx) or []
    fmt = lambda p: p.replace("{src}", str(ctx.src)).replace("{sandbox}", str(sandbox))  # noqa: E731
    out = case_.out(ctx)
    built = Built(case_, ctx, out, [fmt(p) for p in case_.pieces] + extra, tree_digest(ctx.src, ctx.outside))
    if os.path.isdir(out) and out != ctx.src and out != sandbox:
        built.out_before = tree_digest(out)
    return built


def _check(built: Built, run) -> None:
    c, ctx = built.case, built.ctx
    assert_clean_failure(run, c.code, built.pieces)
    assert tree_digest(ctx.src, ctx.outside) == built.digest, "the source tree changed"
    out = built.out
    if os.path.realpath(out) in (os.path.realpath(ctx.src), os.path.realpath(ctx.sandbox)):
        return  # the source (or its parent) itself: its digest is the check
    if built.out_before:
        assert tree_digest(out) == built.out_before, "a pre-existing output directory was changed"
    elif os.path.isdir(out):  # os.path: Path.exists() raises for a name over the limit
        assert not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    assert_nothing_complete(out)


def _args(built: Built) -> list[str]:
    return ["convert", str(built.source_arg), str(built.out), *built.case.args]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The `cli=True` cases, each built afresh and run through `python -m w4a8conv.cli` concurrently."""
    base = tmp_path_factory.mktemp("bad-cli")
    built = {c.id: _make(c, base / c.id) for c in CASES if c.cli}
    # The int4 case runs with two worker processes here: the failure comes from a worker.
    extra = {"q-int4-out-of-range-v0": ["--workers", "2"]}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {i: pool.submit(run_cli, *_args(b), *extra.get(i, ["--workers", "1"])) for i, b in built.items()}
        return {i: (built[i], f.result()) for i, f in futures.items()}


def test_corpus_is_large_enough():
    assert len(CASES) >= 30
    assert {c.code for c in CASES} == {ExitCode.INVALID_INPUT, ExitCode.USAGE}
    assert len([c for c in CASES if c.cli]) >= 6


@pytest.mark.parametrize("case_id", IDS)
def test_bad_input(case_id, tmp_path):
    case_ = BY_ID[case_id]
    if IS_ROOT and not case_.as_root:
        pytest.skip("running as root: permission bits do not stop root (env-output-under-a-file and "
                    "env-output-in-proc cover the case)")
    built = _make(case_, tmp_path / "case")
    _check(built, run_main(*_args(built), "--workers", "1"))


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.cli])
def test_bad_input_through_a_subprocess(cli_runs, case_id):
    built, run = cli_runs[case_id]
    _check(built, run)


def test_copy_symlink_never_reaches_the_output(tmp_path):
    """The linked secret is refused before anything is created; `inspect` refuses it too."""
    built = _make(BY_ID["copy-symlink-outside"], tmp_path / "case")
    run = run_main("inspect", built.ctx.src)
    assert_clean_failure(run, INVALID, ["is a link to a file outside the checkpoint directory"])
    assert not built.out.exists()


def test_zero_scales_are_allowed(tmp_path):
    """Policy: scales must be finite and >= 0; zero (a channel or group quantized to nothing) is fine."""
    src = build("v1", tmp_path / "src")

    def change(t):
        t[expert(1, "gate_proj", "weight_scale")][3, 0] = 0.0
        t[expert(1, "gate_proj", "weight_scale_second")][5, 1] = 0.0
        t[expert(2, "down_proj", "weight_scale")][0, 0] = -0.0  # IEEE negative zero compares equal to zero
    rewrite_tensors(src / WEIGHTS, change)
    run = run_main("convert", src, tmp_path / "out", "--workers", "1")
    assert run.returncode == 0, run.describe()
    from w4a8conv.verify import verify
    assert verify(tmp_path / "out", source=src, sample=None).ok


@pytest.mark.parametrize("value, message", [
    ("inf", "'inf' is not a size"), ("nan", "'nan' is not a size"), ("1e999", "'1e999' is not a size"),
    ("0.5", "the shard size must be at least 1 byte"), ("9" * 400, "is not a finite size"),
    ("99999999999999999999TB", "the shard size must be at most 9223372036854775807 bytes")])
def test_non_finite_or_absurd_shard_size_is_a_usage_error(value, message, tmp_path):
    src = build("v1", tmp_path / "src")
    run = run_main("convert", src, tmp_path / "out", "--max-shard-size", value)
    assert_clean_failure(run, USAGE, [message])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("max_shard_bytes", float("inf")), ("max_shard_bytes", 0),
                                          ("workers", 0), ("workers", 2.5), ("max_shard_bytes", 2**63)])
def test_absurd_option_values_from_python_are_a_usage_error(field, value, tmp_path):
    from dataclasses import replace as with_field

    from w4a8conv.api import ConvertOptions, convert
    from w4a8conv.errors import UsageError

    src = build("v1", tmp_path / "src")
    with pytest.raises(UsageError, match=f"{field} .* is not an integer from 1 to"):
        convert(src, tmp_path / "out", options=with_field(ConvertOptions(), **{field: value}))
    assert not (tmp_path / "out").exists()


def test_workers_are_capped_at_the_shards_and_the_usable_cpus(tmp_path):
    """--workers 1000 on a small machine starts no more processes than shards or CPUs, and says so."""
    from w4a8conv.resources import usable_cpus

    src = build("v1", tmp_path / "src")
    run = run_main("convert", src, tmp_path / "out", "--workers", "1000", "--max-shard-size", "4000", "--json")
    assert run.returncode == 0, run.describe()
    summary = json.loads(run.stdout)
    assert summary["workers_requested"] == 1000
    assert summary["workers"] == min(summary["shards"], usable_cpus()) < 1000
    run = run_main("convert", src, tmp_path / "out2", "--workers", "1000")
    assert run.returncode == 0, run.describe()
    assert "with 1 worker(s) (of 1000 requested: 1 shard(s)" in " ".join(run.stdout.split()), run.describe()


def test_the_default_is_one_worker_per_two_usable_cpus_and_the_summary_says_so(tmp_path, monkeypatch):
    """Without --workers: one worker per two usable CPUs (a worker keeps two busy), one per shard at most."""
    import w4a8conv.resources as resources
    from w4a8conv.api import ConvertOptions, convert as api_convert

    src = build("v1", tmp_path / "src")
    for cpus, expected in ((1, 1), (2, 1), (5, 2), (64, 4)):  # the plan below has 4 shards
        monkeypatch.setattr(resources, "usable_cpus", lambda cpus=cpus: cpus)
        plan = api_convert(src, tmp_path / f"dry-{cpus}", options=ConvertOptions(max_shard_bytes=20_000, dry_run=True))
        assert len(plan.resources.shards) == 4
        assert (plan.resources.workers, plan.resources.workers_requested) == (expected, None), cpus
        assert plan.summary()["workers_choice"] == "default: one per two usable CPUs, one per shard at most"
    run = run_main("convert", src, tmp_path / "out", "--json")
    assert run.returncode == 0, run.describe()
    summary = json.loads(run.stdout)
    assert summary["workers_requested"] is None and summary["workers_choice"].startswith("default")
    run = run_main("convert", src, tmp_path / "out2")
    assert "(default: one per two usable CPUs, one per shard at most;" in " ".join(run.stdout.split()), run.describe()


def test_reliability_doc_lists_every_case():
    doc = (REPO / "docs" / "reliability.md").read_text()
    assert not [c.id for c in CASES if f"`{c.id}`" not in doc]

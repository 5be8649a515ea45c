"""The stamp (w4a8conv/stamp.py): what convert writes round-trips through `Stamp` byte for byte, every
field that breaks its rule is refused naming the field, old and foreign stamps are refused for what
they are, and `inspect` / `verify` report a corrupted field with their documented exit codes."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from robustness_support import assert_clean_failure, edit_json, run_main
from w4a8conv.api import ConvertOptions, build_stamp, convert
from w4a8conv.constants import DESCRIPTION_NAME, STAMP_KEY, ExitCode, GroupSizeFrom, QuantVersion, Variant
from w4a8conv.errors import NotConvertedError
from w4a8conv.plan import make_plan
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.source import open_source
from w4a8conv.stamp import LinearRecord, MoeRecord, ShardRecord, SourceRecord, Stamp

EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny-w4a8-moe"
MOE, LINEAR = "model.layers.1.mlp", "model.layers.0.mlp.down_proj"
HASH = "sha256:" + "ab" * 32
FILE = "quant_model_description.json"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """(converted directory, its ConvertReport) of the committed example."""
    out = tmp_path_factory.mktemp("stamp") / "npu"
    return out, convert(EXAMPLE, out, options=ConvertOptions(workers=1))


def _stamp_json() -> dict:
    """A valid stamp with one record of each kind (the shape of docs/format.md's example)."""
    return {
        "layout": "w4a8conv-npu-ready", "layout_version": 2, "serving_releases": ["0.11", "0.23"],
        "tool_version": "0.1.0",
        "source": {"producer": "msmodelslim", "version": "1.0.0", "group_size": 32,
                   "group_size_from": "description", "model_dtype": "bfloat16", "fingerprint": HASH},
        "modules": {
            MOE: {"kind": "moe", "variant": "moe-group-v1", "num_experts": 8,
                  "projections": ["gate_proj", "up_proj", "down_proj"], "hidden": 256, "intermediate": 128,
                  "group_size": 32},
            LINEAR: {"kind": "linear", "variant": "linear-group-v1", "out_features": 256, "in_features": 256,
                     "group_size": 32, "bias": "scale_bias", "bias_columns": 16},
        },
        "shards": {"model-00001-of-00001.safetensors": {"bytes": 123, "sha256": HASH}},
    }


# -- round trip ---------------------------------------------------------------------------------------------


def test_what_convert_writes_round_trips_byte_for_byte(example):
    out, report = example
    raw = (out / DESCRIPTION_NAME).read_bytes()
    description = json.loads(raw)
    stamp = Stamp.parse(description[STAMP_KEY], file=FILE)
    assert Stamp.parse(stamp.to_json(), file=FILE) == stamp
    # the converter's own Stamp, rebuilt from the plan, is the one parsed from the file
    source = open_source(EXAMPLE)
    assert build_stamp(make_plan(source), report.shards, source.fingerprint()) == stamp
    # written as write_json_atomic writes the description: the same bytes, key order included
    rewritten = {**description, STAMP_KEY: stamp.to_json()}
    assert (json.dumps(rewritten, indent=2) + "\n").encode() == raw
    assert {type(m) for m in stamp.modules.values()} == {MoeRecord, LinearRecord}


def test_parsed_fields_are_typed():
    stamp = Stamp.parse(_stamp_json(), file=FILE)
    assert stamp.source == SourceRecord("msmodelslim", QuantVersion.V1, 32, GroupSizeFrom.DESCRIPTION, "bfloat16",
                                        HASH)
    assert stamp.modules[MOE] == MoeRecord(Variant.MOE_GROUP_V1, 8, ("gate_proj", "up_proj", "down_proj"), 256,
                                           128, 32)
    assert stamp.modules[LINEAR] == LinearRecord(Variant.LINEAR_GROUP_V1, 256, 256, 32, "scale_bias", 16)
    assert stamp.shards == {"model-00001-of-00001.safetensors": ShardRecord(123, HASH)}
    assert (stamp.serving_releases, stamp.linear_bias_name) == (("0.11", "0.23"), "scale_bias")
    assert stamp.to_json() == _stamp_json()
    assert json.dumps(stamp.to_json()) == json.dumps(_stamp_json())  # key order too


def test_an_output_written_before_serving_releases_were_recorded_is_read():
    """Such a stamp holds the version range `vllm_ascend`; it round-trips and inspect shows the range."""
    legacy = _stamp_json()
    del legacy["serving_releases"]
    legacy = {"vllm_ascend": ">=0.11.0,<0.14", **legacy}
    stamp = Stamp.parse(legacy, file=FILE)
    assert (stamp.serving_releases, stamp.release_lines) == (None, (">=0.11.0,<0.14",))
    assert stamp.to_json() == legacy and Stamp.parse(stamp.to_json(), file=FILE) == stamp


def test_keys_this_version_does_not_know_are_ignored():
    value = _stamp_json()
    value["written_by_a_later_version"] = {"anything": 1}
    value["modules"][MOE]["note"] = "x"
    assert Stamp.parse(value, file=FILE) == Stamp.parse(_stamp_json(), file=FILE)


# -- one refusal per field kind, naming the field -----------------------------------------------------------

M, L, S = f"stamp.modules[{MOE!r}]", f"stamp.modules[{LINEAR!r}]", "stamp.shards['model-00001-of-00001.safetensors']"


def _set(path: tuple, value):
    def change(stamp: dict) -> None:
        *parents, last = path
        target = stamp
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return change


def _moe(key, value):
    return _set(("modules", MOE, key), value)


def _linear(key, value):
    return _set(("modules", LINEAR, key), value)


REFUSALS = {
    "no-layout": (lambda s: s.clear() or s.update(x=1), "stamp.layout: missing: not a stamp w4a8conv wrote"),
    "serving-releases-missing": (_set(("serving_releases",), KeyError), "stamp.serving_releases: missing"),
    "serving-release-not-a-line": (_set(("serving_releases",), ["0.11", "latest"]),
                                   "stamp.serving_releases[1]: expected a release line such as '0.11', got string "
                                   "'latest'"),
    "tool-version-empty": (_set(("tool_version",), ""),
                           "stamp.tool_version: expected a non-empty string, got string ''"),
    "source-not-an-object": (_set(("source",), "msmodelslim"), "stamp.source: expected an object, got string"),
    "source-version": (_set(("source", "version"), "2.0"),
                       "stamp.source.version: expected one of '0', '1.0.0', got string '2.0'"),
    "source-group-size-negative": (_set(("source", "group_size"), -1),
                                   "stamp.source.group_size: expected an integer from 0 to"),
    "source-group-size-from": (_set(("source", "group_size_from"), "guessed"),
                               "stamp.source.group_size_from: expected one of 'description', 'shapes', 'option', "
                               "'default', got string 'guessed'"),
    "source-model-dtype": (_set(("source", "model_dtype"), "int8"),
                           "stamp.source.model_dtype: expected one of 'bfloat16', 'float16', 'float32'"),
    "source-fingerprint": (_set(("source", "fingerprint"), "sha256:xyz"),
                           "stamp.source.fingerprint: expected 'sha256:' and 64 hex digits"),
    "modules-not-an-object": (_set(("modules",), [MOE]), "stamp.modules: expected an object, got array"),
    "module-not-an-object": (_set(("modules", MOE), "moe"), f"{M}: expected an object, got string 'moe'"),
    "module-kind": (_moe("kind", "dense"), f"{M}.kind: expected one of 'moe', 'linear', got string 'dense'"),
    "moe-variant-of-the-other-kind": (_moe("variant", "linear-group-v1"),
                                      f"{M}.variant: expected one of 'moe-group-v0', 'moe-group-v1'"),
    "moe-field-missing": (_moe("hidden", KeyError), f"{M}.hidden: missing"),
    "moe-count-a-boolean": (_moe("num_experts", True), f"{M}.num_experts: expected an integer from 1 to"),
    "moe-count-zero": (_moe("num_experts", 0), f"{M}.num_experts: expected an integer from 1 to"),
    "moe-count-a-string": (_moe("intermediate", "128"), f"{M}.intermediate: expected an integer from 1 to"),
    "moe-two-projections": (_moe("projections", ["gate_proj", "up_proj"]),
                            f"{M}.projections: expected three different projection names"),
    "moe-projection-not-a-string": (_moe("projections", ["gate_proj", 3, "down_proj"]),
                                    f"{M}.projections[1]: expected a non-empty string, got integer 3"),
    "linear-bias-name": (_linear("bias", "bias"),
                         f"{L}.bias: expected one of 'weight_scale_bias', 'scale_bias', got string 'bias'"),
    "linear-per-channel": (_linear("group_size", 0), f"{L}.group_size: expected an integer from 1 to"),
    "linear-bias-columns": (_linear("bias_columns", 0), f"{L}.bias_columns: expected an integer from 1 to"),
    "shards-not-an-object": (_set(("shards",), ["model-00001-of-00001.safetensors"]),
                             "stamp.shards: expected an object, got array"),
    "shard-outside-the-directory": (lambda s: s["shards"].update({"../x.safetensors": {"bytes": 1, "sha256": HASH}}),
                                    "stamp.shards['../x.safetensors']: not a file name in this directory"),
    "shard-bytes": (_set(("shards", "model-00001-of-00001.safetensors", "bytes"), "123"),
                    f"{S}.bytes: expected an integer from 0 to"),
    "shard-sha256": (_set(("shards", "model-00001-of-00001.safetensors", "sha256"), "md5:00"),
                     f"{S}.sha256: expected 'sha256:' and 64 hex digits, got string 'md5:00'"),
}


@pytest.mark.parametrize("change, message", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_field_that_breaks_its_rule_is_refused_naming_it(change, message):
    value = _stamp_json()
    change(value)
    with pytest.raises(NotConvertedError) as caught:
        Stamp.parse(value, file=FILE)
    assert str(caught.value).startswith(f"{FILE}: {message}"), str(caught.value)
    assert caught.value.file == FILE and caught.value.exit_code == ExitCode.INVALID_INPUT


def test_linear_records_that_name_their_bias_differently_are_refused():
    value = _stamp_json()
    value["modules"]["model.layers.0.self_attn.o_proj"] = {**value["modules"][LINEAR], "bias": "weight_scale_bias",
                                                           "bias_columns": 1}
    with pytest.raises(NotConvertedError, match=r"stamp.modules\['model.layers.0.self_attn.o_proj'\].bias: "
                                                r"'weight_scale_bias', where other Linear records have 'scale_bias'"):
        Stamp.parse(value, file=FILE)


@pytest.mark.parametrize("stamp, message", [
    ([], "stamp: expected an object, got array"),
    ({**_stamp_json(), "layout": "someone-elses-layout"},
     "stamp.layout: layout 'someone-elses-layout' is not 'w4a8conv-npu-ready': another tool's layout"),
    ({**_stamp_json(), "layout_version": 1}, "stamp.layout_version: layout version 1; this w4a8conv serves version 2 "
                                            "only (convert again, or upgrade w4a8conv)"),
    ({**_stamp_json(), "layout_version": 3}, "stamp.layout_version: layout version 3"),
    ({**_stamp_json(), "layout_version": "2"}, "stamp.layout_version: layout version '2'"),
    ({"layout": "w4a8conv-npu-ready", "layout_version": 1, "experts": "packed"},
     "stamp.layout_version: layout version 1"),
], ids=["not-an-object", "foreign-layout", "old-layout-version", "future-layout-version", "version-a-string",
        "old-stamp-with-other-fields"])
def test_old_and_foreign_stamps_are_refused_for_their_layout(stamp, message):
    """Layout and version are checked before any other field: a stamp of another layout or version is
    refused for that, not for the first field it lacks."""
    with pytest.raises(NotConvertedError) as caught:
        Stamp.parse(stamp, file=FILE)
    assert str(caught.value).startswith(f"{FILE}: {message}"), str(caught.value)


@pytest.mark.parametrize("description", [{"version": "1.0.0"}, [], None], ids=["no-stamp", "array", "null"])
def test_a_description_without_a_stamp_is_refused(description):
    with pytest.raises(NotConvertedError, match=r"no 'w4a8conv' stamp: not converted by w4a8conv"):
        Stamp.of_description(description, file=FILE)


def test_stamps_are_frozen():
    stamp = Stamp.parse(_stamp_json(), file=FILE)
    with pytest.raises(AttributeError):
        stamp.tool_version = "9"


# -- inspect and verify on a converted output with a corrupted stamp field ----------------------------------


@pytest.fixture
def corrupted(example, tmp_path):
    out = tmp_path / "npu"
    out.mkdir()
    for f in example[0].iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("path, value, field", [
    (("modules", MOE, "variant"), "moe-group-v9", f"stamp.modules[{MOE!r}].variant: expected one of"),
    (("source", "model_dtype"), "fp8", "stamp.source.model_dtype: expected one of"),
    (("shards", "model-00001-of-00001.safetensors", "sha256"), 12, "stamp.shards['model-00001-of-00001.safetensors']"
                                                                   ".sha256: expected 'sha256:'"),
], ids=["module-variant", "source-model-dtype", "shard-sha256"])
def test_inspect_exits_3_and_verify_5_naming_the_corrupted_field(corrupted, path, value, field):
    edit_json(corrupted / DESCRIPTION_NAME, lambda d: _set(path, value)(d[STAMP_KEY]))
    where = f"{corrupted / DESCRIPTION_NAME}: {field}"
    assert_clean_failure(run_main("inspect", corrupted), ExitCode.INVALID_INPUT, [where])
    run = run_main("verify", corrupted)
    assert run.returncode == ExitCode.VERIFY_FAILED, run.describe()
    assert where in run.stderr and "Traceback" not in run.stderr, run.describe()
    with pytest.raises(NotConvertedError, match="stamp"):
        NpuReadyCheckpoint.open(corrupted)


def test_the_runtime_view_holds_the_parsed_stamp(example):
    out, _report = example
    ckpt = NpuReadyCheckpoint.open(out)
    description = json.loads((out / DESCRIPTION_NAME).read_text())
    assert ckpt.stamp == Stamp.parse(copy.deepcopy(description[STAMP_KEY]), file=FILE)

"""What msModelSlim 26.1.0 really writes, on synthetic checkpoints of the same shape of data: int64 offsets
checked by value, a description without group_size (inferred from the shapes, or stated with --group-size),
sources with nothing to convert, and per-channel W4A8 Linear layers (which no vllm-ascend release serves).

The producer itself runs in tests/test_msmodelslim.py (marker `msmodelslim`).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from robustness_support import assert_clean_failure, edit_json, rewrite_tensors, run_cli, run_main
from w4a8conv.api import ConvertOptions, convert, inspect
from w4a8conv.errors import InvalidCheckpointError
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.synthetic import LLM_PTQ_OLD_FORMAT, PRESETS, write_checkpoint
from w4a8conv.verify import verify

try:
    import vllm_ascend_harness as harness
except ImportError:  # tests/ imported as a package
    from tests import vllm_ascend_harness as harness

MOE = "model.layers.1.mlp"
# llm_ptq's old format: no version, no group_size (64 here, only the shapes tell), W4A8 attention too
OLD_FORMAT = LLM_PTQ_OLD_FORMAT
OLD_DESCRIPTION = OLD_FORMAT.description_name
OLD_WEIGHTS = f"{OLD_FORMAT.weight_name}.safetensors"
WARNING = (f"{OLD_DESCRIPTION} has no group_size: group size 64 inferred from the weight_scale_second shapes "
           "(vllm-ascend would have used 256)")


@pytest.fixture(scope="module")
def old_format(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("old") / "src", OLD_FORMAT)


@pytest.fixture(scope="module")
def old_format_converted(old_format, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    out = tmp_path_factory.mktemp("old-out") / "npu"
    report = convert(old_format, out, options=ConvertOptions(workers=1))
    return old_format, out, report.warnings


def _shards(out: Path) -> dict[str, str]:
    stamp = json.loads((out / "quant_model_description.json").read_text())["w4a8conv"]
    return {name: record["sha256"] for name, record in stamp["shards"].items()}


# -- offsets by value --------------------------------------------------------------------------------------


def test_llm_ptq_presets_store_int64_offsets(preset_source):
    ref = inspect(preset_source("moe-group-v1"))  # validates: int64 offsets are accepted
    assert ref["variants"] == {"moe-group-v1": 1}
    from safetensors import safe_open

    root = preset_source("moe-group-v1")
    file = json.loads((root / "quant_model_weights.safetensors.index.json").read_text())["weight_map"][
        f"{MOE}.experts.0.gate_proj.weight_offset_second"]
    with safe_open(str(root / file), framework="pt") as handle:
        assert handle.get_tensor(f"{MOE}.experts.0.gate_proj.weight_offset_second").dtype == torch.int64
        assert handle.get_tensor(f"{MOE}.experts.0.gate_proj.weight_offset").dtype == torch.float32
    bias = "model.layers.0.self_attn.k_proj.bias"  # the model's q/k/v biases, in its dtype (bf16)
    with safe_open(str(root / json.loads((root / "quant_model_weights.safetensors.index.json").read_text())[
            "weight_map"][bias]), framework="pt") as handle:
        assert handle.get_tensor(bias).dtype == torch.bfloat16


def test_the_old_format_fixture_is_what_llm_ptq_writes(old_format, old_format_converted):
    """As msModelSlim 26.1.0's llm_ptq `safe_tensor` export of Qwen2 (tests/test_msmodelslim.py holds the
    real one): no version or group_size, int64 zero offsets, and q/k/v biases bf16 [out] typed FLOAT next to
    the W4A8 projections; the converted Linear layer carries the bias as it was."""
    from safetensors.torch import load_file

    description = json.loads((old_format / OLD_DESCRIPTION).read_text())
    assert "version" not in description and "group_size" not in description
    tensors = load_file(str(old_format / OLD_WEIGHTS))
    q = "model.layers.0.self_attn.q_proj"
    assert description[f"{q}.weight"] == "W4A8_DYNAMIC" and description[f"{q}.bias"] == "FLOAT"
    assert (tensors[f"{q}.bias"].dtype, tuple(tensors[f"{q}.bias"].shape)) == (torch.bfloat16, (OLD_FORMAT.hidden,))
    assert tensors[f"{q}.weight_offset_second"].dtype == torch.int64
    assert f"model.layers.0.self_attn.o_proj.bias" not in tensors
    _src, out, _warnings = old_format_converted
    assert torch.equal(NpuReadyCheckpoint.open(out).linear(q)["bias"], tensors[f"{q}.bias"])


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float16, torch.float64])
def test_offsets_of_any_dtype_are_checked_by_value(tmp_path, dtype):
    src = write_checkpoint(tmp_path / "src", replace(PRESETS["moe-group-v0"], num_experts=2))
    weights = src / "quant_model_weight_w8a8_dynamic.safetensors"
    name = f"{MOE}.experts.1.up_proj.weight_offset_second"
    rewrite_tensors(weights, lambda t: t.update({name: t[name].to(dtype)}))
    convert(src, tmp_path / "zero", options=ConvertOptions(workers=1))

    def nonzero(t):
        t[name] = t[name].clone()
        t[name][3, 1] = 1
    rewrite_tensors(weights, nonzero)
    with pytest.raises(InvalidCheckpointError, match=r"non-zero offset 1(\.0)? at \[3, 1\]") as err:
        convert(src, tmp_path / "nonzero", options=ConvertOptions(workers=1))
    assert err.value.tensor == name
    assert not (tmp_path / "nonzero").exists()


# -- group size from the shapes ----------------------------------------------------------------------------


def test_group_size_inferred_from_the_shapes_is_stamped_and_warned(old_format_converted):
    _src, out, warnings = old_format_converted
    assert warnings == [WARNING]
    stamp = NpuReadyCheckpoint.open(out).stamp
    assert (stamp.source.group_size, stamp.source.group_size_from) == (64, "shapes")
    assert {m.group_size for m in stamp.modules.values()} == {64}
    kinds = sorted(m.kind for m in stamp.modules.values())
    assert kinds.count("moe") == 1 and "linear" in kinds  # the W4A8 attention and MLP projections too


def test_inferred_group_size_converts_as_if_the_description_named_it(old_format_converted, tmp_path):
    src, out, _warnings = old_format_converted
    described = harness.with_description_keys(src, tmp_path / "described", group_size=64)
    reference = tmp_path / "reference"
    assert convert(described, reference, options=ConvertOptions(workers=1)).warnings == []
    assert _shards(out) == _shards(reference)


def test_verify_source_accepts_the_inferred_conversion(old_format_converted):
    src, out, _warnings = old_format_converted
    report = verify(out, source=src, sample=None, numerics=True)
    assert report.ok, report.problems


def test_group_size_option_is_checked_against_the_shapes(old_format, tmp_path):
    stated = convert(old_format, tmp_path / "stated", options=ConvertOptions(workers=1, group_size=64))
    assert stated.warnings == []
    stamp = NpuReadyCheckpoint.open(tmp_path / "stated").stamp
    assert (stamp.source.group_size, stamp.source.group_size_from) == (64, "option")
    assert verify(tmp_path / "stated", source=old_format, sample=1).ok
    with pytest.raises(InvalidCheckpointError, match="--group-size 32 disagrees with the shapes") as err:
        convert(old_format, tmp_path / "wrong", options=ConvertOptions(workers=1, group_size=32))
    assert "means group size 64" in str(err.value)
    assert not (tmp_path / "wrong").exists()


def test_group_size_option_must_match_a_described_group_size(preset_source, tmp_path):
    with pytest.raises(InvalidCheckpointError, match="--group-size 64 disagrees with the description's "
                                                     "group_size 32"):
        convert(preset_source("moe-group-v1"), tmp_path / "out", options=ConvertOptions(group_size=64))


def test_cli_converts_an_old_format_export_with_one_warning(old_format, tmp_path):
    run = run_cli("convert", old_format, tmp_path / "out", "--workers", "1")
    assert run.returncode == 0, run.describe()
    assert [line for line in run.stderr.splitlines() if line.startswith("warning:")] == [f"warning: {WARNING}"]
    wrong = run_main("convert", old_format, tmp_path / "wrong", "--group-size", "128")
    assert_clean_failure(wrong, 3, [OLD_DESCRIPTION, "--group-size 128 disagrees with the shapes"])


# -- nothing to convert ------------------------------------------------------------------------------------


def test_a_w8a8_only_export_is_refused_and_nothing_is_written(tmp_path):
    spec = replace(PRESETS["moe-group-v1"], moe_layers=0, w8a8_moe_layers=1)
    src = write_checkpoint(tmp_path / "w8a8", spec)
    edit_json(src / spec.description_name, lambda d: d.update(model_quant_type="W8A8_DYNAMIC"))
    run = run_main("convert", src, tmp_path / "out")
    line = assert_clean_failure(run, 3, [spec.description_name, "nothing to convert: no W4A8_DYNAMIC module",
                                         "W8A8/float export", "model_quant_type 'W8A8_DYNAMIC'",
                                         "nothing was written"])
    assert "already converted" not in line
    assert not (tmp_path / "out").exists()


def test_a_converted_directory_is_refused_and_nothing_is_written(converted, tmp_path):
    _src, out = converted("moe-group-v1")
    before = sorted(p.name for p in out.iterdir())
    run = run_main("convert", out, tmp_path / "again")
    line = assert_clean_failure(run, 3, ["quant_model_description.json", "already converted by w4a8conv",
                                         "nothing was written"])
    assert "W8A8" not in line
    assert not (tmp_path / "again").exists()
    assert sorted(p.name for p in out.iterdir()) == before


# -- per-channel W4A8 Linear: no release serves it ---------------------------------------------------------


def test_per_channel_linear_is_refused_naming_the_reason(tmp_path):
    src = write_checkpoint(tmp_path / "src", replace(PRESETS["moe-channel-v1"], w4a8_linear=True))
    run = run_main("convert", src, tmp_path / "out")
    assert_clean_failure(run, 3, ["per-channel (group_size 0) W4A8_DYNAMIC Linear layer",
                                  "no vllm-ascend release serves one", "nothing was written"])
    assert not (tmp_path / "out").exists()


def test_vllm_ascend_cannot_create_a_per_channel_w4a8_linear_layer(vllm_ascend_wheel, tmp_path):
    """The decision in docs/format.md, on vllm-ascend's own code: its Linear scheme sizes the scales
    `input_size // group_size`, which group_size 0 cannot pass (0.11.0 and 0.13.0 here; 0.18 and 0.23 read
    the same way)."""
    src = write_checkpoint(tmp_path / "src", replace(PRESETS["moe-channel-v1"], w4a8_linear=True))
    for version in harness.VLLM_ASCEND_VERSIONS:
        with pytest.raises(ZeroDivisionError):
            harness.linear_tensors(src, "model.layers.0.mlp.down_proj", version=version)


# -- files beside the weights: msModelSlim's optional/, the DeepSeek-V4 script's copied sub-directories ------

QUAROT = {"quarot": {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}}


@pytest.fixture
def with_optional(tmp_path) -> Path:
    """A source as msModelSlim's ascendV1 saver writes one after QuaRot: optional/quarot.safetensors, named by
    the description's `optional` section, and a sub-directory of reference code."""
    from safetensors.torch import save_file

    src = write_checkpoint(tmp_path / "src", replace(PRESETS["moe-channel-v1"], num_experts=2))
    (src / "optional").mkdir()
    save_file({"global_rotation": torch.randn(256, 256, generator=torch.Generator().manual_seed(3))},
              str(src / "optional" / "quarot.safetensors"))
    (src / "inference" / "kernels").mkdir(parents=True)
    (src / "inference" / "kernels" / "act.py").write_text("# reference kernel\n")
    edit_json(src / "quant_model_description.json", lambda d: d.update(optional=QUAROT))
    return src


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_sub_directories_are_copied_byte_for_byte_and_verify_checks_the_named_file(with_optional, tmp_path):
    before = _tree(with_optional)
    out = tmp_path / "out"
    convert(with_optional, out, options=ConvertOptions(workers=1))
    copied = _tree(out)
    for name in ("optional/quarot.safetensors", "inference/kernels/act.py"):
        assert copied[name] == before[name], name
    assert json.loads((out / "quant_model_description.json").read_text())["optional"] == QUAROT
    assert _tree(with_optional) == before  # the source is never modified
    assert verify(out, source=with_optional, sample=1).ok
    (out / "optional" / "quarot.safetensors").unlink()
    problems = verify(out).problems
    assert problems == [f"{out / 'quant_model_description.json'}: names the file 'optional/quarot.safetensors' "
                        "(optional section), which is not a file inside the directory"]


def test_force_replaces_a_previous_output_with_its_sub_directories(with_optional, tmp_path):
    out = tmp_path / "out"
    convert(with_optional, out, options=ConvertOptions(workers=1))
    first = _tree(out)
    convert(with_optional, out, options=ConvertOptions(workers=1, force=True))
    assert _tree(out) == first
    (out / "optional" / "notes.txt").write_text("mine\n")  # not a file the conversion writes
    run = run_main("convert", with_optional, out, "--force")
    assert_clean_failure(run, 2, ["--force replaces only a previous w4a8conv output", "optional is not part of one"])
    assert (out / "optional" / "notes.txt").read_text() == "mine\n"

"""Synthetic msModelSlim W4A8_DYNAMIC checkpoints, written the way the exporters write them.

Used by the examples, the tests and the benchmark; also runnable:
    python -m w4a8conv.synthetic OUT_DIR --version 1.0.0 --group-size 32 --shards 2

Values are random but realistic: int4 weights in [-8, 7], positive fp32 scales that are not
fp16-representable (so the fp16 rounding of fused scales matters), and, for version "1.0.0",
`scale_bias` computed as msModelSlim computes it (bf16-cast scales for per-group). The `llm_ptq`
presets store what msModelSlim 26.1.0's `llm_ptq` writes: `weight_offset_second` as int64 zeros and
q/k/v biases in the model dtype (bf16); `LLM_PTQ_OLD_FORMAT` its old format: no `version` / `group_size`,
W4A8 attention projections.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .constants import DOWN_BIAS_CHUNKS, SOURCE_TYPE
from .transforms.bias import msd_bias_chunks
from .transforms.int4 import pack_int4_to_int8_pairs

__all__ = ["SyntheticSpec", "write_checkpoint", "PRESETS", "LLM_PTQ", "LLM_PTQ_OLD_FORMAT", "DEEPSEEK_V4_SCRIPT"]


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and export format of a synthetic checkpoint."""

    version: str | None = "1.0.0"   # None: the key is absent (legacy exporters), read as "0"
    group_size: int | None = 32     # None: the key is absent (read as 256); 0: per-channel
    describe_group_size: bool = True  # False: group_size is used but not written (old llm_ptq format)
    hidden: int = 256
    intermediate: int = 128         # per-expert moe_intermediate_size
    dense_intermediate: int = 256
    num_experts: int = 8
    dense_layers: int = 1           # layers 0..dense_layers-1 have a dense MLP
    moe_layers: int = 1
    w8a8_moe_layers: int = 0        # extra MoE layers exported as W8A8_DYNAMIC (mixed recipes)
    w4a8_linear: bool = False       # dense MLP and shared experts in W4A8 (else W8A8_DYNAMIC)
    attention: bool = True          # q/k/v/o projections per layer (W8A8_DYNAMIC unless w4a8_attention)
    w4a8_attention: bool = False    # llm_ptq quantizes the attention projections W4A8 too
    offset_second_dtype: str = "float32"  # llm_ptq writes weight_offset_second as int64
    qkv_bias: bool = False          # q/k/v projections with a float `bias` in the model dtype, typed FLOAT
    shared_experts: bool = True
    vocab: int = 256
    shard_bytes: int | None = None  # None: one file; else start a new shard past this many bytes
    index: bool | None = None       # default: an index when sharded
    description_name: str = "quant_model_description.json"
    weight_name: str = "quant_model_weights"
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    model_dtype: str = "bfloat16"
    model_type: str = "deepseek_v3"
    model_quant_type: str = SOURCE_TYPE
    layout: str = "hf"              # tensor names: "hf" (model.layers.L.mlp...) or "deepseek-v4-script"
    down_bias_chunks: int = DOWN_BIAS_CHUNKS  # "1.0.0" down_proj scale_bias columns (the V4 script writes 1)
    mtp_layers: int = 0             # deepseek-v4-script: MoE layers under mtp.N
    seed: int = 0
    extra_files: dict[str, str] = field(default_factory=lambda: {
        "tokenizer_config.json": '{"model_max_length": 4096}\n', "generation_config.json": '{"do_sample": false}\n'})

    @property
    def effective_group_size(self) -> int:
        return 256 if self.group_size is None else self.group_size


def _int4(gen: torch.Generator, out: int, inp: int) -> torch.Tensor:
    return torch.randint(-8, 8, (out, inp), generator=gen, dtype=torch.int8)


def _scales(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float32)


def _w4a8(spec: SyntheticSpec, gen: torch.Generator, name: str, out: int, inp: int, row: bool) -> dict:
    """One W4A8_DYNAMIC projection: weight, scales, zero offsets, and scale_bias for "1.0.0"."""
    values = _int4(gen, out, inp)
    group = spec.effective_group_size
    tensors = {}
    if spec.version == "1.0.0":
        tensors[f"{name}.weight"] = pack_int4_to_int8_pairs(values, dim=0)
    else:
        tensors[f"{name}.weight"] = values
    scale = _scales(gen, (out, 1), 2e-3, 2e-2)
    tensors[f"{name}.weight_scale"] = scale
    tensors[f"{name}.weight_offset"] = torch.zeros(out, 1)
    second = None
    if group:
        second = _scales(gen, (out, inp // group), 0.25, 4.0)
        tensors[f"{name}.weight_scale_second"] = second
        tensors[f"{name}.weight_offset_second"] = torch.zeros(out, inp // group,
                                                              dtype=getattr(torch, spec.offset_second_dtype))
    if spec.version == "1.0.0":
        chunks = spec.down_bias_chunks if row else 1
        # msModelSlim computes the per-group bias from bf16-cast scales.
        bf16 = lambda t: t.to(torch.bfloat16).to(torch.float32) if group else t  # noqa: E731
        tensors[f"{name}.scale_bias"] = msd_bias_chunks(values, bf16(scale), None if second is None else bf16(second),
                                                        chunks)
    return tensors


def _w8a8(gen: torch.Generator, name: str, out: int, inp: int) -> dict:
    return {f"{name}.weight": torch.randint(-128, 128, (out, inp), generator=gen, dtype=torch.int8),
            f"{name}.weight_scale": _scales(gen, (out, 1), 1e-3, 1e-2),
            f"{name}.weight_offset": torch.zeros(out, 1)}


def _float(gen: torch.Generator, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    return {name: (torch.randn(shape, generator=gen) * 0.02).to(dtype)}


class _Sink:
    """Collects (name, tensor, type) layer by layer and writes shards as they fill."""

    def __init__(self, root: Path, spec: SyntheticSpec, shard_bytes: int):
        self.root, self.spec, self.shard_bytes = root, spec, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.description: dict[str, str] = {}
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, tensors: dict[str, torch.Tensor], kind: str) -> None:
        for name, tensor in tensors.items():
            self.pending[name] = tensor.contiguous()
            self.description[name] = kind
        if sum(t.nbytes for t in self.pending.values()) >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            path = self.root / f".part{len(self.written)}.safetensors"
            save_file(self.pending, str(path), metadata={"format": "pt"})
            self.written.append((path, list(self.pending)))
            self.pending = {}


def _model_tensors(spec: SyntheticSpec, sink: _Sink, gen: torch.Generator) -> None:
    dtype = getattr(torch, spec.model_dtype)
    h = spec.hidden
    sink.add(_float(gen, "model.embed_tokens.weight", (spec.vocab, h), dtype), "FLOAT")
    gate, up, down = spec.projections
    bias_gen = torch.Generator().manual_seed(spec.seed + 1)  # apart: the other tensors are those without biases
    for layer in range(spec.dense_layers + spec.moe_layers + spec.w8a8_moe_layers):
        p = f"model.layers.{layer}"
        sink.add(_float(gen, f"{p}.input_layernorm.weight", (h,), dtype), "FLOAT")
        sink.add(_float(gen, f"{p}.post_attention_layernorm.weight", (h,), dtype), "FLOAT")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj") if spec.attention else ():
            if spec.w4a8_attention:
                sink.add(_w4a8(spec, gen, f"{p}.self_attn.{proj}", h, h, proj == "o_proj"), SOURCE_TYPE)
            else:
                sink.add(_w8a8(gen, f"{p}.self_attn.{proj}", h, h), "W8A8_DYNAMIC")
            if spec.qkv_bias and proj != "o_proj":
                sink.add(_float(bias_gen, f"{p}.self_attn.{proj}.bias", (h,), dtype), "FLOAT")
        linear_kind = SOURCE_TYPE if spec.w4a8_linear else "W8A8_DYNAMIC"

        def mlp(prefix: str, inter: int) -> None:
            for proj, (out, inp) in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
                name = f"{prefix}.{proj}"
                tensors = (_w4a8(spec, gen, name, out, inp, proj == "down_proj") if spec.w4a8_linear
                           else _w8a8(gen, name, out, inp))
                sink.add(tensors, linear_kind)

        if layer < spec.dense_layers:
            mlp(f"{p}.mlp", spec.dense_intermediate)
            continue
        sink.add(_float(gen, f"{p}.mlp.gate.weight", (spec.num_experts, h), dtype), "FLOAT")
        if spec.shared_experts:
            mlp(f"{p}.mlp.shared_experts", spec.intermediate)
        w4a8 = layer < spec.dense_layers + spec.moe_layers
        for e in range(spec.num_experts):
            for proj, (out, inp) in ((gate, (spec.intermediate, h)), (up, (spec.intermediate, h)),
                                     (down, (h, spec.intermediate))):
                name = f"{p}.mlp.experts.{e}.{proj}"
                if w4a8:
                    sink.add(_w4a8(spec, gen, name, out, inp, proj == down), SOURCE_TYPE)
                else:
                    sink.add(_w8a8(gen, name, out, inp), "W8A8_DYNAMIC")
    sink.add(_float(gen, "model.norm.weight", (h,), dtype), "FLOAT")
    sink.add(_float(gen, "lm_head.weight", (spec.vocab, h), dtype), "FLOAT")


def _deepseek_v4_script_tensors(spec: SyntheticSpec, sink: _Sink, gen: torch.Generator) -> None:
    """Native DeepSeek-V4 names as vllm-ascend's offline DeepSeek-V4 script writes them: no `model.` prefix,
    `ffn`, w1/w3/w2; routed experts W4A8, shared experts and attention W8A8_DYNAMIC, MTP layers last; the
    fp32 hyper-connection parameters (`hc_*`, HC_MULT streams) FLOAT. vllm-ascend 0.23 recognises a
    DeepSeek-V4 description by its top-level `hc_head_fn` and only then resolves the native names."""
    dtype = getattr(torch, spec.model_dtype)
    h, inter = spec.hidden, spec.intermediate
    mix, streams = (2 + _HC_MULT) * _HC_MULT, _HC_MULT * h

    def hyper_connections(prefix: str, parts: dict[str, tuple[int, ...]]) -> None:
        for part, shape in parts.items():
            sink.add(_float(gen, f"{prefix}hc_{part}", shape, torch.float32), "FLOAT")

    head = {"head_fn": (_HC_MULT, streams), "head_base": (_HC_MULT,), "head_scale": (1,)}
    sink.add(_float(gen, "embed.weight", (spec.vocab, h), dtype), "FLOAT")
    blocks = [f"layers.{i}" for i in range(spec.moe_layers)] + [f"mtp.{i}" for i in range(spec.mtp_layers)]
    for p in blocks:
        hyper_connections(f"{p}.", {f"{where}_{part}": shape for where in ("attn", "ffn")
                                    for part, shape in (("fn", (mix, streams)), ("base", (mix,)), ("scale", (3,)))})
        if p.startswith("mtp."):
            hyper_connections(f"{p}.", head)
        sink.add(_float(gen, f"{p}.attn_norm.weight", (h,), dtype), "FLOAT")
        for proj in ("wq", "wkv", "wo"):
            sink.add(_w8a8(gen, f"{p}.attn.{proj}", h, h), "W8A8_DYNAMIC")
        sink.add(_float(gen, f"{p}.ffn_norm.weight", (h,), dtype), "FLOAT")
        sink.add(_float(gen, f"{p}.ffn.gate.weight", (spec.num_experts, h), dtype), "FLOAT")
        for proj, (out, inp) in (("w1", (inter, h)), ("w3", (inter, h)), ("w2", (h, inter))):
            sink.add(_w8a8(gen, f"{p}.ffn.shared_experts.{proj}", out, inp), "W8A8_DYNAMIC")
        for e in range(spec.num_experts):
            for proj, (out, inp) in (("w1", (inter, h)), ("w3", (inter, h)), ("w2", (h, inter))):
                sink.add(_w4a8(spec, gen, f"{p}.ffn.experts.{e}.{proj}", out, inp, proj == "w2"), SOURCE_TYPE)
    hyper_connections("", head)
    sink.add(_float(gen, "norm.weight", (h,), dtype), "FLOAT")
    sink.add(_float(gen, "head.weight", (spec.vocab, h), dtype), "FLOAT")


_HC_MULT = 2  # DeepSeek-V4's hc_mult (4 in the released models; the shapes follow vllm-ascend 0.23's model)
_LAYOUTS = {"hf": _model_tensors, "deepseek-v4-script": _deepseek_v4_script_tensors}


def write_checkpoint(root: Path | str, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a synthetic checkpoint into `root` (created; must not exist or be empty)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec.seed)
    sink = _Sink(root, spec, spec.shard_bytes or 2**62)
    _LAYOUTS[spec.layout](spec, sink, gen)
    sink.flush()
    count = len(sink.written)
    single = count == 1 and not spec.index
    weight_map = {}
    for i, (path, names) in enumerate(sink.written):
        suffix = "" if single else f"-{i + 1:05d}-of-{count:05d}"
        final = f"{spec.weight_name}{suffix}.safetensors"
        os.replace(path, root / final)
        os.chmod(root / final, 0o644)
        weight_map.update({n: final for n in names})
    if spec.index or (spec.index is None and count > 1):
        (root / f"{spec.weight_name}.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum((root / f).stat().st_size for f in set(weight_map.values()))},
             "weight_map": weight_map}, indent=2))
    description: dict[str, object] = {"model_quant_type": spec.model_quant_type}
    if spec.version is not None:
        description["version"] = spec.version
    if spec.group_size is not None and spec.describe_group_size:
        description["group_size"] = spec.group_size
    description.update(sink.description)
    (root / spec.description_name).write_text(json.dumps(description, indent=2))
    config = {"model_type": spec.model_type, "hidden_size": spec.hidden, "moe_intermediate_size": spec.intermediate,
              "intermediate_size": spec.dense_intermediate, "n_routed_experts": spec.num_experts,
              "num_experts": spec.num_experts, "first_k_dense_replace": spec.dense_layers,
              "num_hidden_layers": spec.dense_layers + spec.moe_layers + spec.w8a8_moe_layers,
              "vocab_size": spec.vocab, "torch_dtype": spec.model_dtype}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    for name, text in spec.extra_files.items():  # a name may hold a sub-directory ("inference/model.py")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


_BASE = SyntheticSpec()
# What msModelSlim's llm_ptq exporter writes: int64 zero weight_offset_second, and the model's own q/k/v
# biases (Qwen2's) as float tensors in the model dtype, bf16 here (modelslim_v1 writes them fp32).
LLM_PTQ = replace(_BASE, offset_second_dtype="int64", qkv_bias=True)
# llm_ptq's old format (save_type safe_tensor): the typed description name, one file, no version and no
# group_size (64 here: only the weight_scale_second shapes tell), attention and MLP projections W4A8 too.
# Not a preset: vllm-ascend reads 256 for a description without group_size, so comparisons with it give
# it the inferred value (tests/test_real_exports.py).
LLM_PTQ_OLD_FORMAT = replace(LLM_PTQ, version=None, group_size=64, describe_group_size=False, w4a8_attention=True,
                             w4a8_linear=True, num_experts=4,
                             description_name="quant_model_description_w4a8_dynamic.json",
                             weight_name="quant_model_weight_w4a8_dynamic")
PRESETS: dict[str, SyntheticSpec] = {
    # legacy llm_ptq mindie_format: typed description name, one file, no version key
    "moe-group-v0": replace(LLM_PTQ, version=None, description_name="quant_model_description_w8a8_dynamic.json",
                            weight_name="quant_model_weight_w8a8_dynamic"),
    # legacy ascendV1 saver: shards with an index
    "moe-group-v1": replace(LLM_PTQ, shard_bytes=500_000),
    # modelslim_v1 saver: per-channel, group_size 0 always written
    "moe-channel-v1": replace(_BASE, group_size=0, shard_bytes=800_000),
    "moe-channel-v0": replace(_BASE, version="0", group_size=0),
    # group_size absent: vllm-ascend reads 256
    "moe-group-v0-default-group": replace(LLM_PTQ, version=None, group_size=None, hidden=512, intermediate=256,
                                          num_experts=4, description_name="quant_model_description_w4a8_dynamic.json"),
    "linear-v0": replace(LLM_PTQ, version="0", w4a8_linear=True, model_dtype="float16"),
    "linear-v1": replace(LLM_PTQ, w4a8_linear=True, shard_bytes=1_000_000),
    "mixed-v1": replace(_BASE, w8a8_moe_layers=1, moe_layers=2, shard_bytes=1_500_000, projections=("w1", "w3", "w2"),
                        model_type="mixtral"),
}

# vllm-ascend's DeepSeek-V4 offline script (quantize.py, W4A8 config): per-channel "1.0.0" experts whose
# w2 scale_bias is the [out, 1] total, model_quant_type W8A8_DYNAMIC, native names, an MTP layer. Not a
# preset: vllm-ascend itself cannot load the [out, 1] w2 bias, so the comparisons use its msModelSlim form.
DEEPSEEK_V4_SCRIPT = replace(_BASE, group_size=0, layout="deepseek-v4-script", down_bias_chunks=1,
                             model_quant_type="W8A8_DYNAMIC", model_type="deepseek_v4", projections=("w1", "w3", "w2"),
                             num_experts=4, moe_layers=2, mtp_layers=1, shard_bytes=600_000,
                             # the script copies the source's sub-directories' .py/.json files (its inference/)
                             extra_files={**_BASE.extra_files, "inference/model.py": "# reference inference code\n"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic msModelSlim W4A8_DYNAMIC checkpoint.")
    parser.add_argument("output", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="moe-group-v1")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--moe-layers", type=int)
    parser.add_argument("--shard-bytes", type=int)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"hidden": args.hidden, "intermediate": args.intermediate,
                                   "num_experts": args.experts, "moe_layers": args.moe_layers,
                                   "shard_bytes": args.shard_bytes, "seed": args.seed}.items() if v is not None}
    print(write_checkpoint(args.output, replace(PRESETS[args.preset], **overrides)))


if __name__ == "__main__":
    main()

"""plan.py: the output tensors of a source, their order and recipes, and what each recipe reads."""
from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from w4a8conv.constants import CONVERTED_TYPE, SOURCE_TYPE, Variant
from w4a8conv.errors import InvalidCheckpointError
from w4a8conv.plan import CopyBytes, ExpertTensor, LinearTensor, Recipe, TranslatedTensor, make_plan, natural_key
from w4a8conv.produce import RECIPES
from w4a8conv.source import open_source

def test_natural_key_orders_numbers_by_value_without_converting_them():
    names = ["layers.10.w", "layers.2.w", "layers.02.x", "layers.1" + "0" * 5000 + ".w", "layers.9.w", "a"]
    assert sorted(names, key=natural_key) == ["a", "layers.2.w", "layers.02.x", "layers.9.w", "layers.10.w",
                                              "layers.1" + "0" * 5000 + ".w"]


def test_every_recipe_type_has_one_entry_in_the_table():
    assert set(RECIPES) == set(typing.get_args(Recipe))


@pytest.mark.parametrize("preset", ["moe-group-v0", "moe-group-v1", "moe-channel-v0", "linear-v1", "mixed-v1"])
def test_the_plan_accounts_for_every_source_tensor_once(preset_source, preset):
    src = open_source(preset_source(preset))
    plan = make_plan(src)
    names = [t.name for t in plan.tensors]
    assert names == sorted(names, key=natural_key) and len(set(names)) == len(names)
    read = {n for t in plan.tensors if not isinstance(t.recipe, CopyBytes) for n in t.recipe.sources().values()}
    assert read <= plan.consumed  # what a converted tensor reads is folded into it, never also copied
    copied = {t.recipe.ref.name for t in plan.passthrough}
    assert copied | plan.consumed == set(src.tensors) and not copied & plan.consumed
    assert all(n in src.tensors for t in plan.tensors for n in t.recipe.sources().values())
    assert {t.recipe.ref.name: t.nbytes for t in plan.passthrough} == {n: src.tensors[n].nbytes for n in copied}


def test_a_group_v1_expert_reads_its_own_projections_tensors(preset_source):
    plan = make_plan(open_source(preset_source("moe-group-v1")))
    by_name = {t.name: t for t in plan.tensors}
    layer = plan.moe_layers[0]
    assert layer.variant is Variant.MOE_GROUP_V1
    expert = f"{layer.prefix}.experts.3.down_proj"
    weight, scale, bias = (by_name[f"{expert}.{o}"] for o in ("weight", "weight_scale", "scale_bias"))
    assert all(isinstance(t.recipe, ExpertTensor) for t in (weight, scale, bias))
    assert weight.recipe.sources() == {"weight": f"{expert}.weight"}
    assert scale.recipe.sources() == {"weight_scale": f"{expert}.weight_scale",
                                      "weight_scale_second": f"{expert}.weight_scale_second"}
    assert bias.recipe.sources() == {"scale_bias": f"{expert}.scale_bias"}
    # kernel orientation [in, out/8] int32; down_proj is [H, I] in the source
    assert (weight.dtype, weight.shape) == ("I32", (layer.intermediate, layer.hidden // 8))
    assert f"{expert}.weight_offset" in plan.consumed and f"{expert}.weight_offset" not in {
        n for t in plan.tensors for n in t.recipe.sources().values()}


def test_a_group_v0_bias_is_computed_from_weight_and_both_scales(preset_source):
    plan = make_plan(open_source(preset_source("moe-group-v0")))
    bias = next(t for t in plan.tensors if t.name == f"{plan.moe_layers[0].prefix}.experts.0.gate_proj.scale_bias")
    assert set(bias.recipe.sources()) == {"weight", "weight_scale", "weight_scale_second"}


def test_a_linear_layer_reads_by_vllm_ascends_parameter_names(preset_source):
    plan = make_plan(open_source(preset_source("linear-v1")))
    module = plan.linears[0]
    recipes = [t.recipe for t in plan.tensors if isinstance(t.recipe, LinearTensor) and t.recipe.module == module]
    assert {r.output for r in recipes} >= {"weight", "weight_scale_second"}
    for recipe in recipes:
        assert all(name == f"{module.prefix}.{suffix}" for suffix, name in recipe.sources().items())
        assert recipe.model_dtype == "bfloat16"


def test_the_output_description_types_each_tensor_by_its_recipe(preset_source):
    src = open_source(preset_source("mixed-v1"))
    plan = make_plan(src)
    description = plan.output_description()
    for tensor in plan.tensors:
        expected = {CopyBytes: src.description.get(tensor.name), TranslatedTensor: getattr(tensor.recipe,
                                                                                           "translation", None)}
        assert description[tensor.name] == expected.get(type(tensor.recipe), CONVERTED_TYPE), tensor.name
    assert SOURCE_TYPE not in {description[t.name] for t in plan.tensors}
    folded = plan.consumed - {t.name for t in plan.tensors}  # offsets, second scales: no output of their own
    assert folded and not folded & set(description)


def test_a_converted_description_is_refused_as_a_source(converted):
    _source, output = converted("moe-group-v1")
    with pytest.raises(InvalidCheckpointError, match="already converted by w4a8conv"):
        make_plan(open_source(output))


RECIPE_TYPES = {cls.__name__ for cls in typing.get_args(Recipe)}


def _tests_recipe_type(test: ast.expr) -> bool:
    """`isinstance(x, SomeRecipe)` or `type(x) is SomeRecipe`, possibly negated or inside and/or."""
    for node in ast.walk(test):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            if {getattr(n, "id", None) for n in ast.walk(node.args[1])} & RECIPE_TYPES:
                return True
        if isinstance(node, ast.Compare) and {getattr(n, "id", None) for n in node.comparators} & RECIPE_TYPES:
            return True
    return False


def recipe_ladders(source: str) -> list[int]:
    """Lines where a block picks a code path by testing a recipe's type twice or more: an if/elif
    chain, or one `if ...: return` after another."""
    found, seen = [], set()
    for node in ast.walk(ast.parse(source)):
        for block in (getattr(node, "body", None), getattr(node, "orelse", None)):
            tests = []
            for statement in block if isinstance(block, list) else ():
                while isinstance(statement, ast.If) and _tests_recipe_type(statement.test):
                    tests.append(statement.lineno)
                    statement = statement.orelse[0] if len(statement.orelse) == 1 else None
            if len(tests) >= 2 and not seen & set(tests):  # an elif chain is also the orelse of its if
                found.append(tests[0])
            seen |= set(tests)
    return sorted(found)


def test_no_module_chooses_a_recipes_code_path_by_an_isinstance_ladder():
    """The code path per recipe type comes from `produce.RECIPES` or from the recipe itself."""
    package = Path(__file__).parents[1] / "w4a8conv"
    ladders = {str(p.relative_to(package)): lines for p in sorted(package.rglob("*.py"))
               if (lines := recipe_ladders(p.read_text()))}
    assert not ladders, ladders
    assert recipe_ladders("if isinstance(r, CopyBytes):\n    a()\nelif isinstance(r, ExpertTensor):\n    b()\n") == [1]
    assert recipe_ladders("def f(r):\n    if isinstance(r, CopyBytes):\n        return 1\n"
                          "    if type(r) is LinearTensor:\n        return 2\n") == [2]
    assert recipe_ladders("if type(r) is TranslatedTensor:\n    a()\n") == []

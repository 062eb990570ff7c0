"""Name matching between files and models: wrapper prefixes, renames, include/exclude."""

from __future__ import annotations

import pytest

from torchkeep.weights.keys import apply_rename, plan_keys

PLAIN = ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]


def prefixed(prefix: str) -> list[str]:
    return [prefix + n for n in PLAIN]


@pytest.mark.parametrize(
    "source_prefix, dest_prefix",
    [
        ("", ""),
        ("module.", ""),
        ("", "module."),
        ("module.", "module."),
        ("_orig_mod.", ""),
        ("", "_orig_mod."),
        ("_orig_mod.", "module."),
        ("module.", "_orig_mod."),
        ("_orig_mod.module.", ""),
        ("module._orig_mod.", "_orig_mod.module."),
        ("model.", ""),
        ("model.module.", "module."),
        ("", "model."),
    ],
)
def test_wrapper_prefixes_in_every_direction(source_prefix: str, dest_prefix: str) -> None:
    plan = plan_keys(prefixed(source_prefix), prefixed(dest_prefix))
    assert plan.pairs == {dest_prefix + n: source_prefix + n for n in PLAIN}
    assert not plan.missing and not plan.unexpected
    assert len(plan.renamed) == (0 if source_prefix == dest_prefix else len(PLAIN))


def test_compiled_submodule_segments_match_plain_names() -> None:
    plan = plan_keys(["enc._orig_mod.w", "head.w"], ["enc.w", "head.w"])
    assert plan.pairs == {"enc.w": "enc._orig_mod.w", "head.w": "head.w"}


def test_a_real_submodule_named_model_is_not_stripped() -> None:
    names = ["model.layer.weight", "model.layer.bias", "head.weight"]
    plan = plan_keys(names, names)
    assert plan.pairs == {n: n for n in names}
    assert not plan.renamed


def test_lightning_prefix_over_a_model_with_a_model_submodule() -> None:
    dest = ["model.a", "model.b", "head.w"]
    source = ["model." + n for n in dest]
    plan = plan_keys(source, dest)
    assert plan.pairs == {n: "model." + n for n in dest}


def test_missing_and_unexpected_are_reported_in_model_terms() -> None:
    plan = plan_keys(["module.a", "module.b", "module.extra"], ["a", "b", "c"])
    assert plan.pairs == {"a": "module.a", "b": "module.b"}
    assert plan.missing == ("c",)
    assert plan.unexpected == ("module.extra",)


def test_rename_rules_regex_mapping_list_and_function() -> None:
    source = ["backbone.layer1.w", "backbone.layer2.w", "classifier.w"]
    dest = ["encoder.layer1.w", "encoder.layer2.w", "head.w"]
    for rules in (
        {r"^backbone\.": "encoder.", r"^classifier\.": "head."},
        [(r"^backbone\.", "encoder."), (r"^classifier\.", "head.")],
        lambda n: n.replace("backbone.", "encoder.").replace("classifier.", "head."),
    ):
        plan = plan_keys(source, dest, rename=rules)
        assert plan.pairs == dict(zip(dest, source, strict=True))
        assert ("classifier.w", "head.w") in plan.renamed


def test_rename_function_can_drop_names() -> None:
    plan = plan_keys(["a", "aux.w"], ["a"], rename=lambda n: None if n.startswith("aux") else n)
    assert plan.pairs == {"a": "a"} and not plan.unexpected


def test_rename_collisions_are_refused() -> None:
    with pytest.raises(ValueError, match="both"):
        apply_rename(["a.w", "b.w"], {r"^[ab]\.": "c."})


def test_include_and_exclude_skip_instead_of_failing() -> None:
    source = ["backbone.0.w", "backbone.1.w", "head.w"]
    dest = ["backbone.0.w", "backbone.1.w", "head.w", "head.b"]
    plan = plan_keys(source, dest, exclude="head")
    assert set(plan.pairs) == {"backbone.0.w", "backbone.1.w"}
    assert not plan.missing and not plan.unexpected
    assert set(plan.skipped) == {"head.w", "head.b"}
    plan = plan_keys(source, dest, include=["backbone.*"])
    assert set(plan.pairs) == {"backbone.0.w", "backbone.1.w"}
    assert not plan.missing and not plan.unexpected


def test_module_name_pattern_does_not_match_a_longer_sibling() -> None:
    plan = plan_keys(["head.w", "header.w"], ["head.w", "header.w"], exclude="head")
    assert set(plan.pairs) == {"header.w"}

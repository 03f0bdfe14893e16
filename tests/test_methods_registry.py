"""METHODS: every method class declares what it is, and the declarations mean what they say."""
from __future__ import annotations

import dataclasses

import pytest

from attribution_core.errors import SettingsError
from attribution_core.methods import METHODS, method_class
from attribution_core.methods.base import CHECKPOINT_POLICIES, Method
from attribution_core.methods.influence import InfluenceSettings, KfacInfluence
from attribution_core.methods.source import SourceSettings
from attribution_core.store import content_key


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_declares_every_capability(name):
    method = METHODS[name]
    assert issubclass(method, Method) and method.name == name
    assert isinstance(method.label, str) and method.label
    assert dataclasses.is_dataclass(method.Settings)
    for settings_field in dataclasses.fields(method.Settings):
        assert settings_field.default is not dataclasses.MISSING or settings_field.default_factory is not dataclasses.MISSING
        assert settings_field.metadata.get("help"), f"{name}: setting {settings_field.name} has no help"
    assert set(method.preset) <= {f.name for f in dataclasses.fields(method.Settings)}
    assert method.checkpoint_policy in CHECKPOINT_POLICIES
    assert all(isinstance(flag, bool) for flag in (method.has_self_influence, method.self_influence_at_fit, method.has_segments))
    assert method.max_parameters is None or method.max_parameters >= 1
    # A capability is declared exactly where the method implements it.
    assert method.has_segments == (method.score_segments is not Method.score_segments)
    assert method.has_self_influence == (method.self_influence is not Method.self_influence)
    assert not method.self_influence_at_fit or method.has_self_influence


@pytest.mark.parametrize(("policy", "expected"), [("last", [9]), ("last5", [5, 6, 7, 8, 9]), ("all", list(range(10)))])
def test_checkpoint_policies_name_the_checkpoints_they_choose(policy, expected):
    chosen = next(method for method in METHODS.values() if method.checkpoint_policy == policy)
    assert chosen.default_checkpoints(10) == expected


def test_a_preset_is_kept_whatever_settings_are_given():
    assert KfacInfluence(InfluenceSettings()).settings.curvature == "kfac"
    assert KfacInfluence({"damping_ratio": 0.5}).settings == InfluenceSettings(curvature="kfac", damping_ratio=0.5)
    assert method_class("ekfac")(InfluenceSettings()).settings.curvature == "ekfac"


@pytest.mark.badinput
def test_unknown_methods_and_foreign_settings_are_refused_by_name():
    with pytest.raises(SettingsError, match="unknown method 'magic'; choose one of trak, source"):
        method_class("magic")
    with pytest.raises(SettingsError, match="trak: settings must be a TrakSettings or a mapping"):
        METHODS["trak"](InfluenceSettings())


@pytest.mark.parametrize(("settings", "fields", "key"), [
    (InfluenceSettings(), [("curvature", "ekfac"), ("damping", None), ("damping_ratio", 1.0), ("fisher", "true_fisher"), ("seed", 0),
                           ("query_batch_size", None), ("k", None), ("kronecker_block", 4)], "4387e8f7522dc542"),
    (SourceSettings(k=64), [("n_segments", 3), ("segments", None), ("fisher", "true_fisher"), ("seed", 0), ("query_batch_size", None),
                            ("k", 64), ("kronecker_block", 4)], "c17dcd23781e6c3d"),
])
def test_the_kronecker_methods_shared_settings_keep_their_fields_defaults_and_stored_keys(settings, fields, key):
    """The fields, their order and defaults, and so the content key of asdict (part of every stored state's key), as they were
    before the shared fields moved to methods/kronecker_settings.py (keys taken from that version)."""
    assert list(dataclasses.asdict(settings).items()) == fields
    assert content_key(dataclasses.asdict(settings)) == key


def test_the_kronecker_methods_share_each_common_settings_help_where_it_means_the_same():
    influence, source = ({f.name: f.metadata["help"] for f in dataclasses.fields(cls)} for cls in (InfluenceSettings, SourceSettings))
    assert all(influence[name] == source[name] for name in ("fisher", "seed", "kronecker_block"))
    assert "once per segment" in source["k"] and "once per segment" not in influence["k"], "k and query_batch_size say what differs"

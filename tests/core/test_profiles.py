import pytest

from specctl.backends import SCHEMAS, load_profile
from specctl.core.errors import SpecctlError
from specctl.core.profile import load_raw, shipped_profiles


def test_some_profiles_ship():
    names = shipped_profiles()
    assert "quickstart/target" in names and "etth1/target-large" in names


@pytest.mark.parametrize("name", shipped_profiles())
def test_every_shipped_profile_parses(name):
    profile = load_profile(name)
    assert isinstance(profile, SCHEMAS[profile.kind]) and profile.name


def test_extends_merges_and_child_wins():
    draft = load_profile("etth1/draft-025")
    assert draft.data.name == "ETTh1" and draft.model.e_layers == 8 and draft.model.scale_d_model == 0.25
    assert draft.train.save_to == "artifacts/etth1/draft-025"


def test_extends_a_list_merges_the_parents_in_order_then_the_file(tmp_path):
    (tmp_path / "base.toml").write_text('[train]\nepochs = 2\nlr = 0.1\n[model]\nd_model = 64\n')
    (tmp_path / "caps.toml").write_text('extends = "base"\n[train]\nlr = 0.2\nmax_steps_per_epoch = 7\n')
    (tmp_path / "p.toml").write_text('extends = ["base", "caps"]\n[train]\nepochs = 3\n')
    train = load_profile(str(tmp_path / "p.toml")).train
    assert (train.epochs, train.lr, train.max_steps_per_epoch) == (3, 0.2, 7)
    raw, files = load_raw(tmp_path / "p.toml")
    assert [f.name for f in files] == ["base.toml", "caps.toml", "p.toml"] and raw["model"]["d_model"] == 64
    (tmp_path / "bad.toml").write_text('extends = ["base", 3]\n')
    with pytest.raises(SpecctlError, match="key 'extends': expected a profile name or path, or a list of them"):
        load_profile(str(tmp_path / "bad.toml"))


def write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return str(path)


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, '[spec]\nk = 3\nsigmaa = 0.5\n')
    with pytest.raises(SpecctlError, match=r"p\.toml:3: unknown key 'spec\.sigmaa'; did you mean 'spec\.sigma'\?"):
        load_profile(path)


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, '[train]\nlr = "fast"\n')
    with pytest.raises(SpecctlError, match=r"p\.toml:2: key 'train\.lr'.*valid number.*'fast'"):
        load_profile(path)


def test_toml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, '[spec]\nk = = 3\n')
    with pytest.raises(SpecctlError, match=r"TOML syntax error.*line 2"):
        load_profile(path)


def test_missing_profile_suggests_shipped_one():
    with pytest.raises(SpecctlError, match=r"profile not found: 'quickstart/targt'.*did you mean 'quickstart/target'"):
        load_profile("quickstart/targt")


@pytest.mark.parametrize("override, message", [
    ("spec.k=-1", "spec.k"), ("spec.sigma=0", "spec.sigma"), ("spec.bias=0.5", "spec.bias"),
    ("spec.tol=-1", "spec.tol"), ("spec.horizon=0", "spec.horizon"), ("data.horizons=[96, -1]", "data.horizons"),
])
def test_impossible_settings_are_rejected(override, message):
    with pytest.raises(SpecctlError, match=message):
        load_profile("quickstart/target", [override])


def test_exact_rule_requires_bias_one():
    with pytest.raises(SpecctlError, match=r"--set: key .spec.: .*.exact. means bias 1"):
        load_profile("quickstart/target", ["spec.rule=exact", "spec.bias=2"])


def test_overrides_are_revalidated_and_parsed_as_toml():
    profile = load_profile("quickstart/target", ["spec.sigma=0.75", "data.horizons=[16, 32]", "spec.rule=tolerance"])
    assert profile.spec.sigma == 0.75 and profile.data.horizons == [16, 32] and profile.spec.rule == "tolerance"


def test_null_unsets_an_optional_key_and_only_an_optional_one():
    assert load_profile("quickstart/target", ["train.save_to=null"]).train.save_to is None
    assert load_profile("quickstart/target", ['train.save_to="null"']).train.save_to == "null"
    with pytest.raises(SpecctlError, match=r"spec.k"):
        load_profile("quickstart/target", ["spec.k=null"])


def test_extends_cycle_is_reported(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b"\n')
    (tmp_path / "b.toml").write_text('extends = "a"\n')
    with pytest.raises(SpecctlError, match="cycle"):
        load_profile(str(tmp_path / "a.toml"))

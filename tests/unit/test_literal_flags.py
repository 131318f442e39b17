"""Flag values reach the bundle as data: MONAI's parser keeps every string exactly, evaluates none, and a typed id
refuses config syntax in one line naming the flag."""

from __future__ import annotations

import pytest
from monai.bundle import ConfigParser

from prod9_components.cli.literal_flags import Expression, FlagValueError, literal_overrides
from prod9_components.tracking import tracking_settings

TRICKY = ['$open("PWNED","w")', "@seed", "%train.json#seed", "runs::a", "out/@#x", "x%##y", "$", "plain/path.nii.gz",
          "it's \\ \"quoted\"", "ünïcødé 🧠", ""]


def parsed(overrides: dict, config: dict | None = None) -> ConfigParser:
    """A parser holding ``config`` with ``overrides`` applied the way a bundle workflow applies them."""
    parser = ConfigParser({"seed": 0, "roi_size": [64, 64, 64], "output_dir": "outputs", "modalities": ["T1"],
                           **(config or {})})
    parser.update(literal_overrides(overrides, ConfigParser(parser.get())))
    parser.parse()
    return parser


@pytest.mark.parametrize("value", TRICKY)
def test_a_string_flag_is_kept_exactly(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = parsed({"output_dir": value, "new_id": value, "modalities": ["T1", value], "extra": {"name": value}})
    assert parser.get_parsed_content("output_dir") == value
    assert parser.get_parsed_content("new_id") == value
    assert parser.get_parsed_content("modalities") == ["T1", value]
    assert parser.get_parsed_content("extra") == {"name": value}
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("flag, value, expected", [
    ("seed", '$open("PWNED","w")',
     "--seed: expected a number like the bundle's default 0, got '$open(\"PWNED\",\"w\")'"),
    ("roi_size", "@seed", "--roi-size: expected a list like the bundle's default [64, 64, 64], got '@seed'"),
    ("roi_size", [64, "$1+1", 64], "--roi-size: expected a number like the bundle's default 64, got '$1+1'"),
    ("network_def#num_channels", "%x.json#a", "--network_def#num_channels: expected a list"),
    ("loss", {"_target_": "os.system", "command": "true"}, "--loss: a flag value cannot hold _target_"),
])
def test_config_syntax_in_a_typed_flag_is_refused(flag, value, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FlagValueError) as error:
        parsed({flag: value}, {"network_def": {"num_channels": [8, 16]}, "loss": {"weight": 1.0}})
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)
    assert not (tmp_path / "PWNED").exists()


def test_true_and_false_in_words_are_booleans_and_other_words_are_refused_where_the_default_is_typed():
    """fire hands ``--amp false`` over as the word 'false', which Python reads as true."""
    config = {"amp": False, "network_def": {"attention_levels": [False, False]}}
    parser = parsed({"amp": "false", "network_def#attention_levels": ["FALSE", " True"]}, config)
    assert parser.get_parsed_content("amp") is False
    assert parser.get_parsed_content("network_def#attention_levels") == [False, True]
    assert parsed({"amp": "True"}, config).get_parsed_content("amp") is True
    for flag, value, expected in (("amp", "no",
                                   "--amp: expected true or false like the bundle's default False, got 'no'"),
                                  ("seed", "abc", "--seed: expected a number like the bundle's default 0, got 'abc'"),
                                  ("roi_size", [64, "big", 64],
                                   "--roi-size: expected a number like the bundle's default 64, got 'big'")):
        with pytest.raises(FlagValueError) as error:
            parsed({flag: value}, config)
        assert str(error.value) == expected


def test_plain_values_and_the_clis_own_expressions_pass_unchanged():
    parser = parsed({"seed": 3, "roi_size": [32, 32, 32], "grid": Expression("$[r // 4 for r in @roi_size]")})
    assert parser.get_parsed_content("seed") == 3
    assert parser.get_parsed_content("grid") == [8, 8, 8]
    assert parser.get("output_dir") == "outputs"


def test_tracking_settings_from_the_command_line_are_a_name_not_a_config():
    with pytest.raises(ValueError, match="^--tracking takes mlflow or a settings file path, got a dict$"):
        tracking_settings({"configs": {"x": "$open('PWNED', 'w')"}, "handlers_id": {}})
    assert tracking_settings("settings.json") == "settings.json" and tracking_settings(None) is None

"""A record's network_args written into an exported bundle's inference.json are data there too (DESIGN §10): a string
MONAI would evaluate or follow reads back as itself, and a dict MONAI would instantiate is refused."""

from __future__ import annotations

import pytest
from monai.bundle import ConfigParser

from prod9_components.zoo import config_data


def test_config_syntax_in_network_args_reads_back_as_plain_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were the expression run, its file lands here
    hostile = {"norm": "$__import__('pathlib').Path('PWNED').touch()", "ref": "@device", "macro": "%x.json#a",
               "nested": ["$1+1", {"name": "a::b"}], "plain": "batch", "size": [4, 4]}
    parser = ConfigParser({"args": config_data(hostile, "best.ckpt"), "device": "cpu"})
    assert parser.get_parsed_content("args") == hostile
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("directive", ["_target_", "_requires_", "_disabled_"])
def test_a_config_directive_in_network_args_is_refused(directive):
    with pytest.raises(ValueError, match=f"best.ckpt: network_args hold a config directive '{directive}'"):
        config_data({"levels": [8, 5], "block": {directive: "os.system"}}, "best.ckpt")

"""The experiment config: schema defaults, readable errors, documented keys."""

from __future__ import annotations

import pytest
import yaml

from conveyor import config as cfg
from conveyor.cli import main
from conveyor.errors import InputError

MINIMAL_SPA = {
    "experiment": "x",
    "spa": {"movies": "m/*.mrc", "pixel_size": 1.1, "dose_per_frame": 1.5, "particle_diameter": 140},
}


def test_defaults_filled():
    out = cfg.validate_config(MINIMAL_SPA)
    assert out["device"] == "auto"
    assert out["spa"]["voltage"] == 300
    assert out["spa"]["cs"] == 2.7
    assert out["spa"]["symmetry"] == "C1"
    assert out["spa"]["selection"] == "manual"
    assert out["spi"] is None
    assert out["containers"]["relion"].endswith(".sif")


@pytest.mark.parametrize(
    "path, value, expect",
    [
        (("device",), "tpu", "allowed values: auto, cpu, gpu"),
        (("spa", "symmetry"), "X4", "'spa.symmetry'"),
        (("spa", "voltage"), 250, "allowed values: 100, 120, 200, 300"),
        (("spa", "selection"), "maybe", "allowed values: auto, manual"),
        (("spa", "pixel_size"), -1, "'spa.pixel_size'"),
        (("spa", "frmes"), 30, "unknown key 'frmes' under spa"),
    ],
)
def test_bad_values_name_the_key(path, value, expect):
    c = yaml.safe_load(yaml.safe_dump(MINIMAL_SPA))
    node = c
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(InputError) as err:
        cfg.validate_config(c, source="my.yaml")
    assert expect in str(err.value)
    assert str(err.value).startswith("my.yaml: ")


def test_missing_required_key():
    c = yaml.safe_load(yaml.safe_dump(MINIMAL_SPA))
    del c["spa"]["pixel_size"]
    with pytest.raises(InputError, match="pixel_size"):
        cfg.validate_config(c)


@pytest.mark.parametrize("name", ["config.yaml", "spa_example.yaml", "spi_example.yaml"])
def test_shipped_configs_are_valid(repo, name):
    cfg.validate_config(cfg.load_yaml(repo / "config" / name))


def test_tiny_test_config_is_valid(repo):
    cfg.validate_config(cfg.load_yaml(repo / "tests" / "configs" / "tiny.yaml"))


def test_every_key_has_description_and_default():
    for key, _t, default, desc in cfg.iter_keys():
        assert desc, f"{key} has no description"


def test_readme_documents_every_key(repo):
    text = (repo / "config" / "README.md").read_text()
    assert cfg.markdown_table() in text, "config/README.md is out of date: regenerate the table with `conveyor config keys`"


def test_cli_check(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**MINIMAL_SPA, "device": "quantum"}))
    assert main(["config", "check", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(p) in err and "auto, cpu, gpu" in err
    p.write_text(yaml.safe_dump(MINIMAL_SPA))
    assert main(["config", "check", str(p)]) == 0


def test_yaml_syntax_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("experiment: x\n spa: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        cfg.load_yaml(p)

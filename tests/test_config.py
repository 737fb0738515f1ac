"""Pipeline config: presets validate, overrides merge, and every bad config is an error naming the valid choices."""
from __future__ import annotations

import pytest

from autoglm_compile.config import PRESETS, load_config
from autoglm_compile.errors import ExitCode, InputError


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_validate(preset):
    cfg = load_config(preset)
    assert cfg.name == preset
    assert [p.name for p in cfg.passes][0] == "pin-shapes"  # the importer needs static shapes at every level


def test_o2_is_default_and_folds():
    cfg = load_config()
    assert cfg.name == "O2"
    assert "fold-constants" in [p.name for p in cfg.passes]
    assert (cfg.verify.rtol, cfg.verify.atol) == (1e-3, 1e-4)


def test_extends_overrides_only_what_it_names(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("extends: O2\nname: mine\nverify:\n  atol: 0.01\nmeasure:\n  runs: 3\n")
    cfg = load_config(path=f)
    base = load_config("O2")
    assert cfg.name == "mine"
    assert cfg.verify.atol == 0.01 and cfg.verify.rtol == base.verify.rtol
    assert cfg.measure.runs == 3 and cfg.passes == base.passes


def test_pass_short_forms(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("passes:\n  - pin-shapes\n  - fold-constants: {max_iterations: 2}\n  - name: infer-shapes\n")
    cfg = load_config(path=f)
    assert [(p.name, p.options) for p in cfg.passes] == [("pin-shapes", {}), ("fold-constants", {"max_iterations": 2}), ("infer-shapes", {})]


@pytest.mark.parametrize(
    "text, message, hint",
    [
        ("passes: [fold-constant]\n", "unknown pass 'fold-constant'", "fold-constants"),
        ("passes:\n  - fold-constants: {max_iter: 3}\n", "pass 'fold-constants' option 'max_iter'", "max_iterations"),
        ("passes:\n  - fold-constants: {max_iterations: many}\n", "option 'max_iterations'", "max_iterations"),
        ("verify: {rtoll: 1}\n", "invalid config key 'verify.rtoll'", "configs/O2.yaml"),
        ("stages: {}\n", "invalid config key 'stages'", "configs/O2.yaml"),
        ("measure: {runs: 0}\n", "invalid config key 'measure.runs'", "configs/O2.yaml"),
        ("passes: [a\n", "not valid YAML", "YAML syntax"),
        ("- just\n- a list\n", "must be a YAML mapping", "configs/O2.yaml"),
        ("extends: O9\n", "unknown preset 'O9'", "O0, O1, O2, O3"),
    ],
)
def test_bad_config_messages(tmp_path, text, message, hint):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(InputError) as e:
        load_config(path=f)
    assert message in str(e.value)
    assert hint in e.value.hint
    assert e.value.exit_code == ExitCode.USAGE


def test_unknown_key_lists_valid_keys(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("verify: {rtoll: 1}\n")
    with pytest.raises(InputError, match="valid keys: graph, each_pass, rtol, atol, seed"):
        load_config(path=f)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(path=tmp_path / "nope.yaml")


def test_tolerances_follow_the_precision(tmp_path):
    fp16 = load_config("O2", precision="fp16")
    assert [p.name for p in fp16.passes][-1] == "convert-float16" and fp16.precision == "fp16"
    assert (fp16.verify.rtol, fp16.verify.atol) == (1e-3, 2.5e-3)
    assert load_config("O2").precision == "fp32"
    f = tmp_path / "half.yaml"  # a config that converts itself gets fp16 tolerances too, unless it states its own
    f.write_text("extends: O2\npasses: [pin-shapes, convert-float16]\n")
    assert (load_config(path=f).verify.rtol, load_config(path=f).verify.atol) == (1e-3, 2.5e-3)
    assert [p.name for p in load_config(path=f, precision="fp16").passes] == ["pin-shapes", "convert-float16"]  # not twice
    f.write_text("extends: O2\npasses: [pin-shapes, convert-float16]\nverify: {atol: 0.05}\n")
    assert load_config(path=f).verify.atol == 0.05


@pytest.mark.parametrize("precision, message, hint", [
    ("int4", "unknown precision 'int4'", "fp32, fp16"),
    ("fp32", "converts to a lower precision", "drop --precision"),
])
def test_bad_precision(tmp_path, precision, message, hint):
    f = tmp_path / "half.yaml"
    f.write_text("extends: O2\npasses: [pin-shapes, convert-float16]\n")
    with pytest.raises(InputError) as e:
        load_config(path=f, precision=precision)
    assert message in str(e.value) and hint in e.value.hint and e.value.exit_code == ExitCode.USAGE

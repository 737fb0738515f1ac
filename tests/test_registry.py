"""The pass registry: consistency of every registered pass, and third-party passes through entry points."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autoglm_compile import pass_manager
from autoglm_compile.pass_manager import GraphPass, PassOptions, registered_passes

TESTS = Path(__file__).parent


@pytest.mark.parametrize("name", sorted(registered_passes()))
def test_every_pass_has_doc_options_and_a_test(name):
    cls = registered_passes()[name]
    assert issubclass(cls, GraphPass) and cls.name == name
    assert cls.doc(), f"{name} has no docstring (its first line is the help text)"
    assert issubclass(cls.Options, PassOptions)
    assert cls.Options.model_config.get("extra") == "forbid"
    assert cls.__module__.startswith("autoglm_compile.passes."), "built-in passes live in passes/"
    tested = any(f'"{name}"' in p.read_text() for p in TESTS.glob("test_pass*.py"))
    assert tested, f"no test in tests/test_pass*.py names the pass '{name}'"


def test_core_never_imports_a_pass():
    core = Path(pass_manager.__file__).parent
    for path in core.glob("*.py"):
        text = path.read_text()
        assert "from autoglm_compile.passes." not in text and "import passes" not in text, path.name


def test_entry_point_plugin_is_registered(tmp_path, monkeypatch):
    (tmp_path / "my_plugin_passes.py").write_text(
        "from autoglm_compile.pass_manager import GraphPass, PassOptions, PassResult, register_pass\n"
        "@register_pass('my-plugin-pass')\n"
        "class MyPass(GraphPass):\n"
        "    '''Do nothing, from a plug-in.'''\n"
        "    class Options(PassOptions):\n"
        "        level: int = 1\n"
        "    def run(self, graph, opts, ctx):\n"
        "        return PassResult(changed=False)\n"
    )
    dist = tmp_path / "my_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[autoglm_compile.passes]\nmine = my_plugin_passes\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(pass_manager, "_DISCOVERED", False)
    try:
        passes = registered_passes()
        assert "my-plugin-pass" in passes and passes["my-plugin-pass"].doc() == "Do nothing, from a plug-in."
        assert "fold-constants" in passes
    finally:
        pass_manager._REGISTRY.pop("my-plugin-pass", None)
        sys.modules.pop("my_plugin_passes", None)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        @pass_manager.register_pass("fold-constants")
        class Clash(GraphPass):
            """Clash."""

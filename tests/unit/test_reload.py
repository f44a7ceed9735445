"""What a reload imports again, and that a failed one leaves ``sys.modules`` exactly as it was."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import forkserve.config
from forkserve.apps import App
from forkserve.config import Config, from_mapping
from forkserve.errors import ConfigError
from forkserve.master import reload
from forkserve.serving.handlers import load

APP = "from pkg.words import WORD\n\ndef handle(conn):\n    return WORD\n"
OURS = ("pkg", "pkg.web", "pkg.words", "sibling")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An app package (``pkg.web:handle``) and a sibling module, imported as at start; every
    module it imports and the import path are put back afterwards."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "web.py").write_text("import sibling\n" + APP)
    (tmp_path / "pkg" / "words.py").write_text("WORD = 'v1'\n")
    (tmp_path / "sibling.py").write_text("")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # files rewritten in the same second
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def prepare(config: Config, app: App) -> reload.Reloaded:
    return reload.prepare(config, app, None, reload.Origin(config, app_by_name=True))


def test_a_reload_imports_the_app_package_and_its_siblings_again(project: Path) -> None:
    config = from_mapping({"app": "pkg.web:handle", "chdir": str(project)})
    app = load(config.app, chdir=config.chdir)
    old = {name: sys.modules[name] for name in OURS}
    (project / "pkg" / "words.py").write_text("WORD = 'v2'\n")
    new = prepare(config, app)
    assert new.app(None) == "v2"  # type: ignore[arg-type, func-returns-value]
    assert all(sys.modules[name] is not old[name] for name in OURS)
    assert sys.modules["forkserve.config"] is forkserve.config, "forkserve is never re-imported"
    assert sys.modules["pytest"] is pytest, "nor what is installed"
    assert new.summary == "reload: re-imported pkg.web:handle"


def test_a_failed_reload_puts_every_module_back(project: Path) -> None:
    config = from_mapping({"app": "pkg.web:handle", "chdir": str(project)})
    app = load(config.app, chdir=config.chdir)
    old = dict(sys.modules)
    (project / "pkg" / "new.py").write_text("")
    (project / "pkg" / "web.py").write_text("import pkg.new\nimport sibling\n" + APP + "(\n")
    with pytest.raises(ConfigError, match=r"SyntaxError: .*\(pkg/web.py, line 7\)"):
        prepare(config, app)
    assert sys.modules == old, "the same module objects, and no half-imported new one"


def test_an_app_given_as_an_object_is_kept(project: Path) -> None:
    config = from_mapping({"app": "pkg.web:handle", "chdir": str(project)})
    app = load(config.app, chdir=config.chdir)
    (project / "pkg" / "words.py").write_text("WORD = 'v2'\n")
    new = reload.prepare(config, app, None, reload.Origin(config))
    assert new.app is app
    assert sys.modules["pkg.words"].WORD == "v1", "nothing was imported again"

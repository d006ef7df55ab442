"""The ``cheapspot`` command's dispatch: commands of parts an installation lacks say so."""

from __future__ import annotations

import importlib.abc
import sys

import pytest

from cheapspot import cli

pytestmark = pytest.mark.unit


class _Absent(importlib.abc.MetaPathFinder):
    """An import finder for which a package does not exist."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname.split(".", maxsplit=1)[0] == self.package:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


def test_unknown_command_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'no-such-command'" in err
    assert "operator" in err and "worker" in err


def test_a_command_whose_package_is_not_installed_names_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As in the container images, which are built without the e2e/ folder.
    for name in [m for m in sys.modules if m.split(".")[0] == "cheapspot_localcluster"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Absent("cheapspot_localcluster"), *sys.meta_path])
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "cheapspot demo:" in err
    assert "does not include the local cluster" in err


def test_an_import_error_inside_an_installed_command_is_not_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A module missing inside an installed package is a bug, not a part left out: it surfaces.
    monkeypatch.setitem(cli.COMMANDS, "broken", ("cheapspot.no_such_module:main", "x"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["broken"])

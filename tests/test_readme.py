"""README.md's checkable names: the Layout lists every module, and the options it names exist."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _layout() -> str:
    return README.split("## Layout", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("folder", ["dn2_lightning", "dn2_lightning/data", "dn2_lightning/maps", "benchmarks"])
def test_layout_names_every_module(folder):
    layout = _layout()
    if folder == "dn2_lightning/maps":  # listed as a folder, its files by what they do
        assert "maps/" in layout
        return
    missing = [p.name for p in sorted((ROOT / folder).glob("*.py")) if p.name != "__init__.py" and p.name not in layout]
    assert not missing, f"README's Layout does not list {missing} of {folder}/"


def test_layout_lists_no_file_that_does_not_exist():
    listed = set(re.findall(r"\b([\w]+\.py)\b", _layout()))
    existing = {p.name for p in ROOT.glob("**/*.py")}
    assert listed <= existing, f"README's Layout lists {sorted(listed - existing)}, which do not exist"


def test_option_names_in_readme_exist():
    from lightning import Trainer

    from dn2_lightning import DN2Module, GroupDataModule, OneClassDataModule

    def params(*callables):
        return {name for c in callables for name in inspect.signature(c).parameters}

    model, trainer = params(DN2Module.__init__), params(Trainer.__init__)
    data = params(OneClassDataModule.__init__, GroupDataModule.__init__) | {"init_args", "help"}
    for prefix, names in (("model", model), ("data", data), ("trainer", trainer)):
        used = set(re.findall(rf"--{prefix}\.(\w+)", README))
        assert used and used <= names, f"README names --{prefix}.{sorted(used - names)}, which do not exist"
    for name in re.findall(r"DN2Module\(([^)]*)\)", README):  # DN2Module(k=2, backbone=..., anomaly_maps=True)
        given = set(re.findall(r"(\w+)=", name))
        assert given <= model, f"README calls DN2Module with {sorted(given - model)}"

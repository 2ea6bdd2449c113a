"""docs/methods.md against the loss registry: the table's defaults and one section per loss."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from transfuse.losses import LOSSES

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
COLUMNS = ["name", "kind", "inputs", "weight", "ce_weight", "family", "needs", "paper"]


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


def _table() -> dict[str, dict[str, str]]:
    """The defaults table: name -> {column: cell}, from the table whose header is COLUMNS."""
    lines = _text().splitlines()
    header = "| " + " | ".join(COLUMNS) + " |"
    start = lines.index(header)  # ValueError here = the table's header changed
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS), f"malformed row: {line}"
        row = dict(zip(COLUMNS, cells))
        name = row["name"].strip("`")
        assert name not in rows, f"{name} is listed twice"
        rows[name] = row
    return rows


def _sections() -> set[str]:
    return set(re.findall(r"^## `([^`]+)` — ", _text(), flags=re.MULTILINE))


def test_table_lists_exactly_the_registered_losses():
    assert set(_table()) == set(LOSSES.names())


def test_every_registered_loss_has_a_section_and_no_section_is_stale():
    assert _sections() == set(LOSSES.names())


@pytest.mark.parametrize("name", LOSSES.names())
def test_documented_defaults_equal_the_spec(name):
    row, spec = _table()[name], LOSSES.get(name)
    assert row["kind"] == spec.kind
    assert row["inputs"] == spec.inputs
    assert float(row["weight"]) == spec.weight
    assert float(row["ce_weight"]) == spec.ce_weight
    assert row["family"] == ("position-wise" if spec.positionwise else "batch-relation")
    assert row["needs"] == (", ".join(spec.needs) or "-")
    if spec.paper is not None:
        link = re.search(r"https://arxiv\.org/abs/[0-9.]+", spec.paper)
        assert link and link.group(0) in row["paper"]


def test_the_registration_example_runs():
    text = _text()
    section = text[text.index("## Adding a loss") :]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    name = re.search(r'name="([^"]+)"', code).group(1)
    try:
        spec = LOSSES.get(name)
        s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
        value = spec.build()(s, t, mask=torch.tensor([True, True, False, True]))
        value.backward()
        assert torch.isfinite(value) and s.grad is not None
    finally:
        LOSSES.unregister(name)


def test_every_scheme_has_a_section_with_its_paper():
    from transfuse.schemes import SCHEMES

    documented = set(re.findall(r"^### `([^`]+)` — ", _text(), flags=re.MULTILINE))
    assert documented == set(SCHEMES.names())
    for entry in SCHEMES.entries():
        assert entry.meta["paper"].split(", ")[-1] in _text()

"""The README and docs/ as a new user reads them: a short front door whose links all lead somewhere, and a
configuration page that is the settings' own descriptions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fluxserve.settings import Settings
from fluxserve.settings_docs import markdown

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_configuration_page_is_generated_from_the_settings() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == markdown(), "stale: run `python -m fluxserve.settings_docs > docs/configuration.md`"
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name}: describe it in settings.py (docs/configuration.md shows it)"
        assert f"| `FLUXSERVE_{name.upper()}` |" in page


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor:
            assert anchor in _anchors(linked), f"{page.name}: {target}"


def test_the_readme_is_a_short_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 10_000
    contents = readme.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"\(#([^)]+)\)", contents) == [
        _anchor(line[3:]) for line in readme.splitlines() if line.startswith("## ") and line != "## Contents"
    ]
    for page in ("reseller", "vendor", "openai", "client", "cli", "bundled-model", "configuration"):
        assert f"(docs/{page}.md)" in readme, page

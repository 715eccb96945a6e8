"""Pure rules: sizes, prices, the catalog, and the migrated schema matching the table definitions."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fluxserve.core.catalog import MODELS, load_catalog
from fluxserve.core.pricing import PRICES, format_credits
from fluxserve.core.sizes import kontext_size, output_size, parse_aspect_ratio, ultra_size
from fluxserve.jobs.database import make_engine, migrate
from fluxserve.jobs.tables import metadata


@pytest.mark.parametrize(
    ("text", "ratio"), [("21:9", 21 / 9), ("9:21", 9 / 21), ("1:1", 1.0), (" 16 : 9 ", 16 / 9)]
)
def test_aspect_ratio_bounds_are_inclusive(text: str, ratio: float) -> None:
    assert parse_aspect_ratio(text) == pytest.approx(ratio)


@pytest.mark.parametrize("text", ["22:9", "9:22", "0:1", "1:0", "16/9", "a:b", "", "1.5:1"])
def test_aspect_ratio_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_aspect_ratio(text)


def test_kontext_sizes_are_about_one_megapixel_multiples_of_16() -> None:
    for ratio in (9 / 21, 9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9, 21 / 9):
        width, height = kontext_size(ratio)
        assert width % 16 == 0 and height % 16 == 0
        assert 0.95e6 < width * height < 1.1e6
        assert abs(width / height - ratio) / ratio < 0.12


def test_ultra_sizes_are_about_four_megapixels() -> None:
    for ratio in (9 / 21, 1.0, 16 / 9, 21 / 9):
        width, height = ultra_size(ratio)
        assert width % 16 == 0 and height % 16 == 0
        assert 4.0e6 < width * height < 4.4e6
    assert ultra_size(1.0) == (2048, 2048)


def test_output_size_per_route() -> None:
    assert output_size("flux-dev", 512, 256, None, None) == (512, 256)
    assert output_size("flux-kontext-pro", None, None, None, None) is None
    assert output_size("flux-kontext-pro", None, None, None, (640, 480)) == kontext_size(4 / 3)
    assert output_size("flux-kontext-max", None, None, "1:1", (640, 480)) == (1024, 1024)
    assert output_size("flux-pro-1.1-ultra", None, None, None, None) == (2048, 2048)


def test_prices_and_their_format() -> None:
    assert set(PRICES) == set(MODELS)
    assert format_credits(PRICES["flux-dev"]) == "2.5"
    assert format_credits(PRICES["flux-kontext-max"]) == "8"
    assert format_credits(Decimal("40.00")) == "40"


def test_catalog_override_merges_per_key(tmp_path: Path) -> None:
    override = tmp_path / "catalog.toml"
    override.write_text('[models."flux-dev"]\nweights = "weights/dev"\nsteps = 28\n')
    catalog = load_catalog(override)
    assert catalog.entry("flux-dev").weights == str(tmp_path / "weights" / "dev")
    assert catalog.entry("flux-dev").steps == 28
    assert catalog.entry("flux-dev").max_pixels == 65536  # kept from the shipped file
    assert catalog.entry("flux-pro").weights == "builtin:tiny"


def test_catalog_refuses_unknown_keys(tmp_path: Path) -> None:
    override = tmp_path / "catalog.toml"
    override.write_text('[models."flux-dev"]\nwieghts = "typo"\n')
    with pytest.raises(ValueError, match="wieghts"):
        load_catalog(override)


def test_migrations_build_exactly_the_declared_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    migrate(engine)  # idempotent
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), metadata)
    assert diff == []

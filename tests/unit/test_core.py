"""Pure rules: sizes, prices, the catalog, and the migrated schema matching the table definitions."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fluxserve.core.catalog import ModelEntry, load_catalog
from fluxserve.core.models import MODELS
from fluxserve.core.params import GenerationParams, ImageRef
from fluxserve.core.pricing import format_credits
from fluxserve.core.sizes import SizeRule, kontext_size, output_size, parse_aspect_ratio, ultra_size
from fluxserve.db.connection import migrate, open_database
from fluxserve.db.tables import metadata
from fluxserve.settings import Settings


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
    def params(**fields: object) -> GenerationParams:
        return GenerationParams.model_validate({"model": "m", "prompt": "p", **fields})

    url = [ImageRef(field="input_image", ref="https://example.com/a.png")]
    assert output_size(SizeRule.WIDTH_HEIGHT, params(width=512, height=256), None) == (512, 256)
    assert output_size(SizeRule.KONTEXT, params(), None) == (1024, 1024)
    assert output_size(SizeRule.KONTEXT, params(input_images=url), None) is None  # waits for the image
    assert output_size(SizeRule.KONTEXT, params(input_images=url), (640, 480)) == (1184, 880)
    assert output_size(SizeRule.KONTEXT, params(aspect_ratio="1:1", input_images=url), (640, 480)) == (
        1024,
        1024,
    )
    assert output_size(SizeRule.ULTRA, params(), None) == (2048, 2048)


def test_prices_and_their_format() -> None:
    # The vendor's published prices, written out: the table must not drift from them. FLUX.2: the first
    # megapixel, then each further one.
    prices = {
        name: format_credits(spec.price)
        + ("" if spec.further_mp_price is None else f" + {format_credits(spec.further_mp_price)}")
        for name, spec in MODELS.items()
    }
    assert prices == {
        "flux-2-pro": "3 + 1.5",
        "flux-2-pro-preview": "3 + 1.5",
        "flux-2-max": "7 + 3",
        "flux-2-flex": "5 + 5",
        "flux-2-klein-4b": "1.4 + 0.1",
        "flux-2-klein-9b": "1.5 + 0.2",
        "flux-2-klein-9b-preview": "1.5 + 0.2",
        "flux-pro-1.0-fill": "5",
        "flux-pro-1.0-expand": "5",
        "flux-tools/erase-v1": "3 + 0.4",
        "flux-kontext-max": "8",
        "flux-kontext-pro": "4",
        "flux-pro-1.1-ultra": "6",
        "flux-pro-1.1": "4",
        "flux-pro": "5",
        "flux-dev": "2.5",
        "flux-schnell": "1",
        # finetuned: FLUX.1 as the vendor prices them; its FLUX.2 LoRA beta has no price apart: the base's
        "flux-pro-finetuned": "6",
        "flux-pro-1.1-ultra-finetuned": "7",
        "flux-2-klein-4b-finetuned": "1.4 + 0.1",
        "flux-2-klein-9b-finetuned": "1.5 + 0.2",
    }
    assert format_credits(Decimal("40.00")) == "40"


def test_catalog_override_merges_per_key_and_other_weights_start_afresh(tmp_path: Path) -> None:
    override = tmp_path / "catalog.toml"
    override.write_text(
        '[models."flux-dev"]\nweights = "weights/dev"\nsteps = 28\n'
        '[models."flux-pro"]\nsteps = 12\n'
        '[models."flux-pro-1.1"]\nengine = "relay"\n'
    )
    catalog = load_catalog([override])
    shipped = load_catalog()
    dev = catalog.entry("flux-dev")
    assert (dev.weights, dev.steps) == (str(tmp_path / "weights" / "dev"), 28)
    # Other weights: nothing tuned for the bundled model (its pixel budget, its true CFG) carries over.
    assert shipped.entry("flux-dev").options and shipped.entry("flux-dev").max_pixels
    assert (dev.max_pixels, dev.options) == (ModelEntry.model_fields["max_pixels"].default, {})
    # Same weights: key by key.
    pro = catalog.entry("flux-pro")
    assert pro == shipped.entry("flux-pro").model_copy(update={"steps": 12})
    assert catalog.entry("flux-pro-1.1").engine == "relay" and catalog.entry("flux-pro-1.1").options == {}
    assert catalog.entry("flux-pro-1.1-ultra") == shipped.entry("flux-pro-1.1-ultra")


def test_catalog_files_layer_in_order_with_paths_relative_to_each(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    site, machine = tmp_path / "site" / "catalog.toml", tmp_path / "machine.toml"
    site.write_text('[models."flux-dev"]\nweights = "dev"\nsteps = 10\n')
    machine.write_text('[models."flux-dev"]\nsteps = 30\n[models."flux-pro"]\nweights = "pro"\n')
    catalog = load_catalog([site, machine])
    assert catalog.entry("flux-dev").weights == str(tmp_path / "site" / "dev")
    assert catalog.entry("flux-dev").steps == 30
    assert catalog.entry("flux-pro").weights == str(tmp_path / "pro")  # relative to machine.toml
    settings = Settings(catalog=f"{site}{os.pathsep}{machine}")
    assert settings.catalog_files == [site, machine]
    assert load_catalog(settings.catalog_files) == catalog


def test_shipped_catalog_serves_every_route_from_the_bundled_model_at_its_native_size() -> None:
    shipped = load_catalog()
    assert {shipped.entry(m).weights for m in MODELS} == {"builtin:bundled"}
    assert {shipped.entry(m).max_pixels for m in MODELS} == {128 * 128}
    assert shipped.entry("flux-kontext-max").steps > shipped.entry("flux-kontext-pro").steps


def test_catalog_refuses_unknown_keys(tmp_path: Path) -> None:
    override = tmp_path / "catalog.toml"
    override.write_text('[models."flux-dev"]\nwieghts = "typo"\n')
    with pytest.raises(ValueError, match="wieghts"):
        load_catalog([override])


def test_migrations_build_exactly_the_declared_schema(tmp_path: Path) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(database)
    migrate(database)  # idempotent
    with database.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), metadata)
    assert diff == []

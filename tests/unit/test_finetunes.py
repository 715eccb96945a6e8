"""Finetunes without a model: the model table's finetuned routes, the catalog entries they inherit, the
header-only adapter check, and the finetune store on SQLite and the local blob store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlalchemy import Engine

from fluxserve.accounts.keys import KeyStore
from fluxserve.api.requests import SCHEMAS
from fluxserve.core.catalog import load_catalog
from fluxserve.core.models import MODELS, SurfaceName, finetune_target
from fluxserve.db.connection import migrate, open_database
from fluxserve.errors import EngineError
from fluxserve.finetunes.check import AdapterProblem, check_fits, inspect
from fluxserve.finetunes.store import Finetune, FinetuneProblem, FinetuneStore, read_adapter
from fluxserve.storage.local import LocalBlobStore


def adapter_file(path: Path, layers: dict[str, tuple[int, int]], rank: int = 4) -> Path:
    tensors = {}
    for layer, (outputs, inputs) in layers.items():
        tensors[f"transformer.{layer}.lora_A.weight"] = np.ones((rank, inputs), dtype=np.float32)
        tensors[f"transformer.{layer}.lora_B.weight"] = np.ones((outputs, rank), dtype=np.float32)
    save_file(tensors, path)
    return path


def test_the_finetuned_routes_take_the_vendors_fields_and_defaults() -> None:
    pro = SCHEMAS[SurfaceName.VENDOR]["flux-pro-finetuned"].model_fields
    ultra = SCHEMAS[SurfaceName.VENDOR]["flux-pro-1.1-ultra-finetuned"].model_fields
    assert pro["finetune_id"].is_required() and ultra["finetune_id"].is_required()
    assert (pro["finetune_strength"].default, ultra["finetune_strength"].default) == (1.1, 1.2)
    assert (pro["steps"].default, pro["guidance"].default, ultra["aspect_ratio"].default) == (40, 2.5, "16:9")
    assert "raw" not in ultra and "interval" not in pro
    klein = SCHEMAS[SurfaceName.VENDOR]["flux-2-klein-4b-finetuned"].model_fields
    assert set(SCHEMAS[SurfaceName.VENDOR]["flux-2-klein-4b"].model_fields) | {
        "finetune_id",
        "finetune_strength",
    } == set(klein)
    assert all(
        SurfaceName.RESELLER not in MODELS[name].fields
        for name in ("flux-pro-finetuned", "flux-2-klein-9b-finetuned")
    )


def test_finetunes_are_added_for_a_base_model_named_any_way() -> None:
    assert {finetune_target(name) for name in ("flux-pro", "flux-pro-finetuned", "flux-pro-1.1-ultra")} == {
        "flux-pro"
    }
    assert finetune_target("flux-2-klein-9b-finetuned") == "flux-2-klein-9b"
    with pytest.raises(ValueError, match="'flux-dev' has no finetuned route"):
        finetune_target("flux-dev")


def test_a_finetuned_route_runs_on_its_base_models_catalog_entry(tmp_path: Path) -> None:
    override = tmp_path / "catalog.toml"
    override.write_text(
        '[models."flux-pro"]\nweights = "/models/flux1"\n'
        '[models."flux-2-klein-4b-finetuned"]\nweights = "/models/klein-lora-base"\n'
    )
    catalog = load_catalog([override])
    assert catalog.entry("flux-pro-finetuned") == catalog.entry("flux-pro")
    assert catalog.entry("flux-pro-finetuned").weights == "/models/flux1"
    assert catalog.entry("flux-pro-1.1-ultra-finetuned") == catalog.entry("flux-pro-1.1-ultra")
    assert catalog.entry("flux-2-klein-4b-finetuned").weights == "/models/klein-lora-base", (
        "its own entry wins"
    )


def test_an_adapter_is_read_from_its_header_and_checked_against_the_model(tmp_path: Path) -> None:
    weights = tmp_path / "model"
    (weights / "transformer").mkdir(parents=True)
    save_file(
        {"blocks.0.to_q.weight": np.zeros((8, 6), dtype=np.float32)},
        weights / "transformer" / "a.safetensors",
    )
    info = inspect(adapter_file(tmp_path / "ok.safetensors", {"blocks.0.to_q": (8, 6)}, rank=3))
    assert (info.layers, info.rank) == ({"blocks.0.to_q": (8, 6)}, 3)
    check_fits(info, weights, "ok")
    wrong = inspect(adapter_file(tmp_path / "wrong.safetensors", {"blocks.0.to_q": (6, 6)}))
    with pytest.raises(AdapterProblem, match="is 6x6 in the adapter but 8x6 in the model"):
        check_fits(wrong, weights, "wrong")
    with pytest.raises(AdapterProblem, match="above the limit of 100 bytes"):
        inspect(tmp_path / "ok.safetensors", max_bytes=100)
    (tmp_path / "empty.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterProblem, match="not a safetensors file"):
        inspect(tmp_path / "empty.safetensors")


@pytest.fixture
def database(tmp_path: Path) -> Engine:
    engine = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    return engine


def test_a_key_sees_its_own_and_the_shared_finetunes(database: Engine, tmp_path: Path) -> None:
    keys = KeyStore(database)
    alice, bob = keys.create("alice").record, keys.create("bob").record
    blobs = LocalBlobStore(tmp_path / "files")
    shipped = Finetune("outlines", "flux-pro", None, "builtin:outlines", "0" * 64, 1, 4, "shipped", None)
    store = FinetuneStore(database, blobs, [shipped])
    own = store.add("alices", b"weights", "flux-pro", 4, alice.id, None)
    store.add("everyones", b"weights", "flux-2-klein-4b", 8, None, "shared")
    assert [f.name for f in store.visible(alice.id)] == ["outlines", "alices", "everyones"]
    assert [f.name for f in store.visible(bob.id)] == ["outlines", "everyones"]
    assert store.find("alices", bob.id) is None and store.find("alices", alice.id) == own
    assert len(blobs.list("finetunes/")) == 1, "the same content is stored once"
    assert read_adapter(own.file, blobs, own.name) == b"weights"
    store.remove("alices")
    assert len(blobs.list("finetunes/")) == 1, "still the shared finetune's file"
    store.remove("everyones")
    assert blobs.list("finetunes/") == []
    with pytest.raises(EngineError, match="finetune_id: alices was removed after this job was submitted"):
        read_adapter(own.file, blobs, own.name)


@pytest.mark.parametrize(
    ("name", "message"),
    [("Has Caps", "lowercase letters"), ("outlines", "shipped finetune"), ("taken", "exists")],
)
def test_finetune_names_are_checked(database: Engine, tmp_path: Path, name: str, message: str) -> None:
    shipped = Finetune("outlines", "flux-pro", None, "builtin:outlines", "0" * 64, 1, 4, None, None)
    store = FinetuneStore(database, LocalBlobStore(tmp_path / "files"), [shipped])
    store.add("taken", b"weights", "flux-pro", 4, None, None)
    with pytest.raises(FinetuneProblem, match=message):
        store.add(name, b"other", "flux-pro", 4, None, None)
    with pytest.raises(FinetuneProblem, match="ships with fluxserve"):
        store.remove("outlines")

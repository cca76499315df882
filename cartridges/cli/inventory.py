"""``cartridges ls`` and ``cartridges inspect``: the promoted cartridges of a store and what they are bound to."""

from __future__ import annotations

import argparse
from typing import Any

from cartridges import layout
from cartridges.cli.common import (
    CLIError,
    Stored,
    add_command,
    check_name,
    find,
    find_promoted,
    generation_options,
    human_bytes,
    names,
    open_store,
    print_json,
    sha256_mismatch,
    store_options,
)
from cartridges.store import ObjectNotFound, Store


def describe(stored: Stored) -> dict[str, Any]:
    m = stored.manifest
    return {
        "name": stored.name,
        "generation": stored.pointer.generation,
        "prefix": stored.pointer.prefix,
        "p": m.p,
        "frozenTokens": m.frozen_tokens,
        "dtype": m.dtype,
        "bytes": m.file_bytes,
        "sha256": m.file_sha256,
        "baseModel": m.base_model.model_id,
        "baseModelSha256": m.base_model.weights_sha256,
        "corpusDigest": m.corpus_digest,
        "scores": m.metrics,
    }


def _recovered(scores: dict[str, Any]) -> str:
    return _score(scores.get("iclGainRecovered"), ".0%")


def _score(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec``, or ``-`` when it is not a number (absent, null, text, a bool): a manifest is
    data anyone with write access to the store can change, and one odd score must not abort ``ls`` or ``inspect``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return format(value, spec)


def describe_or_error(store: Store, root: str, namespace: str, name: str) -> dict[str, Any]:
    """``describe`` of one listed cartridge, or ``{"name", "error"}`` when it cannot be read: one broken cartridge
    (a lost manifest, a damaged current.json) must not hide the others."""
    try:
        return describe(find(store, root, namespace, name))
    except CLIError as err:
        return {"name": name, "error": str(err)}


def run_ls(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    found = [describe_or_error(store, args.store, args.namespace, n) for n in names(store, args.store, args.namespace)]
    if args.json:
        print_json(found)
        return 0
    if not found:
        print(f"no cartridges in {args.store} (namespace {args.namespace}); `cartridges train` makes one")
        return 0
    header = f"{'NAME':<24} {'GEN':>3} {'P':>5} {'SIZE':>10}  {'BASE MODEL':<28} {'CORPUS':<14} {'ICL GAIN':>8}"
    print(header)
    for c in found:
        print(f"{c['name']:<24} BROKEN: {c['error']}" if "error" in c else _row(c))
    return 0


def _row(c: dict[str, Any]) -> str:
    return (
        f"{c['name']:<24} {c['generation']:>3} {c['p']:>5} {human_bytes(c['bytes']):>10}  "
        f"{c['baseModel'][:28]:<28} {(c['corpusDigest'] or '-')[:12]:<14} {_recovered(c['scores']):>8}"
    )


def _progress(store: Store, prefix: str) -> dict[str, Any] | None:
    """The generation's training progress; None when there is none, or it is damaged (not UTF-8 JSON, or not a
    progress record): a side note of ``inspect``, which must still show the cartridge."""
    try:
        return layout.Progress.model_validate(store.get_json(f"{prefix}/{layout.PROGRESS_FILE}")).model_dump()
    except (ObjectNotFound, ValueError):
        return None


def _refused(stored: Stored) -> str | None:
    """Why ask, eval, quantize and serving refuse what ``inspect`` shows, when the manifest read already tells."""
    mismatch = sha256_mismatch(stored, stored.manifest)
    if mismatch is None:
        return None
    return f"{mismatch}; ask, eval, quantize and serving refuse it until a new generation is promoted (train --force)"


def run_inspect(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    name = check_name(args.name)
    stored = find(store, args.store, args.namespace, name, args.generation)
    promoted = stored if args.generation is None else find_promoted(store, args.store, args.namespace, name)
    info = {
        **describe(stored),
        "promoted": promoted is not None and promoted.pointer.generation == stored.pointer.generation,
        "training": stored.manifest.training,
        "progress": _progress(store, stored.pointer.prefix),
        "warning": _refused(stored),
    }
    if args.json:
        print_json(info)
        return 0
    keys = ("name", "generation", "promoted", "prefix", "p", "frozenTokens", "dtype", "sha256", "baseModel")
    for key in (*keys, "corpusDigest"):
        print(f"{key + ':':<15} {info[key]}")
    print(f"{'size:':<15} {human_bytes(info['bytes'])}")
    if info["warning"]:
        print(f"{'warning:':<15} {info['warning']}")
    scores = info["scores"]
    if scores:
        print(
            f"{'scores:':<15} answer NLL/token on held-out self-study questions: no context "
            f"{_score(scores.get('noContext'), '.3f')}, ICL {_score(scores.get('icl'), '.3f')}, "
            f"cartridge {_score(scores.get('cartridge'), '.3f')} (ICL gain recovered {_recovered(scores)})"
        )
    spec = info["training"].get("spec", {})
    if spec:
        study, training = spec.get("selfStudy", {}), spec.get("training", {})
        steps = info["training"].get("steps", training.get("steps"))  # the steps run: spec.training.epochs came to
        epochs = f" ({training['epochs']} epochs)" if training.get("epochs") else ""
        print(
            f"{'training:':<15} {study.get('conversations')} conversations, {steps} steps{epochs}, "
            f"batch {training.get('batchSize')}, lr {training.get('learningRate')}"
        )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "ls",
        summary="list the cartridges in a store",
        description="List promoted cartridges: generation, p, size, base model, corpus digest, ICL gain recovered.",
        examples=("cartridges ls", "cartridges ls --store s3://cartridges --namespace team-a --json"),
        parents=[store_options()],
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.set_defaults(func=run_ls)
    parser = add_command(
        commands,
        "inspect",
        summary="show one cartridge's manifest, scores and training",
        description="Show a promoted cartridge, or the stored generation --generation names: artifact, base model "
        "fingerprint, corpus, scores, training spec.",
        examples=(
            "cartridges inspect handbook",
            "cartridges inspect handbook --json | jq .scores",
            "cartridges inspect handbook --generation 1",
        ),
        parents=[store_options(), generation_options()],
    )
    parser.add_argument("name", help="the cartridge to show")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    parser.set_defaults(func=run_inspect)

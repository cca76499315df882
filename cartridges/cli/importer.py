"""``cartridges import``: a cartridge trained elsewhere (reference ``.pt`` or PEFT prefix adapter) into a store."""

from __future__ import annotations

import argparse
from pathlib import Path

from cartridges.cli.common import (
    EXIT_NOT_FOUND,
    CLIError,
    add_command,
    check_name,
    load_model,
    model_options,
    open_store,
    print_json,
    publish_generation,
    store_options,
)
from cartridges.cli.inventory import describe


def run(args: argparse.Namespace) -> int:
    from cartridges.importers import import_cartridge

    name = check_name(args.name)
    if not args.file.exists():
        raise CLIError(f"{args.file}: no such file or directory", EXIT_NOT_FOUND)
    store = open_store(args.store)
    cartridge = import_cartridge(args.file)
    lm = load_model(args.model, store)
    training = {"importedFrom": args.file.name}
    stored = publish_generation(store, args.store, args.namespace, name, cartridge, lm.fingerprint, training)
    if args.json:
        print_json(describe(stored))
    else:
        manifest = stored.manifest
        print(
            f"{name}: imported {args.file} as generation {stored.pointer.generation} "
            f"(p={manifest.p}, {manifest.base_model.model_id})"
        )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "import",
        summary="import a reference-implementation .pt cartridge or a PEFT prefix-tuning adapter",
        description="Convert a cartridge trained elsewhere into this product's format, bound to --model, and "
        "promote it: a .pt of the reference implementation (trainable_keys/values, optional frozen_*), or a PEFT "
        "prefix-tuning adapter directory (adapter_config.json + adapter_model.safetensors, as save_pretrained "
        "writes it). The tensors must fit the model's layers, KV heads and head dimension.",
        examples=(
            "cartridges import handbook cache-step-2000.pt",
            "cartridges import notes ./prefix-adapter/ --json",
        ),
        parents=[store_options(), model_options()],
    )
    parser.add_argument("name", help="name to give the cartridge")
    parser.add_argument("file", type=Path, help="the reference .pt file or the PEFT adapter directory")
    parser.add_argument("--json", action="store_true", help="print the imported cartridge as JSON")
    parser.set_defaults(func=run)

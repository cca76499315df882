"""``cartridges quantize``: a promoted cartridge stored again in int8 or fp8, as a new promoted generation."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from cartridges.cli.common import (
    EXIT_INPUT,
    CLIError,
    add_command,
    check_name,
    download_promoted,
    find,
    find_promoted,
    generation_options,
    human_bytes,
    open_store,
    print_json,
    publish_generation,
    store_options,
)
from cartridges.cli.evaluate import records_its_corpus
from cartridges.cli.inventory import describe


def run(args: argparse.Namespace) -> int:
    from cartridges.artifact import load_cartridge, quantize_cartridge

    name = check_name(args.name)
    store = open_store(args.store)
    source = find(store, args.store, args.namespace, name, args.generation)
    promoted = find_promoted(store, args.store, args.namespace, name) if args.generation else None
    replaced = promoted.pointer.generation if promoted else None
    if source.manifest.quantization is not None:
        raise CLIError(
            f"{name} generation {source.pointer.generation} is already stored in {source.manifest.dtype}; "
            "quantize a generation trained without quantization",
            EXIT_INPUT,
        )
    with tempfile.TemporaryDirectory(prefix="cartridges-quantize-") as tmp:
        download_promoted(store, source, Path(tmp))
        dense, manifest = load_cartridge(Path(tmp))
    training = {**manifest.training, "quantizedFrom": source.pointer.generation}
    if spec := manifest.training.get("spec"):  # as if trained with spec.quantization (`train` compares it)
        training["spec"] = {**spec, "quantization": args.format}
    try:
        quantized = quantize_cartridge(dense, args.format, args.keys, args.values)
    except ValueError as err:  # inf or NaN in the stored keys/values: nothing can scale them
        raise CLIError(f"{name} generation {source.pointer.generation}: {err}; retrain it", EXIT_INPUT) from err
    # no metrics: the source's scores are not this cartridge's; `cartridges eval` measures it
    stored = publish_generation(
        store, args.store, args.namespace, name, quantized, manifest.base_model, training, manifest.corpus_digest
    )
    if replaced not in (None, source.pointer.generation):  # what is served changes to an earlier generation's text
        print(
            f"{name}: generation {stored.pointer.generation} (from {source.pointer.generation}) is promoted in place "
            f"of generation {replaced}",
            file=sys.stderr,
        )
    if args.json:
        print_json({**describe(stored), "quantizedFrom": source.pointer.generation})
        return 0
    print(
        f"{name}: generation {stored.pointer.generation} is generation {source.pointer.generation} in {args.format} "
        f"({human_bytes(source.manifest.file_bytes)} -> {human_bytes(stored.manifest.file_bytes)}); "
        f"`cartridges eval {name} --qa FILE{'' if records_its_corpus(stored) else ' --corpus FILES'}` "
        "measures what it costs"
    )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "quantize",
        summary="store a promoted cartridge in int8 or fp8 as a new generation",
        description="Quantize the promoted generation of a cartridge, or the stored one --generation names "
        "(absmax scales, keys per channel and values per token by default), and promote the result as a new "
        "generation: one byte per element, half the bytes of bf16 to store and for the attention kernels to "
        "read, which dequantize on load. For a local "
        "store; in a cluster set spec.quantization on the Cartridge, so the trainer stores and scores it.",
        examples=(
            "cartridges quantize handbook",
            "cartridges quantize handbook --format fp8 --json",
            "cartridges quantize handbook --generation 2",
        ),
        parents=[store_options(), generation_options()],
    )
    parser.add_argument("name", help="the cartridge to quantize")
    parser.add_argument("--format", choices=["int8", "fp8"], default="int8", help="stored format (default: int8)")
    parser.add_argument("--keys", choices=["channel", "token"], default="channel", help="key scales (default: channel)")
    parser.add_argument("--values", choices=["token", "channel"], default="token", help="value scales (default: token)")
    parser.add_argument("--json", action="store_true", help="print the new generation as JSON")
    parser.set_defaults(func=run)

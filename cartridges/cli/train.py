"""``cartridges train``: corpus files → a trained, promoted cartridge in a store (the trainer, in this process)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from cartridges import api, layout
from cartridges.cli.common import (
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    CLIError,
    Stored,
    add_command,
    check_name,
    find,
    human_bytes,
    load_model,
    model_options,
    model_source,
    open_store,
    print_json,
    promote,
    read_document,
    store_options,
)
from cartridges.corpus import NormalizedCorpus, normalize_text, publish
from cartridges.store import ObjectNotFound, Store

if TYPE_CHECKING:
    from cartridges.models import LoadedModel


@dataclass(frozen=True)
class Budget:
    """How much self-study to do: the knobs that set training time on a CPU."""

    size: int
    conversations: int
    steps: int
    batch: int
    chunk_tokens: tuple[int, int]
    question_tokens: int  # a grounded task's quote is cut to it: 64 keeps most sentences and a blank's instruction
    answer_tokens: int
    sequence_length: int = 512

    def spec(self, model: api.BaseModelRef, corpus: str) -> api.CartridgeSpec:
        return api.CartridgeSpec(
            corpusRefs=[api.CorpusRef(name=corpus)],
            baseModel=model,
            size=self.size,
            selfStudy=api.SelfStudy(
                conversations=self.conversations,
                minChunkTokens=self.chunk_tokens[0],
                maxChunkTokens=self.chunk_tokens[1],
                seedPrompts=["question", "summarization", "structuring"],
                topK=16,
            ),
            training=api.Training(
                steps=self.steps, learningRate=0.02, batchSize=self.batch, sequenceLength=self.sequence_length
            ),
            resources=api.Resources(gpus=0),
        )


BUDGETS = {
    # `cartridges demo --quick` (its duration: demo.DURATIONS): the cartridge moves towards ICL
    "small": Budget(
        size=64, conversations=16, steps=16, batch=4, chunk_tokens=(128, 256), question_tokens=64, answer_tokens=32
    ),
    # the demo's default (its duration: demo.DURATIONS)
    "medium": Budget(
        size=128, conversations=128, steps=192, batch=8, chunk_tokens=(256, 512), question_tokens=64, answer_tokens=48
    ),
}


def read_files(paths: list[Path]) -> NormalizedCorpus:
    """Every file (directories recursively, hidden files skipped) as one normalized document each, its id the path
    relative to ``_id_base`` (so ``a/readme.md b/readme.md`` are two documents, not one id twice)."""
    documents: list[layout.Document] = []
    for path in paths:
        if not path.exists():
            raise CLIError(f"{path}: no such file or directory", EXIT_NOT_FOUND)
    base, ids = _id_base(paths), set[str]()
    for path in paths:
        files = (
            [f for f in sorted(path.rglob("*")) if f.is_file() and not _hidden(f.relative_to(path))]
            if path.is_dir()
            else [path]
        )
        if not files:
            raise CLIError(
                f"{path}: the directory holds no files (hidden files and directories are skipped)", EXIT_NOT_FOUND
            )
        for file in files:
            doc_id = Path(os.path.abspath(file)).relative_to(base).as_posix()
            if doc_id in ids:
                raise CLIError(f"{file}: given twice (as {doc_id})", EXIT_USAGE)
            ids.add(doc_id)
            documents.append(layout.Document(id=doc_id, text=normalize_text(file.read_bytes(), str(file))))
    return NormalizedCorpus.of(documents)


def _id_base(paths: list[Path]) -> Path:
    """What document ids are relative to: a single directory itself, else the common parent of everything given."""
    absolute = [Path(os.path.abspath(p)) for p in paths]  # not resolve(): a symlink stays where it was given
    if len(absolute) == 1 and absolute[0].is_dir():
        return absolute[0]
    return Path(os.path.commonpath([p.parent for p in absolute]))


def default_description(corpus: NormalizedCorpus) -> str:
    """The description of a corpus given none: what it holds."""
    return f"the documents {', '.join(d.id for d in corpus.documents)}"


def _hidden(relative: Path) -> bool:
    """Whether a path inside a corpus directory is hidden or lies in a hidden directory (.git/, sub/.DS_Store)."""
    return any(part.startswith(".") for part in relative.parts)


def train_cartridge(
    store: Store,
    root: str,
    namespace: str,
    name: str,
    corpus: NormalizedCorpus,
    description: str,
    model: str,
    budget: Budget,
    *,
    lm: LoadedModel | None = None,
    force: bool = False,
    quantization: api.StorageQuantization = "none",
) -> tuple[Stored, bool]:
    """Store the corpus, train a new generation and promote it; returns it and whether it was trained now.

    Without ``force``, a promoted cartridge already trained on this corpus, description and spec is kept.
    """
    from cartridges.contract import TrainerConfig
    from cartridges_trainer import TrainerOptions, train
    from cartridges_trainer.pipeline import training_inputs

    source = model_source(model)
    model_ref = api.BaseModelRef(name=model if model in ("smollm2", "tiny") else "custom", uri=_as_uri(source))
    # the spec first: a bad --size or --steps is refused before anything is stored (or the store's state matters)
    spec = budget.spec(model_ref, name).model_copy(update={"quantization": quantization})
    store.ensure_bucket(root)
    corpus_prefix = layout.corpus_prefix(root, namespace, name, corpus.digest)
    publish(corpus, description, store, corpus_prefix)
    if not force:
        try:
            current = find(store, root, namespace, name)
        except CLIError:
            current = None
        if current and _trained_on(current, corpus.digest, description, spec):
            return current, False
    options = TrainerOptions(
        synthesis_batch_size=min(8, budget.conversations),
        max_question_tokens=budget.question_tokens,
        max_answer_tokens=budget.answer_tokens,
        checkpoint_every=max(1, budget.steps // 4),
        progress_interval_s=2.0,
    )
    config = TrainerConfig(
        namespace=namespace,
        cartridge=name,
        generation=_generation_to_train(store, root, namespace, name, training_inputs(spec, options, corpus.digest)),
        store_root=root,
        corpus_prefixes=[corpus_prefix],
        corpus_description=description,
        spec=spec,
    )
    manifest = train(config, store, options=options, model=lm or load_model(model, store))
    promote(store, root, namespace, name, config.generation, manifest, keep=spec.keepGenerations)
    return find(store, root, namespace, name), True


def _generation_to_train(store: Store, root: str, namespace: str, name: str, inputs: dict[str, object]) -> int:
    """The newest generation if it is unfinished (no manifest), newer than the promoted one and recorded as trained
    on ``inputs`` (an interrupted run of this same command: the trainer resumes its shards and checkpoint); else a
    new one. The trainer itself discards any state under the prefix that was made from other inputs."""
    generations = layout.stored_generations(store, root, namespace, name)
    if not generations:
        return 1
    newest = generations[-1]
    prefix = layout.generation_prefix(root, namespace, name, newest)
    try:
        recorded = store.get_json(f"{prefix}/{layout.TRAINING_INPUTS_FILE}")
    except (ObjectNotFound, ValueError):  # ValueError: damaged (not UTF-8 JSON), so no record of these inputs
        recorded = None
    promoted = _promoted_generation(store, root, namespace, name)
    newer = promoted is None or newest > promoted
    unfinished = newer and not store.exists(f"{prefix}/{layout.MANIFEST_FILE}")
    same = isinstance(recorded, dict) and all(recorded.get(key) == value for key, value in inputs.items())
    return newest if unfinished and same else newest + 1


def _promoted_generation(store: Store, root: str, namespace: str, name: str) -> int | None:
    """The promoted generation's number; None when none is, or when ``current.json`` cannot be read: promoting
    the generation trained now replaces it (training again is how it is mended), and that generation is numbered
    after the stored ones whatever the pointer said, so none is overwritten."""
    try:
        return read_document(store, layout.current_pointer(root, namespace, name), layout.Pointer).generation
    except ObjectNotFound:
        return None
    except CLIError as err:
        print(f"{name}: ignoring the promoted pointer: {err}; the generation trained now replaces it", file=sys.stderr)
        return None


def _as_uri(source: str) -> str:
    return source if "://" in source else f"file://{source}"


def _trained_on(stored: Stored, corpus_digest: str, description: str, spec: api.CartridgeSpec) -> bool:
    """Whether the stored generation was trained on this corpus, described so (the description is in every
    self-study prompt, so another one trains another cartridge) and with this spec."""
    trained_description = stored.manifest.training.get("corpus_description")
    return (
        stored.manifest.corpus_digest == corpus_digest
        and trained_description == description
        and _same_spec(stored, spec)
    )


def _same_spec(stored: Stored, spec: api.CartridgeSpec) -> bool:
    """Whether the stored generation was trained on these inputs (retention and the like do not count)."""
    try:
        trained = api.CartridgeSpec.model_validate(stored.manifest.training.get("spec") or {})
    except ValidationError:  # trained under a spec this version no longer reads
        return False
    return trained.training_inputs() == spec.training_inputs()


def summary(stored: Stored) -> dict[str, object]:
    m = stored.manifest
    return {
        "name": stored.name,
        "generation": stored.pointer.generation,
        "prefix": stored.pointer.prefix,
        "p": m.p,
        "bytes": m.file_bytes,
        "baseModel": m.base_model.model_id,
        "corpusDigest": m.corpus_digest,
        "scores": m.metrics,
    }


def run(args: argparse.Namespace) -> int:
    name = check_name(args.name)
    store = open_store(args.store)
    corpus = read_files(args.paths)
    budget = BUDGETS[args.budget]
    overrides = {k: v for k, v in (("size", args.size), ("steps", args.steps)) if v is not None}
    budget = Budget(**{**budget.__dict__, **overrides})
    description = args.description or default_description(corpus)
    stored, trained = train_cartridge(
        store,
        args.store,
        args.namespace,
        name,
        corpus,
        description,
        args.model,
        budget,
        force=args.force,
        quantization=args.quantization,
    )
    if args.json:
        print_json({**summary(stored), "trained": trained})
        return 0
    verb = "trained" if trained else "already trained (use --force to train again)"
    scores = stored.manifest.metrics
    print(
        f"{name}: {verb}: generation {stored.pointer.generation}, p={stored.manifest.p}, "
        f"{human_bytes(stored.manifest.file_bytes)}, ICL gain recovered "
        f"{api.recovered_text(scores.get('iclGainRecovered'), scores.get('icl') is not None)} on held-out self-study "
        "questions"
    )
    print(f"  {stored.pointer.prefix}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "train",
        summary="train a cartridge on corpus files",
        description="Store the corpus, run self-study and distillation in this process, and promote the result.",
        examples=(
            "cartridges train handbook docs/               # every file under docs/, embedded SmolLM2",
            "cartridges train notes a.md b.txt --budget medium --size 256",
            "cartridges train handbook docs/ --store s3://cartridges   # with CARTRIDGES_S3_* set",
        ),
        parents=[store_options(), model_options()],
    )
    parser.add_argument("name", help="cartridge name (lowercase letters, digits, '-' and '.')")
    parser.add_argument("paths", nargs="+", type=Path, help="text files or directories (UTF-8)")
    parser.add_argument("--description", help="what the corpus is; used in the self-study prompts")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small", help="training budget (default: small)")
    parser.add_argument("--size", type=int, help="p, trainable KV tokens per layer (a multiple of 16)")
    parser.add_argument("--steps", type=int, help="distillation steps")
    parser.add_argument(
        "--quantization",
        choices=["none", "int8", "fp8"],
        default="none",
        help="store the cartridge in one byte per element (scored as stored; default: none)",
    )
    parser.add_argument("--force", action="store_true", help="train a new generation even if nothing changed")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run, resumes=True)

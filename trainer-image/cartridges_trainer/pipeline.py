"""One training generation end to end: corpus and model in, verified artifact and scores out (DESIGN.md §6)."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cartridges import layout
from cartridges.api import CartridgeSpec
from cartridges.artifact import (
    MANIFEST_FILE,
    CartridgeManifest,
    StoredCartridge,
    download_artifact,
    quantize_cartridge,
    save_cartridge,
    upload_artifact,
)
from cartridges.contract import TrainerConfig
from cartridges.layout import EVAL_FILE, TRAINING_INPUTS_FILE
from cartridges.manifest import ArtifactError
from cartridges.models import LoadedModel, ModelLoadError, load_base_model
from cartridges.store import BucketNotFound, ObjectNotFound, Store, StoreError
from cartridges_trainer.corpus import Corpus, load_corpus
from cartridges_trainer.distill import distill, initial_cartridge, load_chosen_checkpoint, load_or_discard_checkpoints
from cartridges_trainer.errors import InputError
from cartridges_trainer.evaluate import evaluate, unseen
from cartridges_trainer.options import TrainerOptions
from cartridges_trainer.parallel import World
from cartridges_trainer.progress import ProgressReporter
from cartridges_trainer.synthesis import (
    HELD_OUT,
    adopt_synthesis,
    check_chunk_fits,
    corpus_context,
    synthesis_inputs,
    synthesize,
    teacher_overhead,
)
from cartridges_trainer.workspace import Workspace

log = logging.getLogger(__name__)


def _check_fits(lm: LoadedModel, config: TrainerConfig, world: World) -> None:
    """Reject specs the model or the world cannot run before any compute is spent."""
    spec = config.spec
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    needed = spec.size + spec.training.sequenceLength
    if limit is not None and needed > limit:
        raise InputError(
            f"size {spec.size} + sequenceLength {spec.training.sequenceLength} = {needed} positions exceed "
            f"{lm.fingerprint.model_id}'s {limit}"
        )
    if spec.frozenTokens >= spec.size:
        raise InputError(f"frozenTokens {spec.frozenTokens} must be smaller than size {spec.size}")
    if spec.training.batchSize < world.size:
        raise InputError(f"batchSize {spec.training.batchSize} is smaller than the {world.size} data-parallel ranks")


def _load_model(config: TrainerConfig, store: Store, world: World) -> LoadedModel:
    """The base model; one that is missing or no model is bad input (a retry finds the same), as for the corpus."""
    on_gpu = world.device.type == "cuda"
    try:
        return load_base_model(
            config.spec.baseModel.uri,
            store=store,
            device=world.device,
            dtype=torch.bfloat16 if on_gpu else torch.float32,
        )
    except ModelLoadError as err:
        raise InputError(str(err)) from err
    except (ObjectNotFound, BucketNotFound) as err:
        raise InputError(f"base model not found: {err}") from err


def training_inputs(spec: CartridgeSpec, options: TrainerOptions, corpus_digest: str) -> dict[str, Any]:
    """What a generation trains on, as recorded in ``layout.TRAINING_INPUTS_FILE`` (beside the synthesis key and
    the ``key`` of it all): the spec's training inputs, the corpus and the options that change results (not the
    cadences). ``cartridges train`` compares them to resume an interrupted generation."""
    return {
        "spec": spec.training_inputs(),
        "corpus": corpus_digest,
        "options": options.model_dump(mode="json", exclude={"checkpoint_every", "progress_interval_s"}),
    }


def _recorded_inputs(config: TrainerConfig, options: TrainerOptions, synthesis: dict[str, Any]) -> dict[str, Any]:
    """:func:`training_inputs` with the synthesis inputs' key (model, corpus, selfStudy), and the sha256 of both as
    ``key``: what a checkpoint records, so only a run on the same inputs resumes it."""
    inputs = training_inputs(config.spec, options, synthesis["corpus"]["digest"]) | {"synthesis": synthesis["key"]}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return {"key": key, **inputs}


def _prepare_workspace(
    config: TrainerConfig,
    lm: LoadedModel,
    corpus: Corpus,
    options: TrainerOptions,
    workspace: Workspace,
    world: World,
) -> tuple[str | None, str, dict[str, Any] | None]:
    """Rank 0 discards what another run left under this prefix (checkpoints or shards of other inputs), copies the
    shards of the newest earlier generation of this cartridge made from the same inputs (a change of p, training or
    quantization needs no new synthesis) or records the inputs of the shards to come, and records the training
    inputs (``layout.TRAINING_INPUTS_FILE``); the other ranks wait for it, then load the very checkpoint it chose (its
    step shared through the world: every rank must resume from the same step). Returns the prefix the shards were
    copied from, the training inputs' key and the checkpoint to resume from (loaded once per rank: it is
    gigabytes)."""
    reused: str | None = None
    checkpoint: dict[str, Any] | None = None
    synthesis = synthesis_inputs(lm, corpus, config.spec.selfStudy, options)
    inputs = _recorded_inputs(config, options, synthesis)
    if world.is_main:
        checkpoint = load_or_discard_checkpoints(workspace, inputs["key"])
        workspace.store.put_json(workspace.uri(TRAINING_INPUTS_FILE), inputs)
        generations = layout.stored_generations(workspace.store, config.store_root, config.namespace, config.cartridge)
        earlier = [
            layout.generation_prefix(config.store_root, config.namespace, config.cartridge, g)
            for g in reversed(generations)
            if g < config.generation
        ]
        reused = adopt_synthesis(workspace, synthesis, earlier)
        if reused:
            log.info("synthesis shards copied from %s (same model, corpus and selfStudy)", reused)
    # rank 0's step, the others adding 0; the sum waits for rank 0 to finish the above, as a barrier would
    step = int(world.sum(checkpoint["step"] if checkpoint else 0))
    if not world.is_main and step:
        checkpoint = load_chosen_checkpoint(workspace, step, inputs["key"])
    return reused, inputs["key"], checkpoint


def train(
    config: TrainerConfig,
    store: Store,
    *,
    options: TrainerOptions | None = None,
    model: LoadedModel | None = None,
    workdir: Path | None = None,
    world: World | None = None,
) -> CartridgeManifest:
    """Train, evaluate and upload one generation into ``config.output_prefix``; returns the uploaded manifest.

    Idempotent: a generation whose manifest is already uploaded is returned as is (trained again when it does not
    read back); an interrupted one resumes from its synthesis shards and latest checkpoint. ``model`` skips loading
    ``spec.baseModel`` (tests, local use); ``world`` is the data-parallel group under ``torchrun`` (default: a
    single process).
    """
    options = options or TrainerOptions()
    world = world or World()
    prefix = config.output_prefix
    with tempfile.TemporaryDirectory(prefix="cartridges-trainer-") as tmp:
        local = workdir or Path(tmp)
        if store.exists(f"{prefix}/{MANIFEST_FILE}") and (finished := _finished(store, prefix, local / "existing")):
            log.info("%s is already trained; nothing to do", prefix)
            return finished
        progress = ProgressReporter(store, prefix, options.progress_interval_s, enabled=world.is_main)
        try:
            return _run(config, store, options, model, Workspace(store, prefix, local), progress, world)
        except Exception as err:
            _report_failure(progress, err)
            raise


def _finished(store: Store, prefix: str, directory: Path) -> CartridgeManifest | None:
    """The generation stored under ``prefix``, or None when it does not read back (a corrupt manifest, corrupt or
    missing tensors). That is trained again, resuming from its shards and last checkpoint: it costs the evaluation
    and upload, and converges, where a failure would be retried forever and an input error would wait for someone
    to delete the objects. The upload overwrites the tensors, then the manifest: it is again written last."""
    try:
        return download_artifact(store, prefix, directory)
    except (ArtifactError, ObjectNotFound) as err:
        log.warning("%s: the stored generation does not read back (%s); training it again", prefix, err)
        return None


def _report_failure(progress: ProgressReporter, err: Exception) -> None:
    """Write the "failed" progress, best effort: ``err`` decides the exit code (bad input fails the Job for good),
    not a store that cannot take the note (it is often what failed)."""
    try:
        progress.finish("failed", f"{type(err).__name__}: {err}"[:1000])
    except StoreError as write_error:
        log.warning("cannot write the failed progress: %s", write_error)


def _run(
    config: TrainerConfig,
    store: Store,
    options: TrainerOptions,
    model: LoadedModel | None,
    workspace: Workspace,
    progress: ProgressReporter,
    world: World,
) -> CartridgeManifest:
    spec = config.spec
    progress.phase("starting", message="loading model and corpus")
    lm = model or _load_model(config, store, world)
    _check_fits(lm, config, world)
    corpus = load_corpus(store, config.corpus_prefixes, config.corpus_description, lm.tokenizer)
    overhead = teacher_overhead(lm, corpus.description, spec.selfStudy, options)
    check_chunk_fits(lm, spec.selfStudy, min(spec.selfStudy.maxChunkTokens, len(corpus.tokens)), overhead)
    init = initial_cartridge(lm, corpus, spec, options.seed)

    started = time.monotonic()
    reused, inputs_key, checkpoint = _prepare_workspace(config, lm, corpus, options, workspace, world)
    train_shards, eval_shards = synthesize(lm, corpus, spec.selfStudy, options, workspace, progress, world)
    synthesis_rate = progress.progress.tokens_per_s  # None when every shard was already stored
    stats: dict[str, float | int | None] = {"synthesis_seconds": time.monotonic() - started}
    conversations = [c for shard in train_shards for c in shard.conversations]
    started = time.monotonic()
    cartridge, distill_stats = distill(
        lm, init, conversations, spec, options, workspace, progress, world, inputs_key, checkpoint
    )
    del checkpoint  # gigabytes with the Adam state: not held through evaluation and upload
    stats |= distill_stats | {"distill_seconds": time.monotonic() - started}
    rates = {"synthesis_tokens_per_s": synthesis_rate, "distill_tokens_per_s": progress.progress.tokens_per_s}
    if not world.is_main:
        world.barrier()  # rank 0 evaluates and uploads
        return download_artifact(store, workspace.prefix, workspace.path("artifact"))

    steps = int(distill_stats["steps"] or 0)  # spec.training.steps, or what its epochs came to
    progress.phase("evaluating", total=steps, done=steps)
    context = corpus_context(lm, corpus)
    held_out, dropped = unseen(train_shards, eval_shards)
    served: StoredCartridge = cartridge
    if spec.quantization == "none":
        scores = evaluate(lm, cartridge, held_out, context)
    else:
        served = quantize_cartridge(cartridge, spec.quantization)
        dtype = cartridge.keys[0].dtype
        scores = evaluate(lm, served.dequantize(dtype), held_out, context, unquantized=cartridge)
    scores |= {
        "heldOut": HELD_OUT[spec.selfStudy.recipe],
        "heldOutConversations": sum(len(s.conversations) for s in held_out),
        "heldOutDroppedAsTrained": dropped,
    }
    store.put_json(workspace.uri(EVAL_FILE), scores)

    progress.phase("uploading", total=steps, done=steps)
    artifact = workspace.path("artifact")
    manifest = save_cartridge(
        served,
        artifact,
        lm.fingerprint,
        corpus_digest=corpus.digest,
        training={
            "spec": spec.model_dump(mode="json"),
            "corpus_description": corpus.description,  # what the prompts said; the stored corpus keeps its first
            "options": options.model_dump(),
            "synthesis_from": reused,
            "training_hash": config.training_hash,
            **stats,
            **rates,
        },
        metrics=scores,
    )
    upload_artifact(store, artifact, workspace.prefix)
    progress.finish("done", f"iclGainRecovered={scores['iclGainRecovered']}")
    world.barrier()
    return manifest

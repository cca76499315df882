"""Context distillation into a trainable cartridge, from stored teacher top-k (no teacher forward while training).

Batches are a pure function of (seed, step) (training by epochs: of the epochs' permutations, seeded too), so a run
resumed from a checkpoint (cartridge rows, Adam state, step) continues with exactly the batches it would have seen;
no RNG state needs saving.
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import re
import shutil
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch

from cartridges.api import CartridgeSpec, Training
from cartridges.artifact import Cartridge
from cartridges.kvcache import prefix_cartridge
from cartridges.models import LoadedModel
from cartridges.store import IntegrityError, StoreError
from cartridges_trainer.batching import Batch, Conversation, pack, target_logprobs
from cartridges_trainer.corpus import Corpus
from cartridges_trainer.errors import InputError
from cartridges_trainer.options import TrainerOptions
from cartridges_trainer.parallel import World
from cartridges_trainer.progress import ProgressReporter
from cartridges_trainer.stopping import STOP
from cartridges_trainer.workspace import Workspace

log = logging.getLogger(__name__)
CHECKPOINT_FOLDER = "checkpoints"
STATE_FILE = "state.pt"
CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_FOLDER}/step-(\d+)/{re.escape(STATE_FILE)}")
RANDOM_INIT_SCALE = 0.02
T = TypeVar("T")
_UNLOADABLE = (pickle.UnpicklingError, EOFError, KeyError, RuntimeError)  # RuntimeError: torch's, and StoreError


class TrainableCartridge(torch.nn.Module):
    """Float32 trainable rows per layer; the first ``frozen_tokens`` rows are plain tensors no optimizer sees."""

    def __init__(self, init: Cartridge) -> None:
        super().__init__()
        f = init.frozen_tokens
        self.frozen_tokens = f
        self.frozen_keys = [k[:, :f].detach().float().clone() for k in init.keys]
        self.frozen_values = [v[:, :f].detach().float().clone() for v in init.values]
        self.keys = torch.nn.ParameterList([torch.nn.Parameter(k[:, f:].detach().float().clone()) for k in init.keys])
        self.values = torch.nn.ParameterList(
            [torch.nn.Parameter(v[:, f:].detach().float().clone()) for v in init.values]
        )

    def cartridge(self, dtype: torch.dtype | None = None) -> Cartridge:
        """The full cartridge (frozen rows first), differentiable with respect to the trainable rows."""

        def join(frozen: list[torch.Tensor], trainable: torch.nn.ParameterList) -> list[torch.Tensor]:
            return [torch.cat([f, t], dim=1).to(dtype) for f, t in zip(frozen, trainable, strict=True)]

        return Cartridge(join(self.frozen_keys, self.keys), join(self.frozen_values, self.values), self.frozen_tokens)


def initial_cartridge(lm: LoadedModel, corpus: Corpus, spec: CartridgeSpec, seed: int) -> Cartridge:
    """The cartridge before training: KV of the first p corpus tokens, of a given text, or small random rows."""
    p, frozen, init = spec.size, spec.frozenTokens, spec.initialization
    if init.strategy == "random":
        fp = lm.fingerprint
        generator = torch.Generator().manual_seed(seed)
        shape = (fp.num_kv_heads, p, fp.head_dim)

        def rows() -> list[torch.Tensor]:
            return [torch.randn(shape, generator=generator) * RANDOM_INIT_SCALE for _ in range(fp.num_layers)]

        return Cartridge(rows(), rows(), frozen).to(lm.device, lm.model.dtype)
    if init.strategy == "text":
        tokens = lm.tokenizer(init.text or "", add_special_tokens=False)["input_ids"]
        if not tokens:
            raise InputError("initialization.text is empty after tokenization")
        tokens = (tokens * -(-p // len(tokens)))[:p]
    else:
        if len(corpus.tokens) < p:
            raise InputError(f"size p={p} is larger than the corpus ({len(corpus.tokens)} tokens); choose p <= that")
        tokens = corpus.tokens[:p]
    return prefix_cartridge(lm.model, tokens, frozen)


def distill_loss(logprobs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """-Σ_topk p_teacher · log q_student, averaged over answer tokens."""
    student = logprobs.gather(-1, batch.topk_ids)
    return -(batch.topk_logprobs.exp() * student).sum() / len(student)


def _gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    norms = [p.grad.norm() for p in parameters if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The total gradient norm, before scaling the gradients down to ``max_norm`` (when set and exceeded). Called on
    the summed gradients, so every rank clips alike and all take the same step."""
    if max_norm is None:
        return _gradient_norm(parameters)
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))


def _stop_if_diverged(loss: float, gradient_norm: float, step: int, training: Training) -> None:
    """A non-finite loss or gradient never comes back (Adam spreads it into every row), and retrying replays the
    same batches: stop for good, before the step reaches the cartridge, progress.json or a checkpoint, saying what
    to change."""
    if not (math.isfinite(loss) and math.isfinite(gradient_norm)):
        clipping = "set spec.training.maxGradNorm (e.g. 1.0)"
        if training.maxGradNorm is not None:
            clipping = f"lower spec.training.maxGradNorm (now {training.maxGradNorm})"
        raise InputError(
            f"training diverged at step {step}: the loss is {loss}, the gradient norm is {gradient_norm}; lower "
            f"spec.training.learningRate (now {training.learningRate}) or {clipping} to train a new generation"
        )


def _permutation(count: int, seed: int, index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randperm(count, generator=generator)


def step_batch(items: Sequence[T], batch_size: int, seed: int, step: int) -> list[T]:
    """The batch of one step: ``batch_size`` distinct conversations drawn with a generator seeded by the step."""
    return [items[i] for i in _permutation(len(items), seed, step)[:batch_size].tolist()]


_epoch_order = functools.lru_cache(maxsize=2)(_permutation)  # a batch spans two epochs (more: items < batch_size)


def epoch_batch(items: Sequence[T], batch_size: int, seed: int, step: int) -> list[T]:
    """The batch of one step when training by epochs: the next ``batch_size`` items of one permutation per epoch,
    back to back, so each epoch sees every item once (the last step of an epoch runs into the next one)."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [items[int(_epoch_order(len(items), seed, i // len(items))[i % len(items)])] for i in positions]


def _checkpoint_dir(step: int) -> str:
    return f"{CHECKPOINT_FOLDER}/step-{step:08d}"


@functools.cache
def _warn_not_a_checkpoint(uri: str) -> None:
    """Once per object and process: the folder is listed at every checkpoint save, and one stray object must not
    fill the log."""
    log.warning("ignoring %s: not a checkpoint (%s/step-<step>/%s)", uri, CHECKPOINT_FOLDER, STATE_FILE)


def _stored_steps(workspace: Workspace) -> list[int]:
    """The steps of the stored checkpoints, newest first. Other objects under the folder (another tool's) are
    ignored with a warning, not refused: that would fail every retry of the Job the same way."""
    steps = set()
    for name in workspace.names(CHECKPOINT_FOLDER):
        if match := CHECKPOINT_NAME.fullmatch(name):
            steps.add(int(match[1]))
        else:
            _warn_not_a_checkpoint(workspace.uri(name))
    return sorted(steps, reverse=True)


def _latest_checkpoint(workspace: Workspace) -> int | None:
    return next(iter(_stored_steps(workspace)), None)


def _save_checkpoint(
    workspace: Workspace,
    step: int,
    trainable: TrainableCartridge,
    optimizer: torch.optim.Optimizer,
    inputs_key: str,
    loss: float,
) -> None:
    """Upload the new checkpoint, then drop older ones: a kill in between leaves at least one complete checkpoint.

    The checkpoint records ``inputs_key`` (what the run trains on), so a run on other inputs never resumes it, and
    ``loss`` (the step's), so a run resumed after its last step still reports its final loss."""
    previous = _latest_checkpoint(workspace)
    name = _checkpoint_name(step)
    state = {"step": step, "inputs": inputs_key, "loss": loss, "cartridge": trainable.state_dict()}
    torch.save(state | {"optimizer": optimizer.state_dict()}, workspace.path(name))
    workspace.upload(name)
    if previous is not None and previous != step:
        workspace.delete(_checkpoint_dir(previous))


def _checkpoint_name(step: int) -> str:
    return f"{_checkpoint_dir(step)}/{STATE_FILE}"


def _load_state(workspace: Workspace, step: int) -> dict[str, Any]:
    """The checkpoint of ``step``, on the CPU (a GPU out of memory is no corrupt checkpoint)."""
    state: dict[str, Any] = torch.load(workspace.fetch(_checkpoint_name(step)), map_location="cpu", weights_only=True)
    return state


def _read_checkpoint(workspace: Workspace, step: int) -> dict[str, Any] | None:
    """The checkpoint of ``step``; ``None`` when its bytes do not load (altered or cut short in the store), after
    deleting it: every retry would fail on it the same way."""
    name = _checkpoint_name(step)
    try:
        state = _load_state(workspace, step)
    except _UNLOADABLE as err:
        if isinstance(err, StoreError) and not isinstance(err, IntegrityError):
            raise  # the store did not answer: a retry may read the checkpoint
        log.warning("checkpoint %s is unreadable (%s); discarding it", workspace.uri(name), err)
        workspace.delete(_checkpoint_dir(step))
        shutil.rmtree(workspace.local / _checkpoint_dir(step), ignore_errors=True)
        return None
    return state


def load_checkpoint(workspace: Workspace, inputs_key: str) -> dict[str, Any] | None:
    """The newest readable stored checkpoint if it was trained on ``inputs_key``, else ``None``."""
    for step in _stored_steps(workspace):
        if (state := _read_checkpoint(workspace, step)) is None:
            continue
        if state.get("inputs") != inputs_key:
            log.warning(
                "ignoring the checkpoint %s: it was trained on other inputs", workspace.uri(_checkpoint_dir(step))
            )
            return None
        return state
    return None


def load_or_discard_checkpoints(workspace: Workspace, inputs_key: str) -> dict[str, Any] | None:
    """:func:`load_checkpoint`, deleting every checkpoint under the workspace when the newest readable one was trained
    on other inputs: they were left by another run under this prefix (e.g. a cartridge deleted mid-training and
    created again on other inputs). Rank 0 calls it once at the start and hands the state to :func:`distill`: a
    checkpoint with Adam state is gigabytes, not to be loaded twice."""
    state = load_checkpoint(workspace, inputs_key)
    if state is None and _latest_checkpoint(workspace) is not None:
        log.warning("discarding the checkpoints under %s; training starts afresh", workspace.uri(CHECKPOINT_FOLDER))
        workspace.delete(CHECKPOINT_FOLDER)
        shutil.rmtree(workspace.local / CHECKPOINT_FOLDER, ignore_errors=True)
    return state


def load_chosen_checkpoint(workspace: Workspace, step: int, inputs_key: str) -> dict[str, Any]:
    """The checkpoint of ``step``, the one rank 0 chose with :func:`load_or_discard_checkpoints`, as another rank
    loads it: every rank must resume from the same step (or their collectives fall out of step and hang). Nothing is
    discarded here, since rank 0 read it: a failure (a store hiccup, a checkpoint changed meanwhile) is retryable."""
    uri = workspace.uri(_checkpoint_name(step))
    try:
        state = _load_state(workspace, step)
    except _UNLOADABLE as err:
        raise RuntimeError(f"cannot read {uri}, the checkpoint rank 0 resumes from: {err}") from err
    if state.get("step") != step or state.get("inputs") != inputs_key:
        raise RuntimeError(f"{uri} changed after rank 0 chose it to resume from")
    return state


def distill(
    lm: LoadedModel,
    init: Cartridge,
    conversations: Sequence[Conversation],
    spec: CartridgeSpec,
    options: TrainerOptions,
    workspace: Workspace,
    progress: ProgressReporter,
    world: World,
    inputs_key: str,
    checkpoint: dict[str, Any] | None,
) -> tuple[Cartridge, dict[str, float | int | None]]:
    """Train ``spec.training.steps`` Adam steps, or the steps its epochs come to, resuming from ``checkpoint`` (the
    state :func:`load_checkpoint` read, if any); the cartridge and run stats (``steps``: how many). New checkpoints
    record ``inputs_key``.

    With several ranks each takes its share of every step's batch; only rank 0 writes checkpoints. After SIGTERM
    every rank stops after the same step, checkpointed, and raises :class:`Interrupted` (KeyboardInterrupt after
    Ctrl-C alone).
    """
    training = spec.training
    data = [t for c in conversations if (t := c.truncated(training.sequenceLength)) is not None]
    if not data:
        raise InputError(f"no synthesized conversation fits sequenceLength={training.sequenceLength}")
    if training.epochs is None and len(data) < world.size:  # a step's batch holds each conversation once at most
        raise InputError(
            f"{len(data)} synthesized conversations fit sequenceLength={training.sequenceLength}, fewer than the "
            f"{world.size} data-parallel ranks, each of which needs one per step: synthesize more "
            "(synthesis.conversations), raise sequenceLength, train by epochs, or train on fewer GPUs"
        )
    lm.model.requires_grad_(False)  # a caller-supplied model may not be frozen; only cartridge rows train
    trainable = TrainableCartridge(init)
    optimizer = torch.optim.Adam(trainable.parameters(), lr=training.learningRate)
    start = 0
    # The last step's loss. A checkpoint saved before checkpoints recorded it gives None (null in the manifest:
    # unknown), which the loop replaces unless the run resumes after its last step; never NaN (not valid JSON).
    loss_value: float | None = None
    if checkpoint is not None:
        trainable.load_state_dict(checkpoint["cartridge"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start = int(checkpoint["step"])
        loss_value = checkpoint.get("loss")
        log.info("resuming distillation at step %d", start)
    pad_id = lm.tokenizer.pad_token_id or 0
    total = training.total_steps(len(data))
    batch_of = step_batch if training.epochs is None else epoch_batch
    progress.phase("training", total=total, done=start)
    with STOP.deferred():
        for step in range(start, total):
            share = batch_of(data, training.batchSize, options.seed, step)[world.rank :: world.size]
            batch = pack(share, pad_id, lm.device, training.sequenceLength)
            loss = distill_loss(target_logprobs(lm.model, batch, trainable.cartridge(lm.model.dtype)), batch)
            loss = loss * (len(batch.targets) / world.sum(len(batch.targets)))  # this rank's share of the loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            world.sum_gradients(trainable.parameters())
            loss_value = world.sum(loss.item())
            gradient_norm = _clip_gradients(list(trainable.parameters()), training.maxGradNorm)
            _stop_if_diverged(loss_value, gradient_norm, step + 1, training)
            optimizer.step()
            progress.advance(step + 1, tokens=int(world.sum(batch.tokens)), loss=loss_value)
            stopping = world.any(STOP.stopping)  # ranks get SIGTERM at different moments: all stop at one step
            due = (step + 1) % options.checkpoint_every == 0 or step + 1 == total
            if world.is_main and (due or stopping):
                _save_checkpoint(workspace, step + 1, trainable, optimizer, inputs_key, loss_value)
            if stopping:
                interruption = STOP.interruption()
                stopped_by = "Ctrl-C" if isinstance(interruption, KeyboardInterrupt) else "SIGTERM"
                progress.finish(
                    "training", f"stopped by {stopped_by} after step {step + 1}, checkpointed; resumes there"
                )
                raise interruption
    stats: dict[str, float | int | None] = {
        "steps": total,
        "resumed_from_step": start,
        "final_loss": loss_value,
    }
    return trainable.cartridge(lm.model.dtype), stats

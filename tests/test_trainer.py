"""The self-study trainer on the tiny random Llama: synthesis, loss, distillation, resume, evaluation, exit codes."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from _cartridge_store import put_model
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cartridges import api
from cartridges.artifact import Cartridge, QuantizedCartridge, download_artifact, load_cartridge, load_stored_cartridge
from cartridges.chat import render
from cartridges.contract import EXIT_INTERRUPTED, EXIT_OK, EXIT_PERMANENT, TRAINER_GRACE_S, TrainerConfig
from cartridges.hashing import sha256_bytes
from cartridges.kvcache import compose, forward_with_cartridge, prefix_cartridge
from cartridges.layout import CORPUS_FILE, EVAL_FILE, MANIFEST_FILE, PROGRESS_FILE, CorpusManifest, Progress
from cartridges.models import LoadedModel, load_base_model, tiny_llama
from cartridges.store import IntegrityError, Store, StoreError, StoreUnavailable, StoreURI
from cartridges_trainer import TrainerOptions, train
from cartridges_trainer import distill as distill_module
from cartridges_trainer import evaluate as evaluate_module
from cartridges_trainer import pipeline as pipeline_module
from cartridges_trainer import synthesis as synthesis_module
from cartridges_trainer.__main__ import main
from cartridges_trainer.batching import Conversation, pack, target_logprobs
from cartridges_trainer.corpus import Corpus, load_corpus
from cartridges_trainer.distill import (
    TrainableCartridge,
    distill,
    distill_loss,
    epoch_batch,
    initial_cartridge,
    load_checkpoint,
    step_batch,
)
from cartridges_trainer.errors import InputError
from cartridges_trainer.evaluate import evaluate, unseen
from cartridges_trainer.parallel import World
from cartridges_trainer.pipeline import _prepare_workspace
from cartridges_trainer.progress import ProgressReporter
from cartridges_trainer.prompts import system_prompt
from cartridges_trainer.stopping import StopRequest
from cartridges_trainer.synthesis import (
    HELD_OUT,
    Shard,
    corpus_context,
    shard_names,
    synthesize_shard,
    teacher_overhead,
)
from cartridges_trainer.workspace import Workspace

if TYPE_CHECKING:
    from cartridges_e2e.minio import MinioServer

CORPUS_TEXT = (
    "The lighthouse of Varnholm was lit in 1873 by keeper Ilse Marrow. Its lens came from a foundry in Ostrava. "
    "Every winter the keeper logged the ice on the fjord, and in 1901 the ice reached the harbour wall. "
) * 3
OPTIONS = TrainerOptions(
    synthesis_batch_size=4,
    max_question_tokens=8,
    max_answer_tokens=12,
    checkpoint_every=2,
    progress_interval_s=0.0,
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model is dominated by thread overhead; one thread is many times faster on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def put_corpus(store: Store, root: str, name: str, texts: list[str] | bytes) -> str:
    """Write a normalized corpus the way the corpus reconciler does (or raw bytes); returns its prefix."""
    lines = texts if isinstance(texts, bytes) else [json.dumps({"id": str(i), "text": t}) for i, t in enumerate(texts)]
    data = lines if isinstance(lines, bytes) else "".join(f"{line}\n" for line in lines).encode()
    prefix = f"{root.rstrip('/')}/corpora/default/{name}/{sha256_bytes(data)}"
    manifest = CorpusManifest(
        digest=sha256_bytes(data), documents=len(texts), bytes=len(data), description="the Varnholm lighthouse"
    )
    store.put_bytes(f"{prefix}/{CORPUS_FILE}", data)
    store.put_json(f"{prefix}/{MANIFEST_FILE}", manifest.model_dump())
    return prefix


def make_config(
    root: str, corpus_prefix: str, *, steps: int = 4, size: int = 16, conversations: int = 8, epochs: int | None = None
) -> TrainerConfig:
    """Training for ``steps``, or for ``epochs`` when given."""
    spec = api.CartridgeSpec(
        corpusRefs=[api.CorpusRef(name="lighthouse")],
        baseModel=api.BaseModelRef(name="tiny", uri=f"{root.rstrip('/')}/models/tiny"),
        size=size,
        selfStudy=api.SelfStudy(conversations=conversations, minChunkTokens=16, maxChunkTokens=64, topK=4),
        training=api.Training(
            steps=None if epochs else steps, epochs=epochs, learningRate=1e-2, batchSize=4, sequenceLength=256
        ),
    )
    return TrainerConfig(
        namespace="default",
        cartridge="lighthouse",
        generation=1,
        store_root=root,
        corpus_prefixes=[corpus_prefix],
        corpus_description="the Varnholm lighthouse",
        spec=spec,
    )


def tiny_corpus(lm: LoadedModel) -> Corpus:
    return Corpus("the Varnholm lighthouse", lm.tokenizer(CORPUS_TEXT, add_special_tokens=False)["input_ids"], "d")


STUDY = api.SelfStudy(minChunkTokens=16, maxChunkTokens=64, topK=4)


@pytest.fixture(scope="module")
def shard(tiny_model: LoadedModel) -> Shard:
    """A shard of the paper's recipe (generated questions and greedy answers)."""
    torch.set_num_threads(1)
    study = STUDY.model_copy(update={"recipe": "paper"})
    return synthesize_shard(tiny_model, tiny_corpus(tiny_model), study, OPTIONS, "synth/train-00000.safetensors")


# --- cartridges as past key/values -------------------------------------------------------------------------------


def test_corpus_initialization_is_the_models_own_kv(tiny_model: LoadedModel) -> None:
    corpus = tiny_corpus(tiny_model)
    spec = make_config("file:///unused", "file:///unused").spec
    init = initial_cartridge(tiny_model, corpus, spec, seed=0)
    ids = torch.tensor([corpus.tokens[:40]])
    with torch.no_grad():
        cache = tiny_model.model(input_ids=ids[:, :16], use_cache=True).past_key_values
        full = tiny_model.model.get_decoder()(input_ids=ids).last_hidden_state
        after = forward_with_cartridge(tiny_model.model, init, ids[:, 16:], torch.ones(1, 24, dtype=torch.long))
    assert init.p == 16 and init.frozen_tokens == 1
    for layer, k, v in zip(cache.layers, init.keys, init.values, strict=True):
        assert torch.equal(layer.keys[0], k) and torch.equal(layer.values[0], v)
    torch.testing.assert_close(after, full[:, 16:], atol=1e-5, rtol=1e-5)


def test_text_and_random_initialization(tiny_model: LoadedModel) -> None:
    spec = make_config("file:///unused", "file:///unused").spec
    text = spec.model_copy(update={"initialization": api.Initialization(strategy="text", text="abcde")})
    from_text = initial_cartridge(tiny_model, tiny_corpus(tiny_model), text, seed=0)
    tiled = prefix_cartridge(tiny_model.model, tiny_model.tokenizer("abcde" * 4)["input_ids"][:16])
    assert all(torch.equal(a, b) for a, b in zip(from_text.keys, tiled.keys, strict=True))
    rand = spec.model_copy(update={"initialization": api.Initialization(strategy="random")})
    first, again = (initial_cartridge(tiny_model, tiny_corpus(tiny_model), rand, seed=0) for _ in range(2))
    other = initial_cartridge(tiny_model, tiny_corpus(tiny_model), rand, seed=1)
    fp = tiny_model.fingerprint
    assert first.keys[0].shape == (fp.num_kv_heads, 16, fp.head_dim) and first.num_layers == fp.num_layers
    assert torch.equal(first.keys[1], again.keys[1]) and not torch.equal(first.keys[1], other.keys[1])
    assert 0 < first.values[0].std() < 0.1


def test_composed_cartridges_put_the_request_after_their_summed_lengths(tiny_model: LoadedModel) -> None:
    """Two halves of one context, composed, equal the whole context only if request positions start at p1 + p2."""
    ids = torch.randint(0, 250, (1, 48), generator=torch.Generator().manual_seed(1))
    whole = prefix_cartridge(tiny_model.model, ids[0, :32].tolist())
    first = prefix_cartridge(tiny_model.model, ids[0, :16].tolist())
    second = Cartridge([k[:, 16:] for k in whole.keys], [v[:, 16:] for v in whole.values], 0)
    composed = compose([first, second])
    # left padding: the request's first real token must still sit at position 32
    request = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:, 32:]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 16, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = tiny_model.model.get_decoder()(input_ids=ids).last_hidden_state
        after = forward_with_cartridge(tiny_model.model, composed, request, mask)
        shifted = forward_with_cartridge(tiny_model.model, first, request, mask)
    assert composed.p == 32 and composed.frozen_tokens == 1
    torch.testing.assert_close(after[:, 3:], full[:, 32:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shifted[:, 3:], full[:, 32:], atol=1e-3)


# --- synthesis ---------------------------------------------------------------------------------------------------


def test_synthesis_shard_shapes_and_teacher_alignment(shard: Shard, tiny_model: LoadedModel, tmp_path: Path) -> None:
    assert len(shard.conversations) == OPTIONS.synthesis_batch_size
    context_text = tiny_model.tokenizer.decode(shard.context.tolist())
    assert "Varnholm lighthouse" in context_text and "<document>" in context_text
    for conv in shard.conversations:
        answer = conv.answer
        assert 1 <= len(answer) <= OPTIONS.max_answer_tokens
        assert conv.target_start == conv.answer_start  # the paper's recipe distills answers only
        assert conv.topk_ids.shape == conv.topk_logprobs.shape == (len(answer), 4)
        assert (conv.topk_logprobs <= 0).all() and (conv.topk_logprobs.diff(dim=-1) <= 0).all()
        # bot B answers greedily, so the teacher's top-1 at each answer position is the answer token itself
        assert torch.equal(conv.topk_ids[:, 0].long(), answer)
        assert "assistant" in tiny_model.tokenizer.decode(conv.ids[: conv.answer_start].tolist())
    path = tmp_path / "shard.safetensors"
    shard.save(path)
    loaded = Shard.load(path)
    assert torch.equal(loaded.context, shard.context)
    for a, b in zip(loaded.conversations, shard.conversations, strict=True):
        assert torch.equal(a.ids, b.ids) and (a.answer_start, a.target_start) == (b.answer_start, b.target_start)
        assert torch.equal(a.topk_ids, b.topk_ids.int()) and torch.equal(a.topk_logprobs, b.topk_logprobs)


@pytest.mark.parametrize("fits", [True, False])
def test_grounded_shard_asks_about_the_windows_facts_with_the_corpus_in_context(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch, fits: bool
) -> None:
    corpus = tiny_corpus(tiny_model)
    if not fits:  # a corpus longer than the model's positions: the teacher reads the shard's window
        monkeypatch.setattr(tiny_model.model.config, "max_position_embeddings", len(corpus.tokens))
    shard = synthesize_shard(tiny_model, corpus, STUDY, OPTIONS, "synth/train-00001.safetensors")
    assert STUDY.recipe == "grounded" and len(shard.conversations) == OPTIONS.synthesis_batch_size
    start, end = corpus.window(1, STUDY.maxChunkTokens)
    chunk = tiny_model.tokenizer.decode(corpus.tokens[start:end])
    context = tiny_model.tokenizer.decode(shard.context.tolist())
    assert (CORPUS_TEXT.strip() in context) is fits and chunk in context
    eos = tiny_model.tokenizer.eos_token_id
    for conv in shard.conversations:
        answer = conv.answer.tolist()
        assert answer[-1] == eos and tiny_model.tokenizer.decode(answer[:-1]) in chunk
        # the user turn is distilled too, from its second token (the first has no prediction after the cartridge)
        assert conv.target_start == 1 < conv.answer_start
        assert conv.topk_ids.shape == conv.topk_logprobs.shape == (len(conv.ids) - 1, 4)
    # the teacher reads the context once, then the conversations: the same log-probs as reading it all at once
    conv = shard.conversations[0]
    with torch.no_grad():
        ids = torch.cat([shard.context, conv.ids]).unsqueeze(0)
        logprobs = tiny_model.model(input_ids=ids).logits[0].log_softmax(-1)
    at = len(shard.context) + conv.target_start - 1
    expected = logprobs[at : at + len(conv.targets)].gather(-1, conv.topk_ids.long())
    assert torch.allclose(expected, conv.topk_logprobs, atol=1e-4)
    scored = conv.answer_only()
    assert torch.equal(scored.topk_ids, conv.topk_ids[conv.answer_start - 1 :]) and len(scored.targets) == len(answer)


def test_grounded_user_turns_quote_at_most_max_question_tokens_around_their_fact(tiny_model: LoadedModel) -> None:
    """Text without sentence breaks is one sentence the length of the window: quoted whole, a user turn ran hundreds
    of tokens past max_question_tokens, so the teacher read more than the budget checked up front (teacher_overhead)
    and a sequenceLength fitting the budget dropped the conversation. Each turn now quotes the words around its fact
    that fit the budget."""
    text = " and ".join(f"in {1800 + i} the keeper of Varnholm logged {i + 3} metres of ice" for i in range(30))
    corpus = Corpus("the Varnholm ice log", tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"], "d")
    options = OPTIONS.model_copy(update={"max_question_tokens": 48})
    study = STUDY.model_copy(update={"maxChunkTokens": 256})
    shard = synthesize_shard(tiny_model, corpus, study, options, "synth/train-00001.safetensors")
    system = render(tiny_model.tokenizer, system_prompt(corpus.description, ""), "")[0]
    budget = teacher_overhead(tiny_model, corpus.description, study, options) - len(system)  # turn and answer
    for conv in shard.conversations:
        assert len(conv.ids) <= budget and conv.truncated(budget) is conv
        user = str(tiny_model.tokenizer.decode(conv.ids[: conv.answer_start].tolist(), skip_special_tokens=True))
        asked = user.split("\n")[1].rstrip("?")  # "user\n<question>?\nassistant\n" (the blank's instruction is
        answer = str(tiny_model.tokenizer.decode(conv.answer[:-1].tolist()))  # longer than the budget here)
        quoted = re.sub(r"(?:^|(?<= ))(?:what year|how many \w+|what)\b", answer.lower(), asked.lower(), count=1)
        assert len(asked.split()) >= 4 and f" {quoted}" in f" {text.lower()}", (asked, answer)  # a window's end: cut


def test_a_grounded_shard_over_a_window_of_whitespace_only_asks_about_the_next_window_with_text(
    tiny_model: LoadedModel,
) -> None:
    """Blank pages of a PDF can fill a window: its shard asked "What?" for an empty answer. It now takes the next
    window that has text, the same in every run."""
    tokenizer = tiny_model.tokenizer
    text = tokenizer(CORPUS_TEXT, add_special_tokens=False)["input_ids"]
    corpus = Corpus(
        "the Varnholm lighthouse", text + tokenizer("\n" * 200, add_special_tokens=False)["input_ids"] + text, "d"
    )
    decoded = [str(tokenizer.decode(corpus.tokens[slice(*corpus.window(i, STUDY.maxChunkTokens))])) for i in range(20)]
    blank = next(i for i, chunk in enumerate(decoded) if not chunk.strip())
    after = next(chunk for chunk in decoded[blank:] if chunk.strip())
    name = f"synth/train-{blank:05d}.safetensors"
    shard = synthesize_shard(tiny_model, corpus, STUDY, OPTIONS, name)
    for conv in shard.conversations:
        answer = str(tokenizer.decode(conv.answer[:-1].tolist()))
        assert answer.strip() and answer in after, answer
    again = synthesize_shard(tiny_model, corpus, STUDY, OPTIONS, name)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(shard.conversations, again.conversations, strict=True))


FACTS_TEXT = " ".join(
    f"In {1850 + 7 * i} the keeper of the Varnholm light logged {i + 3} metres of ice on the fjord." for i in range(12)
)


@pytest.mark.parametrize("fits", [True, False])
def test_held_out_conversations_are_none_of_the_training_ones(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch, fits: bool
) -> None:
    """The held-out shard took the window of the first training shard and asked about the same few facts: most of its
    conversations were training ones, token for token, so the quality gate scored recall of training examples. It
    now asks about facts no training conversation asks about, whether the teacher reads the corpus whole or the
    shard's window."""
    corpus = Corpus(
        "the Varnholm ice log", tiny_model.tokenizer(FACTS_TEXT, add_special_tokens=False)["input_ids"], "d"
    )
    if not fits:
        monkeypatch.setattr(tiny_model.model.config, "max_position_embeddings", len(corpus.tokens))
    study = STUDY.model_copy(update={"conversations": 48, "maxChunkTokens": 512 if fits else 160})
    train_names, eval_names = shard_names(study.conversations, OPTIONS)
    trained = [synthesize_shard(tiny_model, corpus, study, OPTIONS, name) for name in train_names]
    held_out = [synthesize_shard(tiny_model, corpus, study, OPTIONS, name) for name in eval_names]
    seen = {tuple(c.ids.tolist()) for shard in trained for c in shard.conversations}
    assert len(held_out[0].conversations) == OPTIONS.synthesis_batch_size
    assert not [c for c in held_out[0].conversations if tuple(c.ids.tolist()) in seen]
    kept, dropped = unseen(trained, held_out)
    assert dropped == 0 and [len(s.conversations) for s in kept] == [len(s.conversations) for s in held_out]


def test_held_out_conversations_equal_to_training_ones_are_dropped_and_counted(
    shard: Shard, tiny_model: LoadedModel
) -> None:
    """A corpus of one fact has nothing to hold out, and the paper's recipe can ask the same again: what equals a
    training conversation is not scored, and a held-out set left empty scores nothing rather than dividing by 0."""
    other = synthesize_shard(tiny_model, tiny_corpus(tiny_model), STUDY, OPTIONS, "synth/eval-00000.safetensors")
    mixed = Shard(other.context, [*other.conversations, shard.conversations[0]])
    kept, dropped = unseen([shard], [mixed, shard])
    assert dropped == 1 + len(shard.conversations)
    assert [c.ids.tolist() for s in kept for c in s.conversations] == [c.ids.tolist() for c in other.conversations]
    cartridge = prefix_cartridge(tiny_model.model, shard.context.tolist()[:8])
    scores = evaluate(tiny_model, cartridge, [])
    assert scores["answerTokens"] == 0 and scores["iclGainRecovered"] is None
    assert scores["noContext"] is scores["icl"] is scores["cartridge"] is None


def test_a_corpus_of_whitespace_only_has_nothing_to_study(tiny_model: LoadedModel) -> None:
    blank = Corpus("blank pages", tiny_model.tokenizer("\n" * 100, add_special_tokens=False)["input_ids"], "d")
    with pytest.raises(InputError, match="whitespace only"):
        synthesize_shard(tiny_model, blank, STUDY, OPTIONS, "synth/train-00000.safetensors")


def test_corpus_windows_cover_every_token_evenly() -> None:
    corpus = Corpus("d", list(range(100)), "x")
    spans = [corpus.window(i, 30) for i in range(5)]
    assert spans[0] == (0, 30) and spans[-1] == (70, 100) and corpus.window(5, 30) == spans[0]
    assert all(b - a == 30 for a, b in spans)
    assert set().union(*(range(a, b) for a, b in spans)) == set(range(100))
    assert corpus.window(0, 500) == (0, 100) and corpus.windows(30) == 5 and corpus.windows(500) == 1


# --- distillation ------------------------------------------------------------------------------------------------


def test_loss_matches_a_direct_computation(shard: Shard, tiny_model: LoadedModel) -> None:
    init = initial_cartridge(tiny_model, tiny_corpus(tiny_model), make_config("file:///x", "file:///x").spec, 0)
    batch = pack(shard.conversations, 0, tiny_model.device, row_tokens=128)
    assert len(batch.input_ids) < len(shard.conversations)  # packed: the direct computation below is unpacked
    with torch.no_grad():
        loss = distill_loss(target_logprobs(tiny_model.model, batch, init), batch)
        expected, count = 0.0, 0
        for conv in shard.conversations:  # one unpadded conversation at a time, full logits
            ids = conv.ids.unsqueeze(0)
            hidden = forward_with_cartridge(tiny_model.model, init, ids, torch.ones_like(ids))
            logq = tiny_model.model.lm_head(hidden[0]).log_softmax(-1)
            for j in range(len(conv.targets)):
                row = logq[conv.target_start + j - 1]
                expected -= float((conv.topk_logprobs[j].exp() * row[conv.topk_ids[j].long()]).sum())
                count += 1
    assert loss.item() == pytest.approx(expected / count, rel=1e-4)


def test_gradients_reach_only_trainable_rows_and_loss_goes_down(shard: Shard, tiny_model: LoadedModel) -> None:
    spec = make_config("file:///x", "file:///x").spec.model_copy(update={"frozenTokens": 2})
    init = initial_cartridge(tiny_model, tiny_corpus(tiny_model), spec, 0)
    trainable = TrainableCartridge(init)
    optimizer = torch.optim.Adam(trainable.parameters(), lr=1e-1)
    batch = pack(shard.conversations, 0, tiny_model.device)
    # a random teacher is nearly uniform; a peaked target leaves the cartridge room to learn
    batch.topk_logprobs = torch.tensor([0.9, 0.05, 0.03, 0.02]).log().expand_as(batch.topk_logprobs)
    losses = []
    for _ in range(30):
        loss = distill_loss(target_logprobs(tiny_model.model, batch, trainable.cartridge()), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())
    assert all(not t.requires_grad for t in trainable.frozen_keys + trainable.frozen_values)
    assert all(p.grad is None for p in tiny_model.model.parameters())
    trained = trainable.cartridge()
    for before, after in zip(init.keys + init.values, trained.keys + trained.values, strict=True):
        assert torch.equal(before[:, :2], after[:, :2])
        assert not torch.equal(before[:, 2:], after[:, 2:])
    assert losses[-1] < losses[0] - 0.1  # the random model's residual stream bounds how far a cartridge can move it


def test_a_diverged_loss_stops_training_for_good_naming_the_step_the_learning_rate_and_clipping(
    shard: Shard, tiny_model: LoadedModel, file_store_root: str, tmp_path: Path
) -> None:
    """A NaN loss (here from a cartridge holding inf, as an exploding one ends up) is an InputError (exit 65): no
    checkpoint is written, and progress.json never holds the NaN, which no JSON reader (the operator) accepts."""
    store, config = Store(), make_config(file_store_root, "file:///x")
    spec = config.spec
    init = initial_cartridge(tiny_model, tiny_corpus(tiny_model), spec, 0)
    init.keys[0][:, 1:] = float("inf")
    workspace = Workspace(store, config.output_prefix, tmp_path)
    progress = ProgressReporter(store, config.output_prefix, interval_s=0.0)
    with pytest.raises(InputError) as caught:
        distill(tiny_model, init, shard.conversations, spec, OPTIONS, workspace, progress, World(), "key", None)
    message = str(caught.value)
    assert "diverged at step 1" in message and "lower spec.training.learningRate (now 0.01)" in message
    assert "or set spec.training.maxGradNorm" in message
    assert store.list(f"{config.output_prefix}/checkpoints") == []
    written = Progress.model_validate(store.get_json(f"{config.output_prefix}/{PROGRESS_FILE}"))
    assert written.phase == "training" and written.loss is None


def test_a_non_finite_gradient_stops_training_before_it_reaches_the_cartridge(
    shard: Shard, tiny_model: LoadedModel, file_store_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finite loss with a non-finite gradient (an overflow in the backward pass) would turn every row into NaN;
    at the last step the NaN cartridge would be checkpointed, scored and uploaded. It stops as a diverged loss does."""
    real = distill_module.distill_loss

    def overflowing(logprobs: torch.Tensor, batch: Any) -> torch.Tensor:
        loss = real(logprobs, batch)
        return loss + (loss * 0).sqrt()  # adds 0; its gradient is 0 * inf = NaN

    monkeypatch.setattr(distill_module, "distill_loss", overflowing)
    store, config = Store(), make_config(file_store_root, "file:///x", steps=1)
    init = initial_cartridge(tiny_model, tiny_corpus(tiny_model), config.spec, 0)
    workspace = Workspace(store, config.output_prefix, tmp_path)
    progress = ProgressReporter(store, config.output_prefix, interval_s=0.0)
    with pytest.raises(InputError, match="diverged at step 1: .* gradient norm is nan"):
        distill(tiny_model, init, shard.conversations, config.spec, OPTIONS, workspace, progress, World(), "key", None)
    assert store.list(f"{config.output_prefix}/checkpoints") == []


def test_fewer_usable_conversations_than_ranks_is_bad_input_before_any_step(
    shard: Shard, tiny_model: LoadedModel, file_store_root: str, tmp_path: Path
) -> None:
    """A step's batch holds each conversation once at most: with fewer than the ranks, a rank would get none (and
    fail on an empty batch while the others wait on it in their collectives). It is refused, saying what helps."""
    store, config = Store(), make_config(file_store_root, "file:///x", steps=1)
    init = initial_cartridge(tiny_model, tiny_corpus(tiny_model), config.spec, 0)
    workspace = Workspace(store, config.output_prefix, tmp_path)
    progress = ProgressReporter(store, config.output_prefix, interval_s=0.0)
    world = PeerWorld(rank=len(shard.conversations), size=len(shard.conversations) + 1)  # the last rank: none
    with pytest.raises(InputError, match=f"{len(shard.conversations)} synthesized conversations fit .* fewer than"):
        distill(tiny_model, init, shard.conversations, config.spec, OPTIONS, workspace, progress, world, "key", None)
    assert store.list(f"{config.output_prefix}/checkpoints") == []


def test_step_batches_are_a_function_of_the_step() -> None:
    items = list(range(20))
    assert step_batch(items, 4, 0, 7) == step_batch(items, 4, 0, 7)
    assert step_batch(items, 4, 0, 7) != step_batch(items, 4, 0, 8)
    assert len(set(step_batch(items, 4, 0, 3))) == 4


def test_epoch_batches_see_every_item_once_per_epoch_in_a_seeded_order() -> None:
    """10 items in batches of 4 for 3 epochs: ceil(30 / 4) = 8 steps, the last one running into a fourth pass."""
    items = list(range(10))
    seen = [i for step in range(8) for i in epoch_batch(items, 4, 0, step)]
    epochs = [seen[e * 10 : (e + 1) * 10] for e in range(3)]
    assert all(sorted(epoch) == items for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != items  # shuffled anew each epoch
    assert seen[30:] == epoch_batch(items, 10, 0, 3)[:2]  # the extra items open the next epoch
    assert epoch_batch(items, 4, 0, 5) == seen[20:24]  # a function of the step: a resumed run sees the same
    assert epoch_batch(items, 4, 1, 0) != seen[:4]
    assert sorted(i for step in range(5) for i in epoch_batch(items, 12, 0, step)) == sorted(items * 6)


def distill_shard(
    shard: Shard, lm: LoadedModel, store_root: str, tmp_path: Path, training: dict[str, Any]
) -> tuple[dict[str, Any], Workspace, list[list[int]]]:
    """distill() on the shard's conversations with these spec.training settings; its stats, its workspace and the
    indices (into the shard) of the conversations of each step."""
    config = make_config(store_root, "file:///x")
    spec = config.spec.model_copy(update={"training": api.Training.model_validate(training)})
    init = initial_cartridge(lm, tiny_corpus(lm), spec, 0)
    workspace = Workspace(Store(), config.output_prefix, tmp_path)
    progress = ProgressReporter(workspace.store, config.output_prefix, interval_s=0.0)
    index = {conversation.ids.data_ptr(): i for i, conversation in enumerate(shard.conversations)}
    batches: list[list[int]] = []

    def packing(conversations: list[Conversation], *args: Any) -> Any:
        batches.append([index[c.ids.data_ptr()] for c in conversations])
        return pack(conversations, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill_module, "pack", packing)
        _, stats = distill(lm, init, shard.conversations, spec, OPTIONS, workspace, progress, World(), "key", None)
    return stats, workspace, batches


def test_max_grad_norm_bounds_the_gradient_of_every_step(
    shard: Shard, tiny_model: LoadedModel, file_store_root: str, tmp_path: Path
) -> None:
    """With a learning rate at its limit, every step's gradient (as the optimizer sees it) is clipped to maxGradNorm,
    far below the gradients' own norm."""
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        norms.append(float(torch.stack([p.grad.norm() for g in optimizer.param_groups for p in g["params"]]).norm()))

    hook = register_optimizer_step_pre_hook(record)
    try:
        training = {"steps": 3, "learningRate": 1.0, "maxGradNorm": 1e-5}
        distill_shard(shard, tiny_model, file_store_root, tmp_path, training)
    finally:
        hook.remove()
    assert len(norms) == 3 and all(1e-5 * 0.99 < norm <= 1e-5 * 1.001 for norm in norms), norms


def test_training_by_epochs_runs_the_steps_they_come_to_each_seeing_every_usable_conversation_once(
    shard: Shard, tiny_model: LoadedModel, file_store_root: str, tmp_path: Path
) -> None:
    """The conversations longer than sequenceLength up to their answer do not count: they are never trained on."""
    sequence_length = sorted(c.answer_start for c in shard.conversations)[1] + 1  # the shortest two fit
    usable = [i for i, c in enumerate(shard.conversations) if c.answer_start < sequence_length]
    assert 2 <= len(usable) < len(shard.conversations)
    training = {"epochs": 3, "batchSize": 4, "sequenceLength": sequence_length}
    stats, workspace, batches = distill_shard(shard, tiny_model, file_store_root, tmp_path, training)
    steps = math.ceil(3 * len(usable) / 4)
    assert stats["steps"] == len(batches) == steps
    seen = [i for batch in batches for i in batch]
    assert all(sorted(seen[e * len(usable) : (e + 1) * len(usable)]) == usable for e in range(3))
    written = Progress.model_validate(workspace.store.get_json(workspace.uri(PROGRESS_FILE)))
    assert written.step == written.total == steps
    assert workspace.names(distill_module.CHECKPOINT_FOLDER) == [f"checkpoints/step-{steps:08d}/state.pt"]


# --- evaluation --------------------------------------------------------------------------------------------------


def test_eval_icl_reads_the_whole_corpus_when_it_fits_else_the_chunk(shard: Shard, tiny_model: LoadedModel) -> None:
    corpus = tiny_corpus(tiny_model)
    cartridge = initial_cartridge(tiny_model, corpus, make_config("file:///x", "file:///x").spec, 0)
    whole = corpus_context(tiny_model, corpus)
    assert len(whole) > len(shard.context)  # the shard's chunk is only part of the corpus
    scores = evaluate(tiny_model, cartridge, [shard], whole)
    same_as_whole = evaluate(tiny_model, cartridge, [Shard(torch.tensor(whole), shard.conversations)])
    assert scores["iclContext"] == "corpus" and same_as_whole["iclContext"] == "chunk"
    assert scores["icl"] == pytest.approx(same_as_whole["icl"], rel=1e-5)
    assert scores["noContext"] == pytest.approx(same_as_whole["noContext"], rel=1e-6)
    too_long = whole * (tiny_model.model.config.max_position_embeddings // len(whole) + 1)
    fallback, chunk = evaluate(tiny_model, cartridge, [shard], too_long), evaluate(tiny_model, cartridge, [shard])
    assert fallback["iclContext"] == "chunk" and fallback["icl"] == pytest.approx(chunk["icl"], rel=1e-6)
    assert fallback["icl"] != pytest.approx(scores["icl"], rel=1e-5)  # a random model barely reads context


@pytest.mark.parametrize(("icl", "recovered"), [(5.1, None), (5.0, None), (4.0, -0.5)])
def test_icl_gain_recovered_is_none_when_icl_gives_no_gain(
    icl: float, recovered: float | None, shard: Shard, tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ICL no better than no context leaves no gain to recover: a score divided by a gain of zero or less would
    make a cartridge worse than no context (NLL 5.5 against 5.0) recover +500% and pass any quality gate."""
    cartridge = prefix_cartridge(tiny_model.model, [11, 12, 13, 14], frozen_tokens=0)
    nll = {"none": 5.0, "icl": icl, "cartridge": 5.5}

    def fixed_nll(model: Any, batch: Any, prefix: Cartridge | None = None) -> torch.Tensor:
        which = "none" if prefix is None else "cartridge" if prefix is cartridge else "icl"
        return torch.full((len(batch.targets), model.config.vocab_size), -nll[which])

    monkeypatch.setattr(evaluate_module, "target_logprobs", fixed_nll)
    scores = evaluate(tiny_model, cartridge, [shard])
    assert scores["cartridge"] == pytest.approx(5.5) and scores["icl"] == pytest.approx(icl)
    assert scores["iclGainRecovered"] == (None if recovered is None else pytest.approx(recovered))


# --- end to end ----------------------------------------------------------------------------------------------------


def check_generation(store: Store, config: TrainerConfig, lm: LoadedModel, tmp_path: Path) -> dict[str, float]:
    """The uploaded generation is complete and verifiable; returns its eval scores."""
    prefix = config.output_prefix
    manifest = download_artifact(store, prefix, tmp_path / "downloaded")
    cartridge, loaded = load_cartridge(tmp_path / "downloaded", expected_model=lm.fingerprint)
    assert (cartridge.p, cartridge.frozen_tokens, cartridge.num_layers) == (config.spec.size, 1, 2)
    init = prefix_cartridge(lm.model, lm.tokenizer(CORPUS_TEXT)["input_ids"][: config.spec.size])
    for trained, initial in zip(cartridge.keys + cartridge.values, init.keys + init.values, strict=True):
        assert torch.equal(trained[:, :1], initial[:, :1])  # the attention sink never trains
        assert not torch.equal(trained[:, 1:], initial[:, 1:])
    steps = config.spec.training.total_steps(config.spec.selfStudy.conversations)  # every one fits sequenceLength
    assert loaded.training["steps"] == steps
    assert loaded.training["synthesis_tokens_per_s"] > 0 and loaded.training["distill_tokens_per_s"] > 0
    scores: dict[str, float] = store.get_json(f"{prefix}/{EVAL_FILE}")
    assert {"noContext", "icl", "cartridge", "iclGainRecovered"} <= scores.keys()
    assert scores["iclContext"] == "corpus"  # the tiny corpus fits the context window
    assert all(scores[k] > 0 for k in ("noContext", "icl", "cartridge"))
    assert scores["heldOut"] == HELD_OUT["grounded"]  # what the score measures is recorded with it
    assert (scores["heldOutConversations"], scores["heldOutDroppedAsTrained"]) == (OPTIONS.synthesis_batch_size, 0)
    assert manifest.metrics == scores
    progress = Progress.model_validate(store.get_json(f"{prefix}/{PROGRESS_FILE}"))
    assert progress.phase == "done" and progress.step == progress.total == steps
    assert progress.loss is not None and progress.loss > 0
    synth = [u for u in store.list(f"{prefix}/synth") if u.endswith(".safetensors")]
    assert len(synth) == 2 + OPTIONS.eval_shards  # 8 conversations in shards of 4, plus the held-out shard
    assert len(store.list(f"{prefix}/checkpoints")) == 1  # older checkpoints are pruned
    return scores


@pytest.mark.parametrize("epochs", [None, 3])  # 3 epochs of 8 conversations in batches of 4: 6 steps
def test_train_end_to_end_into_a_file_store(
    tiny_model: LoadedModel, file_store_root: str, tmp_path: Path, epochs: int | None
) -> None:
    store = Store()
    corpus = put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT])
    config = make_config(file_store_root, corpus, epochs=epochs)
    manifest = train(config, store, options=OPTIONS, model=tiny_model)
    check_generation(store, config, tiny_model, tmp_path)
    assert manifest.base_model == tiny_model.fingerprint
    # a finished generation is never trained (or overwritten) again
    before = store.stat(f"{config.output_prefix}/cartridge.safetensors")
    assert train(config, store, options=OPTIONS, model=tiny_model).file_sha256 == manifest.file_sha256
    assert store.stat(f"{config.output_prefix}/cartridge.safetensors") == before


def test_quantized_generation_is_stored_and_scored_as_served(
    tiny_model: LoadedModel, file_store_root: str, tmp_path: Path
) -> None:
    """spec.quantization int8: the artifact is int8 with scales, and the evaluation scores the stored cartridge
    beside the one it was quantized from, with the same conversations and ICL."""
    store = Store()
    config = make_config(file_store_root, put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT]))
    config = config.model_copy(update={"spec": config.spec.model_copy(update={"quantization": "int8"})})
    manifest = train(config, store, options=OPTIONS, model=tiny_model)
    assert manifest.dtype == "int8" and manifest.quantization is not None
    download_artifact(store, config.output_prefix, tmp_path)
    stored, _ = load_stored_cartridge(tmp_path, expected_model=tiny_model.fingerprint)
    assert isinstance(stored, QuantizedCartridge) and stored.p == config.spec.size
    scores = store.get_json(f"{config.output_prefix}/{EVAL_FILE}")
    assert scores["cartridge"] != scores["cartridgeUnquantized"]  # the stored one is what is scored
    assert abs(scores["cartridge"] - scores["cartridgeUnquantized"]) < 0.05 * scores["cartridgeUnquantized"]
    recovered = api.icl_gain_recovered(scores["noContext"], scores["icl"], scores["cartridge"])
    assert scores["iclGainRecovered"] == (None if recovered is None else pytest.approx(recovered))


def count_synthesized(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the shards synthesized from now on (not copied or resumed), in order."""
    made: list[str] = []
    real = synthesis_module.synthesize_shard

    def counting(*args: Any) -> Shard:
        made.append(str(args[4]))  # (lm, corpus, study, options, name, teacher)
        return real(*args)

    monkeypatch.setattr(synthesis_module, "synthesize_shard", counting)
    return made


def count_checkpoint_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The checkpoint folders (``step-<step>``) whose state file is loaded from now on, in order."""
    loaded: list[str] = []
    real = torch.load

    def counting(f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, Path) and f.name == distill_module.STATE_FILE:
            loaded.append(f.parent.name)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return loaded


@pytest.mark.parametrize("spelling", ["file:///path", "file:///pa//th"])
def test_a_new_generation_reuses_the_synthesis_of_one_made_from_the_same_inputs(
    tiny_model: LoadedModel, file_store_root: str, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    """Only p and steps change from generation 1 to 2: its shards are copied, not synthesized again. A change to
    selfStudy (generation 3) synthesizes anew. Also with a root that the store lists in another spelling."""
    if spelling == "file:///pa//th":
        parent, leaf = file_store_root.rsplit("/", 1)
        file_store_root = f"{parent}//{leaf}"
    store = Store()
    corpus = put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT])
    first = make_config(file_store_root, corpus)
    train(first, store, options=OPTIONS, model=tiny_model)
    made = count_synthesized(monkeypatch)
    resized = make_config(file_store_root, corpus, size=32, steps=2).model_copy(update={"generation": 2})
    manifest = train(resized, store, options=OPTIONS, model=tiny_model)
    assert made == [] and manifest.training["synthesis_from"] == first.output_prefix
    for name in ("synth/train-00000.safetensors", "synth/eval-00000.safetensors"):
        assert store.get_bytes(f"{resized.output_prefix}/{name}") == store.get_bytes(f"{first.output_prefix}/{name}")
    inputs = store.get_json(f"{resized.output_prefix}/synth/inputs.json")
    assert inputs == {**store.get_json(f"{first.output_prefix}/synth/inputs.json"), "copied_from": first.output_prefix}
    assert store.children(resized.output_prefix) == store.children(first.output_prefix)  # nothing misnamed
    restudied = make_config(file_store_root, corpus, conversations=4).model_copy(update={"generation": 3})
    assert train(restudied, store, options=OPTIONS, model=tiny_model).training["synthesis_from"] is None
    assert len(made) == 1 + OPTIONS.eval_shards  # 4 conversations in one shard, plus the held-out shard


def test_a_generation_that_copied_its_shards_records_their_source_after_a_restart(
    tiny_model: LoadedModel, file_store_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generation 2 copies generation 1's shards, then its pod is lost before distillation ends: the restarted run
    finds its own shards, and its manifest still says where they came from (not that it synthesized them)."""
    store = Store()
    corpus = put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT])
    first = make_config(file_store_root, corpus, steps=2)
    train(first, store, options=OPTIONS, model=tiny_model)
    second = make_config(file_store_root, corpus, steps=4).model_copy(update={"generation": 2})
    with monkeypatch.context() as lost:
        lost.setattr(pipeline_module, "distill", lambda *args, **kwargs: pytest.fail("node lost"))
        with pytest.raises(pytest.fail.Exception, match="node lost"):
            train(second, store, options=OPTIONS, model=tiny_model)
    made = count_synthesized(monkeypatch)
    manifest = train(second, store, options=OPTIONS, model=tiny_model)
    assert made == [] and manifest.training["synthesis_from"] == first.output_prefix


def test_leftovers_of_another_run_under_the_prefix_are_discarded_not_resumed(
    tiny_model: LoadedModel, file_store_root: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """g1 holds the shards and checkpoint of a run on corpus A (say the Cartridge was deleted mid-training and
    created again on corpus B): training B into g1 synthesizes and trains afresh. Its own state is then resumed."""
    store = Store()
    first = make_config(file_store_root, put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT]))
    train(first, store, options=OPTIONS, model=tiny_model)
    Path(StoreURI.parse(f"{first.output_prefix}/{MANIFEST_FILE}").key).unlink()  # as if killed before the upload
    other_text = "The mill of Brakka ground rye for the islands until 1920, when its sails burned in a storm. " * 4
    other = first.model_copy(update={"corpus_prefixes": [put_corpus(store, file_store_root, "mill", [other_text])]})
    made = count_synthesized(monkeypatch)
    with caplog.at_level("WARNING"):
        manifest = train(other, store, options=OPTIONS, model=tiny_model)
    assert manifest.training["resumed_from_step"] == 0
    assert len(made) == 2 + OPTIONS.eval_shards  # every shard made anew, from corpus B
    assert manifest.corpus_digest is not None and other.corpus_prefixes[0].endswith(manifest.corpus_digest)
    assert "discarding the synthesis shards" in caplog.text and "discarding the checkpoints" in caplog.text

    # the same run restarted after its last checkpoint resumes it and keeps its shards
    Path(StoreURI.parse(f"{other.output_prefix}/{MANIFEST_FILE}").key).unlink()
    made.clear()
    again = train(other, store, options=OPTIONS, model=tiny_model)
    assert made == [] and again.training["resumed_from_step"] == other.spec.training.steps


def test_a_run_resumed_after_its_last_checkpoint_reports_the_final_loss(
    tiny_model: LoadedModel, file_store_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the last step's checkpoint but before the manifest upload, the rerun trains no step: its
    final_loss is the checkpointed one (not NaN, which is no JSON). A checkpoint from before losses were recorded
    gives null (unknown). The checkpoint (gigabytes with the Adam state of a large model) is loaded once."""
    store = Store()
    config = make_config(file_store_root, put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT]))
    manifest_path = Path(StoreURI.parse(f"{config.output_prefix}/{MANIFEST_FILE}").key)
    uninterrupted = train(config, store, options=OPTIONS, model=tiny_model)
    manifest_path.unlink()  # as if killed before the upload
    loads = count_checkpoint_loads(monkeypatch)
    resumed = train(config, store, options=OPTIONS, model=tiny_model)
    assert loads == ["step-00000004"]
    assert resumed.training["resumed_from_step"] == config.spec.training.steps
    assert resumed.training["final_loss"] == uninterrupted.training["final_loss"]
    json.loads(manifest_path.read_text(), parse_constant=lambda name: pytest.fail(f"manifest holds {name}"))

    [checkpoint] = store.list(f"{config.output_prefix}/checkpoints")
    state_path = Path(StoreURI.parse(checkpoint).key)
    torch.save({k: v for k, v in torch.load(state_path, weights_only=True).items() if k != "loss"}, state_path)
    manifest_path.unlink()
    assert train(config, store, options=OPTIONS, model=tiny_model).training["final_loss"] is None


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_checkpoint_is_discarded_and_training_resumes_from_the_one_before(
    tiny_model: LoadedModel,
    file_store_root: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    """A checkpoint that no longer loads would fail every retry of the Job the same way: it is discarded with a
    warning, and training resumes from the checkpoint before it, to the cartridge of an uninterrupted run."""
    store = Store()
    config = make_config(file_store_root, put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT]))
    checkpoints = f"{config.output_prefix}/checkpoints"
    with monkeypatch.context() as keep_all:  # as if killed between the upload of step 4 and the pruning of step 2
        keep_all.setattr(Workspace, "delete", lambda self, folder: None)
        uninterrupted = train(config, store, options=OPTIONS, model=tiny_model)
    Path(StoreURI.parse(f"{config.output_prefix}/{MANIFEST_FILE}").key).unlink()  # as if killed before the upload
    assert [u.removeprefix(checkpoints) for u in store.list(checkpoints)] == [
        "/step-00000002/state.pt",
        "/step-00000004/state.pt",
    ]
    newest = Path(StoreURI.parse(store.list(checkpoints)[-1]).key)
    newest.write_bytes(b"half a checkpoint" if damage == "garbage" else newest.read_bytes()[:1000])

    loads = count_checkpoint_loads(monkeypatch)
    with caplog.at_level("WARNING"):
        resumed = train(config, store, options=OPTIONS, model=tiny_model)
    assert loads == ["step-00000004", "step-00000002"]  # each once
    assert resumed.training["resumed_from_step"] == 2
    assert resumed.file_sha256 == uninterrupted.file_sha256
    assert "step-00000004/state.pt is unreadable" in caplog.text
    assert [u.removeprefix(checkpoints) for u in store.list(checkpoints)] == ["/step-00000004/state.pt"]


@pytest.mark.parametrize("damage", ["tensors flipped", "tensors lost", "manifest garbled"])
def test_a_finished_generation_that_no_longer_reads_back_is_trained_again_from_its_last_checkpoint(
    tiny_model: LoadedModel,
    file_store_root: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    damage: str,
) -> None:
    """A stored manifest whose artifact fails verification would fail every retry of the Job (exit 1) the same way:
    the run takes the generation as unfinished and resumes it from its shards and last checkpoint, training no step
    again, to the uninterrupted cartridge, manifest written last. The next run finds it finished."""
    store = Store()
    config = make_config(file_store_root, put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT]))
    uninterrupted = train(config, store, options=OPTIONS, model=tiny_model)
    tensors = Path(StoreURI.parse(f"{config.output_prefix}/cartridge.safetensors").key)
    manifest = Path(StoreURI.parse(f"{config.output_prefix}/{MANIFEST_FILE}").key)
    if damage == "tensors flipped":
        tensors.write_bytes(tensors.read_bytes()[:-1] + bytes([tensors.read_bytes()[-1] ^ 0xFF]))
    elif damage == "tensors lost":
        tensors.unlink()
    else:
        manifest.write_text("{not json")
    made, loads = count_synthesized(monkeypatch), count_checkpoint_loads(monkeypatch)
    caplog.set_level(logging.WARNING, logger="cartridges_trainer.pipeline")
    again = train(config, store, options=OPTIONS, model=tiny_model)
    assert "does not read back" in caplog.text and "training it again" in caplog.text
    assert made == [] and loads == [f"step-{config.spec.training.steps:08d}"]
    assert download_artifact(store, config.output_prefix, tmp_path) == again
    assert again.file_sha256 == uninterrupted.file_sha256
    assert again.training["resumed_from_step"] == config.spec.training.steps
    caplog.clear()
    assert train(config, store, options=OPTIONS, model=tiny_model).file_sha256 == uninterrupted.file_sha256
    assert "training it again" not in caplog.text


def test_objects_under_checkpoints_that_are_no_checkpoint_are_ignored_with_a_warning(
    tiny_model: LoadedModel, file_store_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another tool may write under checkpoints/ (a note, a step folder without state.pt): such names must not stop
    every retry of the Job; the run saves, prunes and resumes the real checkpoints and leaves them alone. Each is
    warned about once, though the folder is listed at every checkpoint save."""
    store = Store()
    config = make_config(file_store_root, put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT]))
    checkpoints = f"{config.output_prefix}/checkpoints"
    strays = ["/README.txt", "/backup/state.pt", "/step-latest/state.pt", "/step-00000009/notes.txt"]
    for name in strays:
        store.put_bytes(f"{checkpoints}{name}", b"not a checkpoint")

    caplog.set_level(logging.WARNING, logger=distill_module.log.name)
    uninterrupted = train(config, store, options=OPTIONS, model=tiny_model)  # checkpoints at steps 2 and 4
    Path(StoreURI.parse(f"{config.output_prefix}/{MANIFEST_FILE}").key).unlink()  # as if killed before the upload
    resumed = train(config, store, options=OPTIONS, model=tiny_model)
    assert resumed.training["resumed_from_step"] == 4
    assert resumed.file_sha256 == uninterrupted.file_sha256
    assert sorted(u.removeprefix(checkpoints) for u in store.list(checkpoints)) == sorted(
        [*strays, "/step-00000004/state.pt"]
    )
    warned = [m.split(": not a checkpoint")[0] for m in caplog.messages if "not a checkpoint" in m]
    assert sorted(warned) == sorted(f"ignoring {checkpoints}{name}" for name in strays)  # once per process


@dataclass(frozen=True)
class PeerWorld(World):
    """One rank of a world whose other ranks add ``peers`` to every sum and are always at the barrier."""

    peers: float = field(default=0.0, kw_only=True)

    def sum(self, value: float) -> float:
        return value + self.peers

    def barrier(self) -> None:
        pass


def test_other_ranks_resume_from_the_step_rank_0_chose_and_never_discard_it(
    tiny_model: LoadedModel, file_store_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 chooses the checkpoint (discarding unreadable or foreign ones) and shares its step: rank 1 loads that
    very step, not the newest it finds (one saved meanwhile), starts afresh when rank 0 does, and fails retryably,
    deleting nothing, when it cannot read the chosen one (else the ranks' collectives fall out of step, or a
    store hiccup on rank 1 deletes the checkpoint rank 0 resumes from)."""
    store = Store()
    config = make_config(file_store_root, put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT]))
    checkpoints = f"{config.output_prefix}/checkpoints"
    with monkeypatch.context() as keep_all:  # checkpoints at steps 2 and 4 both kept
        keep_all.setattr(Workspace, "delete", lambda self, folder: None)
        train(config, store, options=OPTIONS, model=tiny_model)
    corpus = load_corpus(store, config.corpus_prefixes, config.corpus_description, tiny_model.tokenizer)

    def rank_1_resumes(rank_0_step: int, run: str) -> dict[str, Any] | None:
        workspace = Workspace(store, config.output_prefix, tmp_path / run)
        world = PeerWorld(rank=1, size=2, peers=rank_0_step)
        return _prepare_workspace(config, tiny_model, corpus, OPTIONS, workspace, world)[2]

    chosen = rank_1_resumes(2, "first")
    assert chosen is not None and chosen["step"] == 2
    assert rank_1_resumes(0, "fresh") is None
    step_2 = Path(StoreURI.parse(f"{checkpoints}/step-00000002/state.pt").key)
    step_2.write_bytes(b"half a checkpoint")
    with pytest.raises(RuntimeError, match="step-00000002/state.pt"):
        rank_1_resumes(2, "unreadable")
    assert [u.removeprefix(checkpoints) for u in store.list(checkpoints)] == [
        "/step-00000002/state.pt",
        "/step-00000004/state.pt",
    ]


@pytest.mark.parametrize("error", [IntegrityError, StoreUnavailable])
def test_a_checkpoint_is_discarded_when_its_sha256_fails_not_when_the_store_fails(
    file_store_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[StoreError]
) -> None:
    """Bytes that do not match their recorded sha256 are as corrupt as bytes that do not load; a store that does
    not answer is not, and the error stays retryable with the checkpoint kept."""
    store = Store()
    workspace = Workspace(store, f"{file_store_root}/g1", tmp_path)
    store.put_bytes(workspace.uri("checkpoints/step-00000002/state.pt"), b"a checkpoint")

    def fail(self: Workspace, name: str) -> Path:
        raise error("simulated", self.uri(name))

    monkeypatch.setattr(Workspace, "fetch", fail)
    if error is IntegrityError:
        assert load_checkpoint(workspace, "key") is None
        assert workspace.names("checkpoints") == []
    else:
        with pytest.raises(StoreUnavailable):
            load_checkpoint(workspace, "key")
        assert workspace.names("checkpoints") == ["checkpoints/step-00000002/state.pt"]


@pytest.mark.minio
def test_train_end_to_end_into_minio(
    tiny_model: LoadedModel, s3_prefix: str, minio_server: MinioServer, tmp_path: Path
) -> None:
    store = minio_server.store()
    root = s3_prefix.rstrip("/")
    config = make_config(root, put_corpus(store, root, "lighthouse", [CORPUS_TEXT]))
    train(config, store, options=OPTIONS, model=tiny_model)
    check_generation(store, config, tiny_model, tmp_path)


def test_restart_skips_finished_shards_and_steps(
    tiny_model: LoadedModel, file_store_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store()
    config = make_config(file_store_root, put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT]), steps=6)
    real = synthesis_module.synthesize_shard
    made: list[str] = []

    def crash_after_two(*args: object) -> Shard:
        if len(made) == 2:
            raise RuntimeError("simulated kill during synthesis")
        made.append(str(args[4]))  # (lm, corpus, study, options, name, teacher)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(synthesis_module, "synthesize_shard", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(config, store, options=OPTIONS, model=tiny_model)
    shards = [u for u in store.list(f"{config.output_prefix}/synth") if u.endswith(".safetensors")]
    kept, corrupt = (Path(StoreURI.parse(u).key) for u in shards)
    assert Progress.model_validate(store.get_json(f"{config.output_prefix}/{PROGRESS_FILE}")).phase == "failed"
    corrupt.write_bytes(b"half a shard")
    kept_mtime = kept.stat().st_mtime_ns

    made.clear()
    train(config, store, options=OPTIONS, model=tiny_model)
    # only the corrupt and the missing shards were synthesized again; the good one was not touched
    assert made == [f"synth/{corrupt.name}", "synth/eval-00000.safetensors"]
    assert kept.stat().st_mtime_ns == kept_mtime
    manifest = json.loads(store.get_bytes(f"{config.output_prefix}/{MANIFEST_FILE}"))
    assert manifest["training"]["resumed_from_step"] == 0


@dataclass
class CliRun:
    """A 300-step run of the trainer's entry point as its container starts it (a subprocess, one thread per process):
    long enough to interrupt mid-distillation."""

    store: Store
    config: TrainerConfig
    options: TrainerOptions
    args: list[str]  # after the interpreter: -m cartridges_trainer ...
    env: dict[str, str]

    @property
    def checkpoints(self) -> str:
        return f"{self.config.output_prefix}/checkpoints"

    def progress(self) -> Progress | None:
        uri = f"{self.config.output_prefix}/{PROGRESS_FILE}"
        return Progress.model_validate(self.store.get_json(uri)) if self.store.exists(uri) else None

    def wait_until_training(self, process: subprocess.Popen[Any], timeout_s: float) -> None:
        """Until the run has trained a step (or ended, or ``timeout_s`` passed)."""
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            if (seen := self.progress()) is not None and seen.phase == "training" and seen.step > 0:
                return
            time.sleep(0.05)


def cli_run(
    model: LoadedModel, root: str, tmp_path: Path, checkpoint_every: int, max_grad_norm: float | None = None
) -> CliRun:
    store = Store()
    put_model(model, store, f"{root}/models/tiny")
    config = make_config(root, put_corpus(store, root, "lighthouse", [CORPUS_TEXT]), steps=300, conversations=4)
    training = config.spec.training.model_copy(update={"maxGradNorm": max_grad_norm})
    config = config.model_copy(update={"spec": config.spec.model_copy(update={"training": training})})
    config_file = tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    options = OPTIONS.model_copy(update={"checkpoint_every": checkpoint_every})
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("", "trainer-image")),
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path),  # a killed run leaves its working directory: here, not in the system's /tmp
    }
    args = ["-m", "cartridges_trainer", "--config-file", str(config_file), "--options", options.model_dump_json()]
    return CliRun(store, config, options, args, env)


def test_cli_resumes_after_sigkill_on_two_ranks_to_the_uninterrupted_result(
    tiny_model: LoadedModel, file_store_root: str, tmp_path: Path
) -> None:
    """Kill a one-process run mid-distillation, finish it with torchrun on two CPU ranks (gloo): no step is
    repeated, and the cartridge equals that of an uninterrupted one-process run (same batches, summed gradients,
    clipped alike: maxGradNorm below every step's gradient norm)."""
    run = cli_run(tiny_model, file_store_root, tmp_path, checkpoint_every=20, max_grad_norm=1e-5)
    store, config, args, env, checkpoints = run.store, run.config, run.args, run.env, run.checkpoints
    process = subprocess.Popen([sys.executable, *args], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not store.list(checkpoints) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(int(uri.split("step-")[1].split("/")[0]) for uri in store.list(checkpoints))
    assert 0 < killed_at < 300

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    finished = subprocess.run([*torchrun, *args], env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    manifest = json.loads(store.get_bytes(f"{config.output_prefix}/{MANIFEST_FILE}"))
    assert manifest["training"]["resumed_from_step"] >= killed_at
    assert manifest["training"]["steps"] == 300
    assert [u.removeprefix(checkpoints) for u in store.list(checkpoints)] == ["/step-00000300/state.pt"]
    download_artifact(store, config.output_prefix, tmp_path / "resumed")
    resumed, _ = load_cartridge(tmp_path / "resumed")

    reference = config.model_copy(update={"generation": 2})
    model = load_base_model(config.spec.baseModel.uri, store=store)
    train(reference, store, options=run.options, model=model)
    download_artifact(store, reference.output_prefix, tmp_path / "reference")
    uninterrupted, _ = load_cartridge(tmp_path / "reference")
    for a, b in zip(resumed.keys + resumed.values, uninterrupted.keys + uninterrupted.values, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cli_stopped_by_sigterm_checkpoints_its_step_and_resumes_to_the_uninterrupted_result(
    tiny_model: LoadedModel, file_store_root: str, tmp_path: Path
) -> None:
    """The kubelet stops a pod with SIGTERM (preemption, drain), then SIGKILL: the run finishes its step, checkpoints
    at it (no periodic checkpoint is due before the last step), writes progress and exits retryable; the next run
    resumes at that step and ends with the cartridge of an uninterrupted run, bit for bit."""
    run = cli_run(tiny_model, file_store_root, tmp_path, checkpoint_every=1000)
    store, config, checkpoints = run.store, run.config, run.checkpoints
    command = [sys.executable, *run.args]
    process = subprocess.Popen(command, env=run.env, stderr=subprocess.DEVNULL)
    run.wait_until_training(process, timeout_s=120)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == EXIT_INTERRUPTED
    stopped = run.progress()
    assert stopped is not None and stopped.phase == "training" and 0 < stopped.step < 300, stopped
    assert "SIGTERM" in stopped.message
    assert [u.removeprefix(checkpoints) for u in store.list(checkpoints)] == [f"/step-{stopped.step:08d}/state.pt"]

    finished = subprocess.run(command, env=run.env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    manifest = json.loads(store.get_bytes(f"{config.output_prefix}/{MANIFEST_FILE}"))
    assert manifest["training"]["resumed_from_step"] == stopped.step

    reference = config.model_copy(update={"generation": 2})
    model = load_base_model(config.spec.baseModel.uri, store=store)
    assert train(reference, store, options=run.options, model=model).file_sha256 == manifest["file_sha256"]


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(
    tiny_model: LoadedModel, file_store_root: str, tmp_path: Path
) -> None:
    """torchrun passes SIGTERM to every rank, each at its own moment: here only rank 1 gets it, yet rank 0 stops
    after the same step (else one rank waits for the other in the next step's all-reduce) and checkpoints it."""
    run = cli_run(tiny_model, file_store_root, tmp_path, checkpoint_every=1000)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *run.args]
    launcher = subprocess.Popen(command, env=run.env, stderr=subprocess.PIPE, text=True)
    run.wait_until_training(launcher, timeout_s=180)
    os.kill(rank_process(launcher.pid, rank=1), signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode not in (EXIT_OK, EXIT_PERMANENT), stderr[-3000:]
    assert stderr.count("stopped by SIGTERM; ") == 2, stderr[-3000:]
    stopped = run.progress()
    assert stopped is not None and stopped.phase == "training" and 0 < stopped.step < 300, stopped
    checkpoints = run.store.list(run.checkpoints)
    assert [u.removeprefix(run.checkpoints) for u in checkpoints] == [f"/step-{stopped.step:08d}/state.pt"]


def rank_process(launcher: int, rank: int) -> int:
    """The pid of one of torchrun's ranks: a child of ``launcher`` whose environment says ``RANK=<rank>``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == launcher and f"RANK={rank}".encode() in (stat.parent / "environ").read_bytes().split(b"\0"):
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile, or another user's
    raise LookupError(f"torchrun {launcher} has no rank {rank}")


# --- bad input -----------------------------------------------------------------------------------------------------


def test_a_corpus_stored_under_another_digest_than_its_own_is_bad_input(
    tiny_model: LoadedModel, file_store_root: str
) -> None:
    """The digest in the prefix is the one the Cartridge pinned and its training hash records: text stored there
    that is consistent with its own manifest, but of another digest, is never trained on."""
    store = Store()
    prefix = put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT])
    digest, pinned = prefix.rsplit("/", 1)[1], f"{prefix.rsplit('/', 1)[0]}/{'d' * 64}"
    for name in (CORPUS_FILE, MANIFEST_FILE):
        store.copy(f"{prefix}/{name}", f"{pinned}/{name}")
    with pytest.raises(InputError, match=f"describes corpus digest {digest}, not {'d' * 64}"):
        load_corpus(store, [pinned], "the Varnholm lighthouse", tiny_model.tokenizer)


@pytest.mark.parametrize(
    ("texts", "size", "message"),
    [
        ([], 16, "has 0 tokens"),
        (["   ", "\n"], 16, "has 0 tokens"),
        (["tiny"], 16, "need at least 16"),
        ([CORPUS_TEXT[:100]], 128, "larger than the corpus"),
        (None, 16, "corpus not found"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", 16, "unreadable"),
        ([CORPUS_TEXT], 4096, "positions exceed"),
    ],
)
def test_bad_input_exits_permanent_with_a_message(
    texts: list[str] | bytes | None,
    size: int,
    message: str,
    tiny_model: LoadedModel,
    file_store_root: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = Store()
    put_model(tiny_model, store, f"{file_store_root}/models/tiny")
    prefix = put_corpus(store, file_store_root, "c", texts) if texts is not None else f"{file_store_root}/corpora/x"
    config = make_config(file_store_root, prefix, size=size)
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(termination))
    assert main(["--config", config.model_dump_json(), "--options", OPTIONS.model_dump_json()]) == EXIT_PERMANENT
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and message in termination.read_text()
    assert "\n" not in termination.read_text()
    assert not store.exists(f"{config.output_prefix}/{MANIFEST_FILE}")
    assert Progress.model_validate(store.get_json(f"{config.output_prefix}/{PROGRESS_FILE}")).phase == "failed"


def test_bad_input_exits_permanent_when_the_store_refuses_the_failed_progress(
    tiny_model: LoadedModel,
    file_store_root: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The store going down while the trainer reports bad input must not turn exit 65 (fail the Job) into 1 (retry
    it forever): the input error decides the exit code, the unwritten progress is logged."""
    store = Store()
    put_model(tiny_model, store, f"{file_store_root}/models/tiny")
    config = make_config(file_store_root, put_corpus(store, file_store_root, "empty", []))
    put_json = Store.put_json

    def down_when_failing(self: Store, uri: str, value: Any) -> Any:
        if uri.endswith(PROGRESS_FILE) and value["phase"] == "failed":
            raise StoreUnavailable("connection refused", uri)
        return put_json(self, uri, value)

    monkeypatch.setattr(Store, "put_json", down_when_failing)
    caplog.set_level(logging.WARNING, logger="cartridges_trainer.pipeline")  # the CLI's tests leave the root at ERROR
    assert main(["--config", config.model_dump_json(), "--options", OPTIONS.model_dump_json()]) == EXIT_PERMANENT
    assert "has 0 tokens" in capsys.readouterr().err
    assert any("connection refused" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_a_tokenizer_with_ids_the_model_has_no_embedding_for_exits_permanent(
    file_store_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model directory holding another model's (larger) tokenizer: its ids index past the embeddings, which would
    fail every retry with an IndexError; it is a permanent input error that names both sizes."""
    mismatched = tiny_llama()
    mismatched.model.resize_token_embeddings(len(mismatched.tokenizer) - 1)  # no row for its last special token
    store = Store()
    put_model(mismatched, store, f"{file_store_root}/models/tiny")
    config = make_config(file_store_root, put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT]))
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(tmp_path / "termination-log"))
    assert main(["--config", config.model_dump_json(), "--options", OPTIONS.model_dump_json()]) == EXIT_PERMANENT
    message = f"tokenizer has {len(mismatched.tokenizer)} tokens, the model embeds {len(mismatched.tokenizer) - 1}"
    assert message in capsys.readouterr().err and message in (tmp_path / "termination-log").read_text()


@pytest.mark.parametrize("recipe", ["grounded", "paper"])
def test_a_chunk_past_the_models_positions_exits_permanent_naming_the_largest_that_fits(
    recipe: str,
    tiny_model: LoadedModel,
    file_store_root: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Past the model's trained positions the teacher reads garbage without a word: a maxChunkTokens whose chunk,
    prompt, question and answer overflow them is bad input naming both numbers and the field, before any synthesis:
    every recipe's budgets are known up front (a grounded task quotes at most max_question_tokens of the corpus).
    Taking the suggestion trains at once, every teacher read within the positions; the default trains on a corpus
    shorter than it (its own chunk)."""
    monkeypatch.setattr(tiny_model.model.config, "max_position_embeddings", 512)
    store = Store()
    put_model(tiny_model, store, f"{file_store_root}/models/tiny")
    corpus = put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT])  # 618 tokens: longer than a chunk
    config = make_config(file_store_root, corpus, steps=1)
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(tmp_path / "termination-log"))
    generations = iter(range(1, 100))

    def run(max_chunk_tokens: int) -> tuple[int, str, TrainerConfig]:
        study = config.spec.selfStudy.model_copy(update={"maxChunkTokens": max_chunk_tokens, "recipe": recipe})
        spec = config.spec.model_copy(update={"selfStudy": study})
        trainer = config.model_copy(update={"spec": spec, "generation": next(generations)})
        code = main(["--config", trainer.model_dump_json(), "--options", OPTIONS.model_dump_json()])
        return code, capsys.readouterr().err.strip().splitlines()[-1], trainer

    def largest(err: str) -> int:
        return int(err.split("set selfStudy.maxChunkTokens to at most ")[1].split()[0])

    code, err, _ = run(16384)
    assert code == EXIT_PERMANENT and "selfStudy.maxChunkTokens 16384" in err and "512 positions" in err, err
    fits = largest(err)
    assert run(fits + 1)[0] == EXIT_PERMANENT
    attempt = run(fits)
    assert attempt[0] == EXIT_OK, attempt[1]
    shards = [u for u in store.list(f"{attempt[2].output_prefix}/synth") if u.endswith(".safetensors")]
    for shard in (Shard.load(Path(StoreURI.parse(u).key)) for u in shards):
        assert len(shard.context) + max(len(c.ids) for c in shard.conversations) <= 512  # what the teacher read

    short = put_corpus(store, file_store_root, "short", [CORPUS_TEXT[:200]])
    config = config.model_copy(update={"corpus_prefixes": [short]})
    default = run(api.SelfStudy().maxChunkTokens)
    assert default[0] == EXIT_OK, default[1]


@pytest.mark.parametrize("model", ["missing.gguf", "missing"])
def test_a_base_model_not_in_the_store_exits_permanent(
    model: str,
    file_store_root: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A baseModel.uri naming nothing (a .gguf object or an HF directory prefix) is bad input like a missing corpus:
    every retry would find nothing again, so the Job fails at once, saying which model is missing."""
    store = Store()
    config = make_config(file_store_root, put_corpus(store, file_store_root, "lighthouse", [CORPUS_TEXT]))
    uri = f"{file_store_root}/models/{model}"
    config.spec.baseModel.uri = uri
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(tmp_path / "termination-log"))
    assert main(["--config", config.model_dump_json(), "--options", OPTIONS.model_dump_json()]) == EXIT_PERMANENT
    assert uri in capsys.readouterr().err and uri in (tmp_path / "termination-log").read_text()


def test_invalid_config_exits_permanent(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", '{"namespace": "default"}']) == EXIT_PERMANENT
    assert "invalid trainer config" in capsys.readouterr().err


def test_a_config_file_that_is_not_utf8_exits_permanent_saying_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every retry would read the same bytes: bad input (65) with a one-line reason, not a traceback and exit 1."""
    config_file = tmp_path / "config.json"
    config_file.write_bytes('{"namespace": "café"}'.encode("latin-1"))
    assert main(["--config-file", str(config_file)]) == EXIT_PERMANENT
    err = capsys.readouterr().err
    assert f"invalid trainer config: {config_file}: not UTF-8 text" in err and "Traceback" not in err


def test_dockerfile_matches_the_trainer_contract() -> None:
    from cartridges.contract import TRAINER_COMMAND

    lines = (REPO / "trainer-image" / "Dockerfile").read_text().splitlines()
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    entrypoint = next(line.removeprefix("ENTRYPOINT ") for line in lines if line.startswith("ENTRYPOINT "))
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert base.startswith("nvidia/cuda:") and base.split(":")[1][0].isdigit()  # pinned tag, never latest
    assert json.loads(entrypoint) == TRAINER_COMMAND
    assert users and users[-1] not in ("root", "0")
    assert any('".[train]"' in line for line in lines)


def test_multi_gpu_launcher_keeps_the_permanent_exit_code(
    tiny_model: LoadedModel, file_store_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun turns any rank failure into exit 1; the launcher must still report bad input as permanent."""
    import cartridges_trainer.__main__ as entry

    store = Store()
    put_model(tiny_model, store, f"{file_store_root}/models/tiny")
    config = make_config(file_store_root, put_corpus(store, file_store_root, "empty", []))
    launched: list[list[str]] = []

    class Torchrun:
        """Stands in for torchrun: runs the rank in-process with the launcher's environment, exits 1 on failure."""

        def __init__(self, command: list[str], env: dict[str, str]) -> None:
            launched.append(command)
            with monkeypatch.context() as rank:
                for name, value in {**env, "WORLD_SIZE": "1"}.items():
                    rank.setenv(name, value)
                self.code = 0 if entry.main(command[command.index("cartridges_trainer") + 1 :]) == 0 else 1

        def wait(self) -> int:
            return self.code

    monkeypatch.setattr(entry.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(entry.subprocess, "Popen", Torchrun)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert entry.main(["--config", config.model_dump_json()]) == EXIT_PERMANENT
    assert launched and "--nproc-per-node=2" in launched[0]


def test_multi_gpu_launcher_passes_sigterm_to_torchrun_and_exits_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher is the container's main process, the one the kubelet signals: it must hand SIGTERM to torchrun
    (which passes it to the ranks, waiting the pod's grace period) and wait, not die and take the ranks with it."""
    import cartridges_trainer.__main__ as entry

    config = make_config("file:///unused", "file:///unused")
    started = tmp_path / "started"
    script = "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(1)); "
    script += f"pathlib.Path({str(started)!r}).touch(); time.sleep(60)"
    real_popen = subprocess.Popen
    environments: list[dict[str, str]] = []

    def torchrun(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Stands in for torchrun: waits for SIGTERM, then exits 1 as torchrun does once its ranks stopped."""
        environments.append(env)
        return real_popen([sys.executable, "-c", script])

    def kubelet() -> None:
        while not started.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(entry.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(entry.subprocess, "Popen", torchrun)
    monkeypatch.setattr(entry, "STOP", StopRequest())
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threading.Thread(target=kubelet, daemon=True).start()
    assert entry.main(["--config", config.model_dump_json()]) == EXIT_INTERRUPTED
    assert environments[0]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(TRAINER_GRACE_S)


def test_ctrl_c_while_deferred_is_recorded_and_a_second_one_interrupts_at_once() -> None:
    """The first Ctrl-C waits for the loop's next safe point (which checkpoints); a second one must still stop a
    step that hangs. The block leaves as KeyboardInterrupt and forgets the request (a command run in-process may
    train again)."""
    stop, caller = StopRequest(), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), stop.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.stopping and not stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert not stop.stopping and signal.getsignal(signal.SIGINT) is caller

"""The self-study trainer on the tiny random Llama: synthesis, loss, distillation, resume, evaluation, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cartridges import api
from cartridges.artifact import Cartridge, download_artifact, load_cartridge
from cartridges.contract import EXIT_PERMANENT, TrainerConfig
from cartridges.hashing import sha256_bytes
from cartridges.kvcache import compose, forward_with_cartridge, prefix_cartridge
from cartridges.layout import CORPUS_FILE, EVAL_FILE, MANIFEST_FILE, PROGRESS_FILE, CorpusManifest, Progress
from cartridges.models import LoadedModel, load_base_model
from cartridges.store import Store, StoreURI
from cartridges_trainer import InputError, TrainerOptions, train
from cartridges_trainer import synthesis as synthesis_module
from cartridges_trainer.__main__ import main
from cartridges_trainer.batching import answer_logprobs, collate
from cartridges_trainer.corpus import Corpus
from cartridges_trainer.distill import TrainableCartridge, distill_loss, initial_cartridge, step_batch
from cartridges_trainer.synthesis import Shard, synthesize_shard

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


def put_corpus(store: Store, root: str, name: str, texts: list[str]) -> str:
    """Write a normalized corpus the way the corpus reconciler does; returns its prefix."""
    data = "".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)).encode()
    prefix = f"{root.rstrip('/')}/corpora/default/{name}/{sha256_bytes(data)}"
    manifest = CorpusManifest(
        digest=sha256_bytes(data), documents=len(texts), bytes=len(data), description="the Varnholm lighthouse"
    )
    store.put_bytes(f"{prefix}/{CORPUS_FILE}", data)
    store.put_json(f"{prefix}/{MANIFEST_FILE}", manifest.model_dump())
    return prefix


def make_config(root: str, corpus_prefix: str, *, steps: int = 4, size: int = 16, conversations: int = 8) -> TrainerConfig:
    spec = api.CartridgeSpec(
        corpusRefs=[api.CorpusRef(name="lighthouse")],
        baseModel=api.BaseModelRef(name="tiny", uri=f"{root.rstrip('/')}/models/tiny"),
        size=size,
        selfStudy=api.SelfStudy(conversations=conversations, minChunkTokens=16, maxChunkTokens=64, topK=4),
        training=api.Training(steps=steps, learningRate=1e-2, batchSize=4, sequenceLength=64),
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


@pytest.fixture(scope="module")
def shard(tiny_model: LoadedModel) -> Shard:
    torch.set_num_threads(1)
    study = api.SelfStudy(minChunkTokens=16, maxChunkTokens=64, topK=4)
    return synthesize_shard(tiny_model, tiny_corpus(tiny_model), study, OPTIONS, "synth/train-00000.safetensors")


def save_model(lm: LoadedModel, store: Store, root: str, tmp_path: Path) -> None:
    """Put the tiny model into the store as an HF directory, where ``spec.baseModel.uri`` points."""
    local = tmp_path / "tiny-model"
    lm.model.save_pretrained(local)
    lm.tokenizer.save_pretrained(local)
    for path in local.iterdir():
        store.put_file(f"{root.rstrip('/')}/models/tiny/{path.name}", path)


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
        assert torch.equal(a.ids, b.ids) and a.answer_start == b.answer_start
        assert torch.equal(a.topk_ids, b.topk_ids.int()) and torch.equal(a.topk_logprobs, b.topk_logprobs)


# --- distillation ------------------------------------------------------------------------------------------------


def test_loss_matches_a_direct_computation(shard: Shard, tiny_model: LoadedModel) -> None:
    init = initial_cartridge(tiny_model, tiny_corpus(tiny_model), make_config("file:///x", "file:///x").spec, 0)
    batch = collate(shard.conversations, 0, tiny_model.device)
    with torch.no_grad():
        loss = distill_loss(answer_logprobs(tiny_model.model, batch, init), batch)
        expected, count = 0.0, 0
        for conv in shard.conversations:  # one unpadded conversation at a time, full logits
            ids = conv.ids.unsqueeze(0)
            hidden = forward_with_cartridge(tiny_model.model, init, ids, torch.ones_like(ids))
            logq = tiny_model.model.lm_head(hidden[0]).log_softmax(-1)
            for j in range(len(conv.answer)):
                row = logq[conv.answer_start + j - 1]
                expected -= float((conv.topk_logprobs[j].exp() * row[conv.topk_ids[j].long()]).sum())
                count += 1
    assert loss.item() == pytest.approx(expected / count, rel=1e-4)


def test_gradients_reach_only_trainable_rows_and_loss_goes_down(shard: Shard, tiny_model: LoadedModel) -> None:
    spec = make_config("file:///x", "file:///x").spec.model_copy(update={"frozenTokens": 2})
    init = initial_cartridge(tiny_model, tiny_corpus(tiny_model), spec, 0)
    trainable = TrainableCartridge(init)
    optimizer = torch.optim.Adam(trainable.parameters(), lr=1e-1)
    batch = collate(shard.conversations, 0, tiny_model.device)
    # a random teacher is nearly uniform; a peaked target leaves the cartridge room to learn
    batch.topk_logprobs = torch.tensor([0.9, 0.05, 0.03, 0.02]).log().expand_as(batch.topk_logprobs)
    losses = []
    for _ in range(30):
        loss = distill_loss(answer_logprobs(tiny_model.model, batch, trainable.cartridge()), batch)
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


def test_step_batches_are_a_function_of_the_step() -> None:
    items = list(range(20))
    assert step_batch(items, 4, 0, 7) == step_batch(items, 4, 0, 7)
    assert step_batch(items, 4, 0, 7) != step_batch(items, 4, 0, 8)
    assert len(set(step_batch(items, 4, 0, 3))) == 4

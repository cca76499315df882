"""Self-study synthesis: conversations about a chunk of the corpus, and the teacher's top-k log-probs on each answer.

The teacher is the model with the chunk in context. Two recipes (``selfStudy.recipe``): ``paper``, where bot A
asks about a random chunk and bot B answers greedily, distilled on the answers; ``grounded``, where tasks and answers
come from the facts of a window of the corpus (:mod:`cartridges_trainer.grounded`), the teacher reads the whole
corpus when it fits the model (what ICL and so the cartridge stand for), and the whole user turn is distilled too.
One shard = one context and a batch of conversations about it, made together (batched generation, the context read
once). Shards are named by index and seeded by name, so a restart skips what the store holds and regenerates the
rest identically. ``synth/inputs.json`` records what the shards depend on (model, corpus, selfStudy, the synthesis
options; not p, initialization or training): a new generation that differs only elsewhere copies the shards of
an earlier one instead of synthesizing again (:func:`adopt_synthesis`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cartridges.api import SelfStudy
from cartridges.artifact import Cartridge
from cartridges.chat import render, turn_after_cartridges
from cartridges.kvcache import forward_with_cartridge, prefix_cartridge
from cartridges.models import LoadedModel
from cartridges.store import IntegrityError, ObjectNotFound
from cartridges_trainer.batching import Conversation
from cartridges_trainer.corpus import Corpus
from cartridges_trainer.errors import InputError
from cartridges_trainer.grounded import HELD_OUT_SHARE, Task, grounded_tasks
from cartridges_trainer.options import TrainerOptions
from cartridges_trainer.parallel import World
from cartridges_trainer.progress import ProgressReporter
from cartridges_trainer.prompts import SEED_INSTRUCTIONS, system_prompt
from cartridges_trainer.workspace import Workspace

log = logging.getLogger(__name__)
SYNTH_FOLDER = "synth"
INPUTS_FILE = f"{SYNTH_FOLDER}/inputs.json"
SYNTHESIS_VERSIONS = {"paper": 1, "grounded": 5}
"""Per recipe: bump one when its shards change for the same inputs (older ones are then not reused), leaving the
other recipe's stored shards reusable. grounded 2: tasks cut to max_question_tokens; 3: cut at any whitespace, no
blank without context; 4: a window of whitespace only gives way to the next with text; 5: hard-wrapped lines joined
into sentences, none ended after a title, abbreviation or initial; held-out shards ask about facts training never
does."""
TEACHER_BATCH = 8
HELD_OUT_PREFIX = "eval-"
HELD_OUT = {
    "paper": "conversations about random chunks, seeded apart from the training ones",
    "grounded": f"tasks about facts reserved from training (1 in {round(1 / HELD_OUT_SHARE)}, chosen by their words)",
}
"""Per recipe: what the held-out shards ask, recorded with the scores."""


@dataclass
class Shard:
    """Conversations about one chunk; ``context`` is the teacher's system turn (the chunk), kept for ICL scoring."""

    context: torch.Tensor
    conversations: list[Conversation]

    def save(self, path: Path) -> None:
        convs = self.conversations
        lengths = torch.tensor([len(c.ids) for c in convs])
        save_file(
            {
                "context": self.context,
                "ids": torch.cat([c.ids for c in convs]),
                "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
                "answer_starts": torch.tensor([c.answer_start for c in convs]),
                "target_starts": torch.tensor([c.target_start for c in convs]),
                "topk_ids": torch.cat([c.topk_ids for c in convs]).int(),
                "topk_logprobs": torch.cat([c.topk_logprobs for c in convs]).float(),
            },
            str(path),
        )

    @classmethod
    def load(cls, path: Path) -> Shard:
        t = load_file(str(path))
        offsets, starts = t["offsets"].tolist(), t["answer_starts"].tolist()
        convs, top_offset = [], 0
        for begin, end, start, target in zip(offsets, offsets[1:], starts, t["target_starts"].tolist(), strict=False):
            top = slice(top_offset, top_offset + end - begin - target)
            convs.append(Conversation(t["ids"][begin:end], start, target, t["topk_ids"][top], t["topk_logprobs"][top]))
            top_offset = top.stop
        return cls(t["context"], convs)


def shard_names(conversations: int, options: TrainerOptions) -> tuple[list[str], list[str]]:
    """Training shards covering ``conversations``, then the held-out evaluation shards."""
    train = -(-conversations // options.synthesis_batch_size)
    return (
        [f"{SYNTH_FOLDER}/train-{i:05d}.safetensors" for i in range(train)],
        [f"{SYNTH_FOLDER}/{HELD_OUT_PREFIX}{i:05d}.safetensors" for i in range(options.eval_shards)],
    )


def _shard_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1].split(".")[0])


def _is_held_out(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(HELD_OUT_PREFIX)


def _pad(seqs: list[list[int]], pad_id: int, device: torch.device, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _stop_ids(lm: LoadedModel) -> set[int]:
    configured = lm.model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return ids


def _text(lm: LoadedModel, ids: list[int]) -> str:
    text = lm.tokenizer.decode(ids, skip_special_tokens=True)
    return text if isinstance(text, str) else "".join(text)


@torch.no_grad()
def generate(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> list[list[int]]:
    """New tokens for every prompt in one batched ``generate``, each cut after its first stop token (kept)."""
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    ids, mask = _pad(prompts, pad_id, lm.device, left=True)
    stops = _stop_ids(lm)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
    out = lm.model.generate(  # type: ignore[operator]  # transformers types generate through nn.Module.__getattr__
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,
        pad_token_id=pad_id,
        eos_token_id=sorted(stops),
        **({"do_sample": False} | sampling),
    )
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:end])
    return results


class TeacherContext:
    """The teacher's KV cache of the last context it read: the shards of a corpus that fits the model share one."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self._tokens: list[int] = []
        self._kv: Cartridge | None = None

    def kv(self, tokens: list[int]) -> Cartridge:
        if self._kv is None or tokens != self._tokens:
            self._tokens, self._kv = tokens, prefix_cartridge(self.lm.model, tokens, frozen_tokens=0)
        return self._kv


@torch.no_grad()
def teacher_topk(
    lm: LoadedModel, context: Cartridge, seqs: list[list[int]], starts: list[int], k: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Top-k (ids, log-probs) of the teacher at each token ``seq[start:]`` of ``context + seq``.

    The shared context is read once into a KV cache; the conversations follow it in right-padded batches of
    ``TEACHER_BATCH`` (the cache is copied per row, so this bounds memory).
    """
    head: torch.nn.Module = lm.model.get_output_embeddings()
    results = []
    for i in range(0, len(seqs), TEACHER_BATCH):
        batch = seqs[i : i + TEACHER_BATCH]
        ids, mask = _pad(batch, 0, lm.device, left=False)
        hidden = forward_with_cartridge(lm.model, context, ids, mask)
        for row, (seq, start) in enumerate(zip(batch, starts[i : i + TEACHER_BATCH], strict=True)):
            logprobs = head(hidden[row, start - 1 : len(seq) - 1]).float().log_softmax(-1)
            top = logprobs.topk(k, dim=-1)
            results.append((top.indices.int().cpu(), top.values.cpu()))
    return results


def synthesize_shard(
    lm: LoadedModel,
    corpus: Corpus,
    study: SelfStudy,
    options: TrainerOptions,
    name: str,
    teacher: TeacherContext | None = None,
) -> Shard:
    """One context and ``synthesis_batch_size`` conversations about it, by ``study.recipe``, with teacher top-k.

    The grounded recipe distills every token of a conversation after its first (the user turn quotes the corpus),
    the paper's only the answer.
    """
    seed = zlib.crc32(f"{options.seed}:{name}".encode())
    rng = random.Random(seed)
    torch.manual_seed(seed)
    grounded = study.recipe == "grounded"
    make = _grounded_conversations if grounded else _paper_conversations
    context, turns, answers = make(lm, corpus, study, options, name, rng)
    seqs = [turn + answer for turn, answer in zip(turns, answers, strict=True)]
    targets = [1 if grounded else len(turn) for turn in turns]
    tops = teacher_topk(lm, (teacher or TeacherContext(lm)).kv(context), seqs, targets, study.topK)
    conversations = [
        Conversation(torch.tensor(seq), len(turn), target, top_ids, top_lp)
        for seq, turn, target, (top_ids, top_lp) in zip(seqs, turns, targets, tops, strict=True)
    ]
    return Shard(torch.tensor(context), conversations)


Turns = tuple[list[int], list[list[int]], list[list[int]]]
"""The teacher's context, then each conversation's user turn (with assistant header) and answer ids."""


def _paper_conversations(
    lm: LoadedModel, corpus: Corpus, study: SelfStudy, options: TrainerOptions, name: str, rng: random.Random
) -> Turns:
    """A random chunk; bot A writes a message from a seed prompt, bot B answers it greedily (Eyuboglu et al.)."""
    start, end = corpus.chunk(rng, study.minChunkTokens, study.maxChunkTokens)
    system = system_prompt(corpus.description, _text(lm, corpus.tokens[start:end]))
    seeds = [rng.choice(study.seedPrompts) for _ in range(options.synthesis_batch_size)]
    rendered = [render(lm.tokenizer, system, SEED_INSTRUCTIONS[seed_prompt]) for seed_prompt in seeds]
    context = rendered[0][0]
    a_prompts = [context + turn for _, turn in rendered]
    questions = generate(lm, a_prompts, options.max_question_tokens, study.temperature)
    turns = [render(lm.tokenizer, system, _text(lm, q).strip())[1] for q in questions]
    b_prompts = [context + turn for turn in turns]
    return context, turns, generate(lm, b_prompts, options.max_answer_tokens, 0.0)


def _grounded_conversations(
    lm: LoadedModel, corpus: Corpus, study: SelfStudy, options: TrainerOptions, name: str, rng: random.Random
) -> Turns:
    """Tasks about the facts of the shard's window of the corpus, answered with its own words and the end-of-turn
    token; the teacher reads the whole corpus if it fits the model with the longest conversation, else the window.
    A held-out shard asks about the facts reserved across the whole corpus when the teacher reads it whole (one
    window may hold one or none of them), else about those of its window."""
    if _is_held_out(name):
        tasks = grounded_tasks(
            rng,
            _text(lm, corpus.tokens),
            options.synthesis_batch_size,
            cut_head=False,
            cut_tail=False,
            fits=_fits(lm, options),
            held_out=True,
        )
        if tasks:
            turns, answers = _turns_and_answers(lm, options, tasks)
            if (whole := _whole_corpus(lm, corpus, turns, answers)) is not None:
                return whole, turns, answers
    start, end, chunk, tasks = _grounded_window(lm, corpus, study, options, name, rng)
    turns, answers = _turns_and_answers(lm, options, tasks)
    if (whole := _whole_corpus(lm, corpus, turns, answers)) is not None:
        return whole, turns, answers
    window = render(lm.tokenizer, system_prompt(corpus.description, chunk), "")[0]
    check_chunk_fits(lm, study, end - start, len(window) - (end - start) + _longest(turns, answers))
    return window, turns, answers


def _turns_and_answers(
    lm: LoadedModel, options: TrainerOptions, tasks: list[Task]
) -> tuple[list[list[int]], list[list[int]]]:
    """The tasks' user turns (with assistant header), and their answers cut to ``max_answer_tokens`` with the
    end-of-turn token."""
    eos = [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []
    answers = [
        list(lm.tokenizer(task.answer, add_special_tokens=False)["input_ids"])[: options.max_answer_tokens - len(eos)]
        + eos
        for task in tasks
    ]
    return [turn_after_cartridges(lm.tokenizer, task.user) for task in tasks], answers


def _longest(turns: list[list[int]], answers: list[list[int]]) -> int:
    return max(len(turn) + len(answer) for turn, answer in zip(turns, answers, strict=True))


def _whole_corpus(
    lm: LoadedModel, corpus: Corpus, turns: list[list[int]], answers: list[list[int]]
) -> list[int] | None:
    """The teacher's context of the whole corpus, if it fits the model with the longest conversation."""
    longest = _longest(turns, answers)
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if limit is None or len(corpus.tokens) + longest <= limit:  # else too long: not even worth rendering
        whole = corpus_context(lm, corpus)
        if limit is None or len(whole) + longest <= limit:
            return whole
    return None


def _fits(lm: LoadedModel, options: TrainerOptions) -> Callable[[Task], bool]:
    """Whether a task's user turn keeps to ``max_question_tokens`` (the template's own tokens aside)."""
    empty = len(turn_after_cartridges(lm.tokenizer, ""))
    return lambda task: len(turn_after_cartridges(lm.tokenizer, task.user)) - empty <= options.max_question_tokens


def _grounded_window(
    lm: LoadedModel, corpus: Corpus, study: SelfStudy, options: TrainerOptions, name: str, rng: random.Random
) -> tuple[int, int, str, list[Task]]:
    """The window of the corpus numbered by the shard's ``name`` (its span and text) and its tasks; past a window
    with nothing to ask about (whitespace only, as a PDF's blank pages; no fact reserved for a held-out shard), the
    next one. A held-out shard asks about the facts reserved from training; about any fact when no window holds one
    (a corpus of a single fact: the pipeline drops what is then the same as a training conversation). A skipped
    window draws nothing from ``rng``."""
    windows = corpus.windows(study.maxChunkTokens)
    held_out = _is_held_out(name)
    for skipped in range(2 * windows if held_out else windows):
        start, end = corpus.window(_shard_index(name) + skipped, study.maxChunkTokens)
        chunk = _text(lm, corpus.tokens[start:end])
        tasks = grounded_tasks(
            rng,
            chunk,
            options.synthesis_batch_size,
            cut_head=start > 0,
            cut_tail=end < len(corpus.tokens),
            fits=_fits(lm, options),
            held_out=held_out and skipped < windows,
        )
        if tasks:
            return start, end, chunk, tasks
    raise InputError(f"the corpus's {len(corpus.tokens)} tokens decode to whitespace only: no text to study")


def teacher_overhead(lm: LoadedModel, description: str, study: SelfStudy, options: TrainerOptions) -> int:
    """The most positions the recipe's prompts take besides the chunk, known before synthesis: the system turn
    around it (chat template, corpus description), then ``paper``'s bot A seed turn and question, or its question,
    user-turn template and answer; ``grounded``'s task (quoting the corpus, cut to ``max_question_tokens``),
    template and answer."""
    around = system_prompt(description, "")
    system, turn = render(lm.tokenizer, around, "")
    answer = len(turn) + options.max_answer_tokens
    if study.recipe == "grounded":
        return len(system) + options.max_question_tokens + answer
    seed_turns = [len(render(lm.tokenizer, around, SEED_INSTRUCTIONS[seed])[1]) for seed in study.seedPrompts]
    return len(system) + options.max_question_tokens + max(*seed_turns, answer)


def check_chunk_fits(lm: LoadedModel, study: SelfStudy, chunk: int, rest: int) -> None:
    """Refuse a teacher read of a chunk of ``chunk`` tokens and ``rest`` more past the model's trained positions,
    where it reads garbage without a word, naming the largest ``maxChunkTokens`` that leaves room for the rest."""
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if limit is not None and chunk + rest > limit:
        raise InputError(
            f"selfStudy.maxChunkTokens {study.maxChunkTokens} overflows {lm.fingerprint.model_id}'s {limit} positions:"
            f" the teacher reads a chunk of {chunk} tokens and {rest} more (prompt, question, answer); set "
            f"selfStudy.maxChunkTokens to at most {limit - rest}"
        )


def corpus_context(lm: LoadedModel, corpus: Corpus) -> list[int]:
    """The teacher's system turn holding the whole corpus: what a cartridge of the corpus stands in for."""
    return render(lm.tokenizer, system_prompt(corpus.description, _text(lm, corpus.tokens)), "")[0]


def _stored_shard(workspace: Workspace, name: str, stored: set[str]) -> Shard | None:
    """The shard a previous run finished, or ``None`` (absent, or corrupt and to be regenerated)."""
    if name not in stored:
        return None
    try:
        return Shard.load(workspace.fetch(name))
    except (IntegrityError, SafetensorError, KeyError, RuntimeError) as err:
        log.warning("synthesis shard %s is corrupt (%s); regenerating it", name, err)
        workspace.path(name).unlink(missing_ok=True)
        return None


def synthesis_inputs(lm: LoadedModel, corpus: Corpus, study: SelfStudy, options: TrainerOptions) -> dict[str, Any]:
    """Everything the shards depend on, with its sha256 as ``key``: equal keys, interchangeable shards."""
    inputs = {
        "version": SYNTHESIS_VERSIONS[study.recipe],
        "model": lm.fingerprint.model_dump(mode="json"),
        "corpus": {"digest": corpus.digest, "description": corpus.description},
        "selfStudy": study.model_dump(mode="json"),
        "options": options.model_dump(
            include={"synthesis_batch_size", "max_question_tokens", "max_answer_tokens", "eval_shards", "seed"}
        ),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return {"key": key, **inputs}


def adopt_synthesis(workspace: Workspace, inputs: dict[str, Any], earlier: Sequence[str]) -> str | None:
    """Before a generation's first shard: copy (server-side) the shards of the first of the ``earlier`` generation
    prefixes synthesized from the same inputs, and return that prefix; with none, record ``inputs`` for the shards
    about to be made here. A generation whose shards were made from these inputs is left as it is (a restart), and
    the prefix they were copied from (recorded with the inputs as ``copied_from``) is returned again; shards made
    from other inputs (left by another run under this prefix) or unlabelled ones are deleted first.

    A shard is a function of the inputs and its name, so an earlier generation's partial set is as good: what is
    missing is synthesized as after a restart."""
    store = workspace.store
    if workspace.names(SYNTH_FOLDER):
        try:
            record = store.get_json(workspace.uri(INPUTS_FILE))
        except (ObjectNotFound, IntegrityError):  # unrecorded, or altered: the shards cannot be trusted
            record = {}
        recorded = record.get("key")
        if recorded == inputs["key"]:
            copied_from: str | None = record.get("copied_from")
            return copied_from
        log.warning(
            "discarding the synthesis shards under %s: they were made from other inputs (%s), not this run's (%s)",
            workspace.uri(SYNTH_FOLDER),
            recorded[:12] if isinstance(recorded, str) else "unrecorded",
            inputs["key"][:12],
        )
        workspace.delete(SYNTH_FOLDER)
        shutil.rmtree(workspace.local / SYNTH_FOLDER, ignore_errors=True)
    source = None
    for prefix in earlier:
        try:
            if store.get_json(f"{prefix}/{INPUTS_FILE}").get("key") == inputs["key"]:
                source = prefix
                break
        except (ObjectNotFound, IntegrityError):
            continue
    if source is not None:
        for name in store.names(f"{source}/{SYNTH_FOLDER}"):
            if f"{SYNTH_FOLDER}/{name}" != INPUTS_FILE:
                store.copy(f"{source}/{SYNTH_FOLDER}/{name}", workspace.uri(f"{SYNTH_FOLDER}/{name}"))
    store.put_json(workspace.uri(INPUTS_FILE), {**inputs, "copied_from": source})
    return source


def synthesize(
    lm: LoadedModel,
    corpus: Corpus,
    study: SelfStudy,
    options: TrainerOptions,
    workspace: Workspace,
    progress: ProgressReporter,
    world: World,
) -> tuple[list[Shard], list[Shard]]:
    """All training and held-out shards, generating only those the store does not hold yet (split across ranks)."""
    train_names, eval_names = shard_names(study.conversations, options)
    names = train_names + eval_names
    stored = set(workspace.names(SYNTH_FOLDER))
    shards: dict[str, Shard] = {}
    for name in names:
        if (shard := _stored_shard(workspace, name, stored)) is not None:
            shards[name] = shard
    missing = [name for name in names if name not in shards]
    progress.phase("synthesizing", total=len(names), done=len(shards))
    teacher = TeacherContext(lm)
    for made, name in enumerate(missing[world.rank :: world.size], start=1):
        shards[name] = synthesize_shard(lm, corpus, study, options, name, teacher)
        shards[name].save(workspace.path(name))
        workspace.upload(name)
        # the other ranks make shards alongside this one: extrapolate to the whole world
        tokens = sum(len(c.ids) for c in shards[name].conversations) * world.size
        progress.advance(min(len(names), len(names) - len(missing) + made * world.size), tokens=tokens)
    world.barrier()
    loaded = {name: shards.get(name) or Shard.load(workspace.fetch(name)) for name in names}
    return [loaded[n] for n in train_names], [loaded[n] for n in eval_names]

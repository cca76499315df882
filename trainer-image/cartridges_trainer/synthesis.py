"""Self-study synthesis: bot A asks about a chunk, bot B answers it greedily, bot B's top-k log-probs are kept.

One shard = one chunk and a batch of conversations about it, generated together (left-padded batches). Shards are
named by index and seeded by name, so a restart skips what the store holds and regenerates the rest identically.
"""

from __future__ import annotations

import logging
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cartridges.api import SelfStudy
from cartridges.kvcache import positions_after
from cartridges.models import LoadedModel
from cartridges.store import IntegrityError
from cartridges_trainer.batching import Conversation
from cartridges_trainer.corpus import Corpus
from cartridges_trainer.options import TrainerOptions
from cartridges_trainer.parallel import World
from cartridges_trainer.progress import ProgressReporter
from cartridges_trainer.prompts import SEED_INSTRUCTIONS, render, system_prompt
from cartridges_trainer.workspace import Workspace

log = logging.getLogger(__name__)
SYNTH_FOLDER = "synth"


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
                "topk_ids": torch.cat([c.topk_ids for c in convs]).int(),
                "topk_logprobs": torch.cat([c.topk_logprobs for c in convs]).float(),
            },
            str(path),
        )

    @classmethod
    def load(cls, path: Path) -> Shard:
        t = load_file(str(path))
        offsets, starts = t["offsets"].tolist(), t["answer_starts"].tolist()
        convs, answer_offset = [], 0
        for begin, end, start in zip(offsets, offsets[1:], starts, strict=False):
            answer = end - begin - start
            convs.append(
                Conversation(
                    t["ids"][begin:end],
                    start,
                    t["topk_ids"][answer_offset : answer_offset + answer],
                    t["topk_logprobs"][answer_offset : answer_offset + answer],
                )
            )
            answer_offset += answer
        return cls(t["context"], convs)


def shard_names(conversations: int, options: TrainerOptions) -> tuple[list[str], list[str]]:
    """Training shards covering ``conversations``, then the held-out evaluation shards."""
    train = -(-conversations // options.synthesis_batch_size)
    return (
        [f"{SYNTH_FOLDER}/train-{i:05d}.safetensors" for i in range(train)],
        [f"{SYNTH_FOLDER}/eval-{i:05d}.safetensors" for i in range(options.eval_shards)],
    )


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
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
    ids, mask = _left_pad(prompts, pad_id, lm.device)
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


@torch.no_grad()
def teacher_topk(
    lm: LoadedModel, prompts: list[list[int]], answers: list[list[int]], k: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Top-k (ids, log-probs) of the teacher at each answer token, from one forward over the batch."""
    ids, mask = _left_pad([p + a for p, a in zip(prompts, answers, strict=True)], 0, lm.device)
    hidden = lm.model.get_decoder()(
        input_ids=ids, attention_mask=mask, position_ids=positions_after(0, mask)
    ).last_hidden_state
    head: torch.nn.Module = lm.model.get_output_embeddings()
    width = ids.shape[1]
    results = []
    for i, answer in enumerate(answers):
        logprobs = head(hidden[i, width - len(answer) - 1 : width - 1]).float().log_softmax(-1)
        top = logprobs.topk(k, dim=-1)
        results.append((top.indices.int().cpu(), top.values.cpu()))
    return results


def synthesize_shard(lm: LoadedModel, corpus: Corpus, study: SelfStudy, options: TrainerOptions, name: str) -> Shard:
    """One chunk, ``synthesis_batch_size`` seed prompts: bot A's questions, bot B's greedy answers and top-k."""
    seed = zlib.crc32(f"{options.seed}:{name}".encode())
    rng = random.Random(seed)
    torch.manual_seed(seed)
    start, end = corpus.chunk(rng, study.minChunkTokens, study.maxChunkTokens)
    system = system_prompt(corpus.description, _text(lm, corpus.tokens[start:end]))
    seeds = [rng.choice(study.seedPrompts) for _ in range(options.synthesis_batch_size)]
    rendered = [render(lm.tokenizer, system, SEED_INSTRUCTIONS[seed_prompt]) for seed_prompt in seeds]
    context = rendered[0][0]
    a_prompts = [context + turn for _, turn in rendered]
    questions = generate(lm, a_prompts, options.max_question_tokens, study.temperature)
    turns = [render(lm.tokenizer, system, _text(lm, q).strip())[1] for q in questions]
    b_prompts = [context + turn for turn in turns]
    answers = generate(lm, b_prompts, options.max_answer_tokens, 0.0)
    tops = teacher_topk(lm, b_prompts, answers, study.topK)
    conversations = [
        Conversation(torch.tensor(turn + answer), len(turn), top_ids, top_lp)
        for turn, answer, (top_ids, top_lp) in zip(turns, answers, tops, strict=True)
    ]
    return Shard(torch.tensor(context), conversations)


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
    for made, name in enumerate(missing[world.rank :: world.size], start=1):
        shards[name] = synthesize_shard(lm, corpus, study, options, name)
        shards[name].save(workspace.path(name))
        workspace.upload(name)
        # the other ranks make shards alongside this one: extrapolate to the whole world
        tokens = sum(len(c.ids) for c in shards[name].conversations) * world.size
        progress.advance(min(len(names), len(names) - len(missing) + made * world.size), tokens=tokens)
    world.barrier()
    loaded = {name: shards.get(name) or Shard.load(workspace.fetch(name)) for name in names}
    return [loaded[n] for n in train_names], [loaded[n] for n in eval_names]

"""The arithmetic of ``cartridges eval``: answer NLL and decoding speed after a prefix KV cache (or none)."""

from __future__ import annotations

import time

import torch

from cartridges.artifact import Cartridge, QuantizedCartridge, StoredCartridge
from cartridges.cli.common import EXIT_INPUT, CLIError
from cartridges.cli.evaluate import QA, Row
from cartridges.kvcache import cartridge_cache, prefix_cartridge
from cartridges.models import LoadedModel
from cartridges_trainer.progress import Console

DECODE_TOKENS = 32


@torch.no_grad()
def compare(lm: LoadedModel, stored: StoredCartridge, description: str, text: str | None, pairs: list[QA]) -> list[Row]:
    """The three conditions on every pair; ICL is the model's own KV cache of the corpus prompt (no ICL row without
    a corpus ``text``). A quantized cartridge is scored dequantized, and its KV memory is what it is stored and
    served in; ICL's is counted in the dtype a server would hold it in next to that cartridge (:func:`kv_dtype`).

    Each question is rendered as it is read after a cartridge, without the corpus (the turn does not depend on the
    system text): the corpus is tokenized once, for ICL, not once per question."""
    from cartridges.chat import turn_after_cartridges

    turns = [turn_after_cartridges(lm.tokenizer, qa.question) for qa in pairs]
    cartridge = stored.dequantize() if isinstance(stored, QuantizedCartridge) else stored
    quantized = f", {stored.format}" if isinstance(stored, QuantizedCartridge) else ""
    eos = [lm.tokenizer.eos_token_id] if lm.tokenizer.eos_token_id is not None else []
    answers = [list(lm.tokenizer(qa.answer, add_special_tokens=False)["input_ids"]) + eos for qa in pairs]
    conditions: list[tuple[str, Cartridge | None, int]] = [("no context", None, 0)]
    if text is not None:
        longest = max(len(turn) + len(answer) for turn, answer in zip(turns, answers, strict=True))
        dtype = kv_dtype(stored)
        context, size = icl_context(lm, description, text, longest)
        icl = prefix_cartridge(lm.model, context, frozen_tokens=0)
        conditions.append((f"ICL ({size}, {str(dtype).removeprefix('torch.')} KV)", icl, icl.nbytes_in(dtype)))
    conditions.append((f"cartridge (p={cartridge.p}{quantized})", cartridge, stored.nbytes))
    rows = []
    console = Console()
    for number, (name, prefix, kv_bytes) in enumerate(conditions, 1):
        label = f"eval: {name} ({number}/{len(conditions)})"
        nll = _total_nll(lm, prefix, turns, answers, console, label)
        tokens = sum(len(a) for a in answers)
        rate = _tokens_per_s(lm, prefix, turns[0])
        rows.append(Row(name, nll / tokens, kv_bytes, rate))
    return rows


def kv_dtype(stored: StoredCartridge) -> torch.dtype:
    """The dtype ICL's KV cache is counted in, so that the memory ratio compares like with like: a dense cartridge's
    own (the server holds its own KV and cartridges in one dtype, so an fp32 and a bf16 copy give one ratio);
    bfloat16 next to a quantized one, which is for 16-bit serving on a GPU and dequantizes to it."""
    return torch.bfloat16 if isinstance(stored, QuantizedCartridge) else stored.keys[0].dtype


def icl_context(lm: LoadedModel, description: str, text: str, longest: int) -> tuple[list[int], str]:
    """The ICL system turn and how much of the corpus it holds: the whole corpus when it fits the model's positions
    with the longest question and answer, as the trainer's evaluation decides; else the longest leading chunk of the
    corpus that does. The whole turn counts context tokens (the prompt around the corpus too), a chunk corpus ones."""
    from cartridges.chat import render
    from cartridges_trainer.evaluate import fits_context
    from cartridges_trainer.prompts import system_prompt

    whole = render(lm.tokenizer, system_prompt(description, text), "")[0]
    if fits_context(lm, len(whole), longest):
        return whole, f"{len(whole)} context tokens"
    tokens = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    limit = int(lm.model.config.max_position_embeddings)
    keep, context = len(tokens), whole
    while not fits_context(lm, len(context), longest):
        keep -= max(1, len(context) + longest - limit)  # rendering the decoded chunk may add a token or two
        if keep <= 0:
            raise CLIError(
                f"the questions and answers alone leave no room for the corpus in {lm.fingerprint.model_id}'s "
                f"{limit} positions",
                EXIT_INPUT,
            )
        chunk = lm.tokenizer.decode(tokens[:keep])
        context = render(lm.tokenizer, system_prompt(description, chunk if isinstance(chunk, str) else ""), "")[0]
    return context, f"chunk: first {keep} of {len(tokens)} corpus tokens"


def _logits(lm: LoadedModel, prefix: Cartridge | None, ids: list[int], cache: object = None) -> torch.Tensor:
    """Next-token logits for ``ids`` read after ``prefix`` (positions continue after it)."""
    if cache is None and prefix is not None:
        cache = cartridge_cache(prefix, 1)
    out = lm.model(input_ids=torch.tensor([ids], device=lm.device), past_key_values=cache, use_cache=cache is not None)
    logits: torch.Tensor = out.logits[0]
    return logits


def _total_nll(
    lm: LoadedModel,
    prefix: Cartridge | None,
    turns: list[list[int]],
    answers: list[list[int]],
    console: Console,
    label: str,
) -> float:
    """The summed answer NLL of every pair after ``prefix``, with a bar on a terminal, else a status line now and
    then (a long evaluation is otherwise silent)."""
    total = 0.0
    console.start(label, len(answers), unit="question")
    for question, (turn, answer) in enumerate(zip(turns, answers, strict=True), 1):
        console.show(f"{label}: question {question}/{len(answers)}", now=question == 1)
        total += _answer_nll(lm, prefix, turn, answer)
        console.advance(question)
    console.close()
    return total


def _answer_nll(lm: LoadedModel, prefix: Cartridge | None, turn: list[int], answer: list[int]) -> float:
    logprobs = _logits(lm, prefix, turn + answer)[len(turn) - 1 : -1].float().log_softmax(-1)
    return -float(logprobs.gather(1, torch.tensor(answer, device=lm.device)[:, None]).sum())


def _tokens_per_s(lm: LoadedModel, prefix: Cartridge | None, turn: list[int]) -> float:
    """Greedy decoding speed after the prompt (prefill excluded)."""
    from transformers import DynamicCache

    cache = cartridge_cache(prefix, 1) if prefix is not None else DynamicCache()
    token = int(_logits(lm, prefix, turn, cache)[-1].argmax())
    started = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        token = int(_logits(lm, prefix, [token], cache)[-1].argmax())
    return DECODE_TOKENS / (time.perf_counter() - started)

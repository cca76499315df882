"""Per-request generation settings and a decode step's next tokens.

Greedy requests take one argmax over the batch. Sampled ones are drawn together on the logits' device by
inverse-CDF sampling: each request's uniform comes from its own CPU generator when it has a seed (so it repeats
whatever else is in the batch), and only the uniforms go to the device and the tokens come back. Sampling each
row on the CPU instead would copy and sort a full vocabulary per request per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cartridges_serving.errors import InvalidRequest

# Every step checks each running request's stop strings against its new text on the scheduler thread, which the
# whole batch waits for: bounded so one request cannot slow the others.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; ``temperature == 0`` is greedy, ``seed`` makes sampling repeatable.

    ``repetition_penalty`` > 1 makes tokens already in the prompt or the answer less likely (their positive logits
    divided by it, negative ones multiplied), the usual cure for a greedy answer stuck in a loop; 1 leaves them."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        if self.max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidRequest(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        longest = max(map(len, self.stop), default=0)
        if longest > MAX_STOP_LENGTH:
            raise InvalidRequest(f"a stop string may have at most {MAX_STOP_LENGTH} characters, got one of {longest}")


@dataclass(frozen=True)
class Pick:
    """One request's next token to choose: its row of the logits, its settings, its generator (seeded) and the
    tokens its repetition penalty applies to (the prompt's and the answer's so far)."""

    row: int
    params: SamplingParams
    generator: torch.Generator | None
    seen: Sequence[int] = ()


def next_tokens(logits: Tensor, picks: Sequence[Pick]) -> list[int]:
    """The next token of each pick, from ``logits`` [rows, vocab]."""
    logits = _penalize_repetition(logits, picks)
    greedy = logits.argmax(dim=-1).tolist() if any(p.params.temperature == 0 for p in picks) else []
    drawn: dict[int, int] = {}
    for nucleus in (False, True):  # apart, so a request's draw never depends on the other requests
        group = [p for p in picks if p.params.temperature > 0 and (p.params.top_p < 1) == nucleus]
        if group:
            drawn.update(zip((p.row for p in group), _sample(logits, group, nucleus), strict=True))
    return [greedy[p.row] if p.params.temperature == 0 else drawn[p.row] for p in picks]


def _sample(logits: Tensor, picks: Sequence[Pick], nucleus: bool) -> list[int]:
    """Rows of ``logits`` sampled at their temperatures; with ``nucleus``, from the smallest set of most likely
    tokens whose probability reaches top_p (sorted stably, so ties break the same way in any batch)."""
    settings = torch.tensor(
        [[p.row, p.params.temperature, p.params.top_p, float(torch.rand((), generator=p.generator))] for p in picks],
        dtype=torch.float64,
    ).to(logits.device)
    rows, temperature, top_p, uniform = settings[:, 0].long(), settings[:, 1:2], settings[:, 2:3], settings[:, 3:]
    scores = logits[rows].double()
    probs = ((scores - scores.amax(dim=-1, keepdim=True)) / temperature).softmax(dim=-1)  # no overflow at tiny T
    order = None
    if nucleus:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs > top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    # right=True: the first token whose cdf exceeds the draw, so a draw of exactly 0 skips tokens of probability 0
    chosen = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    tokens = chosen if order is None else order.gather(-1, chosen)
    return [int(t) for t in tokens.squeeze(-1).tolist()]


def _penalize_repetition(logits: Tensor, picks: Sequence[Pick]) -> Tensor:
    """``logits`` with each penalized pick's seen tokens made less likely (a copy; the rows of others unchanged)."""
    penalized = [p for p in picks if p.params.repetition_penalty != 1 and p.seen]
    if not penalized:
        return logits
    logits = logits.clone()
    for pick in penalized:
        seen = torch.tensor(sorted(set(pick.seen)), dtype=torch.long, device=logits.device)
        scores, penalty = logits[pick.row, seen], pick.params.repetition_penalty
        logits[pick.row, seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits

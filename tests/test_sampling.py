"""Next-token choice: greedy by argmax, sampling batched on the logits' device with per-request seeds."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from cartridges_serving.errors import InvalidRequest
from cartridges_serving.sampling import MAX_STOP_LENGTH, MAX_STOP_STRINGS, Pick, SamplingParams, next_tokens

PROBS = [0.5, 0.3, 0.2, 0.0]


def logits_of(probs: list[float], rows: int = 1) -> torch.Tensor:
    return torch.tensor([[math.log(p) if p else -math.inf for p in probs]] * rows)


def draws(params: SamplingParams, n: int = 6000) -> Counter[int]:
    picks = [Pick(row, params, torch.Generator().manual_seed(row)) for row in range(n)]
    return Counter(next_tokens(logits_of(PROBS, n), picks))


def test_sampling_follows_the_distribution() -> None:
    counts = draws(SamplingParams(temperature=1.0))
    for token, p in enumerate(PROBS):
        assert abs(counts[token] / 6000 - p) < 0.025, counts


def test_top_p_keeps_the_smallest_head_that_reaches_it() -> None:
    counts = draws(SamplingParams(temperature=1.0, top_p=0.6))  # 0.5 < 0.6 <= 0.5 + 0.3: tokens 0 and 1
    assert set(counts) == {0, 1}
    assert abs(counts[0] / 6000 - 0.5 / 0.8) < 0.025, counts


def test_a_tiny_temperature_is_greedy_not_an_error() -> None:
    logits = torch.randn(3, 50) * 30
    picks = [Pick(row, SamplingParams(temperature=1e-45, top_p=p, seed=1), None) for row, p in enumerate((1, 0.5, 1))]
    assert next_tokens(logits, picks) == logits.argmax(dim=-1).tolist()


def test_a_seeded_draw_does_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7)

    def alone_and_in_a_batch(row: int) -> tuple[int, int]:
        alone = next_tokens(logits[row : row + 1], [Pick(0, seeded, torch.Generator().manual_seed(7))])[0]
        others = [Pick(r, SamplingParams(temperature=r / 2, top_p=1 - r / 10), None) for r in range(5) if r != row]
        batch = [*others, Pick(row, seeded, torch.Generator().manual_seed(7))]
        return alone, next_tokens(logits, batch)[-1]

    for row in range(5):
        alone, batched = alone_and_in_a_batch(row)
        assert alone == batched


def test_a_uniform_of_exactly_zero_never_picks_a_token_of_probability_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.zeros(()))  # a draw of 0.0 (prob 2^-24)
    logits = logits_of([0.0, 0.0, 0.6, 0.4], rows=2)
    picks = [Pick(0, SamplingParams(temperature=1.0), None), Pick(1, SamplingParams(temperature=1.0, top_p=0.9), None)]
    assert next_tokens(logits, picks) == [2, 2]


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (("",), "stop strings must not be empty"),
        (tuple(str(i) for i in range(MAX_STOP_STRINGS + 1)), f"at most {MAX_STOP_STRINGS} stop strings"),
        (("ok", "x" * (MAX_STOP_LENGTH + 1)), f"at most {MAX_STOP_LENGTH} characters, got one of 257"),
    ],
)
def test_stop_strings_are_bounded(stop: tuple[str, ...], message: str) -> None:
    """Every step checks them on the scheduler thread the whole batch waits for."""
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(stop=stop).validate()
    at_the_limits = tuple(str(i).rjust(MAX_STOP_LENGTH, "x") for i in range(MAX_STOP_STRINGS))
    SamplingParams(stop=at_the_limits).validate()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() -> None:
    logits = torch.tensor([[4.0, 3.0, -1.0, -1.5], [4.0, 3.0, -1.0, -1.5]])
    penalized, plain = SamplingParams(repetition_penalty=2.0), SamplingParams()
    picks = [Pick(0, penalized, None, seen=[0, 2, 0]), Pick(1, plain, None, seen=[0, 2])]
    assert next_tokens(logits, picks) == [1, 0]  # 4 / 2 < 3 for the penalized row; the other row keeps token 0
    picks = [Pick(0, SamplingParams(repetition_penalty=2.0), None, seen=[0, 1])]
    assert next_tokens(logits, picks) == [0]  # 4/2 = 2 > 3/2: both seen, the order between them stays
    picks = [Pick(0, SamplingParams(repetition_penalty=8.0), None, seen=[0, 1, 2])]
    assert next_tokens(logits, picks) == [0]  # 0.5 > 0.375 > -1.5 > -8: negative seen logits only sink further
    assert logits[0].tolist() == [4.0, 3.0, -1.0, -1.5]  # the step's logits are not changed in place


@pytest.mark.parametrize("penalty", [0.0, -1.0, math.inf, math.nan])
def test_repetition_penalty_must_be_a_positive_number(penalty: float) -> None:
    with pytest.raises(InvalidRequest, match="repetition_penalty must be a finite number > 0"):
        SamplingParams(repetition_penalty=penalty).validate()

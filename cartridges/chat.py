"""How a question is tokenized after a cartridge: the one encoding the trainer distills on and the server sends.

A cartridge stands in for a system turn (the corpus), so the student (and a served request) reads the user turn
and the assistant header exactly as the chat template renders them after a system turn. Rendering a user turn
alone is not the same: templates such as SmolLM2's and Qwen2's then add their default system turn, tokens the
cartridge never saw between itself and the question.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Any system turn: only what the template renders after it is used.
_PLACEHOLDER_SYSTEM = "context"


def render(tokenizer: PreTrainedTokenizerBase, system: str, user: str) -> tuple[list[int], list[int]]:
    """Token ids of the system turn and of the user turn (with the assistant header), rendered by the chat template.

    Split at the text boundary so ``system + turn`` is exactly the teacher's prompt and ``turn`` alone what the
    student reads after the cartridge.
    """
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    head = tokenizer.apply_chat_template(messages[:1], tokenize=False)
    if not isinstance(full, str) or not isinstance(head, str) or not full.startswith(head):
        raise ValueError("the chat template does not render the system turn as a prefix of the conversation")

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return ids(head), ids(full[len(head) :])


def turn_after_cartridges(tokenizer: PreTrainedTokenizerBase, user: str) -> list[int]:
    """The ids a request with cartridges reads after them: the user turn as :func:`render` gives it to the student."""
    return render(tokenizer, _PLACEHOLDER_SYSTEM, user)[1]

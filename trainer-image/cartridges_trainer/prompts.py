"""Self-study prompts: the seed instructions for bot A and the chat rendering both bots share."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from cartridges.api import SeedPrompt

SEED_INSTRUCTIONS: dict[SeedPrompt, str] = {
    "structuring": (
        "Write a message asking to reorganize one specific part of the document above into a structured format "
        "(a table, a list or JSON), naming the part. Reply with the message only."
    ),
    "summarization": (
        "Write a message asking for a summary of one specific section of the document above, naming it. "
        "Reply with the message only."
    ),
    "question": (
        "Write a question about a specific fact, name, number or date in the document above that can be answered "
        "from the document alone. Reply with the question only."
    ),
    "use_case": (
        "Think of a practical task someone could solve with the information in the document above and write the "
        "message they would send to get help with it. Reply with the message only."
    ),
    "creative": (
        "Write a creative request (a poem, a short story, a dialogue) about a specific detail of the document above. "
        "Reply with the request only."
    ),
}


def system_prompt(description: str, chunk: str) -> str:
    """The context the cartridge replaces: what the corpus is, and one chunk of it."""
    return f"You are answering about this corpus: {description}\n\n<document>\n{chunk}\n</document>"


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

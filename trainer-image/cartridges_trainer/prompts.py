"""Self-study prompts: the seed instructions for bot A and the system turn the cartridge replaces (the chat
rendering both bots share is :func:`cartridges.chat.render`)."""

from __future__ import annotations

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

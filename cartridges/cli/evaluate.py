"""``cartridges eval``: no context vs the whole corpus in context (ICL) vs the cartridge, on question/answer pairs.

Quality is the mean negative log-likelihood per token of the reference answers (lower is better); memory is the
KV cache each condition puts in front of the question; speed is greedy decoding tokens/s on this machine. Questions
are rendered exactly as the trainer renders them, so the cartridge sees what it was distilled for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cartridges import layout
from cartridges.api import icl_gain_recovered, recovered_text
from cartridges.cli.common import (
    EXIT_INPUT,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    CLIError,
    Stored,
    add_command,
    check_name,
    find,
    generation_options,
    human_bytes,
    load,
    load_model,
    model_options,
    open_store,
    print_json,
    store_options,
)
from cartridges.corpus import decode_utf8
from cartridges.store import ObjectNotFound, Store

if TYPE_CHECKING:
    from cartridges.models import LoadedModel


CONDITION_COLORS = {"no": "#9e9e9e", "ICL": "#1f77b4"}  # by a condition's first word; the cartridge's is red


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclass(frozen=True)
class Row:
    condition: str
    answer_nll: float
    kv_bytes: int
    tokens_per_s: float


def read_qa(path: Path) -> list[QA]:
    """``{"question": "...", "answer": "..."}`` per line, both strings (a null or a list is no question to score)."""
    if path.is_dir():
        raise CLIError(f"{path}: a directory, not a JSON lines file of question/answer pairs", EXIT_NOT_FOUND)
    if not path.is_file():
        raise CLIError(f"{path}: no such file", EXIT_NOT_FOUND)
    pairs = []
    for number, line in enumerate(decode_utf8(path.read_bytes(), str(path)).splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            question, answer = item["question"], item["answer"]
            if not isinstance(question, str) or not isinstance(answer, str):
                raise TypeError("not strings")
            pairs.append(QA(question, answer))
        except (ValueError, KeyError, TypeError):
            raise CLIError(f'{path}:{number}: expected {{"question": "...", "answer": "..."}}', EXIT_INPUT) from None
    if not pairs:
        raise CLIError(f"{path}: no question/answer pairs", EXIT_INPUT)
    return pairs


def records_its_corpus(stored: Stored) -> bool:
    """Whether the manifest says which stored corpus the cartridge was trained on (an imported one does not)."""
    refs = stored.manifest.training.get("spec", {}).get("corpusRefs")
    return bool(refs and stored.manifest.corpus_digest)


def corpus_of(store: Store, root: str, namespace: str, stored: Stored) -> tuple[str, str]:
    """The description and text the cartridge was trained on, joined as the trainer joins them."""
    from cartridges_trainer.corpus import DOCUMENT_SEPARATOR

    if not records_its_corpus(stored):
        raise CLIError(
            f"{stored.name}: the manifest does not say which corpus it was trained on; give it with --corpus FILES",
            EXIT_INPUT,
        )
    refs, digest = stored.manifest.training["spec"]["corpusRefs"], str(stored.manifest.corpus_digest)
    texts: list[str] = []
    description = ""
    for ref, part in zip(refs, digest.split("+"), strict=False):
        prefix = layout.corpus_prefix(root, namespace, ref["name"], part)
        try:
            manifest = layout.corpus_manifest(store, prefix)
            documents = list(layout.read_documents(store, prefix))
        except ObjectNotFound:
            raise CLIError(
                f"{stored.name}: the corpus it was trained on ({ref['name']}) is gone from the store; "
                "give it with --corpus FILES",
                EXIT_NOT_FOUND,
            ) from None
        description = description or manifest.description
        texts.extend(doc.text for doc in documents)
    # The description the trainer's prompts used: a stored corpus keeps the one it was first published with.
    description = stored.manifest.training.get("corpus_description") or description
    return description, DOCUMENT_SEPARATOR.join(t for t in texts if t.strip())


def given_corpus(paths: list[Path], description: str | None) -> tuple[str, str]:
    """``--corpus``: the description and text for the ICL condition, read and joined as ``train`` would."""
    from cartridges.cli.train import default_description, read_files
    from cartridges_trainer.corpus import DOCUMENT_SEPARATOR

    corpus = read_files(paths)
    text = DOCUMENT_SEPARATOR.join(d.text for d in corpus.documents if d.text.strip())
    return description or default_description(corpus), text


def table(rows: list[Row]) -> str:
    width = max(28, *(len(r.condition) for r in rows))
    lines = [f"{'condition':<{width}} {'answer NLL/token':>16} {'KV cache':>12} {'tokens/s':>10}"]
    lines += [
        f"{r.condition:<{width}} {r.answer_nll:>16.3f} {human_bytes(r.kv_bytes):>12} {r.tokens_per_s:>10.1f}"
        for r in rows
    ]
    if len(rows) < 3:
        return "\n".join(lines)  # no ICL row: no gain to recover
    icl, cart = rows[1:]
    lines.append(
        f"ICL gain recovered by the cartridge: {recovered_text(recovered(rows))}, "
        f"with {icl.kv_bytes / max(cart.kv_bytes, 1):.1f}x less KV memory"
    )
    return "\n".join(lines)


def recovered(rows: list[Row]) -> float | None:
    """``iclGainRecovered`` of the rows (None without an ICL row, or when ICL gave no gain)."""
    if len(rows) < 3:
        return None
    none, icl, cart = rows
    return icl_gain_recovered(none.answer_nll, icl.answer_nll, cart.answer_nll)


def plot_path(text: str) -> Path:
    """``--plot``: a file matplotlib can write, checked before any work (argparse makes a failure exit 2). Without
    an extension it is a PNG, as matplotlib would save it (``out`` -> ``out.png``); the parent is created now."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(text)
    if not path.suffix:
        path = path.with_name(f"{path.name}.png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise argparse.ArgumentTypeError(f"{text}: cannot plot to {path.suffix!r}; use one of {', '.join(formats)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{text}: cannot write there ({err.strerror or err})") from None
    return path


def plot(rows: list[Row], path: Path, title: str) -> Path:
    """Three bar charts (quality, memory, speed) in one file, its format from ``path``'s extension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.condition.split(" (")[0] for r in rows]
    colors = [CONDITION_COLORS.get(name.split()[0], "#d62728") for name in names]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    panels = (
        ("answer NLL per token (lower is better)", [r.answer_nll for r in rows]),
        ("KV cache (MiB)", [r.kv_bytes / 2**20 for r in rows]),
        ("decoding tokens/s", [r.tokens_per_s for r in rows]),
    )
    for axis, (label, values) in zip(axes, panels, strict=True):
        axis.bar(names, values, color=colors)
        axis.set_title(label, fontsize=10)
        for i, value in enumerate(values):
            axis.annotate(f"{value:.2f}", (i, value), ha="center", va="bottom", fontsize=9)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def evaluate_stored(
    store: Store,
    root: str,
    namespace: str,
    name: str,
    lm: LoadedModel,
    pairs: list[QA],
    corpus: tuple[str, str] | None = None,
    generation: int | None = None,
) -> list[Row]:
    """The conditions on ``pairs`` for the promoted generation (or the stored ``generation``); ICL on ``corpus``
    (description, text) when given, else on the corpus the cartridge was trained on, else (an imported cartridge)
    no ICL row."""
    from cartridges.cli.scoring import compare

    stored = find(store, root, namespace, name, generation)
    if corpus is None and records_its_corpus(stored):
        corpus = corpus_of(store, root, namespace, stored)
    description, text = corpus or (str(stored.manifest.training.get("corpus_description") or name), None)
    return compare(lm, load(store, stored, lm), description, text, pairs)


def run(args: argparse.Namespace) -> int:
    name = check_name(args.name)
    if args.description is not None and not args.corpus:
        raise CLIError("--description needs --corpus: it says what the --corpus files are", EXIT_USAGE)
    pairs = read_qa(args.qa)
    store = open_store(args.store)
    stored = find(store, args.store, args.namespace, name, args.generation)  # fail before loading the model
    corpus = given_corpus(args.corpus, args.description) if args.corpus else None
    if corpus is None and records_its_corpus(stored):  # read before loading the model: it may be gone
        corpus = corpus_of(store, args.store, args.namespace, stored)
    elif corpus is None:
        print(
            f"{name}: no corpus recorded (imported?): scoring no context and the cartridge only; "
            "--corpus FILES adds the corpus in context (ICL)",
            file=sys.stderr,
        )
    lm = load_model(args.model, store)
    rows = evaluate_stored(store, args.store, args.namespace, name, lm, pairs, corpus, args.generation)
    if args.json:  # the results first: a plot that fails to save must not lose them
        rows_json = [asdict(r) for r in rows]
        print_json({"cartridge": name, "questions": len(pairs), "iclGainRecovered": recovered(rows), "rows": rows_json})
    else:
        print(table(rows), flush=True)
    if args.plot:
        written = plot(rows, args.plot, f"{name}: {len(pairs)} questions")
        if not args.json:
            print(f"plot: {written}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "eval",
        summary="compare no context, ICL and the cartridge on a QA file",
        description=__doc__,
        examples=(
            "cartridges eval handbook --qa questions.jsonl",
            "cartridges eval handbook --qa questions.jsonl --plot eval.png --json",
            "cartridges eval imported --qa questions.jsonl --corpus docs/   # ICL on docs/ for an imported one",
            "cartridges eval handbook --qa questions.jsonl --generation 1   # an earlier generation",
            'questions.jsonl holds one {"question": "...", "answer": "..."} per line',
        ),
        parents=[store_options(), model_options(), generation_options()],
    )
    parser.add_argument("name", help="the cartridge to evaluate")
    parser.add_argument("--qa", type=Path, required=True, help="JSON lines of question/answer pairs")
    parser.add_argument(
        "--corpus",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="files or directories for the ICL condition (default: the corpus the cartridge was trained on; "
        "needed for an imported cartridge)",
    )
    parser.add_argument("--description", help="what --corpus is, as in `train --description` (only with --corpus)")
    parser.add_argument("--plot", type=plot_path, help="save a chart of the comparison here (.png, .svg, .pdf, ...)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.set_defaults(func=run)

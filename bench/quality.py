"""Quality benchmark (issue 4): how much of the ICL gain a cartridge recovers, by size p, trained and untrained.

On the fictional gazetteer in ``bench/quality/`` (corpus.md, never seen by the model) and its held-out question/answer
pairs (qa.jsonl, never used in training), with SmolLM2-135M-Instruct, every condition answers every question:

- ``none``: the question alone; ``icl``: the whole corpus in the system turn, as the teacher renders it;
- ``cartridge_init``: the cartridge before training (the KV of the first p corpus tokens);
- ``cartridge``: trained by the real trainer (``cartridges_trainer.train``) into a file store;
- ``cartridge_int8`` / ``cartridge_fp8`` (``--formats``): that cartridge as a quantized artifact stores it
  (``quantize_cartridge``: keys per channel, values per token), dequantized as the kernels do: the quality cost of
  serving it in one byte per element (``stored_bytes``; the bf16 size on the ``cartridge`` row).

Scores: answer NLL per token counting the end-of-turn token and without it, greedy exact-match and contains
accuracy, and recovered = (NLL_none - NLL_x) / (NLL_none - NLL_icl) (without the end token; ``_eos`` with it).
Synthesis does not depend on p (the teacher reads the chunk, never the cartridge): it runs once, and the trainer
copies its shards into every later generation (``cartridges_trainer.synthesis.adopt_synthesis``). A generation
already trained in ``--workdir`` is not trained again, so a rerun there only scores. Writes ``quality.json`` and
``quality.png``::

    python bench/quality.py --threads 2
    python bench/quality.py --workdir DIR --formats int8 fp8 --out bench/results/quantization.json  # rescore DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cartridges import api, layout
from cartridges.artifact import Cartridge, download_artifact, load_cartridge, quantize_cartridge
from cartridges.chat import render
from cartridges.contract import TrainerConfig
from cartridges.corpus import NormalizedCorpus, publish
from cartridges.embedded import smollm2_gguf
from cartridges.kvcache import cartridge_cache, positions_after, prefix_cartridge
from cartridges.models import LoadedModel, load_base_model
from cartridges.store import Store
from cartridges_trainer import TrainerOptions, train
from cartridges_trainer.batching import Conversation, pack, target_logprobs
from cartridges_trainer.corpus import load_corpus
from cartridges_trainer.distill import initial_cartridge
from cartridges_trainer.prompts import system_prompt

HERE = Path(__file__).resolve().parent
DATA = HERE / "quality"
DESCRIPTION = "a gazetteer of the Tarrow Isles"
BATCH = 8  # questions per forward: the ICL cache is copied per row
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Question:
    turn: list[int]
    answer: list[int]
    gold: str


def _normal(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("the", "a", "an"))


@torch.no_grad()
def _greedy(lm: LoadedModel, prefix: Cartridge | None, turns: list[list[int]]) -> list[str]:
    """Greedy answers of a left-padded batch read after ``prefix``, stopped at the end-of-turn token."""
    p, width, eos = (prefix.p if prefix else 0), max(map(len, turns)), lm.tokenizer.eos_token_id
    ids = torch.tensor([[eos] * (width - len(t)) + t for t in turns], device=lm.device)
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in turns], device=lm.device)
    attention = torch.cat([mask.new_ones(len(turns), p), mask], dim=1)
    positions = positions_after(p, mask)
    cache = cartridge_cache(prefix, len(turns)) if prefix else None
    out: list[list[int]] = [[] for _ in turns]
    for _ in range(MAX_NEW_TOKENS):
        result = lm.model(
            input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True
        )
        cache, ids = result.past_key_values, result.logits[:, -1:].argmax(-1)
        for row, token in enumerate(ids[:, 0].tolist()):
            if not out[row] or out[row][-1] != eos:
                out[row].append(token)
        if all(o[-1] == eos for o in out):
            break
        attention = torch.cat([attention, mask.new_ones(len(turns), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return [str(lm.tokenizer.decode([t for t in o if t != eos], skip_special_tokens=True)) for o in out]


@torch.no_grad()
def score(lm: LoadedModel, prefix: Cartridge | None, questions: list[Question]) -> dict[str, float]:
    """Answer NLL per token (with and without the end-of-turn token) and greedy accuracy after ``prefix``."""
    eos = lm.tokenizer.eos_token_id
    nll = {"with": 0.0, "without": 0.0}
    tokens = {"with": 0, "without": 0}
    exact = contains = 0
    for i in range(0, len(questions), BATCH):
        chunk = questions[i : i + BATCH]
        convs = [
            Conversation(torch.tensor(q.turn + q.answer), len(q.turn), len(q.turn), torch.zeros(0), torch.zeros(0))
            for q in chunk
        ]
        batch = pack(convs, eos, lm.device)
        losses = -target_logprobs(lm.model, batch, prefix).gather(1, batch.targets[:, None])[:, 0]
        content = batch.targets != eos
        nll["with"] += float(losses.sum())
        nll["without"] += float(losses[content].sum())
        tokens["with"] += len(losses)
        tokens["without"] += int(content.sum())
        for q, text in zip(chunk, _greedy(lm, prefix, [q.turn for q in chunk]), strict=True):
            exact += _normal(text) == _normal(q.gold)
            contains += _normal(q.gold) in _normal(text)
    return {
        "answer_nll": nll["without"] / tokens["without"],
        "answer_nll_eos": nll["with"] / tokens["with"],
        "accuracy": contains / len(questions),  # the headline accuracy: the gold answer appears in the greedy one
        "accuracy_exact": exact / len(questions),
        "accuracy_contains": contains / len(questions),
    }


def run(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> None:
    """Score every condition, calling ``save`` with the results so far after each size p."""
    started = time.monotonic()
    torch.set_num_threads(args.threads)
    lm = load_base_model(smollm2_gguf())
    text = (DATA / "corpus.md").read_text()
    pairs = [json.loads(line) for line in (DATA / "qa.jsonl").read_text().splitlines() if line.strip()]
    store, root = Store(), f"file://{args.workdir.resolve()}"
    corpus_data = NormalizedCorpus.of([layout.Document(id="corpus.md", text=text)])
    corpus_prefix = layout.corpus_prefix(root, "bench", "tarrow", corpus_data.digest)
    publish(corpus_data, DESCRIPTION, store, corpus_prefix)
    corpus = load_corpus(store, [corpus_prefix], DESCRIPTION, lm.tokenizer)

    system = system_prompt(DESCRIPTION, text)
    eos = [lm.tokenizer.eos_token_id]
    rendered = [render(lm.tokenizer, system, pair["question"]) for pair in pairs]
    questions = [
        Question(turn, list(lm.tokenizer(pair["answer"], add_special_tokens=False)["input_ids"]) + eos, pair["answer"])
        for (_, turn), pair in zip(rendered, pairs, strict=True)
    ]
    icl_context = rendered[0][0]
    if args.baselines and args.baselines.exists():  # none and ICL do not depend on training: scored once
        rows: list[dict[str, Any]] = json.loads(args.baselines.read_text())
    else:
        icl = prefix_cartridge(lm.model, icl_context, 0)
        rows = [
            {"method": "none", "p": 0, **score(lm, None, questions)},
            {"method": "icl", "p": len(icl_context), **score(lm, icl, questions)},
        ]
        if args.baselines:
            args.baselines.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows, indent=1), flush=True)
    options = TrainerOptions(
        synthesis_batch_size=args.shard_size,
        max_answer_tokens=args.max_answer_tokens,
        checkpoint_every=args.steps,
        progress_interval_s=30.0,
    )
    first: TrainerConfig | None = None
    stats: dict[str, Any] = {}
    for p in args.sizes:
        spec = api.CartridgeSpec(
            corpusRefs=[api.CorpusRef(name="tarrow")],
            baseModel=api.BaseModelRef(name="smollm2", uri=f"file://{smollm2_gguf()}"),
            size=p,
            selfStudy=api.SelfStudy(
                recipe=args.recipe,
                conversations=args.conversations,
                minChunkTokens=args.chunk_tokens,
                maxChunkTokens=args.chunk_tokens,
            ),
            training=api.Training(
                steps=args.steps, learningRate=args.lr, batchSize=args.batch, sequenceLength=args.sequence_length
            ),
            resources=api.Resources(gpus=0),
        )
        config = TrainerConfig(
            namespace="bench",
            cartridge="tarrow",
            generation=p,
            store_root=root,
            corpus_prefixes=[corpus_prefix],
            corpus_description=DESCRIPTION,
            spec=spec,
        )
        train(config, store, options=options, model=lm)
        local = Path(tempfile.mkdtemp(prefix="quality-"))
        download_artifact(store, config.output_prefix, local)
        trained, manifest = load_cartridge(local, expected_model=lm.fingerprint)
        training = manifest.training
        if first is None:
            first = config
            # with shards from another run, that run's synthesis figures are the real ones
            synthesis = () if args.synthesis_from else ("synthesis_seconds", "synthesis_tokens_per_s")
            stats = {k: training[k] for k in synthesis}
        init = initial_cartridge(lm, corpus, spec, options.seed)
        rows.append({"method": "cartridge_init", "p": p, "train_seconds": 0.0, **score(lm, init, questions)})
        rows.append(
            {
                "method": "cartridge",
                "p": p,
                "train_seconds": training["distill_seconds"],
                "distill_tokens_per_s": training["distill_tokens_per_s"],
                "final_loss": training["final_loss"],
                "trainer_eval": manifest.metrics,
                "stored_bytes": trained.to(dtype=torch.bfloat16).nbytes,
                **score(lm, trained, questions),
            }
        )
        for fmt in args.formats:
            stored = quantize_cartridge(trained, fmt)
            quantized = {"method": f"cartridge_{fmt}", "p": p, "stored_bytes": stored.nbytes}
            rows.append(quantized | score(lm, stored.dequantize(), questions))
        print(json.dumps(rows[-2 - len(args.formats) :], indent=1), flush=True)
        distill_rates = [r["distill_tokens_per_s"] for r in rows if "distill_tokens_per_s" in r]
        save(
            {
                "model": lm.fingerprint.model_id,
                "corpus_tokens": len(corpus.tokens),
                "icl_context_tokens": len(icl_context),
                "questions": len(questions),
                "recipe": args.recipe,
                "options": options.model_dump(),
                "spec": {"selfStudy": spec.selfStudy.model_dump(), "training": spec.training.model_dump()},
                **stats,
                "distill_tokens_per_s": sum(distill_rates) / len(distill_rates),
                "rows": _recovered(rows),
                "baselines_from": str(args.baselines) if args.baselines else None,
                "command": shlex.join(["python", *sys.argv]),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch threads {args.threads}",
                "wall_seconds": time.monotonic() - started,
                "workdir": str(args.workdir.resolve()),
            }
        )


def _recovered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with the fraction of the ICL gain each recovers, without (and ``_eos``: with) the end token."""
    none, icl = rows[0], rows[1]
    for row in rows:
        for suffix in ("", "_eos"):
            gain = none[f"answer_nll{suffix}"] - icl[f"answer_nll{suffix}"]
            row[f"recovered{suffix}"] = (none[f"answer_nll{suffix}"] - row[f"answer_nll{suffix}"]) / gain
    return rows


def _merged(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """``result`` with the rows of a run beside it in the same workdir (``--synthesis-from``), as last saved."""
    earlier = json.loads(path.read_text()) if path.exists() else {}
    if earlier.get("workdir") != result["workdir"]:
        return result
    mine = {(r["method"], r["p"]) for r in result["rows"]}
    rows = result["rows"] + [r for r in earlier["rows"] if (r["method"], r["p"]) not in mine]
    rows.sort(key=lambda r: ({"none": 0, "icl": 1}.get(r["method"], 2), -r["p"], r["method"] == "cartridge"))
    # the run that synthesizes first: the other copies its shards once they are stored (or makes them itself)
    commands = sorted(
        {*earlier["command"].split(" & "), result["command"]},
        key=lambda command: ("--synthesis-from" in command, command),
    )
    rates = [r["distill_tokens_per_s"] for r in rows if "distill_tokens_per_s" in r]
    return (
        earlier
        | {k: v for k, v in result.items() if k not in earlier or v}
        | {
            "rows": rows,
            "command": " & ".join(commands),
            "distill_tokens_per_s": sum(rates) / len(rates),
        }
    )


def plot(result: dict[str, Any], path: Path) -> None:
    """Recovered fraction and contains-accuracy against p, trained and untrained, with none and ICL as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, label in (
        (axes[0], "recovered", "fraction of the ICL gain recovered (answer NLL)"),
        (axes[1], "accuracy_contains", "greedy accuracy (answer contained)"),
    ):
        styles = {"cartridge": "o-", "cartridge_init": "s--", "cartridge_int8": "^-", "cartridge_fp8": "v-"}
        for method, style in styles.items():
            points = sorted((r["p"], r[key]) for r in rows if r["method"] == method)
            if points:
                axis.plot(*zip(*points, strict=True), style, label=method.replace("_init", " (untrained)"))
        for r, color in ((rows[0], "gray"), (rows[1], "tab:green")):
            axis.axhline(r[key], color=color, linestyle=":", label=r["method"])
        axis.set_xscale("log", base=2)
        axis.set_xlabel("cartridge size p (tokens)")
        axis.set_title(label, fontsize=10)
        axis.legend(fontsize=8)
    figure.suptitle(f"{result['model']}, {result['corpus_tokens']}-token corpus, {result['questions']} questions")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--recipe", choices=["grounded", "paper"], default="grounded")
    parser.add_argument("--conversations", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=32, help="conversations per synthesis shard")
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--max-answer-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; on a shared CPU one is several times faster than two"
    )
    parser.add_argument("--workdir", type=Path, help="the store of the run (default: a new temporary directory, kept)")
    parser.add_argument("--baselines", type=Path, help="JSON of the none and ICL rows: read if present, else written")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "quality.json")
    parser.add_argument(
        "--formats", nargs="*", choices=["int8", "fp8"], default=[], help="also score each trained cartridge quantized"
    )
    parser.add_argument(
        "--synthesis-from",
        type=int,
        metavar="P",
        help="a second process beside size P's run in the same --workdir: the trainer copies that run's shards, so "
        "this run reports no synthesis figures, and its rows are merged into --out",
    )
    args = parser.parse_args()
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="quality-store-"))
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict[str, Any]) -> None:
        result = _merged(result, args.out)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.out.with_suffix(".png"))
        for r in result["rows"]:
            print(
                f"{r['method']:<15} p={r['p']:<5} nll={r['answer_nll']:.3f} nll_eos={r['answer_nll_eos']:.3f} "
                f"recovered={r['recovered']:.3f} contains={r['accuracy_contains']:.2f} "
                f"exact={r['accuracy_exact']:.2f}",
                flush=True,
            )

    run(args, save)


if __name__ == "__main__":
    main()

"""Serving benchmark: a cartridge vs the corpus in context (ICL, with and without prefix reuse), engine and Triton.

Same model (SmolLM2-135M-Instruct), same machine, same questions. For each corpus size and batch size:

- ``cartridge``: requests attend over a p-token cartridge. Training quality does not change speed, so the cartridges
  are initialised from the corpus KV (the first p tokens, as self-study initialises them) and never trained.
- ``icl_prefix_reuse``: the corpus KV is computed once and shared by every request; the engine serves it exactly
  like a cartridge of p = corpus tokens (the honest best case of prefix caching).
- ``icl``: the corpus text is in every prompt and every request prefills it.

Each cell submits ``batch`` requests at once, measured in the engine directly and through a live tritonserver with
the router model (an asyncio client streaming from ``generate_stream``); then a load test sends mixed compositions
at concurrency 1 to 64. ICL without reuse prefills thousands of tokens per request, far too slow on a small CPU for
full batches: those cells run ``min(batch, requests cap)`` requests and say so in the row. Results (written after
every cell, so an interrupted run keeps what it measured) go to ``serving.json`` under ``--out`` (default
``bench/results``) with a plot beside; a trial run should name another folder, not overwrite the committed numbers.

    python bench/serving.py [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import torch
from serving_gpu import positive_int

from cartridges import layout
from cartridges.artifact import Cartridge, load_cartridge, save_cartridge, upload_artifact
from cartridges.cli.common import promote
from cartridges.embedded import smollm2_gguf
from cartridges.models import LoadedModel, load_base_model
from cartridges.paths import cache_dir
from cartridges.store import Store
from cartridges.tritonserver import TritonServer, start_triton
from cartridges_serving import MODEL_REPOSITORY, CartridgeCache, Engine, SamplingParams, StreamEvent
from cartridges_serving.runner import BatchItem, LlamaRunner

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
REPOSITORY = MODEL_REPOSITORY
CORPUS_FILES = ["README.md", "cartridges/cli/data/kestrel-rock.md", "cartridges/cli/data/kestrel-rock-qa.jsonl"]
CORPUS_SIZES = [1024, 2048, 4096, 0]  # 0: the whole corpus (about 7k tokens)
PS = [256, 512]
BATCHES = [1, 8, 32]
LOAD_CONCURRENCY = [1, 4, 16, 64]
NAMESPACE = "bench"
QUESTIONS = [
    "Summarize the main ideas of the document in detail.",
    "Explain step by step how the system described in the document works.",
    "List the most important facts in the document and explain each one.",
    "Describe the components mentioned in the document and how they interact.",
]


@dataclass(frozen=True)
class Timing:
    """One request, in seconds from the batch's submission: first text chunk, last response; tokens generated."""

    first: float
    end: float
    tokens: int


@dataclass(frozen=True)
class Job:
    prompt: str
    cartridges: tuple[str, ...]


def summarize(timings: Sequence[Timing]) -> dict[str, float]:
    """TTFT is the mean time to a request's first text chunk; decode rate counts tokens after each first one over
    the span from the earliest first chunk to the last response; throughput is all tokens over the wall time."""
    tokens = sum(t.tokens for t in timings)
    end = max(t.end for t in timings)
    decode_span = end - min(t.first for t in timings)
    decode_tokens = sum(max(t.tokens - 1, 0) for t in timings)
    return {
        "ttft_s": round(statistics.mean(t.first for t in timings), 4),
        "decode_tokens_per_s": round(decode_tokens / decode_span, 3) if decode_span > 0 else 0.0,
        "throughput_tokens_per_s": round(tokens / end, 3),
        "generated_tokens": tokens,
        "wall_s": round(end, 3),
    }


# -- corpus, corpus KV and the published cartridges -------------------------------------------------------------------


def corpus_ids(loaded: LoadedModel) -> list[int]:
    text = "\n\n".join((ROOT / name).read_text() for name in CORPUS_FILES)
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def corpus_kv(loaded: LoadedModel, ids: list[int], chunk: int = 1024) -> tuple[Cartridge, float]:
    """The model's KV of the corpus at positions 0..n-1, prefilled by the serving runner in chunks; cached on disk
    by (model, tokens) because it costs minutes here. Returns it and the seconds its prefill took (0 if cached)."""
    digest = hashlib.sha256(f"{loaded.fingerprint.weights_sha256}:{ids}".encode()).hexdigest()[:16]
    directory = cache_dir() / "bench" / f"corpus-kv-{digest}"
    if (directory / "manifest.json").exists():
        return load_cartridge(directory, expected_model=loaded.fingerprint)[0], 0.0
    runner = LlamaRunner(loaded.model)
    own = runner.new_own_kv(len(ids))
    started = time.perf_counter()
    for start in range(0, len(ids), chunk):
        runner.step([BatchItem(ids[start : start + chunk], start, [], own)])
    seconds = time.perf_counter() - started
    cartridge = Cartridge(
        [own.keys[i].clone() for i in range(runner.num_layers)],
        [own.values[i].clone() for i in range(runner.num_layers)],
    )
    save_cartridge(cartridge, directory, loaded.fingerprint)
    return cartridge, seconds


def prefix(cartridge: Cartridge, n: int) -> Cartridge:
    return Cartridge([k[:, :n].contiguous() for k in cartridge.keys], [v[:, :n].contiguous() for v in cartridge.values])


def publish(store: Store, root: str, name: str, cartridge: Cartridge, loaded: LoadedModel, workdir: Path) -> None:
    """Upload generation 1 and promote it, as the operator does."""
    directory = workdir / name
    manifest = save_cartridge(cartridge, directory, loaded.fingerprint)
    upload_artifact(store, directory, layout.generation_prefix(root, NAMESPACE, name, 1))
    promote(store, root, NAMESPACE, name, 1, manifest)


# -- measuring ----------------------------------------------------------------------------------------------------


def run_engine(engine: Engine, jobs: Sequence[Job], max_tokens: int) -> list[Timing]:
    """Submit all jobs at once; times come from the engine's per-request event callback."""
    started = time.perf_counter()
    firsts: list[float | None] = [None] * len(jobs)
    ends: list[float] = [0.0] * len(jobs)

    def recorder(i: int) -> Callable[[StreamEvent], None]:
        def record(event: StreamEvent) -> None:
            now = time.perf_counter() - started
            if firsts[i] is None and (event.text or event.final):
                firsts[i] = now
            if event.final:
                ends[i] = now

        return record

    params = SamplingParams(max_tokens=max_tokens)
    handles = [engine.submit(j.prompt, j.cartridges, params, on_event=recorder(i)) for i, j in enumerate(jobs)]
    tokens = [len(h.result(timeout=3600).token_ids) for h in handles]
    return [Timing(f or e, e, n) for f, e, n in zip(firsts, ends, tokens, strict=True)]


async def _stream_one(
    session: aiohttp.ClientSession, url: str, job: Job, max_tokens: int, started: float
) -> tuple[float, float, str]:
    body: dict[str, Any] = {"text_input": job.prompt, "max_tokens": max_tokens, "stream": True}
    if job.cartridges:
        body["cartridges"] = list(job.cartridges)
    first, parts = None, []
    async with session.post(f"{url}/v2/models/router/generate_stream", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[len(b"data:") :])
            if "error" in event:
                raise RuntimeError(event["error"])
            first = first if first is not None else time.perf_counter() - started
            parts.append(event.get("text_output", ""))
    end = time.perf_counter() - started
    return first if first is not None else end, end, "".join(parts)


def run_triton(server: TritonServer, loaded: LoadedModel, jobs: Sequence[Job], max_tokens: int) -> list[Timing]:
    """All jobs at once over HTTP generate_stream; tokens counted by re-tokenizing each answer."""

    async def run() -> list[tuple[float, float, str]]:
        timeout = aiohttp.ClientTimeout(total=3600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            started = time.perf_counter()
            return await asyncio.gather(*(_stream_one(session, server.http_url, j, max_tokens, started) for j in jobs))

    results = asyncio.run(run())
    tokenizer = loaded.tokenizer
    return [Timing(f, e, len(tokenizer(text, add_special_tokens=False)["input_ids"])) for f, e, text in results]


def load_test(
    server: TritonServer, cartridge_ids: Sequence[str], max_tokens: int, levels: Sequence[int]
) -> list[dict[str, Any]]:
    """Concurrency levels with mixed compositions (0, 1 and 2 cartridges); every request's latency and outcome."""
    compositions = [(), (cartridge_ids[0],), (cartridge_ids[1],), tuple(cartridge_ids[:2])]

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[float, str | None]:
        body: dict[str, Any] = {
            "text_input": f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})",
            "max_tokens": max_tokens,
        }
        if compositions[i % len(compositions)]:
            body["cartridges"] = list(compositions[i % len(compositions)])
        started = time.perf_counter()
        try:
            async with session.post(f"{server.http_url}/v2/models/router/generate", json=body) as response:
                payload = await response.json(content_type=None)
                error = None if response.status == 200 and "text_output" in payload else str(payload)[:300]
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            error = f"{type(err).__name__}: {err}"
        return time.perf_counter() - started, error

    async def level(concurrency: int, requests: int) -> list[tuple[float, str | None]]:
        gate = asyncio.Semaphore(concurrency)
        timeout = aiohttp.ClientTimeout(total=1800)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

            async def gated(i: int) -> tuple[float, str | None]:
                async with gate:
                    return await one(session, i)

            return await asyncio.gather(*(gated(i) for i in range(requests)))

    rows = []
    for concurrency in levels:
        requests = max(4, concurrency)
        started = time.perf_counter()
        results = asyncio.run(level(concurrency, requests))
        wall = time.perf_counter() - started
        latencies = sorted(1000 * latency for latency, _ in results)
        errors = [error for _, error in results if error]
        rows.append(
            {
                "max_concurrency": concurrency,
                "requests": requests,
                "failed": len(errors),
                "first_error": errors[0] if errors else None,
                "p50_ms": round(percentile(latencies, 50), 1),
                "p99_ms": round(percentile(latencies, 99), 1),
                "requests_per_s": round(requests / wall, 3),
            }
        )
        print(f"load c={concurrency}: {rows[-1]}", flush=True)
    return rows


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


# -- the benchmark --------------------------------------------------------------------------------------------------


class Benchmark:
    def __init__(self, args: argparse.Namespace, loaded: LoadedModel, ids: list[int]) -> None:
        self.args, self.loaded, self.ids = args, loaded, ids
        self.out: Path = args.out
        config = loaded.model.config
        # Bytes of one token's KV over all layers: keys and values, kv_heads x head_dim each, in the model's dtype.
        self.kv_token_bytes = (
            2 * config.num_hidden_layers * loaded.fingerprint.num_kv_heads * loaded.fingerprint.head_dim
        ) * next(loaded.model.parameters()).element_size()
        self.sizes = [n or len(ids) for n in args.corpus_sizes]
        self.rows: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {}

    def prompt_tokens(self, prompt: str) -> int:
        text = self.loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return len(self.loaded.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    def cells(self) -> list[tuple[str, int, int | None, int]]:
        """(method, corpus tokens, p, batch) in measuring order: cheap cells first."""
        out: list[tuple[str, int, int | None, int]] = []
        for batch in self.args.batches:
            out += [("cartridge", n, p, batch) for p in PS for n in self.sizes]
            out += [("icl_prefix_reuse", n, None, batch) for n in self.sizes]
        out += [("icl", n, None, batch) for n in self.sizes for batch in self.args.batches]
        return out

    def jobs(self, method: str, n: int, p: int | None, requests: int) -> list[Job]:
        questions = [f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})" for i in range(requests)]
        if method == "icl":
            corpus = self.loaded.tokenizer.decode(self.ids[:n])
            return [Job(f"{corpus}\n\n{q}", ()) for q in questions]
        name = f"prefix-{n}" if method == "icl_prefix_reuse" else f"cartridge-p{p}"
        return [Job(q, (name,)) for q in questions]

    def requests_for(self, method: str, n: int, batch: int, level: str) -> int:
        """ICL without reuse: at most ``icl_prefill_tokens`` of corpus prefill per cell (at least one request)."""
        if method != "icl":
            return batch
        budget = self.args.icl_prefill_tokens if level == "engine" else self.args.triton_icl_prefill_tokens
        return max(1, min(batch, budget // n))

    def measure(self, level: str, run: Callable[[list[Job]], list[Timing]], done: dict[tuple[Any, ...], dict]) -> None:
        for method, n, p, batch in self.cells():
            requests = self.requests_for(method, n, batch, level)
            skip = level == "triton" and (
                batch not in self.args.triton_batches or (method == "icl" and n > self.args.triton_icl_max_corpus)
            )
            if skip:
                note: str | None = "not measured through Triton (time budget); see the engine row"
                self.add_row(level, method, n, p, batch, None, note=note)
                continue
            shared = (level, method, n if method != "cartridge" else None, p, requests)
            if shared in done:  # the same experiment as a row already measured: say so, do not run it twice
                source = done[shared]
                note = (
                    f"same experiment as the {source['level']} row at corpus {source['corpus_tokens']}, "
                    f"batch {source['batch']}"
                )
                self.add_row(level, method, n, p, batch, requests, stats=source["stats"], note=note)
                continue
            jobs = self.jobs(method, n, p, requests)
            timings = run(jobs)
            stats = summarize(timings)
            prompt_tokens = statistics.mean(self.prompt_tokens(j.prompt) for j in jobs)
            note = (
                None
                if requests == batch
                else f"{requests} of {batch} requests run (ICL prefill too slow for the time budget)"
            )
            row = self.add_row(level, method, n, p, batch, requests, stats, prompt_tokens, note)
            done[shared] = {"level": level, "corpus_tokens": n, "batch": batch, "stats": row}
            print(f"{level} {method} n={n} p={p} batch={batch} requests={requests}: {stats}", flush=True)

    def add_row(
        self,
        level: str,
        method: str,
        n: int,
        p: int | None,
        batch: int,
        requests: int | None,
        stats: dict[str, Any] | None = None,
        prompt_tokens: float | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        row: dict[str, Any] = {"level": level, "method": method, "corpus_tokens": n, "p": p, "batch": batch}
        row["requests_measured"] = requests
        if stats is not None and prompt_tokens is None:  # a shared measurement: copy its numbers
            row.update({k: stats[k] for k in stats if k not in row})
        elif stats is not None and prompt_tokens is not None:
            generated = stats["generated_tokens"] / max(requests or 1, 1)
            attended = {"cartridge": p or 0, "icl_prefix_reuse": n, "icl": 0}[method]
            own = prompt_tokens + generated
            shared_tokens = attended / (requests or 1) if method != "cartridge" else attended
            row.update(
                {
                    "kv_bytes_per_request": round((attended + own) * self.kv_token_bytes),
                    "kv_bytes_resident_per_request": round((shared_tokens + own) * self.kv_token_bytes),
                    "prompt_tokens": round(prompt_tokens, 1),
                    **stats,
                }
            )
        row["note"] = note
        self.rows.append(row)
        self.write()
        return row

    def write(self) -> None:
        self.result["rows"] = self.rows
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "serving.json").write_text(json.dumps(self.result, indent=2) + "\n")


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def targets(rows: list[dict[str, Any]], n: int, level: str) -> dict[str, Any]:
    """The issue's targets at the largest corpus, batch 8: KV >= 10x smaller than ICL, decode >= 2x prefix reuse,
    end-to-end throughput >= 10x ICL."""

    def row(method: str, p: int | None = None) -> dict[str, Any] | None:
        found = [
            r
            for r in rows
            if (r["level"], r["method"], r["corpus_tokens"], r["p"], r["batch"]) == (level, method, n, p, 8)
        ]
        return found[0] if found and "throughput_tokens_per_s" in found[0] else None

    reuse, icl = row("icl_prefix_reuse"), row("icl")
    out: dict[str, Any] = {"level": level, "corpus_tokens": n, "batch": 8}
    for p in PS:
        cart = row("cartridge", p)
        if cart is None or reuse is None or icl is None:
            out[f"p{p}"] = "not measured"
            continue
        kv = icl["kv_bytes_per_request"] / cart["kv_bytes_per_request"]
        decode = cart["decode_tokens_per_s"] / reuse["decode_tokens_per_s"]
        e2e = cart["throughput_tokens_per_s"] / icl["throughput_tokens_per_s"]
        out[f"p{p}"] = {
            "kv_bytes_ratio_vs_icl": round(kv, 2),
            "kv_met": kv >= 10,
            "decode_ratio_vs_icl_prefix_reuse": round(decode, 2),
            "decode_met": decode >= 2,
            "throughput_ratio_vs_icl": round(e2e, 2),
            "throughput_met": e2e >= 10,
            "icl_requests_measured": icl["requests_measured"],
        }
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    series = [("cartridge", 256), ("cartridge", 512), ("icl_prefix_reuse", None), ("icl", None)]
    for ax, batch in zip(axes, batches, strict=True):
        for level, style in (("engine", "-o"), ("triton", "--s")):
            for i, (method, p) in enumerate(series):
                points = sorted(
                    (r["corpus_tokens"], r["throughput_tokens_per_s"])
                    for r in rows
                    if (r["level"], r["method"], r["p"], r["batch"]) == (level, method, p, batch)
                    and "throughput_tokens_per_s" in r
                )
                if points:
                    label = f"{method}{f' p={p}' if p else ''} ({level})"
                    ax.plot(
                        *zip(*points, strict=True),
                        style,
                        color=f"C{i}",
                        label=label,
                        alpha=1 if level == "engine" else 0.6,
                    )
        ax.set(title=f"batch {batch}", xlabel="corpus tokens", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("end-to-end throughput (tokens/s)")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("SmolLM2-135M-Instruct on CPU: cartridge vs corpus in context")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=positive_int, default=12, help="tokens generated per request")
    parser.add_argument(
        "--icl-prefill-tokens", type=positive_int, default=2048, help="ICL corpus prefill per engine cell"
    )
    parser.add_argument("--triton-icl-prefill-tokens", type=positive_int, default=1024)
    parser.add_argument(
        "--triton-icl-max-corpus", type=positive_int, default=1024, help="larger ICL corpora: engine only"
    )
    parser.add_argument("--load-max-tokens", type=positive_int, default=8)
    parser.add_argument("--load-concurrency", type=positive_int, nargs="+", default=LOAD_CONCURRENCY)
    parser.add_argument("--corpus-sizes", type=int, nargs="+", default=CORPUS_SIZES, help="0: the whole corpus")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=BATCHES)
    parser.add_argument("--triton-batches", type=positive_int, nargs="+", default=BATCHES)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for serving.json and serving.png")
    parser.add_argument(
        "--levels",
        nargs="+",
        choices=["engine", "triton"],
        default=["engine", "triton"],
        help="measure only these; rows of the other level are kept from the existing results file",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    loaded = load_base_model(smollm2_gguf())
    ids = corpus_ids(loaded)
    bench = Benchmark(args, loaded, ids)
    if "engine" not in args.levels:  # keep the engine rows (and how they were made) of an earlier run
        earlier = json.loads((args.out / "serving.json").read_text())
        bench.rows = [r for r in earlier["rows"] if r["level"] == "engine"]
        bench.result["engine_rows_from"] = {k: earlier[k] for k in ("command", "date", "machine")}
    full, prefill_s = corpus_kv(loaded, ids)
    bench.result.update(
        {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "corpus": {"files": CORPUS_FILES, "tokens": len(ids), "kv_prefill_s": round(prefill_s, 1) or "cached"},
            "setup": {
                "max_tokens": args.max_tokens,
                "cartridges": "initialised from the corpus KV (first p tokens), not trained: speed does not depend "
                "on training, and the same two cartridges serve every corpus size",
                "icl_prefix_reuse": "corpus KV computed once, served as a shared cartridge of p = corpus tokens",
                "icl": "corpus text + question in every prompt, chat template applied",
                "kv_bytes_per_request": "KV a request attends over (cartridge or corpus + its own prompt and "
                "generated tokens), float32; kv_bytes_resident_per_request counts shared KV once per batch",
                "ttft_s": "mean time from submitting the batch to a request's first text chunk",
                "decode_tokens_per_s": "tokens after each request's first, over the span from the earliest first "
                "chunk to the last response",
                "throughput_tokens_per_s": "all generated tokens over the batch's wall time",
                "triton": "tritonserver from the nvidia-pytriton wheel, router model, HTTP generate_stream from an "
                "asyncio client on 127.0.0.1; tokens counted by re-tokenizing the answers",
            },
        }
    )
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        workdir, store = Path(tmp), Store()
        root = f"file://{workdir}/store"
        names = {f"cartridge-p{p}": prefix(full, p) for p in PS}
        names |= {f"prefix-{n}": prefix(full, n) for n in bench.sizes}
        for name, cartridge in names.items():
            publish(store, root, name, cartridge, loaded, workdir / "artifacts")
        del names, full
        done: dict[tuple[Any, ...], dict] = {}
        cache = CartridgeCache(store, root, NAMESPACE, loaded.fingerprint, 4 << 30)
        if "engine" in args.levels:
            engine = Engine(loaded, cache)
            try:
                run_engine(engine, bench.jobs("cartridge", bench.sizes[0], PS[0], 2), 2)  # warm-up: first calls
                bench.measure("engine", lambda jobs: run_engine(engine, jobs, args.max_tokens), done)
            finally:
                engine.close()
        env = {
            "CARTRIDGES_MODEL_URI": str(smollm2_gguf()),
            "CARTRIDGES_STORE_ROOT": root,
            "CARTRIDGES_NAMESPACE": NAMESPACE,
            "CARTRIDGES_CACHE_BYTES": str(4 << 30),
        }
        server = start_triton(REPOSITORY, workdir / "triton", env, timeout_s=600)
        try:
            run_triton(server, loaded, bench.jobs("cartridge", bench.sizes[0], PS[0], 2), 2)  # warm-up
            bench.measure("triton", lambda jobs: run_triton(server, loaded, jobs, args.max_tokens), done)
            load = load_test(server, ["cartridge-p256", "cartridge-p512"], args.load_max_tokens, args.load_concurrency)
        finally:
            server.stop()
    bench.result["load"] = {
        "client": "asyncio + aiohttp, HTTP generate on 127.0.0.1 (perf_analyzer: the configured package index has "
        "only a 0.1.0 placeholder of perf-analyzer, without the binary)",
        "max_tokens": args.load_max_tokens,
        "compositions": "cycled: none, cartridge-p256, cartridge-p512, cartridge-p256 + cartridge-p512",
        "max_concurrency": max(args.load_concurrency),
        "requests": sum(r["requests"] for r in load),
        "failed": sum(r["failed"] for r in load),
        "p50_ms": load[-1]["p50_ms"],
        "p99_ms": load[-1]["p99_ms"],
        "levels": load,
    }
    largest = bench.sizes[-1]
    bench.result["targets"] = [targets(bench.rows, largest, level) for level in ("engine", "triton")]
    bench.result["machine"]["load_average_at_end"] = os.getloadavg()
    bench.result["wall_s"] = round(time.perf_counter() - started, 1)
    bench.write()
    plot(bench.rows, args.out / "serving.png")
    print(json.dumps(bench.result["targets"], indent=2))
    print(f"wrote {args.out / 'serving.json'} and serving.png in {bench.result['wall_s']}s")


if __name__ == "__main__":
    main()

"""The serving runner on a CUDA GPU: correctness of its Triton-kernel attention, then decode speed.

1. A small random Llama (GQA) in float32: one ragged step with 0, 1 and 2 composed cartridges, then a decode step,
   each request's logits against transformers reading the composed cartridge as past key/values (SDPA).
2. A Llama-3.2-1B-shaped random model in bf16: decode tokens/s of a batch sharing one 2048-token cartridge vs the
   same batch with the 2048 tokens as each request's own prompt (ICL), at batch 1…64. The runner launches every
   layer eagerly from Python, so these are host-inclusive numbers; ``decode_device_busy_ms`` (the kernels and
   copies of one step, torch.profiler) beside ``decode_step_ms`` says how far the host is the bound. The
   cartridge rows run again with every decode step replayed from a CUDA graph (``cuda_graphs``), after a check
   that replayed steps give the eager steps' logits (``cuda_graphs_check``; if it fails, the eager rows are
   still timed, the graph rows skipped, and the script exits non-zero). Batch 64, the issue's, is timed first.

    PYTHONPATH=.:serving-image:kernels python bench/serving_gpu.py --out bench/results

Writes DIR/serving-gpu.json and, with matplotlib, serving-gpu.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jsonfile import write_json
from transformers import LlamaConfig, LlamaForCausalLM

from cartridges.artifact import Cartridge
from cartridges.kvcache import compose, forward_with_cartridge
from cartridges_serving.graphs import Capture, DecodeGraphs
from cartridges_serving.runner import BatchItem, LlamaRunner

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = "cuda"  # --smoke: "cpu"


def random_llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return model.to(device=torch.device(DEVICE), dtype=dtype)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def random_cartridge(runner: LlamaRunner, p: int) -> Cartridge:
    shape = (runner.num_kv_heads, p, runner.head_dim)
    layers = range(runner.num_layers)
    keys = [torch.randn(shape, device=runner.device, dtype=runner.dtype) for _ in layers]
    return Cartridge(keys, [torch.randn(shape, device=runner.device, dtype=runner.dtype) for _ in layers])


@torch.no_grad()
def reference_logits(model: LlamaForCausalLM, cartridges: Sequence[Cartridge], ids: Sequence[int]) -> torch.Tensor:
    tokens = torch.tensor([list(ids)], device=DEVICE)
    if not cartridges:
        return model(input_ids=tokens).logits[0, -1].float()
    hidden = forward_with_cartridge(model, compose(cartridges), tokens, torch.ones_like(tokens))
    return model.lm_head(hidden[0, -1]).float()


def check_correctness() -> dict[str, Any]:
    """Max |runner - reference| logit error over a mixed prefill step and a decode step."""
    model = random_llama(256, 4, 8, 2, 512, torch.float32)
    runner = LlamaRunner(model)
    a, b = random_cartridge(runner, 40), random_cartridge(runner, 23)
    compositions: list[list[Cartridge]] = [[], [a], [a, b]]
    prompts = [[5, 9, 200, 31, 7], [17, 3, 99], [250, 1, 2, 3, 4, 8, 16]]
    items = [
        BatchItem(ids, sum(c.p for c in carts), carts, runner.new_own_kv(16))
        for ids, carts in zip(prompts, compositions, strict=True)
    ]
    errors = []
    for _ in range(2):  # prefill, then one decode token per request
        logits = runner.step(items)
        for i, (item, carts) in enumerate(zip(items, compositions, strict=True)):
            full = prompts[i]
            errors.append((logits[i] - reference_logits(model, carts, full)).abs().max().item())
            nxt = int(logits[i].argmax())
            prompts[i] = [*full, nxt]
            item.start_position += len(item.token_ids)
            item.token_ids = [nxt]
    scale = max(reference_logits(model, c, p).abs().max().item() for c, p in zip(compositions, prompts, strict=True))
    return {"max_abs_logit_error": max(errors), "logit_scale": scale, "ok": max(errors) <= 2e-2 * max(scale, 1.0)}


def check_graphs(capture: Capture | None = None, long_prompt: int = 600) -> dict[str, Any] | None:
    """Max |replayed - eager| logit error of decode steps through CUDA graphs (DecodeGraphs) over steps that
    capture, replay with split walks (a ``long_prompt``-token prompt), and replay again after a request was
    replaced by another reading the same cartridges (new rows, maybe a grown pool); None without CUDA (tests
    pass a CPU emulation as ``capture``, and a short prompt: the interpreter is slow)."""
    if DEVICE != "cuda" and capture is None:
        return None
    model = random_llama(256, 4, 8, 2, 512, torch.float32)
    eager, captured = LlamaRunner(model), LlamaRunner(model)
    graphs = DecodeGraphs(captured, capture)
    a, b = random_cartridge(eager, 40), random_cartridge(eager, 23)

    def request(runner: LlamaRunner, prompt: int, cartridges: list[Cartridge]) -> BatchItem:
        ids = [1 + i % 500 for i in range(prompt)]
        return BatchItem(ids, sum(c.p for c in cartridges), cartridges, runner.new_own_kv(prompt + 16))

    shapes: list[tuple[int, list[Cartridge]]] = [(long_prompt, []), (5, [a]), (7, [a, b])]
    batches = [[request(runner, n, c) for n, c in shapes] for runner in (eager, captured)]
    errors = []
    for step in range(14):
        if step == 7:  # another request reading [a] takes the place of the second
            for items, runner in zip(batches, (eager, captured), strict=True):
                items.pop(1).own.release()
                items.append(request(runner, long_prompt // 2, [a]))
        logits = [eager.step(batches[0]), graphs.step(batches[1])]
        errors.append((logits[1] - logits[0]).abs().max().item())
        for items in batches:
            for item in items:
                item.start_position += len(item.token_ids)
                item.token_ids = [7 + step]
    stats = graphs.stats
    ok = max(errors) <= 1e-3 and stats.replays >= 6 and not stats.disabled
    return {"max_abs_logit_error": max(errors), **vars(stats), "ok": ok}


def device_busy_ms(step: Callable[[], object]) -> float | None:
    """Summed device time of the kernels and copies ``step`` issues (torch.profiler); None without CUDA."""
    if DEVICE != "cuda":
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        synchronize()
    events = prof.key_averages()
    return sum(float(getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)) for e in events) / 1e3


def decode_rate(
    runner: LlamaRunner, batch: int, context: int, shared: bool, steps: int, cuda_graphs: bool = False
) -> dict[str, Any]:
    """Decode tokens/s for ``batch`` requests over a ``context``-token cartridge (shared) or own prompt (ICL),
    each step launched eagerly or replayed from a CUDA graph."""
    graphs = DecodeGraphs(runner) if cuda_graphs else None
    step = graphs.step if graphs else runner.step
    cartridge = random_cartridge(runner, context) if shared else None
    prompt = 8 if shared else context
    items = [
        BatchItem(
            [1 + i % 500 for i in range(prompt)],  # within the 512-token vocabulary
            context if shared else 0,
            [cartridge] if cartridge is not None else [],
            runner.new_own_kv(prompt + steps + 4),  # prefill, warm-up steps, the timed steps, a profiled one
        )
        for _ in range(batch)
    ]
    synchronize()
    started = time.perf_counter()
    runner.step(items)
    synchronize()
    prefill_s = time.perf_counter() - started
    for item in items:
        item.start_position += len(item.token_ids)
        item.token_ids = [1]

    def decode() -> None:
        step(items)
        for item in items:
            item.start_position += 1

    # The first decode step compiles the decode-shaped kernels; with graphs the second captures one and the
    # third, the graph's first replay, is also run eagerly to check it.
    for _ in range(3 if cuda_graphs else 1):
        decode()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        decode()
    synchronize()
    decode_s = time.perf_counter() - started
    busy_ms = device_busy_ms(lambda: step(items))
    return {
        "method": "cartridge" if shared else "icl",
        "cuda_graphs": cuda_graphs,
        "context_tokens": context,
        "batch": batch,
        "prefill_s": prefill_s,
        "decode_step_ms": decode_s / steps * 1e3,
        # Kernel and copy time of one more step: far below the step's wall time means the host is the bound.
        "decode_device_busy_ms": busy_ms,
        "decode_tokens_per_s": batch * steps / decode_s,
        "own_kv_bytes_per_request": items[0].own.nbytes,
        "shared_cartridge_bytes": cartridge.nbytes if cartridge is not None else 0,
        "graph_stats": vars(graphs.stats) if graphs else None,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Decode tokens/s against batch, one line per method (cartridge eager and replayed, ICL); skipped (False)
    without matplotlib, which the device image may lack."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(_label(row) for row in rows):
        mine = sorted((row for row in rows if _label(row) == label), key=lambda row: row["batch"])
        ax.plot([r["batch"] for r in mine], [r["decode_tokens_per_s"] for r in mine], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="requests in the decode step", ylabel="decode tokens/s")
    ax.set_title(f"Serving runner decode, {rows[0]['context_tokens']}-token context", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def _label(row: dict[str, Any]) -> str:
    return row["method"] + (" (graphs)" if row.get("cuda_graphs") else "")


def positive_int(text: str) -> int:
    """An argparse type: a count of at least 1 (no steps would divide by zero)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--steps", type=positive_int, default=16, help="timed decode steps per row")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (PyTorch attention)")
    args = parser.parse_args(argv)
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "correctness": check_correctness(),
        "model": "random Llama-3.2-1B shape: hidden 2048, 16 layers, 32 heads, 8 KV heads, head_dim 64, bf16",
        "rows": [],
    }
    result["cuda_graphs_check"] = check_graphs()
    print(f"correctness: {result['correctness']}\ncuda graphs: {result['cuda_graphs_check']}", flush=True)
    if not result["correctness"]["ok"]:
        print(
            "correctness check failed: no timings written (they would time a runner that decodes wrong)",
            file=sys.stderr,
        )
        return 1
    graphs_ok = result["cuda_graphs_check"] is None or result["cuda_graphs_check"]["ok"]
    if not graphs_ok:
        print("CUDA graph check failed: timing the eager rows only (replayed steps decode wrong)", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    big = (128, 2, 4, 2, 256, torch.float32) if args.smoke else (2048, 16, 32, 8, 8192, torch.bfloat16)
    runner = LlamaRunner(random_llama(*big))
    print(f"{'method':<16}{'batch':>6}{'prefill s':>11}{'step ms':>10}{'busy ms':>9}{'tok/s':>10}{'own KV MB':>11}")
    for batch in (1, 2) if args.smoke else (64, 1, 8, 32):
        for shared, graphs in ((True, False), (True, True), (False, False)):
            if graphs and (args.smoke or not graphs_ok):
                continue
            row = decode_rate(runner, batch, 64 if args.smoke else 2048, shared, args.steps, graphs)
            result["rows"].append(row)
            label = _label(row)
            print(
                f"{label:<16}{batch:>6}{row['prefill_s']:>11.3f}{row['decode_step_ms']:>10.2f}"
                f"{row['decode_device_busy_ms'] or float('nan'):>9.2f}"
                f"{row['decode_tokens_per_s']:>10.1f}{row['own_kv_bytes_per_request'] / 2**20:>11.1f}",
                flush=True,
            )
            write_json(args.out / "serving-gpu.json", result)
    plotted = plot(result["rows"], args.out / "serving-gpu.png")
    print(f"wrote {args.out / 'serving-gpu.json'}" + (" and serving-gpu.png" if plotted else ""))
    return 0 if graphs_ok else 1


if __name__ == "__main__":
    sys.exit(main())

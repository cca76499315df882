"""The ``cartridges`` command driven end to end with the tiny model: every subcommand, its errors and exit codes."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from _cartridge_store import publish, random_cartridge, truncate_in_minio
from _http_stub import http_stub
from _peft_adapter import peft_prefix_adapter
from _processes import assert_none_left, lines_until

from cartridges import layout, tritonserver
from cartridges.api import icl_gain_recovered
from cartridges.artifact import Cartridge
from cartridges.cli import main
from cartridges.cli.app import parser
from cartridges.cli.ask import URL_SCHEMES
from cartridges.cli.common import (
    EXIT_INPUT,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CLIError,
    find,
    load,
    open_store,
)
from cartridges.cli.demo import DURATIONS
from cartridges.cli.evaluate import corpus_of
from cartridges.cli.exits import EXIT_INTERRUPTED
from cartridges.cli.serve import KEPT_SERVE_LOGS, Ports, serve_log_path, serve_ports
from cartridges.cli.train import read_files
from cartridges.models import LoadedModel, tiny_llama
from cartridges.paths import cache_dir
from cartridges.process import free_port
from cartridges.store import Store, StoreURI
from cartridges_e2e.minio import MinioServer

COMMANDS = ("demo", "train", "eval", "serve", "ask", "ls", "inspect", "import", "quantize")
CORPUS = (
    "The lighthouse of Varnholm was lit in 1873 by keeper Ilse Marrow. Its lens came from a foundry in Ostrava. "
    "Every winter the keeper logged the ice on the fjord, and in 1901 the ice reached the harbour wall.\n"
) * 2
QA = [{"question": "Who lit the lighthouse?", "answer": "Ilse Marrow, in 1873."}]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cartridges: error: "), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"file://{tmp_path_factory.mktemp('cli-store')}"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("corpus")
    (directory / "lighthouse.md").write_text(CORPUS)
    (directory / "notes").mkdir()
    (directory / "notes" / "ice.txt").write_text("The ice of 1901 reached the harbour wall.\n")
    (directory / ".hidden").write_text("skipped")
    (directory / "notes" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1\xff")  # hidden, and not UTF-8
    (directory / ".git").mkdir()
    (directory / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return directory


@pytest.fixture(scope="module")
def trained(store: str, corpus_dir: Path) -> dict[str, object]:
    torch.set_num_threads(1)
    argv = ["train", "lighthouse", str(corpus_dir), "--model", "tiny", "--store", store, "--steps", "4", "--json"]
    code = main(argv)
    assert code == 0
    return {"store": store}


def zero_cartridge(lm: LoadedModel) -> Cartridge:
    """A p=16 cartridge of zeros for ``lm``: enough to score, nothing to train."""
    fp = lm.fingerprint
    layers = [torch.zeros(fp.num_kv_heads, 16, fp.head_dim) for _ in range(fp.num_layers)]
    return Cartridge(layers, layers, frozen_tokens=1)


def reference_pt(lm: LoadedModel, path: Path) -> Path:
    """A reference-implementation checkpoint for ``lm``: 1 frozen + 15 trainable rows per layer."""
    fp = lm.fingerprint

    def layers(p: int) -> list[torch.Tensor]:
        return [torch.randn(1, fp.num_kv_heads, p, fp.head_dim) for _ in range(fp.num_layers)]

    trainable, frozen = {"keys": layers(15), "values": layers(15)}, {"keys": layers(1), "values": layers(1)}
    torch.save(
        {f"{kind}_{name}": v for kind, d in (("trainable", trainable), ("frozen", frozen)) for name, v in d.items()},
        path,
    )
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "examples:" in out and "exit codes:" in out


def test_the_demo_durations_are_the_same_in_its_help_the_readme_and_the_makefile(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One statement of how long the demo takes (measured, in ``demo.DURATIONS``), wherever a newcomer reads it."""
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    repo = Path(__file__).resolve().parent.parent
    readme, makefile = (repo / "README.md").read_text(), (repo / "Makefile").read_text()
    for text in (capsys.readouterr().out, readme, makefile):
        flat = " ".join(text.split())
        assert all(duration in flat for duration in DURATIONS.values()), flat


def test_ask_help_names_every_url_scheme_and_the_endpoint_each_mode_uses(capsys: pytest.CaptureFixture[str]) -> None:
    """--json asks the non-streaming generate endpoint, and --url takes grpc:// too: the help must not say less."""
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert all(scheme in flat for scheme in URL_SCHEMES), flat
    assert (
        "generate_stream" in flat and "With --json it waits for the whole answer (HTTP: the generate endpoint)" in flat
    )


def test_every_argument_of_every_command_is_described_in_its_help() -> None:
    import argparse

    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    undescribed = [f"{name} {a.dest}" for name, sub in commands.choices.items() for a in sub._actions if not a.help]
    assert undescribed == []


def test_corpus_directories_skip_hidden_files_at_any_depth(corpus_dir: Path) -> None:
    assert [d.id for d in read_files([corpus_dir]).documents] == ["lighthouse.md", "notes/ice.txt"]


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], corpus_dir: Path, store: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == EXIT_USAGE
    capsys.readouterr()
    code, _, err = cli(capsys, "train", "Bad_Name", str(corpus_dir), "--model", "tiny", "--store", store)
    assert code == EXIT_USAGE
    one_line_error(err)
    code, _, err = cli(capsys, "train", "odd", str(corpus_dir), "--model", "tiny", "--store", store, "--size", "20")
    assert code == EXIT_USAGE and "multiple of 16" in err
    one_line_error(err)
    code, _, err = cli(capsys, "ls", "--store", "http://not-a-store")
    assert code == EXIT_USAGE and "unsupported store URI" in err


def test_bad_training_values_are_refused_before_the_store_is_touched(
    capsys: pytest.CaptureFixture[str], corpus_dir: Path, tmp_path: Path
) -> None:
    """A bad --size or --steps is a usage error with nothing written: no corpus stored under a name never trained."""
    store = tmp_path / "store"
    for flag, value in (("--steps", "0"), ("--size", "-1")):
        code, _, err = cli(
            capsys, "train", "x", str(corpus_dir), "--model", "tiny", "--store", f"file://{store}", flag, value
        )
        assert code == EXIT_USAGE and f"invalid {flag[2:]}" in err
        one_line_error(err)
    assert not store.exists()


def test_an_s3_store_without_an_endpoint_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CARTRIDGES_S3_ENDPOINT", raising=False)
    code, _, err = cli(capsys, "ls", "--store", "s3://xyz")
    assert code == EXIT_USAGE and "set CARTRIDGES_S3_ENDPOINT" in err
    one_line_error(err)
    code, _, err = cli(capsys, "ls", "--store", "s3://x")
    assert code == EXIT_USAGE and "invalid S3 bucket name 'x'" in err
    one_line_error(err)


def test_missing_and_unreadable_inputs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, corpus_dir: Path, store: str
) -> None:
    code, _, err = cli(capsys, "train", "x", str(tmp_path / "nope.md"), "--model", "tiny", "--store", store)
    assert code == EXIT_NOT_FOUND and "no such file" in err
    one_line_error(err)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = cli(capsys, "train", "x", str(binary), "--model", "tiny", "--store", store)
    assert code == EXIT_INPUT and "not UTF-8" in err
    assert "--debug shows the traceback" not in err  # a message to act on, not a crash
    one_line_error(err)
    code, _, err = cli(capsys, "train", "x", str(corpus_dir), "--model", str(tmp_path / "no-model"), "--store", store)
    assert code == EXIT_NOT_FOUND and "model not found" in err
    one_line_error(err)


def test_a_directory_of_hidden_files_only_says_they_are_skipped(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, store: str
) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".notes.md").write_text("hidden")
    code, _, err = cli(capsys, "train", "x", str(tmp_path), "--model", "tiny", "--store", store)
    assert code == EXIT_NOT_FOUND and "hidden files" in err
    one_line_error(err)


def test_train_ls_inspect_and_retrain(
    trained: dict[str, object], corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(trained["store"])
    code, out, _ = cli(capsys, "ls", "--store", store, "--json")
    listed = json.loads(out)
    assert code == 0 and [c["name"] for c in listed] == ["lighthouse"]
    assert listed[0]["p"] == 64 and listed[0]["generation"] == 1 and listed[0]["corpusDigest"]
    code, out, _ = cli(capsys, "ls", "--store", store)
    assert code == 0 and "lighthouse" in out and "tiny-llama-seed0" in out
    code, out, _ = cli(capsys, "inspect", "lighthouse", "--store", store, "--json")
    info = json.loads(out)
    assert info["progress"]["phase"] == "done" and {"noContext", "icl", "cartridge"} <= set(info["scores"])
    code, out, _ = cli(capsys, "inspect", "lighthouse", "--store", store)
    assert code == 0 and "ICL gain recovered" in out
    argv = ["train", "lighthouse", str(corpus_dir), "--model", "tiny", "--store", store, "--steps", "4", "--json"]
    code, out, _ = cli(capsys, *argv)
    assert code == 0 and json.loads(out)["trained"] is False  # same corpus, same spec: kept
    code, out, _ = cli(capsys, *argv, "--force")
    assert code == 0 and json.loads(out)["generation"] == 2


def test_ls_reads_a_file_store_however_its_uri_is_spelled(
    trained: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(trained["store"]).removeprefix("file://")
    parent, leaf = path.rsplit("/", 1)
    code, out, _ = cli(capsys, "ls", "--store", str(trained["store"]), "--json")
    listed = [c["name"] for c in json.loads(out)]
    assert code == 0 and "lighthouse" in listed
    for spelling in (f"file://localhost{path}", f"file://{parent}//{leaf}", f"file://{parent}/./{leaf}"):
        code, out, err = cli(capsys, "ls", "--store", spelling, "--json")
        assert code == 0, err
        assert [c["name"] for c in json.loads(out)] == listed


def test_train_again_after_an_interruption_resumes_the_unfinished_generation(
    corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after distillation leaves g1 without a manifest: the same command again resumes g1 from its last
    checkpoint; a run on other inputs (here other --steps) starts a new generation instead."""
    from cartridges_trainer import pipeline

    store = f"file://{tmp_path / 'store'}"
    argv = ["train", "resumed", str(corpus_dir), "--model", "tiny", "--store", store, "--json"]
    real = pipeline.evaluate

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate", interrupted)
    code, _, err = cli(capsys, *argv, "--steps", "2")
    assert code == 130 and err.strip().splitlines()[-1] == (
        "cartridges: interrupted; the same command again resumes where it stopped"
    )
    code, _, _ = cli(capsys, *argv, "--steps", "4")  # other inputs: not g1's
    assert code == 130
    monkeypatch.setattr(pipeline, "evaluate", real)
    code, out, _ = cli(capsys, *argv, "--steps", "4")
    assert code == 0 and json.loads(out)["generation"] == 2
    code, out, _ = cli(capsys, "inspect", "resumed", "--store", store, "--json")
    assert json.loads(out)["training"]["resumed_from_step"] == 4


@pytest.mark.parametrize("damage", [b"{not json", b"\xaf{}", b'{"generation": "one", "prefix": "g1", "sha256": "x"}'])
def test_train_replaces_a_damaged_current_json_with_a_new_generation(
    damage: bytes, corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Training again is how a damaged pointer is recovered: it is named in one warning line, and the new
    generation is numbered after the stored ones, so none of them is overwritten."""
    store = f"file://{tmp_path / 'store'}"
    argv = ["train", "mended", str(corpus_dir), "--model", "tiny", "--store", store, "--steps", "2", "--json"]
    code, out, _ = cli(capsys, *argv)
    assert code == 0 and json.loads(out)["generation"] == 1
    opened, pointer = open_store(store), layout.current_pointer(store, "default", "mended")
    first = opened.get_json(pointer)
    opened.put_bytes(pointer, damage)
    for retrained in (2, 3):  # damaged again after the first repair: --force takes the same way
        code, out, err = cli(capsys, *argv, *(["--force"] if retrained == 3 else []))
        assert code == 0 and json.loads(out)["generation"] == retrained, err
        warnings = [line for line in err.splitlines() if pointer in line]
        assert len(warnings) == 1 and warnings[0].startswith("mended: ") and "replaces it" in warnings[0], err
        opened.put_bytes(pointer, damage)
    assert find(opened, store, "default", "mended", 1).pointer.sha256 == first["sha256"]  # g1 as it was


def test_a_trained_cartridge_is_found_under_any_spelling_of_its_store_and_once_moved(
    corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """current.json names the promoted generation relative to the cartridge, so it still leads there when the
    store is named another way or copied elsewhere (not 'pointer leaves the cartridge's prefix'), and training
    again keeps it instead of training anew."""
    store = f"file://{tmp_path / 'store'}"
    argv = ["train", "moving", str(corpus_dir), "--model", "tiny", "--steps", "2", "--json"]
    assert cli(capsys, *argv, "--store", store)[0] == 0
    shutil.copytree(tmp_path / "store", tmp_path / "moved")
    for other in (f"file://localhost{tmp_path}/store", f"file://{tmp_path}//store", f"file://{tmp_path / 'moved'}"):
        code, out, err = cli(capsys, "inspect", "moving", "--store", other, "--json")
        assert code == 0 and json.loads(out)["generation"] == 1, err
    code, out, err = cli(capsys, *argv, "--store", f"file://{tmp_path / 'moved'}")
    assert code == 0 and json.loads(out)["generation"] == 1, err


def test_ctrl_c_at_any_moment_exits_130_with_one_line(corpus_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C while the command starts (its own modules, then torch, transformers and triton importing) or later
    while it trains: the interrupt exit code and its line, never a traceback, an abort or a death by SIGINT. The
    delays only spread the signal over the start; whichever moment each lands in, the outcome must be the same."""
    store = f"file://{tmp_path / 'store'}"
    argv = [sys.executable, "-m", "cartridges.cli", "train", "long", str(corpus_dir), "--model", "tiny"]
    argv += ["--store", store, "--steps", "100000"]
    for delay in (0.3, 1.0, 2.0, 3.0, 4.5):
        for _ in range(3):  # on a loaded machine 0.3 s may still be Python's own start, before any line of ours
            command = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(delay)
            command.send_signal(signal.SIGINT)
            _, err = command.communicate(timeout=120)
            if not _interrupted_before_main(command.returncode, err):
                break
        assert command.returncode == 130, (delay, err)
        assert err.splitlines()[-1].startswith("cartridges: interrupted"), (delay, err)
        assert not any(text in err for text in ("Traceback", "nanobind", "Aborted", "KeyboardInterrupt")), (delay, err)


def test_ctrl_c_while_training_checkpoints_the_step_it_stopped_at(corpus_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C stops distillation as SIGTERM does, after the step it lands in, checkpointed: the same command again
    resumes from there, not from the last periodic checkpoint (a quarter of the steps apart: none yet here)."""
    store = tmp_path / "store"
    argv = [sys.executable, "-m", "cartridges.cli", "train", "long", str(corpus_dir), "--model", "tiny"]
    argv += ["--store", f"file://{store}", "--steps", "100000"]
    progress = Path(f"{layout.generation_prefix(str(store), 'default', 'long', 1)}/{layout.PROGRESS_FILE}")
    command = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reached = _training_step(progress, command)
    command.send_signal(signal.SIGINT)
    _, err = command.communicate(timeout=120)
    assert command.returncode == 130, err
    assert err.splitlines()[-1] == "cartridges: interrupted; the same command again resumes where it stopped", err
    checkpoints = [int(path.name.removeprefix("step-")) for path in store.rglob("step-*")]
    assert len(checkpoints) == 1 and reached <= checkpoints[0] < 25000, (checkpoints, err)


def _training_step(progress: Path, command: subprocess.Popen[str]) -> int:
    """The first training step ``progress`` reports past 0, once the trainer writes one (waiting while it starts)."""
    while command.poll() is None:
        try:
            state = json.loads(progress.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not written yet
            state = {}
        if state.get("phase") == "training" and state.get("step", 0) > 0:
            return int(state["step"])
        time.sleep(0.2)
    raise AssertionError(f"the command ended before training: {command.communicate()[1]}")


def _interrupted_before_main(returncode: int, stderr: str) -> bool:
    """Whether Ctrl-C landed while the interpreter started, before ``cartridges.cli.main`` (whose handler then
    catches every interrupt) was on the stack: a silent death by SIGINT (before Python's own handler), or
    Python's traceback with no frame of ``main`` in it."""
    if returncode == -signal.SIGINT and not stderr:
        return True
    return "KeyboardInterrupt" in stderr and not re.search(r"cartridges/cli/__init__\.py\", line \d+, in main", stderr)


def test_a_command_started_with_ctrl_c_ignored_keeps_ignoring_it(corpus_dir: Path, tmp_path: Path) -> None:
    """``cartridges train ... &`` in a script starts with SIGINT ignored: Ctrl-C on the script must not stop it."""
    store = f"file://{tmp_path / 'store'}"
    argv = [sys.executable, "-m", "cartridges.cli", "train", "bg", str(corpus_dir), "--model", "tiny", "--store", store]
    ignoring = subprocess.Popen([*argv, "--steps", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    for delay in (0.3, 1.0, 2.0):
        time.sleep(delay)
        ignoring.send_signal(signal.SIGINT)
    _, err = ignoring.communicate(timeout=120)
    assert ignoring.returncode == 0, err


def test_a_second_ctrl_c_interrupts_an_import_that_hangs(tmp_path: Path) -> None:
    """Ctrl-C is held back while an import runs, but not for ever: pressed again, it interrupts."""
    (tmp_path / "hangs.py").write_text(
        "import time\nprint('importing', flush=True)\nwhile True:\n    time.sleep(0.01)\n"
    )
    script = (
        f"import sys, time; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from cartridges.cli import _interrupts_outside_imports\n"
        "with _interrupts_outside_imports():\n"
        "    try:\n"
        "        import hangs\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted', flush=True)\n"
        "time.sleep(0.5)\n"  # no retry of the interrupt held back may land here
        "print('done', flush=True)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as command:
        try:
            assert command.stdout is not None and command.stdout.readline() == "importing\n"
            command.send_signal(signal.SIGINT)
            time.sleep(0.5)  # ten retries' worth: each finds the import still running and holds it back again
            assert command.poll() is None
            command.send_signal(signal.SIGINT)
            out, _ = command.communicate(timeout=30)
        finally:
            command.kill()  # a failure here must not leave the import hanging for ever
    assert out == "interrupted\ndone\n" and command.returncode == 0


def test_ctrl_c_in_a_finalizer_waits_for_it_without_a_traceback(tmp_path: Path) -> None:
    """An interrupt raised in ``__del__`` would be printed and dropped: even pressed twice, it waits until the
    finalizer is done, then interrupts the command. The finalizer runs until the test has pressed Ctrl-C twice (a
    fixed time could end first on a loaded machine, and the second Ctrl-C would land after the command)."""
    done = tmp_path / "pressed-twice"
    script = (
        "import os, time\n"
        "from cartridges.cli import _interrupts_outside_imports\n"
        "class Slow:\n"
        "    def __del__(self):\n"
        "        print('finalizing', flush=True)\n"
        f"        while not os.path.exists({str(done)!r}):\n"
        "            time.sleep(0.01)\n"
        "with _interrupts_outside_imports():\n"
        "    try:\n"
        "        slow = Slow()\n"
        "        del slow\n"
        "        time.sleep(30)\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted', flush=True)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as command:
        try:
            assert command.stdout is not None and command.stdout.readline() == "finalizing\n"
            for _ in range(2):
                command.send_signal(signal.SIGINT)
                time.sleep(0.2)
            done.touch()
            out, err = command.communicate(timeout=30)
        finally:
            command.kill()
    assert (out, err, command.returncode) == ("interrupted\n", "", 0)


def test_eval_table_json_and_plot(
    trained: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(trained["store"])
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(x) + "\n" for x in QA))
    plot = tmp_path / "eval.png"
    code, out, _ = cli(
        capsys, "eval", "lighthouse", "--qa", str(qa), "--model", "tiny", "--store", store, "--plot", str(plot)
    )
    assert code == 0 and "no context" in out and "cartridge (p=64)" in out
    assert plot.read_bytes().startswith(b"\x89PNG")
    code, out, _ = cli(capsys, "eval", "lighthouse", "--qa", str(qa), "--model", "tiny", "--store", store, "--json")
    rows = json.loads(out)["rows"]
    assert [r["kv_bytes"] > 0 for r in rows] == [False, True, True]
    nll = [r["answer_nll"] for r in rows]
    assert json.loads(out)["iclGainRecovered"] == icl_gain_recovered(*nll)  # null when ICL gave no gain
    assert rows[1]["kv_bytes"] > rows[2]["kv_bytes"]  # the whole corpus in context costs more than p=64 rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer"}\n')
    code, _, err = cli(capsys, "eval", "lighthouse", "--qa", str(bad), "--model", "tiny", "--store", store)
    assert code == EXIT_INPUT and "bad.jsonl:1" in err
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"question": "Qui a allumé le phare ?", "answer": "Ilse"}\n'.encode("latin-1"))
    code, _, err = cli(capsys, "eval", "lighthouse", "--qa", str(latin1), "--model", "tiny", "--store", store)
    assert code == EXIT_INPUT and f"{latin1}: not UTF-8" in err
    one_line_error(err)
    code, _, err = cli(capsys, "eval", "lighthouse", "--qa", str(tmp_path / "nope.jsonl"), "--store", store)
    assert code == EXIT_NOT_FOUND


@pytest.mark.parametrize(
    ("icl", "recovered"), [(1.5, "50%"), (2.0, "n/a (ICL gave no gain to recover)"), (2.1, "n/a (ICL gave no")]
)
def test_eval_table_says_what_the_cartridge_recovers_or_why_not(icl: float, recovered: str) -> None:
    """The trainer's definition and words: ICL no better than no context leaves no gain to recover, said so rather
    than a line left out."""
    from cartridges.cli.evaluate import Row, table

    rows = [Row("no context", 2.0, 0, 1.0), Row("ICL", icl, 4096, 1.0), Row("cartridge (p=64)", 1.75, 1024, 1.0)]
    last = table(rows).splitlines()[-1]
    assert last.startswith(f"ICL gain recovered by the cartridge: {recovered}") and last.endswith("4.0x less KV memory")


def test_eval_reads_only_string_questions_and_answers(tmp_path: Path) -> None:
    """A null, a list or an object would be scored as its Python repr ("None", "['a']"): refused, naming the line."""
    from cartridges.cli.evaluate import read_qa

    for number, item in enumerate(({"question": None, "answer": "a"}, {"question": ["a"], "answer": {"x": 1}}), 2):
        qa = tmp_path / f"qa{number}.jsonl"
        qa.write_text(json.dumps(QA[0]) + "\n" + "\n" * (number - 2) + json.dumps(item) + "\n")
        with pytest.raises(CLIError, match=f"qa{number}.jsonl:{number}: expected") as raised:
            read_qa(qa)
        assert raised.value.code == EXIT_INPUT


def test_eval_refuses_a_description_without_a_corpus(
    tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--description says what --corpus is; alone it would be ignored without a word."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps(QA[0]) + "\n")
    argv = ["eval", "lighthouse", "--qa", str(qa), "--model", "tiny", "--store", store, "--description", "notes"]
    code, _, err = cli(capsys, *argv)
    assert code == EXIT_USAGE and "--description needs --corpus" in err
    one_line_error(err)


def test_eval_given_a_directory_as_qa_says_it_is_not_a_file(
    tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "eval", "lighthouse", "--qa", str(tmp_path), "--model", "tiny", "--store", store)
    assert code == EXIT_NOT_FOUND and f"{tmp_path}: a directory, not a JSON lines file" in err
    one_line_error(err)


def test_eval_icl_falls_back_to_a_chunk_that_fits_the_model(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the trainer's evaluation: the whole corpus when it fits the model's positions with the longest question
    and answer, else the leading chunk of the corpus that does, labelled as such."""
    from cartridges.cli.evaluate import QA as Pair
    from cartridges.cli.scoring import compare

    cartridge = zero_cartridge(tiny_model)
    pairs = [Pair(**qa) for qa in QA]
    whole = compare(tiny_model, cartridge, "the lighthouse", CORPUS, pairs)[1]
    assert whole.condition.startswith("ICL (") and "chunk" not in whole.condition
    positions = int(whole.condition.split("(")[1].split()[0])  # the system turn holding the whole corpus
    monkeypatch.setattr(tiny_model.model.config, "max_position_embeddings", positions)
    chunk = compare(tiny_model, cartridge, "the lighthouse", CORPUS, pairs)[1]
    assert "chunk: first" in chunk.condition
    assert 0 < chunk.kv_bytes < whole.kv_bytes * 0.9  # the question and its answer need their positions too
    monkeypatch.setattr(tiny_model.model.config, "max_position_embeddings", 8)
    with pytest.raises(CLIError, match="leave no room for the corpus"):
        compare(tiny_model, cartridge, "the lighthouse", CORPUS, pairs)


def test_eval_shows_a_bar_per_condition_on_a_terminal(
    tiny_model: LoadedModel, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal StatusLines stays quiet for a bar to show, so eval must draw one (as training does)."""
    from cartridges.cli.evaluate import QA as Pair
    from cartridges.cli.scoring import compare

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    compare(tiny_model, zero_cartridge(tiny_model), "the lighthouse", CORPUS, [Pair(**QA[0])] * 2)
    err = capsys.readouterr().err
    for condition in (r"no context \(1/3\)", r"ICL \(.+\) \(2/3\)", r"cartridge \(p=16\) \(3/3\)"):
        assert re.search(f"eval: {condition}: +100%.* 2/2 \\[.*question/s", err), err  # a bar run to its end
    assert ": question 1/2" not in err  # no status lines as well


def test_eval_tokenizes_the_corpus_once_whatever_the_number_of_questions(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A question is read after the context as after a cartridge: its turn does not depend on the system text, so
    the corpus (1 MB is minutes of tokenizing) is tokenized once for ICL, not once per question."""
    from cartridges.chat import render, turn_after_cartridges
    from cartridges.cli.evaluate import QA as Pair
    from cartridges.cli.scoring import compare
    from cartridges_trainer.prompts import system_prompt

    tokenizer = tiny_model.tokenizer
    tokenize = type(tokenizer).__call__
    corpus_reads: list[int] = []

    def spy(self: object, text: object, *args: object, **kwargs: object) -> object:
        if isinstance(text, str) and "harbour wall" in text:
            corpus_reads.append(len(text))
        return tokenize(self, text, *args, **kwargs)

    pairs = [Pair(f"Question {n}: who lit the lighthouse?", "Ilse Marrow.") for n in range(5)]
    system = system_prompt("the lighthouse", CORPUS)
    assert all(render(tokenizer, system, q.question)[1] == turn_after_cartridges(tokenizer, q.question) for q in pairs)
    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    rows = compare(tiny_model, zero_cartridge(tiny_model), "the lighthouse", CORPUS, pairs)
    assert len(rows) == 3 and len(corpus_reads) == 1


def test_eval_counts_icl_memory_in_the_cartridges_dtype(tiny_model: LoadedModel) -> None:
    """The memory ratio compares like with like: an fp32 and a bf16 copy of one cartridge give one ratio (the ICL
    cache in the dtype the server would hold it in next to the cartridge), and the label says what it counts."""
    from cartridges.chat import render
    from cartridges.cli.evaluate import QA as Pair
    from cartridges.cli.scoring import compare
    from cartridges_trainer.prompts import system_prompt

    pairs = [Pair(**QA[0])]
    ratios = {}
    for dtype in (torch.float32, torch.bfloat16):
        _, icl, cart = compare(tiny_model, zero_cartridge(tiny_model).to(dtype=dtype), "notes", CORPUS, pairs)
        ratios[dtype] = icl.kv_bytes / cart.kv_bytes
        context = len(render(tiny_model.tokenizer, system_prompt("notes", CORPUS), "")[0])
        assert icl.condition == f"ICL ({context} context tokens, {str(dtype).removeprefix('torch.')} KV)"
    assert ratios[torch.float32] == ratios[torch.bfloat16]


def test_eval_says_the_training_corpus_is_gone_before_loading_the_model(
    trained: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cartridges.cli import evaluate

    copy = tmp_path / "store"
    shutil.copytree(str(trained["store"]).removeprefix("file://"), copy)
    shutil.rmtree(copy / "corpora")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps(QA[0]) + "\n")
    monkeypatch.setattr(evaluate, "load_model", lambda *_: pytest.fail("loaded the model before reading the corpus"))
    code, _, err = cli(capsys, "eval", "lighthouse", "--qa", str(qa), "--model", "tiny", "--store", f"file://{copy}")
    assert code == EXIT_NOT_FOUND and "the corpus it was trained on" in err and "--corpus FILES" in err
    one_line_error(err)


def test_unknown_cartridge(store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps(QA[0]) + "\n")
    for argv in (["inspect", "nope"], ["eval", "nope", "--qa", str(qa), "--model", "tiny"]):
        code, _, err = cli(capsys, *argv, "--store", store)
        assert code == EXIT_NOT_FOUND and "unknown cartridge 'nope'" in err
        one_line_error(err)


@pytest.mark.minio
def test_load_checks_the_pointer_as_serving_does(
    minio_server: MinioServer, s3_prefix: str, tiny_model: LoadedModel
) -> None:
    """current.json is data in the store: one that leads to another cartridge's prefix, or promised other tensors
    than the manifest's, is refused rather than loaded."""
    store, root, fp = minio_server.store(), s3_prefix.rstrip("/"), tiny_model.fingerprint
    publish(store, root, "team-a", "ours", random_cartridge(fp, 4, seed=1), fp)
    theirs = publish(store, root, "team-b", "theirs", random_cartridge(fp, 4, seed=2), fp)
    assert len(load(store, find(store, root, "team-a", "ours"), tiny_model).keys) == fp.num_layers
    pointer_uri = layout.current_pointer(root, "team-a", "ours")
    promoted = store.get_json(pointer_uri)
    escapes = (".\t./.\t./team-b/theirs/g1", "g1?/../../../team-b/theirs/g1")  # URL parsers read ".\t." as ".."
    for prefix in (theirs, *escapes):
        store.put_json(pointer_uri, {**promoted, "prefix": prefix})
        with pytest.raises(CLIError, match="pointer leaves the cartridge's prefix") as refused:
            find(store, root, "team-a", "ours")
        assert refused.value.code == EXIT_INPUT  # the request was fine, the store's cartridge is unusable
    store.put_json(pointer_uri, {**promoted, "sha256": "0" * 64})
    with pytest.raises(CLIError, match="does not match the promoted 0000") as refused:
        load(store, find(store, root, "team-a", "ours"), tiny_model)
    assert refused.value.code == EXIT_INPUT


@pytest.fixture
def s3_cli(minio_server: MinioServer, s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Store, str]:
    """A fresh MinIO bucket the CLI reaches as a user's does, through the CARTRIDGES_S3_* settings: (store, root)."""
    for key, value in minio_server.env().items():
        monkeypatch.setenv(key, value)
    return minio_server.store(), s3_prefix.rstrip("/")


@pytest.mark.minio
def test_a_tampered_or_refusing_store_is_one_line_without_a_crash_hint(
    s3_cli: tuple[Store, str],
    tiny_model: LoadedModel,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store altered behind our back makes the cartridge unusable (65), and a store that refuses our keys is a
    failure the message explains: neither is a crash to debug."""
    (store, root), fp = s3_cli, tiny_model.fingerprint
    publish(store, root, "default", "ours", random_cartridge(fp, 4, seed=1), fp)
    pointer_uri = layout.current_pointer(root, "default", "ours")
    store.put_json(pointer_uri, {**store.get_json(pointer_uri), "prefix": f"{root}/elsewhere/g1"})
    code, _, err = cli(capsys, "inspect", "ours", "--store", root)
    assert code == EXIT_INPUT and "pointer leaves the cartridge's prefix" in err and "--debug" not in err
    one_line_error(err)
    truncate_in_minio(store, pointer_uri)
    code, _, err = cli(capsys, "inspect", "ours", "--store", root)
    assert code == EXIT_INPUT and "sha256 mismatch" in err and "--debug" not in err
    one_line_error(err)
    monkeypatch.setenv("CARTRIDGES_S3_SECRET_KEY", "not-the-secret")
    code, _, err = cli(capsys, "ls", "--store", root)
    assert code == 1 and "wrong secret key" in err and "--debug" not in err
    one_line_error(err)


@pytest.mark.minio
def test_a_missing_bucket_says_how_to_create_it_and_train_creates_it(
    minio_server: MinioServer, corpus_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in minio_server.env().items():
        monkeypatch.setenv(key, value)
    root = f"s3://fresh-{time.monotonic_ns() % 10**9}"
    bucket = root.removeprefix("s3://")
    code, _, err = cli(capsys, "ls", "--store", root)
    assert code == EXIT_NOT_FOUND and f"bucket '{bucket}' does not exist" in err, err
    assert f"`mc mb ALIAS/{bucket}`" in err and err.rstrip().endswith(
        "`cartridges train` creates it on its first write"
    )
    one_line_error(err)
    argv = ["train", "fresh", str(corpus_dir), "--model", "tiny", "--store", root, "--steps", "2", "--json"]
    assert cli(capsys, *argv)[0] == 0
    code, out, _ = cli(capsys, "ls", "--store", root, "--json")
    assert code == 0 and [c["name"] for c in json.loads(out)] == ["fresh"]


def test_an_unexpected_failure_names_its_type_and_the_debug_flag(
    store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cartridges.cli import inventory

    def crash(_: object) -> int:
        raise KeyError("boom")

    monkeypatch.setattr(inventory, "run_ls", crash)
    code, _, err = cli(capsys, "ls", "--store", store)
    assert code == 1 and err == "cartridges: error: 'boom' (KeyError; --debug shows the traceback)\n"


def test_store_that_is_down(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARTRIDGES_S3_ENDPOINT", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("CARTRIDGES_S3_ACCESS_KEY", "key")
    monkeypatch.setenv("CARTRIDGES_S3_SECRET_KEY", "secret")
    for argv in (["ls"], ["inspect", "lighthouse"]):
        code, _, err = cli(capsys, *argv, "--store", "s3://cartridges")
        assert code == EXIT_UNAVAILABLE and "unreachable" in err
        one_line_error(err)


def test_an_unreachable_store_is_one_line_on_stderr_without_library_logs(tmp_path: Path) -> None:
    """urllib3 logs a WARNING per retry; without --debug only the error line reaches stderr."""
    env = {
        **os.environ,
        "CARTRIDGES_S3_ENDPOINT": f"127.0.0.1:{free_port()}",
        "CARTRIDGES_S3_ACCESS_KEY": "key",
        "CARTRIDGES_S3_SECRET_KEY": "secret",
    }
    argv = [sys.executable, "-m", "cartridges.cli", "ls", "--store", "s3://cartridges"]
    quiet = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert quiet.returncode == EXIT_UNAVAILABLE
    one_line_error(quiet.stderr)
    assert "secret" not in quiet.stderr
    loud = subprocess.run([*argv, "--debug"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert "Retrying" in loud.stderr  # the logs are there for --debug


def test_import_reference_pt(
    tiny_model: LoadedModel, tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    good = reference_pt(tiny_model, tmp_path / "ref.pt")
    code, out, _ = cli(capsys, "import", "imported", str(good), "--model", "tiny", "--store", store, "--json")
    info = json.loads(out)
    assert code == 0 and info["p"] == 16 and info["frozenTokens"] == 1 and info["baseModel"] == "tiny-llama-seed0"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    code, _, err = cli(capsys, "import", "x", str(garbage), "--model", "tiny", "--store", store)
    assert code == EXIT_INPUT and "not a readable torch checkpoint" in err
    one_line_error(err)
    code, _, err = cli(capsys, "import", "x", str(tmp_path / "missing.pt"), "--store", store)
    assert code == EXIT_NOT_FOUND
    checkpoint = torch.load(good, weights_only=True)
    for frozen_values in (checkpoint["frozen_values"][:0], checkpoint["frozen_values"][:1]):  # none, or too few
        torch.save({**checkpoint, "frozen_values": frozen_values}, tmp_path / "broken.pt")
        code, _, err = cli(capsys, "import", "x", str(tmp_path / "broken.pt"), "--model", "tiny", "--store", store)
        assert code == EXIT_INPUT and "frozen_values" in err
        one_line_error(err)
    checkpoint["trainable_values"][0][0, 0, 3, 1] = float("nan")  # a diverged run
    torch.save(checkpoint, tmp_path / "nan.pt")
    code, _, err = cli(capsys, "import", "x", str(tmp_path / "nan.pt"), "--model", "tiny", "--store", store)
    assert code == EXIT_INPUT and "layer 0 values: not finite" in err
    one_line_error(err)


def test_inspect_reports_the_steps_that_training_by_epochs_came_to(
    tmp_path: Path, tiny_model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    store, fp = f"file://{tmp_path / 'store'}", tiny_model.fingerprint
    spec = {"selfStudy": {"conversations": 64}, "training": {"epochs": 3, "batchSize": 4, "learningRate": 0.02}}
    training = {"spec": spec, "steps": 48}
    publish(open_store(store), store, "default", "by-epochs", random_cartridge(fp, 4, seed=1), fp, training=training)
    code, out, _ = cli(capsys, "inspect", "by-epochs", "--store", store)
    assert code == 0 and "64 conversations, 48 steps (3 epochs), batch 4, lr 0.02" in out


def test_quantize_refuses_a_generation_with_infinite_values(
    tmp_path: Path, tiny_model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    store, fp = f"file://{tmp_path / 'store'}", tiny_model.fingerprint
    publish(open_store(store), store, "default", "blown", random_cartridge(fp, 4, seed=1, scale=math.inf), fp)
    code, _, err = cli(capsys, "quantize", "blown", "--store", store)
    assert code == EXIT_INPUT and "blown generation 1: cannot quantize" in err and "retrain" in err
    one_line_error(err)


def test_quantize_a_stored_generation_that_is_not_the_promoted_one(
    tmp_path: Path, tiny_model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    store, fp = f"file://{tmp_path / 'store'}", tiny_model.fingerprint
    for generation in (1, 2):  # 2 is promoted
        cartridge = random_cartridge(fp, 4, seed=generation)
        publish(open_store(store), store, "default", "multi", cartridge, fp, generation=generation)
    code, out, err = cli(capsys, "quantize", "multi", "--generation", "1", "--store", store, "--json")
    info = json.loads(out)
    assert code == 0 and info["generation"] == 3 and info["quantizedFrom"] == 1 and info["dtype"] == "int8"
    assert "multi: generation 3 (from 1) is promoted in place of generation 2" in err
    publish(open_store(store), store, "default", "held", random_cartridge(fp, 4, seed=1), fp)
    Path(layout.current_pointer(store, "default", "held").removeprefix("file://")).unlink()  # held back by a gate
    code, out, err = cli(capsys, "quantize", "held", "--generation", "1", "--store", store, "--json")
    assert code == 0 and json.loads(out)["generation"] == 2 and "in place of" not in err, err
    code, _, err = cli(capsys, "quantize", "multi", "--generation", "7", "--store", store)
    assert code == EXIT_NOT_FOUND and "'multi' has no generation 7; stored: 1, 2, 3" in err
    one_line_error(err)
    open_store(store).put_json(f"{layout.generation_prefix(store, 'default', 'multi', 4)}/progress.json", {})
    code, _, err = cli(capsys, "quantize", "multi", "--generation", "4", "--store", store)
    assert code == EXIT_NOT_FOUND and "g4 (still training, or its training failed) has no manifest" in err
    code, _, err = cli(capsys, "quantize", "nothing", "--generation", "1", "--store", store)
    assert code == EXIT_NOT_FOUND and "unknown cartridge 'nothing'" in err
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as raised:
            main(["quantize", "multi", "--generation", bad, "--store", store])
        assert raised.value.code == EXIT_USAGE and "a number from 1 up" in capsys.readouterr().err


def test_quantize_and_inspect_check_the_promoted_sha256(
    tmp_path: Path, tiny_model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """A generation replaced in place (consistent, but other tensors than current.json promised) is refused by
    quantize as by ask, eval and serving, and inspect says so."""
    store, fp = f"file://{tmp_path / 'store'}", tiny_model.fingerprint
    opened = open_store(store)
    publish(opened, store, "default", "swapped", random_cartridge(fp, 4, seed=1), fp)
    promoted = opened.get_json(layout.current_pointer(store, "default", "swapped"))
    publish(opened, store, "default", "swapped", random_cartridge(fp, 4, seed=2), fp)  # g1 again, other tensors
    opened.put_json(layout.current_pointer(store, "default", "swapped"), promoted)
    refused = f"does not match the promoted {promoted['sha256']}; refusing to load it"
    code, _, err = cli(capsys, "quantize", "swapped", "--store", store)
    assert code == EXIT_INPUT and "cartridge 'swapped' g1: tensors sha256" in err and refused in err, err
    one_line_error(err)
    assert layout.stored_generations(opened, store, "default", "swapped") == [1]  # nothing made of them
    code, out, _ = cli(capsys, "inspect", "swapped", "--store", store)
    assert code == 0 and "warning:        cartridge 'swapped' g1: tensors sha256" in out and refused not in out
    code, out, _ = cli(capsys, "inspect", "swapped", "--store", store, "--json")
    assert code == 0 and promoted["sha256"] in json.loads(out)["warning"]
    code, out, _ = cli(capsys, "inspect", "swapped", "--store", store, "--json", "--generation", "1")
    assert code == 0 and json.loads(out)["warning"] is None  # g1 as stored, not as promoted


def test_quantize_promotes_an_int8_generation_that_eval_reads(
    corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"file://{tmp_path / 'store'}"
    argv = ["train", "dense", str(corpus_dir), "--model", "tiny", "--store", store, "--steps", "2"]
    code, out, _ = cli(capsys, *argv, "--json")
    dense_bytes = json.loads(out)["bytes"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(x) + "\n" for x in QA))
    evaluate = ["eval", "dense", "--qa", str(qa), "--model", "tiny", "--store", store, "--json"]
    code, out, _ = cli(capsys, *evaluate)
    dense_kv = json.loads(out)["rows"][2]["kv_bytes"]
    code, out, _ = cli(capsys, "quantize", "dense", "--store", store, "--json")
    info = json.loads(out)
    assert code == 0 and info["generation"] == 2 and info["quantizedFrom"] == 1 and info["dtype"] == "int8"
    assert info["bytes"] < dense_bytes / 2  # one byte per element (plus scales) instead of four
    code, out, _ = cli(capsys, "ls", "--store", store, "--json")
    assert [(c["generation"], c["dtype"]) for c in json.loads(out)] == [(2, "int8")]
    code, out, _ = cli(capsys, *evaluate, "--generation", "1")  # the dense one, no longer promoted
    assert code == 0 and json.loads(out)["rows"][2]["kv_bytes"] == dense_kv
    for generation, dtype in ((None, "int8"), ("1", "float32")):
        which = ["--generation", generation] if generation else []
        code, out, _ = cli(capsys, "inspect", "dense", "--store", store, "--json", *which)
        shown = json.loads(out)
        assert code == 0 and (shown["generation"], shown["dtype"]) == (int(generation or 2), dtype)
        assert shown["promoted"] is (generation is None)
    code, out, _ = cli(capsys, *argv, "--quantization", "int8", "--json")  # what it holds: nothing to train
    assert code == 0 and json.loads(out)["trained"] is False
    code, _, err = cli(capsys, "quantize", "dense", "--store", store, "--format", "fp8")
    assert code == EXIT_INPUT and "already stored in int8" in err
    one_line_error(err)
    code, out, _ = cli(capsys, *evaluate)
    rows = json.loads(out)["rows"]
    assert code == 0 and len(rows) == 3 and "int8" in rows[2]["condition"]
    assert 0 < rows[2]["kv_bytes"] < dense_kv / 2  # what is stored and served, not the dequantized copy


def test_import_peft_prefix_adapter(tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = tmp_path / "adapter"
    peft_prefix_adapter(adapter, tokens=7)
    code, out, _ = cli(capsys, "import", "prefix", str(adapter), "--model", "tiny", "--store", store, "--json")
    info = json.loads(out)
    assert code == 0 and info["p"] == 7 and info["frozenTokens"] == 0
    (adapter / "adapter_model.safetensors").write_bytes(b"junk")
    code, _, err = cli(capsys, "import", "prefix", str(adapter), "--model", "tiny", "--store", store)
    assert code == EXIT_INPUT and "not a readable safetensors file" in err
    one_line_error(err)


@pytest.fixture
def serve_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where `cartridges serve` writes its logs in this test: a cache directory of the test's own, so that the user's
    logs are neither added to nor pruned; its models are the shared cache's, so none is made again."""
    models = cache_dir() / "models"
    models.mkdir(exist_ok=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv("CARTRIDGES_CACHE", str(cache))
    return cache / "logs"


@pytest.mark.triton
def test_serve_ask_and_ctrl_c(
    trained: dict[str, object],
    tiny_model: LoadedModel,
    tmp_path: Path,
    serve_logs: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, (port, grpc_port, metrics_port) = str(trained["store"]), (free_port(), free_port(), free_port())
    pt = reference_pt(tiny_model, tmp_path / "ref.pt")
    for _ in range(3):  # generation 3: not lighthouse's (1, or 2 once retrained)
        assert cli(capsys, "import", "reimported", str(pt), "--model", "tiny", "--store", store)[0] == 0
    generations = {c["name"]: c["generation"] for c in json.loads(cli(capsys, "ls", "--store", store, "--json")[1])}
    assert generations["reimported"] == 3 and generations["lighthouse"] in (1, 2)
    other = tiny_llama(seed=1).fingerprint
    publish(open_store(store), store, "default", "other-model", random_cartridge(other, 4, seed=3), other)
    url, grpc_url = f"http://127.0.0.1:{port}", f"grpc://127.0.0.1:{grpc_port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    argv = [sys.executable, "-m", "cartridges.cli", "serve", "--model", "tiny", "--store", store, "--port", str(port)]
    argv += ["--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = lines_until(server, "cartridges ask")  # the last line it prints once ready
        assert f"serving on {url}" in "".join(lines), "".join(lines)
        assert f"  gRPC {grpc_url}, metrics {metrics_url}\n" in lines, "".join(lines)
        code, out, err = cli(capsys, "ask", "Hi", "-c", "lighthouse", "--url", grpc_url, "--max-tokens", "4")
        assert code == 0 and err == f"answered by: lighthouse generation {generations['lighthouse']}\n"
        with urllib.request.urlopen(metrics_url, timeout=10) as metrics:
            assert "cartridges_requests_finished" in metrics.read().decode()
        code, out, err = cli(
            capsys, "ask", "Who lit the lighthouse?", "-c", "lighthouse", "--url", url, "--max-tokens", "4"
        )
        assert code == 0 and out.endswith("\n")
        assert err == f"answered by: lighthouse generation {generations['lighthouse']}\n"  # stdout: the answer alone
        code, out, _ = cli(capsys, "ask", "Hi", "-c", "reimported", "-c", "lighthouse", "--url", url, "--json")
        assert code == 0 and json.loads(out)["cartridges"] == ["reimported", "lighthouse"]
        assert json.loads(out)["generations"] == [3, generations["lighthouse"]]
        code, out, err = cli(capsys, "ask", "Hi", "--url", url, "--repetition-penalty", "1.2", "--max-tokens", "4")
        assert code == 0 and err == "", err  # the router's config declares the input; no cartridge answered
        code, _, err = cli(capsys, "ask", "Hi", "-c", "nope", "--url", url)
        assert code == EXIT_NOT_FOUND and "not found" in err
        one_line_error(err)
        code, _, err = cli(capsys, "ask", "Hi", "-c", "other-model", "--url", url)
        assert code == EXIT_INPUT and "was trained for" in err
        assert err.rstrip().endswith("; for `cartridges serve`: pass --model PATH: the tiny-llama-seed1 model it was "
                                     "trained for (an HF directory or .gguf)")  # fmt: skip
        one_line_error(err)
        code, _, err = cli(capsys, "ask", "Hi", "--url", url, "--max-tokens", "100000")
        assert code == EXIT_USAGE and "data:" not in err
        one_line_error(err)
        code, _, err = cli(capsys, "serve", "--model", "tiny", "--store", store, "--port", str(port))
        assert code == EXIT_UNAVAILABLE and "already in use" in err
        code, _, err = cli(capsys, "serve", "--store", store, "--port", str(free_port()), "--grpc-port", str(grpc_port))
        assert code == EXIT_UNAVAILABLE and f"port {grpc_port} is already in use; pick another with --grpc-port" in err
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(60) == 0
    code, _, err = cli(capsys, "ask", "Hi", "--url", url)
    assert code == EXIT_UNAVAILABLE and "cannot reach" in err
    assert len(list(serve_logs.glob("serve-*.log"))) == 1


@pytest.mark.triton
def test_demo_quick_with_the_tiny_model(tmp_path: Path, serve_logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    plot = tmp_path / "demo.png"
    argv = ["demo", "--quick", "--model", "tiny", "--store", f"file://{tmp_path}/store", "--plot", str(plot)]
    code, out, _ = cli(capsys, *argv)
    assert code == 0, out
    assert "ICL gain recovered by the cartridge: " in out
    assert out.count("with    the cartridge:") == 3 and out.count("without the cartridge:") == 3
    assert plot.is_file() and "done in" in out
    assert time.monotonic() - started < 600
    assert len(list(serve_logs.glob("serve-*.log"))) == 1


@pytest.mark.triton
def test_demo_stopped_by_sigterm_while_serving_leaves_nothing_running(tmp_path: Path) -> None:
    """A SIGTERM (``kill``, a CI job's timeout) stops the demo as Ctrl-C does, server included: Triton runs in a
    session of its own, which the signal never reaches, and was left running with its scratch directory."""
    plot, store = tmp_path / "demo.png", f"file://{tmp_path}/store"
    argv = [sys.executable, "-m", "cartridges.cli", "demo", "--quick", "--model", "tiny", "--store", store]
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}  # the server's scratch directory in tmp_path
    demo = subprocess.Popen([*argv, "--plot", str(plot)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert "endpoint" in lines_until(demo, "endpoint")[-1]
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == EXIT_INTERRUPTED
    finally:
        demo.kill()
    assert_none_left(tmp_path)
    assert list(tmp_path.glob("cartridges-serve-*")) == []


def test_eval_prompts_with_the_description_the_cartridge_was_trained_with(
    store: str, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A retrain with a new --description keeps the stored corpus (same text, same digest), whose manifest has
    the first description; evaluation must prompt with the one the trainer used."""
    argv = ["train", "described", str(corpus_dir), "--model", "tiny", "--store", store, "--steps", "2", "--json"]
    assert cli(capsys, *argv, "--description", "the first words")[0] == 0
    assert cli(capsys, *argv, "--description", "the second words", "--force")[0] == 0
    opened = open_store(store)
    stored = find(opened, store, "default", "described")
    assert stored.pointer.generation == 2
    description, _ = corpus_of(opened, store, "default", stored)
    assert description == "the second words"


def test_serve_refuses_a_missing_or_unloadable_model_before_starting_triton(
    tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tritonserver, "start_triton", lambda *_, **__: pytest.fail("Triton was started to find out"))
    missing = ["file:///nowhere/nothing.gguf", "file:///nowhere/nothing", str(tmp_path / "nothing.gguf")]
    for model in missing:
        code, _, err = cli(capsys, "serve", "--model", model, "--store", store, "--port", str(free_port()))
        assert code == EXIT_NOT_FOUND, err
        one_line_error(err)
    (tmp_path / "bad.gguf").write_text("not a gguf")
    (tmp_path / "empty-dir").mkdir()
    for unloadable, reason in ((tmp_path / "bad.gguf", "not a GGUF file"), (tmp_path / "empty-dir", "config.json")):
        code, _, err = cli(capsys, "serve", "--model", str(unloadable), "--store", store, "--port", str(free_port()))
        assert code == EXIT_INPUT and reason in err
        one_line_error(err)


def test_serve_keeps_the_newest_logs_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARTRIDGES_CACHE", str(tmp_path))
    logs = tmp_path / "logs"
    logs.mkdir()
    names = [f"serve-202612{day:02d}-120000-1.log" for day in range(1, KEPT_SERVE_LOGS + 6)]
    for name in reversed(names):  # creation order must not matter, the start time in the name does
        (logs / name).write_text("old run")
    (logs / "notes.txt").write_text("not a serve log")
    new = serve_log_path()
    kept = sorted(log.name for log in logs.glob("serve-*.log"))
    assert kept == names[-(KEPT_SERVE_LOGS - 1) :] and new.parent == logs and not new.exists()
    assert (logs / "notes.txt").exists()


def test_serve_port_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for option in ("--port", "--grpc-port", "--metrics-port"):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", option, "70000"])
        assert exit_info.value.code == EXIT_USAGE


def test_serve_grpc_and_metrics_ports_follow_the_http_port_as_tritons_do() -> None:
    assert serve_ports(8000, None, None) == Ports(8000, 8001, 8002)
    assert serve_ports(9000, 7001, None) == Ports(9000, 7001, 9002)
    with pytest.raises(CLIError, match="--port 65535 leaves no port for --grpc-port") as raised:
        serve_ports(65535, None, None)
    assert raised.value.code == EXIT_USAGE
    clashes = {
        (18002, None): "--grpc-port 18002 is --port + 2, the default --metrics-port; give --metrics-port too",
        (None, 18001): "--metrics-port 18001 is --port + 1, the default --grpc-port; give --grpc-port too",
    }
    for (grpc, metrics), message in clashes.items():  # the default is named, not blamed on an option never given
        with pytest.raises(CLIError) as raised:
            serve_ports(18000, grpc, metrics)
        assert (str(raised.value), raised.value.code) == (message, EXIT_USAGE)


def test_serve_refuses_a_grpc_or_metrics_port_in_use_or_given_twice_before_starting_triton(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy, port = str(taken.getsockname()[1]), str(free_port())
        for option in ("--grpc-port", "--metrics-port"):
            code, _, err = cli(capsys, "serve", "--model", "tiny", "--store", store, "--port", port, option, busy)
            assert code == EXIT_UNAVAILABLE and f"port {busy} is already in use; pick another with {option}" in err
            one_line_error(err)
    code, _, err = cli(capsys, "serve", "--store", store, "--port", port, "--metrics-port", port)
    assert code == EXIT_USAGE and f"--metrics-port {port} is the same as --port" in err
    one_line_error(err)


@pytest.mark.triton
def test_serve_startup_failure_is_one_line_naming_a_log_that_exists(
    tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that passes the quick checks but fails in the router: the first error Triton logged, on one line,
    and the log it names is still there."""
    monkeypatch.setenv("CARTRIDGES_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "models" / "bad.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF" + b"\x00" * 64)  # the right magic, nothing after it
    code, _, err = cli(capsys, "serve", "--model", f"file://{bad}", "--store", store, "--port", str(free_port()))
    assert code == 1
    one_line_error(err)
    assert "failed to load 'router'" in err and "bad.gguf" in err and "At:" not in err and "+---" not in err
    log = Path(err.split("(log: ")[1].split(")")[0])
    assert log.is_relative_to(tmp_path / "cache" / "logs") and "failed to load" in log.read_text()


def test_namespace_must_be_a_kubernetes_namespace_name(
    tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "deep" / "store"
    for namespace in ("../../escaped", "", "Team A", ".", "a/b", "x" * 64, "escaped\n"):
        argv = ["train", "esc", str(corpus_dir), "--model", "tiny", "--store", f"file://{store}", "--steps", "1"]
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--namespace", namespace])
        assert exit_info.value.code == EXIT_USAGE, namespace
        assert "invalid namespace" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*esc*"))  # nothing written, inside the store or beside it


@pytest.mark.parametrize("segment", ["", ".", "..", "a/b"])
def test_layout_refuses_names_that_are_not_one_path_segment(segment: str) -> None:
    with pytest.raises(layout.UnsafePathSegment):
        layout.current_pointer("file:///store", segment, "handbook")
    with pytest.raises(layout.UnsafePathSegment):
        layout.generation_prefix("file:///store", "default", segment, 1)
    with pytest.raises(layout.UnsafePathSegment):
        layout.corpus_prefix("file:///store", "default", "handbook", segment)


def test_the_cli_takes_every_cartridge_name_the_cluster_and_the_router_take(
    tmp_path: Path, tiny_model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dotted and long names are Kubernetes object names: ls lists them, so inspect (and the rest) must take them."""
    from cartridges_serving import cache
    from cartridges_serving.errors import CartridgeRefused

    store = f"file://{tmp_path / 'store'}"
    fp = tiny_model.fingerprint
    names = ["handbook.v2", "a" * 100, "b" * 253]
    for seed, name in enumerate(names):
        publish(open_store(store), store, "default", name, random_cartridge(fp, 4, seed=seed), fp)
    code, out, _ = cli(capsys, "ls", "--store", store, "--json")
    assert code == 0 and sorted(c["name"] for c in json.loads(out)) == sorted(names)
    for name in names:
        code, out, err = cli(capsys, "inspect", name, "--store", store, "--json")
        assert code == 0, err
        cache.check_cartridge_id(name, "default")  # the router takes it too
    for name in ("b" * 254, "handbook..v2", ".v2", "Handbook", "handbook\n"):  # "$" matches before a last "\n"
        code, _, err = cli(capsys, "inspect", name, "--store", store)
        assert code == EXIT_USAGE and "invalid cartridge name" in err
        one_line_error(err)
        with pytest.raises(CartridgeRefused):
            cache.check_cartridge_id(name, "default")


def test_eval_checks_plot_before_evaluating_and_prints_results_before_plotting(
    trained: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cartridges.cli import evaluate

    store = str(trained["store"])
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(x) + "\n" for x in QA))
    argv = ["eval", "lighthouse", "--qa", str(qa), "--model", "tiny", "--store", store]
    monkeypatch.setattr(evaluate, "load_model", lambda *_: pytest.fail("loaded the model before checking --plot"))
    for target, reason in ((tmp_path / "out.xyz", "cannot plot to '.xyz'"), ("/proc/nope/out.png", "cannot write")):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--plot", str(target)])
        assert exit_info.value.code == EXIT_USAGE
        assert reason in capsys.readouterr().err
    monkeypatch.undo()
    code, out, _ = cli(capsys, *argv, "--plot", str(tmp_path / "out"))
    assert code == 0 and out.strip().endswith(f"plot: {tmp_path / 'out.png'}")
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")

    def disk_full(*args: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "plot", disk_full)
    code, out, err = cli(capsys, *argv, "--plot", str(tmp_path / "full.svg"))
    assert code == 1 and "No space left" in err and "cartridge (p=64)" in out  # the table was printed first


@pytest.mark.parametrize(
    "argv",
    [
        ["ask", ""],
        ["ask", "Hi", "--max-tokens", "-1"],
        ["ask", "Hi", "--max-tokens", "4294967300"],  # the router's 32-bit input would wrap it to 4
        ["ask", "Hi", "--temperature", "-1"],
        ["ask", "Hi", "--temperature", "nan"],
        ["ask", "Hi", "--url", "127.0.0.1:18555"],
        ["ask", "Hi", "--repetition-penalty", "0"],
        ["ask", "Hi", "--repetition-penalty", "inf"],
        ["demo", "--max-tokens", "-1"],  # not only after training, evaluating and starting a server
    ],
)
def test_ask_and_demo_refuse_bad_values_before_sending_them(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == EXIT_USAGE


def test_ask_without_a_server_says_how_to_start_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "ask", "Hi", "-c", "handbook", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == EXIT_UNAVAILABLE and "cannot reach" in err and "`cartridges serve`" in err
    one_line_error(err)


@pytest.mark.parametrize(
    ("text", "status", "code"),
    [  # the router's errors, marked with their kind, as Triton sends them: HTTP 400, or in-band on gRPC
        ("[not_found] cartridge 'missing' not found in namespace 'team-a' (no promoted generation)", 400, 3),
        ("[not_found] cartridge 'x' g1: no such object: s3://b/cartridges/team-a/x/g1/manifest.json", None, 3),
        ("[unusable_cartridge] cartridge 'x' g1: cartridge was trained for smollm2, not the loaded tiny", 400, 65),
        ("[unusable_cartridge] cartridge 'corrupt' g1: tensors sha256 abc does not match the manifest", None, 65),
        ("[invalid_argument] the prompt and max_tokens need 100010 positions; the context window is 4096", None, 2),
        ("[unavailable] the engine is shutting down", 400, EXIT_UNAVAILABLE),
        ("[internal] inference failed: RuntimeError: boom", 400, 1),
        # without a kind (an older server, Triton's own refusals): the status decides
        ("cartridge 'missing' not found in namespace 'team-a' (no promoted generation)", 404, EXIT_NOT_FOUND),
        ("cartridge 'x' g1: cartridge was trained for smollm2, not the loaded tiny", 400, EXIT_USAGE),
        ("Unable to parse 'data'", 500, 1),
        ("the engine is shutting down", 503, EXIT_UNAVAILABLE),
        ("input 'max_tokens' has type FP32, expected INT32", None, EXIT_USAGE),
    ],
)
def test_ask_exit_codes_follow_the_routers_error_kinds(text: str, status: int | None, code: int) -> None:
    from cartridges.cli.ask import exit_code
    from cartridges.client import GenerateError

    assert exit_code(GenerateError(text, status)) == code


def _mismatch(trained_for: LoadedModel, model_id: str | None = None) -> str:
    """A model mismatch as the router sends it: its kind, then the text of the engine's error."""
    from cartridges.manifest import ModelMismatch

    fingerprint = trained_for.fingerprint
    if model_id is not None:
        fingerprint = fingerprint.model_copy(update={"model_id": model_id})
    mismatch = ModelMismatch("cartridge 'x' g1", fingerprint, tiny_llama(seed=1).fingerprint)
    return f"[unusable_cartridge] {mismatch}"


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        (_mismatch(tiny_llama(seed=0)), "; for `cartridges serve`: pass --model tiny"),
        (_mismatch(tiny_llama(seed=2), "tiny-llama-seed1"), "; for `cartridges serve`: the loaded tiny-llama-seed1"),
        ("[unusable_cartridge] cartridge 'x' g1: tensors sha256 abc does not match the manifest", None),
    ],
)
def test_ask_names_the_model_a_server_needs_for_a_cartridge_of_another_model(
    text: str, hint: str | None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the mismatch's text reaches the client; ask reads the models from it and names the --model to restart
    `cartridges serve` with (and none for a cartridge unusable for another reason)."""
    from cartridges import client

    def refuse(*_: object, **__: object) -> None:
        raise client.GenerateError(text, 400)

    monkeypatch.setattr(client, "generate", refuse)
    code, _, err = cli(capsys, "ask", "Hi", "-c", "x")
    assert code == EXIT_INPUT and "cartridge 'x' g1: " in err
    assert (hint in err and err.count("--model") == 1) if hint else "--model" not in err, err
    one_line_error(err)


def test_a_generate_error_carries_the_kind_and_the_message_without_the_marker() -> None:
    from cartridges.client import GenerateError

    err = GenerateError("[unusable_cartridge] cartridge 'x' g1: trained for smollm2", 400)
    assert (err.kind, err.message, str(err)) == (
        "unusable_cartridge", "cartridge 'x' g1: trained for smollm2", "HTTP 400: cartridge 'x' g1: trained for smollm2"
    )  # fmt: skip
    assert GenerateError("[not_found] gone", grpc_code="NOT_FOUND").kind == "not_found"
    for text in ("Unable to parse 'data'", "[unknown_kind] newer server", "cannot reach http://h:1: refused"):
        err = GenerateError(text, 400)
        assert (err.kind, err.message) == (None, text)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9", "grpc://127.0.0.1:9"])
@pytest.mark.parametrize("field", [{"max_tokens": 2**32 + 4}, {"max_tokens": -(2**31) - 1}, {"seed": 2**63}])
def test_an_integer_the_router_cannot_hold_is_refused_before_sending(url: str, field: dict[str, int]) -> None:
    """Converted to the router's tensor type it would wrap (4294967300 tokens asked as 4), so it never leaves."""
    from cartridges.client import generate

    with pytest.raises(ValueError, match=f"{next(iter(field))} .* is out of range"):
        generate(url, "hi", timeout=1, **field)  # type: ignore[call-overload]


def test_a_refused_stream_reads_as_the_servers_message() -> None:
    from cartridges.client import _error_message

    assert _error_message(b'data: {"error":"max_tokens must be >= 0, got -1"}\n\n') == "max_tokens must be >= 0, got -1"
    assert _error_message(b'{"error":"plain"}') == "plain"
    assert _error_message(b"not json") == "not json"


class BreaksOff(BaseHTTPRequestHandler):
    """A server that stops mid-reply: the answer (a refusal for the model ``refuse``) promises 100 bytes and sends
    20; the stream sends one event of a chunked body and no end."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(500 if "/refuse/" in self.path else 200)
        if self.path.endswith("_stream"):
            event = b'data: {"text_output": "Hel"}\n\n'
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        else:
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"text_output": "Hel')
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("model", "stream"), [("router", False), ("router", True), ("refuse", False)])
def test_a_reply_that_breaks_off_is_the_server_unavailable(model: str, stream: bool) -> None:
    from cartridges import client

    with http_stub(BreaksOff) as endpoint, pytest.raises(client.GenerateError, match="broke off") as error:
        "".join(client.generate(f"http://{endpoint}", "Hi", model=model, stream=stream, timeout=10))  # type: ignore[call-overload]
    assert error.value.kind == "unavailable"


def test_ask_exits_unavailable_when_the_reply_breaks_off(capsys: pytest.CaptureFixture[str]) -> None:
    with http_stub(BreaksOff) as endpoint:
        code, out, err = cli(capsys, "ask", "Hi", "--url", f"http://{endpoint}")
    assert code == EXIT_UNAVAILABLE and "broke off" in err and out.startswith("Hel")
    one_line_error(err)


def test_one_broken_cartridge_is_a_broken_row_not_a_failed_listing(
    tmp_path: Path, tiny_model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"file://{tmp_path / 'store'}"
    opened, fp = open_store(store), tiny_model.fingerprint
    for seed, name in enumerate(("good", "lost-manifest", "bad-pointer")):
        publish(opened, store, "default", name, random_cartridge(fp, 4, seed=seed), fp)
    manifest = f"{layout.generation_prefix(store, 'default', 'lost-manifest', 1)}/{layout.MANIFEST_FILE}"
    Path(manifest.removeprefix("file://")).unlink()
    pointer = layout.current_pointer(store, "default", "bad-pointer")
    opened.put_bytes(pointer, b"{not json")
    code, out, _ = cli(capsys, "ls", "--store", store, "--json")
    listed = {c["name"]: c for c in json.loads(out)}
    assert code == 0 and listed["good"]["generation"] == 1
    assert "has no manifest" in listed["lost-manifest"]["error"]
    assert pointer in listed["bad-pointer"]["error"] and "not valid JSON" in listed["bad-pointer"]["error"]
    code, out, _ = cli(capsys, "ls", "--store", store)
    assert code == 0 and out.count("BROKEN: ") == 2 and "tiny-llama-seed0" in out
    code, _, err = cli(capsys, "inspect", "bad-pointer", "--store", store)
    assert code == EXIT_INPUT and pointer in err
    one_line_error(err)


def test_a_stored_document_that_is_not_utf8_is_a_broken_cartridge(
    tmp_path: Path, tiny_model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bytes that are not UTF-8 in a manifest or current.json are damage like any other: the cartridge is BROKEN
    in ``ls`` (the others still listed) and ``inspect`` exits 65 naming the object."""
    store = f"file://{tmp_path / 'store'}"
    opened, fp = open_store(store), tiny_model.fingerprint
    for seed, name in enumerate(("good", "bad-manifest", "bad-pointer")):
        publish(opened, store, "default", name, random_cartridge(fp, 4, seed=seed), fp)
    manifest = f"{layout.generation_prefix(store, 'default', 'bad-manifest', 1)}/{layout.MANIFEST_FILE}"
    pointer = layout.current_pointer(store, "default", "bad-pointer")
    for damaged in (manifest, pointer):
        Path(damaged.removeprefix("file://")).write_bytes(b"\xaf{}")
    code, out, _ = cli(capsys, "ls", "--store", store, "--json")
    listed = {c["name"]: c for c in json.loads(out)}
    assert code == 0 and listed["good"]["generation"] == 1
    assert manifest in listed["bad-manifest"]["error"] and pointer in listed["bad-pointer"]["error"]
    for name, damaged in (("bad-manifest", manifest), ("bad-pointer", pointer)):
        code, _, err = cli(capsys, "inspect", name, "--store", store)
        assert code == EXIT_INPUT and damaged in err and "not valid JSON" in err
        one_line_error(err)
    progress = f"{layout.generation_prefix(store, 'default', 'good', 1)}/{layout.PROGRESS_FILE}"
    opened.put_bytes(progress, b"\xaf{}")
    code, out, err = cli(capsys, "inspect", "good", "--store", store, "--json")
    assert code == 0 and json.loads(out)["progress"] is None, err


def test_train_takes_a_damaged_inputs_record_as_other_inputs(
    corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unfinished generation whose inputs.json is not UTF-8 JSON is no run of these inputs: the next is trained."""
    store = f"file://{tmp_path / 'store'}"
    argv = ["train", "records", str(corpus_dir), "--model", "tiny", "--store", store, "--steps", "2", "--json"]
    assert cli(capsys, *argv)[0] == 0
    inputs = f"{layout.generation_prefix(store, 'default', 'records', 2)}/{layout.TRAINING_INPUTS_FILE}"
    open_store(store).put_bytes(inputs, b"\xaf{}")
    code, out, err = cli(capsys, *argv, "--force")
    assert code == 0 and json.loads(out)["generation"] == 3, err


def test_ls_leaves_out_folders_no_cartridge_can_be_named(
    tmp_path: Path, tiny_model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder put there by hand under a name ``inspect`` refuses is not listed as a cartridge."""
    store = f"file://{tmp_path / 'store'}"
    opened, fp = open_store(store), tiny_model.fingerprint
    for name in ("good", "Team Notes", ".hidden"):
        publish(opened, store, "default", name, random_cartridge(fp, 4, seed=0), fp)
    code, out, err = cli(capsys, "ls", "--store", store, "--json")
    assert code == 0 and [c["name"] for c in json.loads(out)] == ["good"], err


def test_scores_that_are_not_numbers_print_as_a_dash(
    tmp_path: Path, tiny_model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest edited by hand (a score of "n/a", null or true) is shown, not a crash part-way through."""
    store = f"file://{tmp_path / 'store'}"
    opened, fp = open_store(store), tiny_model.fingerprint
    metrics = {"iclGainRecovered": "n/a", "icl": None, "noContext": True, "cartridge": 1.25}
    publish(opened, store, "default", "odd", random_cartridge(fp, 4, seed=0), fp, metrics=metrics)
    code, out, err = cli(capsys, "ls", "--store", store)
    assert code == 0 and out.splitlines()[1].startswith("odd") and out.split()[-1] == "-", err
    code, out, err = cli(capsys, "inspect", "odd", "--store", store)
    assert code == 0 and "no context -, ICL -, cartridge 1.250 (ICL gain recovered -)" in out, err


@pytest.mark.minio
def test_ls_of_a_bucket_with_folders_made_in_the_console(
    s3_cli: tuple[Store, str], tiny_model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """ "Create folder" leaves a zero-byte ``cartridges/default/`` object: not a cartridge named "" that fails the
    listing, and no folder of its own makes a cartridge."""
    (store, root), fp = s3_cli, tiny_model.fingerprint
    publish(store, root, "default", "notes", random_cartridge(fp, 4, seed=1), fp)
    bucket = StoreURI.parse(root).bucket
    client = store._backend(StoreURI.parse(root)).client  # type: ignore[attr-defined]
    for folder in ("cartridges/", "cartridges/default/", "cartridges/default/drafts/"):
        client.put_object(bucket, folder, io.BytesIO(b""), 0)
    code, out, err = cli(capsys, "ls", "--store", root, "--json")
    assert code == 0 and [c["name"] for c in json.loads(out)] == ["notes"], err


def test_a_new_description_trains_again(store: str, corpus_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The description is in the self-study prompts: another one is another cartridge, not "already trained"."""
    argv = ["train", "redescribed", str(corpus_dir), "--model", "tiny", "--store", store, "--steps", "2", "--json"]
    code, out, _ = cli(capsys, *argv, "--description", "the first words")
    assert code == 0 and json.loads(out)["generation"] == 1
    code, out, _ = cli(capsys, *argv, "--description", "the first words")
    assert code == 0 and json.loads(out)["trained"] is False
    code, out, _ = cli(capsys, *argv, "--description", "the second words")
    assert code == 0 and json.loads(out)["trained"] is True and json.loads(out)["generation"] == 2


def test_progress_lines_when_stderr_is_no_terminal(
    tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under CI or ``| tee`` there is no bar: training and evaluation print a line now and then (every 15 s; here
    at every chance), so a long run is not silent."""
    from cartridges_trainer.progress import StatusLines

    monkeypatch.setattr(StatusLines, "interval_s", 0.0)
    store = f"file://{tmp_path / 'store'}"
    argv = ["train", "chatty", str(corpus_dir), "--model", "tiny", "--store", store, "--steps", "4", "--json"]
    code, out, err = cli(capsys, *argv)
    assert code == 0 and json.loads(out)["trained"] is True  # stdout stays the JSON alone
    assert "synthesizing: step 0/" in err and "training: step 4/4, loss " in err and "ETA " in err
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(x) + "\n" for x in QA))
    code, out, err = cli(capsys, "eval", "chatty", "--qa", str(qa), "--model", "tiny", "--store", store, "--json")
    assert code == 0 and json.loads(out)["rows"]
    for condition in ("eval: no context (1/3): question 1/1", "(2/3): question 1/1", "eval: cartridge (p=64) (3/3)"):
        assert condition in err
    monkeypatch.setattr(StatusLines, "interval_s", 3600.0)
    code, _, err = cli(capsys, *argv, "--force")
    assert code == 0 and err.count("training: ") == 1  # throttled: the phase's first line only


def test_an_imported_cartridge_is_evaluated_with_a_given_corpus_or_without_icl(
    tiny_model: LoadedModel, tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"file://{tmp_path / 'store'}"
    pt = reference_pt(tiny_model, tmp_path / "ref.pt")
    assert cli(capsys, "import", "imported", str(pt), "--model", "tiny", "--store", store)[0] == 0
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(x) + "\n" for x in QA))
    evaluate = ["eval", "imported", "--qa", str(qa), "--model", "tiny", "--store", store]
    code, out, err = cli(capsys, *evaluate, "--json")
    rows = json.loads(out)["rows"]
    assert code == 0 and [r["condition"].split(" (")[0] for r in rows] == ["no context", "cartridge"]
    assert "no corpus recorded" in err and "--corpus" in err
    code, out, _ = cli(capsys, *evaluate, "--corpus", str(corpus_dir), "--json")
    rows = json.loads(out)["rows"]
    assert code == 0 and len(rows) == 3 and rows[1]["condition"].startswith("ICL (") and rows[1]["kv_bytes"] > 0
    code, out, _ = cli(capsys, *evaluate, "--plot", str(tmp_path / "two.png"))
    assert code == 0 and "cartridge (p=16)" in out and "ICL" not in out
    code, out, _ = cli(capsys, "quantize", "imported", "--store", store)
    assert code == 0 and "`cartridges eval imported --qa FILE --corpus FILES`" in out


def test_same_named_files_from_different_directories_are_two_documents(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "readme.md").write_text(f"readme of {folder}\n")
    corpus = read_files([tmp_path / "a" / "readme.md", tmp_path / "b" / "readme.md"])
    assert [d.id for d in corpus.documents] == ["a/readme.md", "b/readme.md"]
    assert [d.id for d in read_files([tmp_path / "a", tmp_path / "b"]).documents] == ["a/readme.md", "b/readme.md"]
    assert [d.id for d in read_files([tmp_path / "a" / "readme.md"]).documents] == ["readme.md"]
    with pytest.raises(CLIError, match="given twice") as raised:
        read_files([tmp_path / "a", tmp_path / "a" / "readme.md"])
    assert raised.value.code == EXIT_USAGE


def test_debug_before_the_command(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(["--debug", "ls", "--store", store])
    assert args.debug is True
    assert parser().parse_args(["ls", "--debug"]).debug is True and parser().parse_args(["ls"]).debug is False
    assert cli(capsys, "--debug", "ls", "--store", store)[0] == 0


def test_debug_shows_the_traceback_and_keeps_the_exit_code(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script that adds --debug to see why still branches on the documented exit code."""
    monkeypatch.delenv("CARTRIDGES_S3_ENDPOINT", raising=False)
    code, _, err = cli(capsys, "--debug", "ls", "--store", "s3://xyz")
    assert code == EXIT_USAGE and "Traceback" in err and "set CARTRIDGES_S3_ENDPOINT" in err


def test_a_closed_pipe_on_stdout_exits_quietly(trained: dict[str, object], tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "cartridges.cli", "ls", "--store", str(trained["store"]), "--json"]
    reader = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.close()  # like `| head -0`: nobody reads what ls prints
    assert reader.wait(120) == 0
    assert reader.stderr.read() == b""


def test_a_cartridge_for_another_model_is_named_not_its_download_directory(
    trained: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cartridges.cli import evaluate

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps(QA[0]) + "\n")
    monkeypatch.setattr(evaluate, "load_model", lambda *_: tiny_llama(seed=1))
    argv = ["eval", "lighthouse", "--qa", str(qa), "--store", str(trained["store"])]
    code, _, err = cli(capsys, *argv)
    assert code == EXIT_INPUT and "cartridge 'lighthouse' g" in err and "was trained for" in err
    assert "/cartridges-" not in err  # no temporary directory
    assert err.rstrip().endswith("; pass --model tiny")  # what it was trained with (--model tiny), named
    one_line_error(err)


def test_a_cartridge_for_another_model_says_which_model_to_pass(tmp_path: Path, tiny_model: LoadedModel) -> None:
    """One of the CLI's models by its --model name, any other as a path to the model it records; the differing
    hashes stay, cut short."""
    store = f"file://{tmp_path / 'store'}"
    loaded = tiny_llama(seed=2).fingerprint
    cases = {
        "for-tiny": (tiny_model.fingerprint, "; pass --model tiny"),
        "for-other": (
            tiny_llama(seed=1).fingerprint,
            "; pass --model PATH: the tiny-llama-seed1 model it was trained for (an HF directory or .gguf)",
        ),
    }
    for name, (fp, hint) in cases.items():
        publish(open_store(store), store, "default", name, random_cartridge(fp, 4, seed=1), fp)
        with pytest.raises(CLIError) as raised:
            load(open_store(store), find(open_store(store), store, "default", name), tiny_llama(seed=2))
        message = str(raised.value)
        assert raised.value.code == EXIT_INPUT and message.endswith(hint), message
        assert f"weights_sha256: {fp.weights_sha256[:16]}... != {loaded.weights_sha256[:16]}..." in message, message


def test_a_cartridge_for_the_same_model_under_other_rope_settings_says_which_settings(
    tmp_path: Path, tiny_model: LoadedModel
) -> None:
    """Only the RoPE settings differ: the message names the setting that differs (whole dicts cut short read the
    same) and does not send the user to the model already loaded, by name or by path."""
    store = f"file://{tmp_path / 'store'}"
    loaded = tiny_model.fingerprint
    scaled = {**(loaded.rope_parameters or {}), "rope_type": "linear", "factor": 4.0}
    fp = loaded.model_copy(update={"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_parameters": scaled})
    publish(open_store(store), store, "default", "scaled", random_cartridge(fp, 4, seed=1), fp)
    with pytest.raises(CLIError) as raised:
        load(open_store(store), find(open_store(store), store, "default", "scaled"), tiny_model)
    message = str(raised.value)
    assert "rope_parameters: factor 4.0 != (absent), rope_type linear != default" in message, message
    assert "rope_scaling: {'rope_type': 'linear', 'factor': 4.0} != None" in message, message
    assert message.endswith(f"the loaded {loaded.model_id} is not the one it was trained with: pass --model PATH "
                            "to that exact model"), message  # fmt: skip


def test_importing_a_text_file_says_what_to_give(
    tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "a.md"
    text.write_text("The Acme handbook.\n")
    code, _, err = cli(capsys, "import", "x", str(text), "--model", "tiny", "--store", store)
    assert code == EXIT_INPUT and "reference implementation's .pt" in err and "weights_only" not in err
    one_line_error(err)

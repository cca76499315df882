"""The operator reading current.json, the promoted generation: when it was replaced by hand, and into
status.promoted, which says what is served whatever status.artifact (the newest verified generation) describes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cartridges import api, layout
from cartridges.contract import TrainerConfig
from cartridges.manifest import TENSORS_FILE
from cartridges.store import Store
from cartridges_operator import cartridge
from cartridges_operator.config import OperatorConfig

SHA = {1: "11" * 32, 2: "22" * 32}


def promoting_pass(root: str, status: dict[str, Any], gate: float | None = None) -> cartridge.Pass:
    model = {"name": "m", "uri": "s3://b/m"}
    spec = api.CartridgeSpec.model_validate({
        "corpusRefs": [{"name": "c"}], "baseModel": model, "serving": {"qualityGate": {"minIclGainRecovered": gate}},
    })  # fmt: skip
    body = {"kind": "Cartridge", "metadata": {"name": "c", "uid": "uid-c", "generation": 1}, "spec": spec.model_dump()}
    return cartridge.Pass(body, spec, status, "ns", "c", 1, OperatorConfig(store_root=root), Store(), lambda m: [])


def trainer_of(run: cartridge.Pass, generation: int) -> TrainerConfig:
    return TrainerConfig(
        namespace="ns",
        cartridge="c",
        generation=generation,
        store_root=run.config.store_root,
        corpus_prefixes=[f"{run.config.store_root}/corpora/ns/c/d"],
        corpus_description="",
        spec=run.spec,
        training_hash="h",
    )


def verified(generation: int, recovered: float) -> dict[str, Any]:
    """The status a pass leaves once it verified ``generation``: status.artifact and status.evaluation describe it."""
    return {"artifact": {"sha256": SHA[generation]}, "evaluation": {"iclGainRecovered": recovered}}


def promoted(root: str, generation: int) -> dict[str, Any]:
    prefix = layout.generation_prefix(root, "ns", "c", generation)
    return {"generation": generation, "uri": f"{prefix}/{TENSORS_FILE}", "sha256": SHA[generation]}


def gate_pass(run: cartridge.Pass, generation: int) -> bool:
    """What a pass does after verifying ``generation``: hold it back or promote it."""
    return cartridge._gate_and_promote(run, trainer_of(run, generation))


def ready(run: cartridge.Pass) -> dict[str, Any]:
    return next(c for c in run.status["conditions"] if c["type"] == "Ready")


def test_a_pointer_replaced_by_hand_with_no_pointer_is_written_afresh(tmp_path: Path) -> None:
    """Not JSON, or JSON that is not a pointer (copied in with another tool, so no sha256 recorded either): the next
    promotion writes it afresh instead of failing every pass without a status."""
    root, store = f"file://{tmp_path}/store", Store()
    pointer_uri = layout.current_pointer(root, "ns", "c")
    prefix = layout.generation_prefix(root, "ns", "c", 2)
    for garbage in (b"not json", b'{"generation": "two"}'):
        store.put_bytes(pointer_uri, garbage)
        run = promoting_pass(root, verified(2, 0.75))
        assert gate_pass(run, 2)
        assert store.get_json(pointer_uri) == {"generation": 2, "prefix": prefix, "sha256": SHA[2]}
        assert run.status["promoted"] == promoted(root, 2)


def test_a_promotion_names_the_generation_as_earlier_operators_read_it(tmp_path: Path) -> None:
    """The operator writes the prefix absolute, which an operator rolled back to a version that resolves no relative
    prefix still reads (it would stop serving the cartridge otherwise); a relative one, as ``cartridges train`` writes
    so that a local store can move, is read too, and promoting the generation it names again writes nothing."""
    root, store = f"file://{tmp_path}/store", Store()
    pointer_uri = layout.current_pointer(root, "ns", "c")
    absolute = layout.Pointer(generation=1, prefix=layout.generation_prefix(root, "ns", "c", 1), sha256=SHA[1])
    assert gate_pass(promoting_pass(root, verified(1, 0.75)), 1)
    assert store.get_json(pointer_uri) == absolute.model_dump()
    store.put_json(pointer_uri, layout.promoted_pointer(1, SHA[1]).model_dump())
    assert cartridge._read_pointer(promoting_pass(root, {})) == absolute
    assert gate_pass(promoting_pass(root, verified(1, 0.75)), 1)
    assert store.get_json(pointer_uri)["prefix"] == "g1"


def test_a_promotion_records_the_promoted_generation(tmp_path: Path) -> None:
    root = f"file://{tmp_path}/store"
    first = promoting_pass(root, verified(1, 0.75), gate=0.5)
    assert gate_pass(first, 1) and first.status["promoted"] == promoted(root, 1)
    second = promoting_pass(root, {**first.status, **verified(2, 0.75)}, gate=0.5)
    assert gate_pass(second, 2) and second.status["promoted"] == promoted(root, 2)


def test_a_held_back_generation_leaves_the_one_before_promoted_and_says_so(tmp_path: Path) -> None:
    """Generation 2 is held back: status.artifact describes it, status.promoted and the message generation 1, which
    is served. Read from current.json, so a status without status.promoted (written before it existed, or by a pass
    whose write was lost) says it as well."""
    root = f"file://{tmp_path}/store"
    assert gate_pass(promoting_pass(root, verified(1, 0.75), gate=0.5), 1)
    for before in ({}, {"promoted": promoted(root, 1)}):
        run = promoting_pass(root, {**before, **verified(2, 0.25)}, gate=0.5)
        assert not gate_pass(run, 2)
        assert run.status["promoted"] == promoted(root, 1) and run.status["artifact"]["sha256"] == SHA[2]
        assert ready(run)["reason"] == "QualityGateFailed"
        assert ready(run)["message"] == (
            "ICL gain recovered 0.25 is below the quality gate 0.5: generation 2 is not promoted; generation 1 "
            "stays promoted"
        )


def test_a_first_generation_held_back_leaves_none_promoted(tmp_path: Path) -> None:
    root = f"file://{tmp_path}/store"
    run = promoting_pass(root, verified(1, 0.25), gate=0.5)
    assert not gate_pass(run, 1)
    assert run.status["promoted"] is None
    assert not Store().exists(layout.current_pointer(root, "ns", "c"))
    assert ready(run)["message"] == (
        "ICL gain recovered 0.25 is below the quality gate 0.5: generation 1 is not promoted, and no generation is "
        "promoted yet"
    )


def test_a_gate_raised_after_a_promotion_says_the_generation_stays_promoted(tmp_path: Path) -> None:
    """The gate holds back no pointer write that already happened: the message says the generation is served."""
    root = f"file://{tmp_path}/store"
    assert gate_pass(promoting_pass(root, verified(1, 0.75), gate=0.5), 1)
    run = promoting_pass(root, verified(1, 0.75), gate=0.9)
    assert not gate_pass(run, 1)
    assert run.status["promoted"] == promoted(root, 1)
    assert ready(run)["message"] == (
        "ICL gain recovered 0.75 is below the quality gate 0.9: generation 1 stays promoted (it was promoted before "
        "the gate held it back)"
    )

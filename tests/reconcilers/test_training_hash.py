"""The training hash decides when a Cartridge trains a new generation: an upgrade must not change it by accident."""

from __future__ import annotations

from cartridges import api
from cartridges_operator.cartridge import _training_hash

SPEC = {
    "corpusRefs": [{"name": "handbook"}],
    "baseModel": {"name": "smollm2", "uri": "s3://cartridges/models/smollm2"},
    "size": 256,
    "selfStudy": {"conversations": 512},
    "training": {"steps": 120},
}
CORPORA = [("handbook", "ab" * 32, "the handbook")]


def test_hash_of_a_spec_is_what_it_was_before_quantization_and_keep_generations_existed() -> None:
    """Pinned from the operator of commit 52d2f3b: fields added since, at their defaults, retrain nothing."""
    assert _training_hash(api.CartridgeSpec.model_validate(SPEC), CORPORA) == "8074a38ea8a100f5"
    kept = api.CartridgeSpec.model_validate({**SPEC, "keepGenerations": 2, "retention": "Delete"})
    assert _training_hash(kept, CORPORA) == "8074a38ea8a100f5"
    unset = api.CartridgeSpec.model_validate({**SPEC, "training": {"steps": 120, "epochs": None, "maxGradNorm": None}})
    assert _training_hash(unset, CORPORA) == "8074a38ea8a100f5"


def test_hash_of_a_spec_with_the_default_steps_is_what_it_was_before_epochs_existed() -> None:
    """Pinned from the operator of commit 8a02531: steps lost its own default (it excludes epochs), and an unset
    steps still trains (and hashes) the 1000 steps it did."""
    default = {k: v for k, v in SPEC.items() if k != "training"}
    assert _training_hash(api.CartridgeSpec.model_validate(default), CORPORA) == "c0cb62d32d3faf41"
    assert _training_hash(api.CartridgeSpec.model_validate({**default, "training": {}}), CORPORA) == "c0cb62d32d3faf41"


def test_a_training_input_changes_the_hash() -> None:
    base = _training_hash(api.CartridgeSpec.model_validate(SPEC), CORPORA)
    changes = (
        {"quantization": "int8"},
        {"size": 512},
        {"training": {"steps": 121}},
        {"training": {"epochs": 2}},
        {"training": {"steps": 120, "maxGradNorm": 1.0}},
    )
    for change in changes:
        assert _training_hash(api.CartridgeSpec.model_validate({**SPEC, **change}), CORPORA) != base
    assert _training_hash(api.CartridgeSpec.model_validate(SPEC), [("handbook", "cd" * 32, "")]) != base

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


def test_a_training_input_changes_the_hash() -> None:
    base = _training_hash(api.CartridgeSpec.model_validate(SPEC), CORPORA)
    for change in ({"quantization": "int8"}, {"size": 512}, {"training": {"steps": 121}}):
        assert _training_hash(api.CartridgeSpec.model_validate({**SPEC, **change}), CORPORA) != base
    assert _training_hash(api.CartridgeSpec.model_validate(SPEC), [("handbook", "cd" * 32, "")]) != base

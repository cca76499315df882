"""The operator reading current.json, the promoted generation, when it was replaced by hand."""

from __future__ import annotations

from pathlib import Path

from cartridges import api, layout
from cartridges.contract import TrainerConfig
from cartridges.store import Store
from cartridges_operator import cartridge
from cartridges_operator.config import OperatorConfig


def promoting_pass(root: str, status: dict[str, object]) -> cartridge.Pass:
    model = {"name": "m", "uri": "s3://b/m"}
    spec = api.CartridgeSpec.model_validate({"corpusRefs": [{"name": "c"}], "baseModel": model})
    body = {"kind": "Cartridge", "metadata": {"name": "c", "uid": "uid-c", "generation": 1}, "spec": spec.model_dump()}
    return cartridge.Pass(body, spec, status, "ns", "c", 1, OperatorConfig(store_root=root), Store(), lambda m: [])


def test_a_pointer_replaced_by_hand_with_no_pointer_is_written_afresh(tmp_path: Path) -> None:
    """Not JSON, or JSON that is not a pointer (copied in with another tool, so no sha256 recorded either): the next
    promotion writes it afresh instead of failing every pass without a status."""
    root, store = f"file://{tmp_path}/store", Store()
    pointer_uri = layout.current_pointer(root, "ns", "c")
    prefix = layout.generation_prefix(root, "ns", "c", 2)
    trainer = TrainerConfig(
        namespace="ns",
        cartridge="c",
        generation=2,
        store_root=root,
        corpus_prefixes=[f"{root}/corpora/ns/c/d"],
        corpus_description="",
        spec=promoting_pass(root, {}).spec,
        training_hash="h",
    )
    for garbage in (b"not json", b'{"generation": "two"}'):
        store.put_bytes(pointer_uri, garbage)
        cartridge._promote(promoting_pass(root, {"artifact": {"sha256": "ab" * 32}}), trainer)
        assert store.get_json(pointer_uri) == {"generation": 2, "prefix": prefix, "sha256": "ab" * 32}

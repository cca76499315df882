"""The quick start's examples train on the model they name: each example Cartridge's size fits its corpus as the
operator stores it and the trainer tokenizes it (the e2e test swaps in the tiny model and a smaller size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cartridges import api, layout
from cartridges.corpus import SourceError, publish
from cartridges.models import LoadedModel
from cartridges.store import Store
from cartridges_operator.corpus_sources import ConfigMapReader, read_sources
from cartridges_operator.source_access import SourceAccess
from cartridges_trainer.corpus import load_corpus

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMESPACE = "default"


def example_documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((EXAMPLES / name).read_text()) if doc]


def configmap_reader(documents: list[dict[str, Any]]) -> ConfigMapReader:
    """Reads the example's ConfigMaps as the operator reads them from the API server."""
    data = {doc["metadata"]["name"]: doc["data"] for doc in documents if doc["kind"] == "ConfigMap"}

    def read(name: str, key: str) -> str:
        if key not in data.get(name, {}):
            raise SourceError(f"configMap {name} has no key {key}")
        return str(data[name][key])

    return read


def stored_corpora(root: str) -> dict[str, str]:
    """The example Corpora stored as the operator stores them: name -> prefix."""
    documents = example_documents("corpus.yaml")
    read = configmap_reader(documents)
    prefixes: dict[str, str] = {}
    for doc in (d for d in documents if d["kind"] == "Corpus"):
        spec = api.CorpusSpec.model_validate(doc["spec"])
        corpus = read_sources(spec, Store(), read, SourceAccess(root, NAMESPACE))
        prefix = layout.corpus_prefix(root, NAMESPACE, doc["metadata"]["name"], corpus.digest)
        publish(corpus, spec.description, Store(), prefix)
        prefixes[doc["metadata"]["name"]] = prefix
    return prefixes


@pytest.mark.parametrize("cartridge", example_documents("cartridge.yaml"), ids=lambda c: c["metadata"]["name"])
def test_example_cartridge_size_fits_its_corpus_in_smollm2_tokens(
    cartridge: dict[str, Any], smollm2: LoadedModel, file_store_root: str
) -> None:
    """The trainer refuses a size larger than the corpus (exit 65, TrainingFailed): the quick start would fail."""
    spec = api.CartridgeSpec.model_validate(cartridge["spec"])
    assert "smollm2" in spec.baseModel.uri.lower()  # the model whose tokenizer counts below
    corpora = stored_corpora(file_store_root)
    prefixes = [corpora[ref.name] for ref in spec.corpusRefs]
    tokens = len(load_corpus(Store(), prefixes, "", smollm2.tokenizer).tokens)
    assert spec.size <= tokens, f"{cartridge['metadata']['name']}: size {spec.size} > {tokens} SmolLM2 tokens"

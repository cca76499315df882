"""Generate the CustomResourceDefinitions from the typed API models (``python -m cartridges.crd``).

Pydantic's JSON Schema is turned into a Kubernetes *structural* schema: references inlined, ``title`` dropped,
optional ``X | None`` collapsed to ``X``, nested objects given their full defaults, and CEL rules kept as
``x-kubernetes-validations``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from cartridges import api

CRD_DIR = Path(__file__).resolve().parent.parent / "crds"
# Identical copies that the chart's templates/crds.yaml reads as plain files: Helm's own crds/ is never upgraded.
CHART_CRD_DIR = CRD_DIR.parent / "charts" / "cartridges" / "files" / "crds"


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_names: list[str]
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: list[dict[str, str]] = field(default_factory=list)


def _ready_columns(*extra: dict[str, str]) -> list[dict[str, str]]:
    ready = '.status.conditions[?(@.type=="Ready")]'
    return [
        {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status"},
        {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason"},
        *extra,
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


KINDS = [
    Kind(
        "Corpus",
        "corpora",
        ["corp"],
        api.CorpusSpec,
        api.CorpusStatus,
        _ready_columns(
            {"name": "Tokens", "type": "integer", "jsonPath": ".status.tokens"},
            {"name": "Digest", "type": "string", "jsonPath": ".status.digest", "priority": "1"},
        ),
    ),
    Kind(
        "Cartridge",
        "cartridges",
        ["cart"],
        api.CartridgeSpec,
        api.CartridgeStatus,
        _ready_columns(
            {"name": "Phase", "type": "string", "jsonPath": ".status.progress.phase"},
            {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
            {"name": "Total", "type": "integer", "jsonPath": ".status.progress.total", "priority": "1"},
            {"name": "Generation", "type": "integer", "jsonPath": ".status.generation"},
            {"name": "Promoted", "type": "integer", "jsonPath": ".status.promoted.generation"},
        ),
    ),
]


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one pydantic JSON-schema node into a structural OpenAPI v3 node."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, defs)
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express union {schema['anyOf']} in a structural schema")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return structural({**options[0], **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("title", "$defs", "additionalProperties") or (key == "default" and value is None):
            continue
        if key == "properties":
            out["properties"] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out["items"] = structural(value, defs)
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):  # JSON Schema number → OpenAPI 3.0 boolean form
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = structural(extra, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def add_object_defaults(model: type[BaseModel], schema: dict[str, Any]) -> None:
    """Give optional nested objects their full default (pydantic leaves ``default_factory`` out of the schema),
    so ``kubectl get -o yaml`` shows every setting the trainer will use."""
    for name, field_info in model.model_fields.items():
        sub = schema.get("properties", {}).get(name)
        annotation = field_info.annotation
        if sub is None or not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            continue
        if field_info.default_factory is not None:
            sub["default"] = field_info.default_factory().model_dump(mode="json", exclude_none=True)  # type: ignore[call-arg]
        add_object_defaults(annotation, sub)


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(mode="validation")
    schema = structural(raw, raw.get("$defs", {}))
    add_object_defaults(model, schema)
    return schema


def crd(kind: Kind) -> dict[str, Any]:
    status = schema_of(kind.status)
    spec = schema_of(kind.spec)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.plural}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": kind.short_names,
                "categories": ["cartridges", "all"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [_column(c) for c in kind.columns],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def _column(column: dict[str, str]) -> dict[str, Any]:
    return {k: int(v) if k == "priority" else v for k, v in column.items()}


def render(kind: Kind) -> str:
    header = "# Generated by `python -m cartridges.crd` from cartridges/api.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(crd(kind), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) the CRDs generated from cartridges/api.py.")
    parser.add_argument(
        "--out", type=Path, action="append", help="directory (repeatable); default crds/ and the chart's"
    )
    parser.add_argument("--check", action="store_true", help="fail if the files on disk differ (drift)")
    args = parser.parse_args(argv)
    stale = []
    for kind in KINDS:
        text = render(kind)
        for out in args.out or [CRD_DIR, CHART_CRD_DIR]:
            path = out / f"{api.GROUP}_{kind.plural}.yaml"
            if args.check:
                if not path.exists() or path.read_text(encoding="utf-8") != text:
                    stale.append(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    if stale:
        print(f"CRDs out of date: {', '.join(map(str, stale))}; run `python -m cartridges.crd`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m cartridges_operator``: run the operator (all namespaces, liveness endpoint on :8080/healthz)."""

from __future__ import annotations

import argparse

import kopf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--namespace", action="append", help="watch only these namespaces (repeatable)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz")
    args = parser.parse_args()
    from cartridges_operator import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace or [],
        liveness_endpoint=args.liveness,
        standalone=True,
    )


if __name__ == "__main__":
    main()

"""``python -m cartridges_operator``: the operator's container entry point.

Watches all namespaces unless ``--namespace`` is given; liveness on ``/healthz``; Prometheus metrics on
``--metrics-port``; ``--log-format json`` for structured logs (kopf never logs Secret contents, and neither do we).
"""

from __future__ import annotations

import argparse

import kopf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", action="append", help="watch only these namespaces (repeatable)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    parser.add_argument("--metrics-port", type=int, default=8081, help="Prometheus metrics port (0: off)")
    parser.add_argument("--log-format", choices=["plain", "json"], default="plain")
    args = parser.parse_args()
    from cartridges_operator import handlers, metrics  # noqa: F401  (importing registers the handlers)

    kopf.configure(log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN)
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace or [],
        liveness_endpoint=args.liveness,
        standalone=True,
    )


if __name__ == "__main__":
    main()

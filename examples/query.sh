#!/usr/bin/env bash
# Ask one question with two cartridges composed (handbook, then release-notes) through Triton's generate endpoint.
# Usage: examples/query.sh [namespace] ["question"]
# Run it from a namespace labelled as a client (see NOTES.txt), or port-forward first and set ENDPOINT:
#   kubectl -n "$NS" port-forward svc/triton-smollm2-135m 8000:8000 & ENDPOINT=http://127.0.0.1:8000 examples/query.sh
set -euo pipefail
NS=${1:-default}
QUESTION=${2:-"When does the on-call rotation hand over, and what page size does the export API accept?"}
# The Cartridge status carries the serving URL; both cartridges share it because they share the base model.
ENDPOINT=${ENDPOINT:-$(kubectl -n "$NS" get cartridge handbook -o jsonpath='{.status.endpoint.url}')}
MODEL=$(kubectl -n "$NS" get cartridge handbook -o jsonpath='{.status.endpoint.model}' 2>/dev/null || true)
MODEL=${MODEL:-router}
BODY=$(jq -n --arg q "$QUESTION" \
  '{text_input: $q, max_tokens: 96, temperature: 0.0, cartridges: ["handbook", "release-notes"]}')
curl --fail-with-body -sS -X POST "$ENDPOINT/v2/models/$MODEL/generate" -H 'Content-Type: application/json' \
  -d "$BODY" | jq -r .text_output

"""Write kubernetes-1.37-strict.json: the Kubernetes object schemas that deploy/k8s uses, from
the kubernetes-validate package's copy of the API's OpenAPI schemas, cut to what they refer to.

    pip download kubernetes-validate==1.37.0 --no-deps -d /tmp/kv
    unzip -q /tmp/kv/*.whl -d /tmp/kv
    python tests/data/schemas/make_kubernetes_schema.py \
        /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.37.0-local-strict/_definitions.json

The "strict" variant refuses unknown fields (a misspelt key fails). Descriptions are dropped
(the file shrinks about tenfold and validation does not read them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# The kinds deploy/k8s uses; add one here (and run this again) before using a new kind.
ROOTS = (
    "io.k8s.api.apps.v1.Deployment",
    "io.k8s.api.batch.v1.CronJob",
    "io.k8s.api.batch.v1.Job",
    "io.k8s.api.core.v1.ConfigMap",
    "io.k8s.api.core.v1.Secret",
    "io.k8s.api.core.v1.Service",
)
REF_PREFIX = "#/$defs/"
OUT = Path(__file__).with_name("kubernetes-1.37-strict.json")


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _without_descriptions(node: Any) -> Any:
    # A string under "description" is prose; a dict there is a field called "description".
    if isinstance(node, dict):
        return {
            key: _without_descriptions(value)
            for key, value in node.items()
            if not (key == "description" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [_without_descriptions(value) for value in node]
    return node


def reachable(defs: dict[str, Any], roots: tuple[str, ...]) -> dict[str, Any]:
    """The definitions named in ``roots`` and every one they refer to, in sorted order."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for ref in _refs(defs[name]):
            assert ref.startswith(REF_PREFIX), ref
            todo.append(ref.removeprefix(REF_PREFIX))
    return {name: _without_descriptions(defs[name]) for name in sorted(seen)}


def main(definitions: Path) -> None:
    source = json.loads(definitions.read_text(encoding="utf-8"))
    schema = {
        "$schema": source["$schema"],
        "$comment": "kubernetes-validate 1.37.0 (Apache-2.0), v1.37.0-local-strict/"
        "_definitions.json, cut by make_kubernetes_schema.py; see README.md",
        "$defs": reachable(source["$defs"], ROOTS),
    }
    OUT.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(schema['$defs'])} definitions)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

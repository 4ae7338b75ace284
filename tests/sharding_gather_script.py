"""Per-layer fsdp weight gathering: where XLA puts the all-gathers of the layer weights, and the
per-device bytes of the update, on an 8-device CPU mesh.

Usage: sharding_gather_script.py CASES_JSON (cases as in sharding_planner_script.py; XLA_FLAGS
must give 8 CPU devices). Prints one JSON line per case: the memory analysis, ``stacked_gathers``
(all-gathers whose result has the stacked [L, ...] shape of a layer weight, i.e. every layer
gathered at once) and ``layer_gathers`` (all-gathers of one layer's weight).
"""

from __future__ import annotations

import json
import re
import sys

import jax

from jaxrl.models.config import ModelConfig
from jaxrl.models.sharding import param_shapes
from tests.sharding_planner_script import compile_update


def gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather in an HLO module text."""
    shapes = []
    for match in re.finditer(r"= \w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", hlo):
        shapes.append(tuple(int(d) for d in match.group(1).split(",") if d))
    return shapes


def analyse(case: dict) -> dict:
    """Memory analysis and gather counts of one compiled update."""
    compiled = compile_update(case)
    analysis = compiled.memory_analysis()
    memory = {name: int(getattr(analysis, name)) for name in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")}
    stacked = {tuple(s) for s in param_shapes(ModelConfig(**case["model"]))["blocks"].values()}
    layer = {s[1:] for s in stacked}
    shapes = gather_shapes(compiled.as_text())
    return {"memory": memory,
            "stacked_gathers": sum(s in stacked for s in shapes),
            "layer_gathers": sum(s in layer for s in shapes)}


def main():
    assert jax.device_count() == 8, jax.device_count()
    for case in json.loads(sys.argv[1]):
        print(json.dumps({"case": case, **analyse(case)}), flush=True)


if __name__ == "__main__":
    main()

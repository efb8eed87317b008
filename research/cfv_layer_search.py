"""The CFV's injection layer, chosen on validation data (issue 20).

A basis is trained at one block: every basis FFV is added after it, and the CFV with them. To
choose that block, build a basis per candidate layer (each into its own directory; the settings
of the map are chosen inside each, on the same validation data):

    ffv basis build --model gemma-3-270m --data-dir ../shared/data --layer 4 --out /tmp/basis-L4 --no-relation none 2 4
    ffv basis build --model gemma-3-270m --data-dir ../shared/data --no-relation none 2 4     # the shipped layer
    python research/cfv_layer_search.py --model gemma-3-270m /tmp/basis-L4 /tmp/basis-L9 vectors/gemma-3-270m/basis

This reads each basis's composite.json (nothing is run) and records, per layer, the settings its
fit chose and what they scored on the validation questions (acc_d on the valid splits of the
question sets) and on the held-out relations, in research/results/cfv-layers-<model>.json
(ffv_eval.reports.results_page owns the name and renders it, block cfv_layers). The layer
chosen is the one whose chosen settings score the best mean acc_d over the sets (ties: the
layer of the model's FFVs); the page says whether the shipped basis and map are that choice (a
choice whose test cells are not run yet is shown as not shipped). No test split is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ffv_eval.files.atomic import atomic_write_text
from ffv_eval.reports.results_page import candidate_setting, find_candidate, layer_search_file
from ffv_eval.vectors.basis import function_heads
from ffv_eval.vectors.library import read_composite_metadata


def layer_record(meta: dict, directory: str) -> dict:
    """What one basis's composite.json says of the settings its fit chose."""
    choice = candidate_setting(meta["posterior_choice"])
    questions = meta.get("validation_questions")
    if not questions:
        sys.exit(f"{directory}: its map was not chosen on validation questions (build it with --data-dir holding the valid splits)")
    record = {"basis_dir": directory, "basis_relations": len(meta["basis"]), "chosen": choice,
              "questions": questions["questions"], "unpatched": questions["unpatched"],
              "acc_d": find_candidate(questions["candidates"], choice)["acc_d"],
              "candidates": len(questions["candidates"]),
              # every candidate tried at this layer, the losers included
              "tried": [{**candidate_setting(c), "acc_d": c["acc_d"]} for c in questions["candidates"]]}
    if validation := meta.get("validation"):  # the chosen settings on the relations held out of the basis (choosing half)
        choosing = validation["choosing"]
        held = find_candidate(choosing["candidates"], choice)
        record["held_out"] = {"analogies": choosing["analogies"], "unpatched": choosing["unpatched"]["accuracy"],
                              "chosen": held["accuracy"] if held else None}
    return record


def choose_layer(layers: dict[int, dict], default: int) -> int:
    """The layer whose chosen settings have the best mean validation acc_d (ties: `default`,
    then the lower layer)."""
    return max(layers, key=lambda n: (layers[n]["acc_d"]["mean"], n == default, -n))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("bases", nargs="+", help="basis directories, one per layer, each with its fitted composite.json")
    parser.add_argument("--out", help="default: research/results/cfv-layers-<model>.json")
    args = parser.parse_args(argv)
    layers: dict[int, dict] = {}
    for directory in args.bases:
        meta = read_composite_metadata(Path(directory))
        if meta["model"] != args.model:
            sys.exit(f"{directory}: a basis of {meta['model']}, not {args.model}")
        if meta["layer"] in layers:
            sys.exit(f"{directory}: a second basis at layer {meta['layer']} (first: {layers[meta['layer']]['basis_dir']})")
        layers[meta["layer"]] = layer_record(meta, directory)
    sets = {json.dumps(r["questions"], sort_keys=True) for r in layers.values()}
    if len(sets) != 1:
        sys.exit(f"the bases were chosen on different validation questions ({' vs '.join(sorted(sets))}): not comparable")
    default = function_heads(args.model).layer
    chosen = choose_layer(layers, default)
    out = Path(args.out) if args.out else layer_search_file(args.model)
    record = {"model": args.model, "split": "valid", "metric": "acc_d", "ffv_layer": default, "chosen_layer": chosen,
              "by": "the best mean acc_d over the validation question sets of each layer's chosen settings (ties: the FFVs' layer)",
              "layers": {str(n): layers[n] for n in sorted(layers)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    for n in sorted(layers):
        r = layers[n]
        print(f"layer {n}{' (chosen)' if n == chosen else ''}: acc_d {r['acc_d']['mean']:.3f} (unpatched {r['unpatched']['mean']:.3f}), "
              f"{', '.join(f'{k} {v}' for k, v in r['chosen'].items())}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much of J the concept's own tokens carry through the cross-attention keys and values, on the shipped model.

For each concept and objective: J of the intact model and J with every token-KV unit ablated (each cross-attention
head's key and value at the concept word's tokens replaced by the anchor prompt's, granularity ``tokenkv``,
:mod:`interp.core.tokens`); then the same with every token-span unit ablated (granularity ``tokenspan``: the replaced
span extended to every position after the concept, UCE's columns: the later tokens, which the causal text encoder has
let see the concept, aligned to the anchor's by the two prompts' token-count difference).

    python benchmarks/token_kv_share.py                       # concept-world, red circle striped
    python benchmarks/token_kv_share.py --model concept-world-latent --concepts red
"""

from __future__ import annotations

import argparse

import torch

import interp
from interp.core.interventions import compile_plan
from interp.core.objectives import Objective, ObjectiveConfig

SPANS = (("concept tokens", "tokenkv"), ("concept tokens and every later position", "tokenspan"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="concept-world")
    ap.add_argument("--concepts", nargs="+", default=["red", "circle", "striped"])
    ap.add_argument("--images", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = interp.load_model(args.model)
    print(f"{'span':40s} {'concept':8s} {'timesteps':15s} {'J intact':>9s} {'J ablated':>9s} {'removed':>8s}")
    for span, granularity in SPANS:
        comps = model.components(granularity)
        plan = compile_plan(model, comps)
        for concept in args.concepts:
            for ts in ((250, 600), (700, 800, 900)):
                obj = Objective(model, concept, ObjectiveConfig(n_images=args.images, timesteps=ts))
                with torch.no_grad():
                    J = obj.values(plan, torch.zeros(1, len(comps))).mean().item()
                J0 = obj.intact.mean().item()
                print(f"{span:40s} {concept:8s} {str(ts):15s} {J0:9.5f} {J:9.5f} {1 - J / J0:+8.3f}")


if __name__ == "__main__":
    main()

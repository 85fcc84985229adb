"""Ray executor vs local executor on the same sweep: the overhead of distributing the engine's work items.

    .venv/bin/python benchmarks/bench_ray.py [--n 448] [--rounds 2] [--method ablation]

Local: one process with 2 torch threads. Ray: a local cluster of 2 workers x 1 thread (each loads the model once).
Both run the same sweep (true ablation of the first ``--n`` feed-forward output neurons of the shipped concept world
at the default evaluation set, 16 UNet rows per mask), nothing cached; rounds alternate local and Ray. Prints the
wall time of each, their ratio (target <= 1.15x), and the one-off cost of starting the cluster and the workers,
which is not part of a sweep. Results are checked to be identical.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=448, help="components (first n ff.net.2 neurons)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--method", default="ablation", choices=("ablation", "coar"))
    args = p.parse_args(argv)

    import torch

    import interp
    from interp.core.components import ComponentSet
    from interp.core.executors import ObjectiveRecipe, RayExecutor
    from interp.core.objectives import Objective
    from interp.studies.compare_config import CompareConfig

    torch.set_num_threads(2)
    model = interp.load_model("concept-world", device="cpu")
    comps = model.components("neuron", family="ff", kind="ff.net.2")
    comps = ComponentSet(list(comps)[: args.n])
    obj = Objective(model, "red", CompareConfig().objective_config())
    options = {"ablation": {"chunk": 64}, "coar": {"n_masks": 2 * len(comps), "chunk": 64}}[args.method]

    t0 = time.perf_counter()
    ray_ex = RayExecutor(workers=2, cpus_per_worker=1)
    ray_ex.actors(ObjectiveRecipe.of(obj))
    ray_ex.worker_pids()  # waits until both workers have loaded the model
    startup = time.perf_counter() - t0
    # Each worker builds its objective (the evaluation set) on its first item: warm that up too, on a tiny sweep.
    interp.attribute("ablation", model, "red", ComponentSet(list(comps)[:4]), objective=obj, executor=ray_ex, chunk=2)

    times = {"local": [], "ray": []}
    results = {}
    for r in range(args.rounds):
        for name, ex in (("local", None), ("ray", ray_ex)):
            t0 = time.perf_counter()
            df = interp.attribute(args.method, model, "red", comps, objective=obj, executor=ex, **options)
            times[name].append(time.perf_counter() - t0)
            results.setdefault(name, df)
            print(f"round {r}: {name:5s} {times[name][-1]:7.1f} s", flush=True)
    ray_ex.close()
    same = bool((results["local"]["score"].to_numpy() == results["ray"]["score"].to_numpy()).all())
    best = {k: min(v) for k, v in times.items()}
    print(f"\n{args.method}, {len(comps)} components, {obj.rows_per_eval} UNet rows per evaluation")
    print(f"local executor (1 process x 2 threads): {best['local']:.1f} s (best of {args.rounds})")
    print(f"Ray executor (2 workers x 1 thread):    {best['ray']:.1f} s (best of {args.rounds})")
    print(f"Ray / local wall time: {best['ray'] / best['local']:.2f}x (target <= 1.15x)")
    print(f"one-off: local cluster start + 2 workers loading the model: {startup:.1f} s")
    print(f"identical scores: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

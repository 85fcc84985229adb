"""J's gradients through the engine: parameters and activations, checked against finite differences / autograd."""

import contextlib

import torch

from interp.core.objectives import Objective, ObjectiveConfig, gradients

PATH = "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2"


def test_activation_and_parameter_gradients(tiny_world_model_f64):
    obj = Objective(tiny_world_model_f64, "red", ObjectiveConfig(n_images=2, timesteps=(300,), dtype="float64"))
    before = obj.model.state_fingerprint()
    w = obj.model.module(PATH).weight
    g = gradients(obj, params={"w": w}, activations=[PATH, "text_encoder.encoder.layers.1"])
    assert g[PATH].shape[0] == 2 * obj.n_samples  # target and anchor branch rows
    # activation gradient vs a finite difference through a plain hook
    delta = torch.zeros_like(g[PATH])
    delta[1, 2, 3] = 1e-6
    h = obj.model.module(PATH).register_forward_hook(lambda m, a, o: o + delta)
    try:
        j1 = obj.values().mean()
    finally:
        h.remove()
    fd = (j1 - obj.values().mean()) / 1e-6
    assert torch.allclose(fd, g[PATH][1, 2, 3], rtol=1e-4)
    # parameter gradient vs plain autograd
    w.requires_grad_(True)
    try:
        gw = torch.autograd.grad(obj.values().mean(), w)[0]
    finally:
        w.requires_grad_(False)
    assert torch.allclose(gw, g["w"])
    after = obj.model.state_fingerprint()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad and p.grad is None for _, p in obj.model.parameters())


def _unet_rows_per_call(model):
    """A plain forward hook on the UNet's first layer that records the rows of every pass: ``(rows, remove)``."""
    rows = []
    handle = model.unet.conv_in.register_forward_hook(lambda mod, args, out: rows.append(out.shape[0]))
    return rows, handle.remove


@contextlib.contextmanager
def _rows_per_backward(model, monkeypatch):
    """The UNet rows run with gradients before each ``torch.autograd.grad`` call (the rows whose graph that backward
    pass holds), recorded in the yielded list."""
    held, running = [], [0]

    def count(mod, args, out):
        if torch.is_grad_enabled():
            running[0] += out.shape[0]

    real = torch.autograd.grad

    def grad(*args, **kwargs):
        held.append(running[0])
        running[0] = 0
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    handle = model.unet.conv_in.register_forward_hook(count)
    try:
        yield held
    finally:
        handle.remove()
        monkeypatch.setattr(torch.autograd, "grad", real)


def test_gradient_passes_stay_within_max_batch_and_give_the_same_gradients(tiny_world_model, tiny_world_model_f64,
                                                                             monkeypatch):
    """Gradients over an evaluation set larger than one pass are taken in sample groups of at most ``max_batch``
    UNet rows, each freed before the next (memory bounded at Stable Diffusion's size): every gradient method gives
    the same numbers, up to rounding, as one backward pass over the whole set."""
    import interp
    from interp.core.engine import multiplier_gradients
    from interp.methods.cad import weight_scores

    model = tiny_world_model
    big = ObjectiveConfig(n_images=3, timesteps=(200, 600), dtype="float64")  # 6 samples x 2 branches = 12 rows
    small = ObjectiveConfig(**{**big.to_dict(), "max_batch": 4})  # 2 samples a pass; 1 with 2 masks
    whole, split = Objective(tiny_world_model_f64, "red", big), Objective(tiny_world_model_f64, "red", small)
    comps = model.components("neuron", family="ff", kind="ff.net.2", block="mid_block")
    before = model.state_fingerprint()

    M = torch.rand(3, len(comps), generator=torch.Generator().manual_seed(0)).double()
    rows, remove = _unet_rows_per_call(split.model)  # float64: the objective's model (the shared float64 copy)
    try:
        with _rows_per_backward(split.model, monkeypatch) as held:
            got = multiplier_gradients(split, comps, M, batch=2)
    finally:
        remove()
    assert rows and max(rows) <= 4, rows  # 2 masks x 1 sample x 2 branches
    assert held and max(held) <= 4, held  # and the graph one backward pass holds
    torch.testing.assert_close(got, multiplier_gradients(whole, comps, M, batch=2), rtol=1e-9, atol=1e-12)

    w = split.model.module(PATH).weight
    rows, remove = _unet_rows_per_call(split.model)  # float64: the objective's model (the shared float64 copy)
    try:
        got = weight_scores(split, {"w": w})["w"]
        g = gradients(split, params={"w": w})["w"]
    finally:
        remove()
    assert rows and max(rows) <= 4, rows
    w_whole = whole.model.module(PATH).weight
    torch.testing.assert_close(got, weight_scores(whole, {"w": w_whole})["w"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g, gradients(whole, params={"w": w_whole})["w"], rtol=1e-9, atol=1e-12)

    # CAD: 2 groups of 3 samples (6 rows each), so each group is split in two passes at max_batch 4
    rows, remove = _unet_rows_per_call(split.model)  # float64: the objective's model (the shared float64 copy)
    try:
        cad_split = interp.attribute("cad", model, "red", comps, objective=split, n_groups=2)
    finally:
        remove()
    assert rows and max(rows) <= 4, rows
    cad_whole = interp.attribute("cad", model, "red", comps, objective=whole, n_groups=2)
    torch.testing.assert_close(torch.tensor(cad_split["score"].to_numpy()), torch.tensor(cad_whole["score"].to_numpy()),
                               rtol=1e-9, atol=1e-12)
    after = model.state_fingerprint()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_mask_rows_are_split_when_one_sample_of_each_is_more_than_max_batch(tiny_world_model,
                                                                                     tiny_world_model_f64, monkeypatch):
    """The mask-averaged gradient takes 4 masks per backward pass: with both erase branches that is 8 UNet rows for a
    single sample, more than a GPU may hold at Stable Diffusion's size. Below that, the mask rows are split as well
    (each mask's rows are independent): every pass stays within ``max_batch``, down to one mask's branches, with the
    same gradients up to rounding, and the plan's largest gradient batch is the one run."""
    from interp.core.engine import multiplier_gradients
    from interp.studies.plan import engine_batches, eval_shape

    model = tiny_world_model
    big = ObjectiveConfig(n_images=2, timesteps=(200, 600), dtype="float64")  # 4 samples x 2 branches
    whole = Objective(tiny_world_model_f64, "red", big)
    comps = model.components("neuron", family="ff", kind="ff.net.2", block="mid_block")
    M = torch.rand(5, len(comps), generator=torch.Generator().manual_seed(1)).double()
    want = multiplier_gradients(whole, comps, M, batch=4)
    for max_batch in (2, 6):  # one mask per pass; three
        split = Objective(tiny_world_model_f64, "red", ObjectiveConfig(**{**big.to_dict(), "max_batch": max_batch}))
        with _rows_per_backward(split.model, monkeypatch) as held:
            got = multiplier_gradients(split, comps, M, batch=4)
        assert held and max(held) <= max_batch, (max_batch, held)  # UNet rows whose graph one backward pass holds
        assert max(held) == engine_batches(eval_shape(split.model, split.config))[1]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_forward_passes_stay_within_max_batch_even_within_one_mask(tiny_world_model, tiny_world_model_f64):
    """``max_batch`` below one mask's evaluation set (SD's default set is 80 UNet rows) splits the set into sample
    groups: every pass stays within it, and J, true ablation and causal tracing's restorations are the same numbers,
    up to rounding, as with one pass per mask."""
    import interp

    model = tiny_world_model
    big = ObjectiveConfig(n_images=3, timesteps=(200, 600), dtype="float64")  # 6 samples x 2 branches = 12 rows
    small = ObjectiveConfig(**{**big.to_dict(), "max_batch": 4})
    whole, split = Objective(tiny_world_model_f64, "red", big), Objective(tiny_world_model_f64, "red", small)
    torch.testing.assert_close(split.intact, whole.intact, rtol=1e-12, atol=0)
    comps = model.components("neuron", family="ff", kind="ff.net.2", block="mid_block")
    for method, options in (("ablation", {}), ("tracing", {"maps": False, "n_noise": 1})):
        rows, remove = _unet_rows_per_call(split.model)
        try:
            a = interp.attribute(method, model, "red", comps[:6], objective=split, **options)
        finally:
            remove()
        assert rows and max(rows) <= 4, (method, rows)
        b = interp.attribute(method, model, "red", comps[:6], objective=whole, **options)
        torch.testing.assert_close(torch.tensor(a["score"].to_numpy()), torch.tensor(b["score"].to_numpy()),
                                   rtol=1e-9, atol=1e-12)
    frozen = {**big.to_dict(), "anchor": "frozen", "dtype": "float32"}  # the intact anchor branch, once, in passes
    rows, remove = _unet_rows_per_call(model)
    try:
        got = Objective(model, "red", ObjectiveConfig(**{**frozen, "max_batch": 4})).intact
    finally:
        remove()
    assert rows and max(rows) <= 4, rows
    want = Objective(model, "red", ObjectiveConfig(**frozen)).intact
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_mean_ablation_reference_means_stay_within_max_batch(tiny_world_model, tiny_world_model_f64):
    """Mean-ablation's reference means are taken in passes of at most ``max_batch`` rows and combined by their rows:
    the same means, and the same mean-ablation scores, up to rounding."""
    import interp
    from interp.core.interventions import compile_plan
    from interp.core.objectives import reference_means

    model = tiny_world_model
    big = ObjectiveConfig(n_images=3, timesteps=(200, 600), dtype="float64")
    whole = Objective(tiny_world_model_f64, "red", big)
    split = Objective(tiny_world_model_f64, "red", ObjectiveConfig(**{**big.to_dict(), "max_batch": 4}))
    comps = model.components("neuron", family="ff", kind="ff.net.2", block="mid_block")[:6]
    rows, remove = _unet_rows_per_call(split.model)
    try:
        got = reference_means(split, compile_plan(split.model, comps))
        a = interp.attribute("ablation", model, "red", comps, objective=split, mode="mean")
    finally:
        remove()
    assert rows and max(rows) <= 4, rows
    want = reference_means(whole, compile_plan(whole.model, comps))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14)
    b = interp.attribute("ablation", model, "red", comps, objective=whole, mode="mean")
    torch.testing.assert_close(torch.tensor(a["score"].to_numpy()), torch.tensor(b["score"].to_numpy()),
                               rtol=1e-9, atol=1e-12)


def test_gradients_through_generation_rerun_unet_calls_beyond_max_batch(tiny_world_folder, monkeypatch):
    """A gradient through generation (the classifier objective) holds every UNet call's activations until its
    backward pass: ``unet_calls`` times a call's rows. While that fits in ``max_batch`` it is kept; beyond, each call
    is re-run in the backward pass instead (checkpointing): the same gradients, the activations of one call held at
    a time instead of one per step, and the plan counts the re-run rows as cost."""
    import interp
    from interp.core.engine import multiplier_gradients
    from interp.studies.plan import engine_batches, eval_shape

    m = interp.load_model(str(tiny_world_folder))
    big = ObjectiveConfig(kind="classifier", n_images=3, gen_steps=3, dtype="float64")
    small = ObjectiveConfig(**{**big.to_dict(), "max_batch": 2})  # a call of 1 image x 3 calls > 2 rows: re-run
    whole, split = Objective(m, "red", big), Objective(m, "red", small)
    comps = m.components("neuron", family="ff", kind="ff.net.2", block="mid_block")
    M = torch.rand(3, len(comps), generator=torch.Generator().manual_seed(0)).double()
    before = split.model.state_fingerprint()

    def run(obj, fn):
        """``fn()``, the bytes autograd saved for backward outside re-run calls, and the rows re-run."""
        saved, rows = [0], []
        hook = obj.model.unet.conv_in.register_forward_hook(lambda mod, args, out: rows.append(out.shape[0]))
        counted = obj.model.counters["unet_rows"]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fn()
        finally:
            hook.remove()
        return out, saved[0], sum(rows) - (obj.model.counters["unet_rows"] - counted)

    M4 = torch.rand(4, len(comps), generator=torch.Generator().manual_seed(2)).double()  # the plan's 4 masks a pass
    with _rows_per_backward(whole.model, monkeypatch) as held:
        multiplier_gradients(whole, comps, M4, batch=4)
    assert held == [4 * 3 * 3] == [engine_batches(eval_shape(whole.model, big))[1]]  # masks x images x calls, kept
    kept, kept_bytes, kept_again = run(whole, lambda: multiplier_gradients(whole, comps, M, batch=2))
    got, got_bytes, again = run(split, lambda: multiplier_gradients(split, comps, M, batch=2))
    torch.testing.assert_close(got, kept, rtol=1e-9, atol=1e-12)
    assert kept_again == 0 and again > 0
    assert got_bytes < kept_bytes / 4, (got_bytes, kept_bytes)  # the UNet's activations are not all held
    assert again == eval_shape(split.model, small).values(len(M), grad=True, per_pass=2).recomputed

    cad = lambda obj: interp.attribute("cad", obj.model, "red", comps, objective=obj)  # noqa: E731
    (kept, _, _), (got, _, again) = run(whole, lambda: cad(whole)), run(split, lambda: cad(split))
    torch.testing.assert_close(torch.tensor(got["score"].to_numpy()), torch.tensor(kept["score"].to_numpy()),
                               rtol=1e-9, atol=1e-12)
    assert again == eval_shape(split.model, small).values(1, grad=True).recomputed > 0
    after = split.model.state_fingerprint()
    assert all(torch.equal(before[k], after[k]) for k in before)

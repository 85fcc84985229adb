"""J's gradients through the engine: parameters and activations, checked against finite differences / autograd."""

import torch

from interp.objectives import Objective, ObjectiveConfig, gradients

PATH = "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2"


def test_activation_and_parameter_gradients(tiny_world_model):
    obj = Objective(tiny_world_model, "red", ObjectiveConfig(n_images=2, timesteps=(300,), dtype="float64"))
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

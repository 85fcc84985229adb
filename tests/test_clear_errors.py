"""Errors that name the problem (a patch of the wrong shape); and a float64 objective through a judge stays
float64."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.core.interventions import Patch, run_unet


@pytest.fixture(scope="module")
def world():
    return interp.load_model("concept-world")


def test_a_patch_that_does_not_fit_its_output_is_named(world):
    obj = interp.Objective(world, "red", interp.ObjectiveConfig(n_images=1, timesteps=(500,)))
    bad = Patch(torch.zeros(3, 5), torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"the patch of unet.conv_norm_out does not fit its output: clean \(3, 5\)"):
        run_unet(world, obj.x_t, obj.t, obj.ctx_target, patches={"unet.conv_norm_out": bad})


def test_a_float64_classifier_objective_is_float64(world):
    cfg = interp.ObjectiveConfig(kind="classifier", n_images=1, gen_steps=1, dtype="float64")
    assert interp.Objective(world, "red", cfg).intact.dtype == torch.float64

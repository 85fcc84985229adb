"""A model of Stable Diffusion 1.5's size, loaded like a user's folder, through the whole comparison (issue 15).

The pipeline (benchmarks/sd15_sized.py: SD 1.5's UNet, CLIP text tower, VAE and PNDM scheduler, random weights) is
saved with ``save_pretrained`` and loaded with ``interp.load_model``. The UNet's default latent side is set to 16 (the
architecture accepts any multiple of 8; SD's own is 64) so the comparison runs in minutes on a CPU: one concept,
one image, one timestep, six named feed-forward output neurons across the down, mid and up paths, few COAR and
held-out masks. Causal tracing is left out: its text-encoder map alone is 77 token positions x 12 layers
evaluation-set passes (``interp.studies.plan`` counts it), far more than every other method together.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from interp.core.results import meta_key

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("sd15_sized", ROOT / "benchmarks" / "sd15_sized.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_sd15_sized


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in model.parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


NEURONS = (
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2[7]",
    "unet.down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2[1000]",
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2[3]",
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2[1279]",
    "unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2[640]",
    "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2[319]",
)


@pytest.mark.slow
def test_comparison_on_a_stable_diffusion_15_sized_model(tmp_path, monkeypatch):
    import interp
    import interp.core.models
    from interp.studies.compare import CompareConfig, run_comparison
    from interp.studies.plan import plan_comparison

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    folder = _builder()(tmp_path / "sd15", sample_size=16)
    model = interp.load_model(str(folder))
    assert type(model.unet).__name__ == "UNet2DConditionModel" and model.vae is not None
    assert type(model.scheduler).__name__ == "PNDMScheduler"
    n_unet = sum(p.numel() for p in model.unet.parameters())
    assert 850e6 < n_unet < 870e6, n_unet  # SD 1.5's UNet: ~860 M parameters
    assert 120e6 < sum(p.numel() for p in model.text_encoder.parameters()) < 126e6
    assert len(model.components("layer", family="block")) == 16  # SD 1.5's 16 transformer blocks
    assert len(model.components("neuron", kind="ff.net.2")) == 12_480

    methods = ("ablation", "cad", "coar", "maskgrad", "ig", "midpoint", "screen")
    cfg = CompareConfig(model=str(folder), concepts=("red",), methods=methods, n_images=1, timesteps=(500,),
                        components=NEURONS, lds_alphas=(0.2,), heldout_masks=10, n_boot=100, device="cpu",
                        options={"coar": {"n_masks": 12, "alpha": 0.2},
                                 "maskgrad": {"n_masks": 2, "curve": (1,), "alpha": 0.2}})
    plan = plan_comparison(cfg, model=model, measure=False)
    digest = _weights_digest(model)
    monkeypatch.setattr(interp.core.models, "load_model", lambda *a, **k: model)  # the loaded model, counters readable
    out = tmp_path / "run"
    result = run_comparison(cfg, out, progress=False)
    assert _weights_digest(model) == digest, "the comparison changed the model's weights"

    # every output of a run folder, complete
    for f in ("index.html", "results.parquet", "meta.json", "status.json"):
        assert (out / f).stat().st_size > 0, f
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    tables = {p.stem: pd.read_csv(p) for p in (out / "tables").glob("*.csv")}
    for name in ("correlations", "lds", "cost", "topk", "accuracy_vs_cost"):
        assert name in tables and len(tables[name]), name
    assert list((out / "figures").glob("*.png"))
    df = pd.read_parquet(out / "results.parquet")
    for m in methods:
        rows = df[(df["variant"] == m) & (df["concept"] == "red")]  # the main estimate, not its budget variants
        assert sorted(rows["component"]) == sorted(NEURONS), m
        assert np.isfinite(rows["score"].to_numpy(float)).all(), m
    abl = df[df["method"] == "ablation"]["score"].to_numpy(float)
    assert (abl != 0).any(), "ablating SD-sized feed-forward neurons changed J not at all"
    # the run did exactly the UNet work the plan counted
    assert model.counters["unet_rows"] == plan.table["unet_rows"].sum()
    assert model.counters["unet_rows_grad"] == plan.table["unet_rows_grad"].sum()
    for m in methods:
        meta = result["meta"]["methods"][meta_key(m, "red")]
        planned = plan.table.set_index(["method", "concept"]).loc[(m, "red")]
        recorded = meta.get("forward_evals_all_alphas", meta["cost"]["forward_evals"])
        assert planned["forward_evals"] == pytest.approx(recorded), m

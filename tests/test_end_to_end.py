"""The end-to-end matrix (analyses.end_to_end): component kinds x objectives, each cell an erasure run, on the tiny
world."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest


def _args(folder, out, *extra):
    return ["--model", str(folder), "--concepts", "red", "--kinds", "ff-out", "attn2-value", "--objectives",
            "one-step", "high-band", "--methods", "cad", "ablation", "--blocks", "mid_block", "--k", "1", "4",
            "--images", "6", "--steps", "2", "--attr-images", "1", "--random-masks", "2", "--n-boot", "100",
            "--device", "cpu", "--no-progress", "--threads", "1", "--out", str(out), *extra]


@pytest.mark.slow  # four erasure runs
def test_matrix_of_kinds_and_objectives(tiny_world_folder, tmp_path, no_figures):
    from analyses.end_to_end import main

    out = tmp_path / "e2e"
    assert main(_args(tiny_world_folder, out)) == 0
    m = pd.read_csv(out / "matrix.csv")
    assert len(m) == 2 * 2 * 2  # kinds x objectives x methods, one concept
    assert set(m["kind"]) == {"ff-out", "attn2-value"} and set(m["objective"]) == {"one-step", "high-band"}
    s = m["prediction_spearman"].dropna()
    assert ((s >= -1) & (s <= 1)).all()
    assert ((m["retained"].dropna() >= 0.9) & (m["artifacts"].dropna() <= 1)).all()
    for kind in ("ff-out", "attn2-value"):
        for objective in ("one-step", "high-band"):
            cell = out / "cells" / f"{kind}__{objective}"
            ranking = json.loads((cell / "meta.json").read_text())["ranking_config"]
            assert ranking["kinds"] == {"ff-out": ["ff.net.2"], "attn2-value": ["attn2.to_v"]}[kind]
            assert ranking["timesteps"] == {"one-step": [250, 600], "high-band": [700, 800, 900]}[objective]
    assert (out / "figures" / "matrix.png").exists() and "From one step to the image" in (out / "index.html").read_text()
    assert np.isfinite(m["auc"]).all()


def test_bad_cells_are_refused_before_anything_loads(tmp_path, refused, capsys):
    from analyses.end_to_end import main

    with pytest.raises(SystemExit) as e:  # argparse's own check of the choices
        main(["--kinds", "ff-out", "nope", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--kinds: invalid choice: 'nope'" in capsys.readouterr().err
    assert "--methods must be non-empty and distinct" in refused(main, ["--methods", "cad", "cad"])
    assert "unknown method" in refused(main, ["--methods", "nope"])
    assert "--kinds features needs the sparse autoencoders" in refused(main, ["--kinds", "features"])
    assert "--sae is used with --kinds features" in refused(main, ["--sae", str(tmp_path)])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # loads the model and measures passes
def test_the_plan_projects_every_cell_before_running(tiny_world_folder, tmp_path, capsys):
    """``--plan`` prints each cell's counted UNet rows and projected time (one measured pass, reused) and a total,
    and runs nothing; a cell's count is its erasure plan's."""
    from analyses import erasure_curves
    from analyses.end_to_end import EndToEndConfig, main, plan

    out = tmp_path / "e2e"
    assert main(_args(tiny_world_folder, out, "--plan")) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    lines = [line for line in text.splitlines() if line.split()[:1] in (["ff-out"], ["attn2-value"])]
    assert len(lines) == 4 and "TOTAL:" in text and "UNet rows, projected" in text
    cfg = EndToEndConfig(model=str(tiny_world_folder), concepts=("red",), kinds=("ff-out",), objectives=("one-step",),
                         methods=("cad", "ablation"), blocks=("mid_block",), k=(1, 4), images=6, steps=2,
                         attr_images=1, random_masks=2, n_boot=100, device="cpu")
    _, table = plan(cfg)
    cell = erasure_curves.plan(cfg.cell("ff-out", "one-step", tmp_path), None)
    assert table["unet_rows"].tolist() == [int(cell.table["unet_rows"].sum())]


@pytest.mark.slow  # one erasure run on features
def test_the_features_kind_ranks_the_saes_latents(tiny_world_folder, tmp_path, no_figures):
    import torch

    from analyses.end_to_end import main
    from interp.core.features import planted, save_sae

    site = "unet.mid_block.attentions.0.transformer_blocks.0.ff"
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    save_sae(planted(site, torch.cat([q, -q]), k=4), tmp_path / "sae")
    out = tmp_path / "e2e"
    argv = _args(tiny_world_folder, out)
    argv[argv.index("--kinds") + 1: argv.index("--objectives")] = ["features"]
    argv[argv.index("--objectives") + 1: argv.index("--methods")] = ["one-step"]
    assert main([*argv, "--sae", str(tmp_path / "sae")]) == 0
    m = pd.read_csv(out / "matrix.csv")
    assert set(m["kind"]) == {"features"} and len(m) == 2  # two methods, one concept
    ranking = json.loads((out / "cells" / "features__one-step" / "meta.json").read_text())["ranking_config"]
    assert ranking["granularity"] == "feature" and ranking["sae"] == [str(tmp_path / "sae")]

"""The HTML report from synthetic result frames: every plot function, self-containment, escaping, and (when
Chromium is installed) that a real browser renders every figure and table."""

from __future__ import annotations

import base64
import io
import os
import re
from html import unescape

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from browser import SKIP_REASON, find_chromium, open_page  # tests/ is on sys.path (rootdir-less test folder)
from interp import evaluation as ev
from interp import plots
from interp.report import render_report
from interp.results import concat, make_frame

TEXT_LAYERS, UNET_LAYERS, UNITS = 3, 4, 12
TOKENS = ["<bos>", "a", "red", "circle", "<eos>"]
TIMESTEPS = [900, 600, 300, 100]


def components(granularity: str = "neuron") -> pd.DataFrame:
    """Text-encoder then UNet layers; ``granularity="layer"`` gives one component per layer (tracing's unit)."""
    rows = []
    for part, n_layers in (("text_encoder", TEXT_LAYERS), ("unet", UNET_LAYERS)):
        for d in range(n_layers):
            if part == "text_encoder":
                layer, block, family, kind = f"text_model.encoder.layers.{d}", "text_encoder", "text_mlp", "mlp.fc1"
            else:
                stage = ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0")[d]
                layer, block, family, kind = f"{stage}.attentions.0.transformer_blocks.0", stage, "ff", "ff.net.0"
            for u in range(UNITS if granularity == "neuron" else 1):
                address = f"{part}.{layer}.{kind}" + (f"[{u}]" if granularity == "neuron" else "")
                rows.append({"component": address, "model_part": part, "family": family, "block": block,
                             "layer": layer, "depth": d, "kind": kind if granularity == "neuron" else "layer",
                             "unit": u if granularity == "neuron" else -1, "granularity": granularity})
    return pd.DataFrame(rows)


def frame(comp, score, method, concept, meta=None, **kw):
    return make_frame(comp, score, method=method, model="toy", concept=concept, objective="erase", n_samples=4,
                      seed=0, config_hash="0" * 16, meta=meta, **kw)


@pytest.fixture(scope="module")
def results():
    rng = np.random.default_rng(0)
    comp, layers = components(), components("layer")
    text_layers = layers[layers["model_part"] == "text_encoder"]
    unet_layers = layers[layers["model_part"] == "unet"]
    frames = []
    for concept in ("red", "circle"):
        truth = rng.normal(size=len(comp)) * np.where(comp["model_part"] == "unet", 1.0, 0.2)
        frames += [
            frame(comp, truth, "ablation", concept, meta={"forward_evals": len(comp), "seconds": 12.0}),
            frame(comp, truth + 0.3 * rng.normal(size=len(comp)), "cad", concept,
                  meta={"forward_evals": 1, "backward_evals": 1, "seconds": 0.1}),
            frame(comp, truth + 0.1 * rng.normal(size=len(comp)), "coar", concept,
                  meta={"forward_evals": 2000, "seconds": 30.0}),
        ]
        tracing = [frame(layers, rng.random(len(layers)), "tracing", concept, meta={"forward_evals": 50})]
        for t in TIMESTEPS:
            tracing.append(frame(unet_layers, rng.random(len(unet_layers)), "tracing", concept, timestep=t))
        for pos in range(len(TOKENS)):
            tracing.append(frame(text_layers, rng.random(len(text_layers)), "tracing", concept, token=pos))
        frames.append(concat(tracing))
    df = concat(frames)
    heldout = {}
    for concept in ("red", "circle"):
        truth = df[(df["method"] == "ablation") & (df["concept"] == concept)].set_index("component")["score"]
        for alpha in (0.05, 0.2):
            masks = rng.random((30, len(comp))) < alpha
            j = 1.0 - masks @ truth.reindex(comp["component"]).to_numpy() + 0.05 * rng.normal(size=30)
            heldout[(concept, alpha)] = {"masks": masks, "components": list(comp["component"]), "j": j,
                                         "j_intact": 1.0}
    return df, heldout


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    df, heldout = results
    corr = ev.correlations(df, n_boot=100)
    by_layer = ev.correlations_by_layer(df, n_boot=20)
    topk = ev.topk_agreement(df)
    lds = ev.lds_table(df, heldout, methods=["ablation", "cad", "coar"])
    cost = ev.cost_table(df)
    acc = lds.groupby(["method", "alpha"], as_index=False)["lds_spearman"].mean().merge(
        cost.groupby("method", as_index=False)["forward_evals"].mean(), on="method")
    fig = plots.fig_to_base64_png
    sections = [
        {"title": "Agreement with true ablation", "text": "Scores against <b>single-component</b> ablation.\n\nTwo.",
         "tables": [("Correlations with 95% bootstrap CIs", corr), ("Per layer", by_layer)],
         "figures": [(f"Scatter, {c}", fig(plots.scatter_vs_reference(df, c))) for c in ("red", "circle")]},
        {"title": "Where the concepts live",
         "tables": [("Top-k agreement", topk)],
         "figures": [(f"Localization, {m}", fig(plots.localization_heatmap(df, m))) for m in ("ablation", "cad")]},
        {"title": "Causal tracing",
         "figures": [("UNet trace", fig(plots.trace_map_unet(df, "red"))),
                     ("Text trace", fig(plots.trace_map_text(df, "red", tokens=TOKENS)))]},
        {"title": "Accuracy vs cost", "tables": [("LDS on held-out masks", lds), ("Cost", cost),
                                                 ("Escaping", pd.DataFrame({"cell": ["<script>x</script>"]}))],
         "figures": [("LDS vs forward passes", fig(plots.accuracy_vs_cost(acc)))]},
    ]
    out = render_report(tmp_path_factory.mktemp("report"), title="Toy report <&>", summary=ev.summary_sentences(corr),
                        sections=sections, config={"concepts": ["red", "circle"], "n_boot": 100})
    return out, sections


def test_report_is_self_contained(report):
    path, sections = report
    assert path.name == "index.html" and path.exists()
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left nothing behind
    html = path.read_text(encoding="utf-8")
    for s in sections:
        assert f">{s['title']}</h2>" in html
        for caption, _ in s.get("tables", []):
            assert caption in html
    n_tables = sum(len(s.get("tables", [])) for s in sections)
    assert html.count('<table class="dataframe data"') == n_tables
    assert "COAR agrees best with true ablation" in html  # COAR has the least noise
    assert '\n  "n_boot": 100\n' in unescape(html)  # the configuration as pretty JSON
    srcs = re.findall(r'<img[^>]*\bsrc="([^"]*)"', html)
    assert len(srcs) == sum(len(s.get("figures", [])) for s in sections) == 7
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 50
    assert not re.search(r"https?://", html)
    assert not re.search(r'<(link|script)\b', html)  # no external stylesheet or script (and no script at all)
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "&lt;b&gt;single-component&lt;/b&gt;" in html
    assert "Toy report &lt;&amp;&gt;" in html
    assert "incomplete" not in html.lower()


def test_incomplete_banner_and_file_target(tmp_path):
    out = render_report(tmp_path / "sub" / "partial.html", title="t", summary=[], sections=[], config={},
                        complete=False)
    assert out == tmp_path / "sub" / "partial.html"
    assert 'id="incomplete-banner"' in out.read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file the user writes, not 0600


def test_figure_must_be_embedded(tmp_path):
    with pytest.raises(ValueError, match="data:image/png"):
        render_report(tmp_path, title="t", summary=[], config={},
                      sections=[{"title": "s", "figures": [("remote", "https://example.org/a.png")]}])


def test_plots_return_figures_and_handle_missing_rows(results):
    df, _ = results
    assert plots.trace_map_unet(df, "no-such-concept").axes  # a message figure, not an exception
    assert plots.localization_heatmap(df, "no-such-method").axes
    assert plots.accuracy_vs_cost(pd.DataFrame(columns=["method", "alpha", "lds_spearman", "forward_evals"])).axes
    uri = plots.fig_to_base64_png(plots.scatter_vs_reference(df, "red"))
    assert uri.startswith("data:image/png;base64,")


def test_report_in_chromium(report, tmp_path):
    if find_chromium() is None:
        pytest.skip(SKIP_REASON)
    path, sections = report
    shot = tmp_path / "report.png"
    page = open_page(path, screenshot_to=shot, user_data_dir=tmp_path / "profile")
    assert len(page["images"]) == 7
    for img in page["images"]:
        assert img["complete"] and img["natural_width"] > 0, img
    assert len(page["tables"]) == sum(len(s.get("tables", [])) for s in sections)
    assert all(n >= 1 for n in page["tables"])
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width > 0

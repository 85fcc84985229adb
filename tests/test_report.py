"""The HTML reports from synthetic result frames: plots, findings, self-containment and escaping, and -- in headless
Chromium at 1280x800, as a reader opens it -- the first screen, images, collapsibles, sorting, the network and the
page height of a default-shaped comparison run."""

from __future__ import annotations

import base64
import io
import os
import re
from html import unescape

import numpy as np
import pandas as pd
import pytest
from browser import inspect_page, require_chromium  # tests/ is on sys.path (rootdir-less test folder)
from PIL import Image

from interp.core.results import concat, is_main, make_frame, make_map_frame
from interp.core.runs import Run
from interp.report import evaluation as ev
from interp.report import plots, render_report, settings_rows
from interp.report.findings import compare_findings, edit_findings

# One worker runs the module: its module fixtures (the toy report with its figures, the default-shaped run) are built
# once.
pytestmark = pytest.mark.xdist_group("report")

TEXT_LAYERS, UNET_LAYERS, UNITS = 3, 4, 12
TOKENS = ["<bos>", "a", "red", "circle", "<eos>"]
TIMESTEPS = [900, 600, 300, 100]
VIEW = (1280, 800)


def components(granularity: str = "neuron", text_layers=TEXT_LAYERS, unet_layers=UNET_LAYERS, units=UNITS,
               text_units: bool = True) -> pd.DataFrame:
    """Text-encoder then UNet layers; ``granularity="layer"`` gives one component per layer (tracing's unit)."""
    stages = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1",
              "up_blocks.2")
    rows = []
    for part, n_layers in (("text_encoder", text_layers if text_units or granularity == "layer" else 0),
                           ("unet", unet_layers)):
        for d in range(n_layers):
            if part == "text_encoder":
                layer, block, family, kind = f"text_model.encoder.layers.{d}", "text_encoder", "text_mlp", "mlp.fc1"
            else:
                layer, block, family, kind = f"{stages[d]}.attentions.0.transformer_blocks.0", stages[d], "ff", "ff.net.2"
            for u in range(units if granularity == "neuron" else 1):
                address = f"{part}.{layer}.{kind}" + (f"[{u}]" if granularity == "neuron" else "")
                rows.append({"component": address, "model_part": part, "family": family, "block": block,
                             "layer": layer, "depth": d, "kind": kind if granularity == "neuron" else "layer",
                             "unit": u if granularity == "neuron" else -1, "granularity": granularity})
    return pd.DataFrame(rows)


def frame(comp, score, method, concept, meta=None, **kw):
    return make_frame(comp, score, method=method, model="toy", concept=concept, objective="erase", n_samples=4,
                      seed=0, config_hash="0" * 16, meta=meta, **kw)


def map_frame(comp, score, concept, axis, position):
    return make_map_frame(comp, score, np.zeros(len(comp)), axis=axis, position=position, method="tracing",
                          model="toy", concept=concept, objective="erase", n_samples=4, seed=0, config_hash="0" * 16)


def tracing_frames(rng, concept, text_layers=TEXT_LAYERS, unet_layers=UNET_LAYERS):
    """Causal tracing's scores of whole layers, and its maps (layer x timestep, layer x token)."""
    layers = components("layer", text_layers, unet_layers)
    text, unet = layers[layers["model_part"] == "text_encoder"], layers[layers["model_part"] == "unet"]
    scores = frame(layers, rng.random(len(layers)), "tracing", concept, meta={"cost": {"forward_evals": 50}})
    maps = [map_frame(unet, rng.random(len(unet)), concept, "timestep", t) for t in TIMESTEPS]
    maps += [map_frame(text, rng.random(len(text)), concept, "token", p) for p in range(len(TOKENS))]
    return scores, pd.concat(maps, ignore_index=True)


@pytest.fixture(scope="module")
def results():
    rng = np.random.default_rng(0)
    comp = components()
    frames, maps = [], []
    for concept in ("red", "circle"):
        truth = rng.normal(size=len(comp)) * np.where(comp["model_part"] == "unet", 1.0, 0.2)
        frames += [
            frame(comp, truth, "ablation", concept, meta={"cost": {"forward_evals": len(comp), "seconds": 12.0}}),
            frame(comp, truth + 0.3 * rng.normal(size=len(comp)), "cad", concept,
                  meta={"cost": {"forward_evals": 1, "backward_evals": 1, "seconds": 0.1}}),
            frame(comp, truth + 0.1 * rng.normal(size=len(comp)), "coar", concept,
                  meta={"cost": {"forward_evals": 2000, "seconds": 30.0}}),
        ]
        scores, tracing_maps = tracing_frames(rng, concept)
        frames.append(scores)
        maps.append(tracing_maps)
    df = concat(frames)
    heldout = {}
    for concept in ("red", "circle"):
        truth = df[(df["method"] == "ablation") & (df["concept"] == concept)].set_index("component")["score"]
        for alpha in (0.05, 0.2):
            masks = rng.random((30, len(comp))) < alpha
            j = 1.0 - masks @ truth.reindex(comp["component"]).to_numpy() + 0.05 * rng.normal(size=30)
            heldout[(concept, alpha)] = {"masks": masks, "components": list(comp["component"]), "j": j,
                                         "j_intact": 1.0}
    return df, heldout, pd.concat(maps, ignore_index=True)


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    df, heldout, maps = results
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
         "tables": [("Correlations with 95% bootstrap CIs", corr)],
         "figures": [("Scatter, red", fig(plots.scatter_vs_reference(df, "red")))],
         "details": [{"title": "Per layer", "tables": [("Per layer", by_layer)],
                      "figures": [("Scatter, circle", fig(plots.scatter_vs_reference(df, "circle")))]}]},
        {"title": "Where the concepts live",
         "tables": [("Top-k agreement", topk)],
         "figures": [("Localization", fig(plots.localization_grid(df, ["ablation", "cad", "coar", "tracing"])))]},
        {"title": "Causal tracing",
         "figures": [("UNet trace", fig(plots.trace_maps(maps, ["red", "circle"], "unet"))),
                     ("Text trace", fig(plots.trace_map_text(maps, "red", tokens=TOKENS)))]},
        {"title": "Accuracy vs cost", "tables": [("LDS on held-out masks", lds)],
         "details": [{"title": "Cost and escaping", "tables": [
             ("Cost", cost), ("Escaping", pd.DataFrame({"cell": ["<script>x</script>"]}))]}]},
    ]
    out = render_report(tmp_path_factory.mktemp("report"), title="Toy report <&>", summary=ev.summary_sentences(corr),
                        headline=[("LDS vs forward passes", fig(plots.accuracy_vs_cost(acc)))],
                        sections=sections, config={"concepts": ["red", "circle"], "n_boot": 100,
                                                   "versions": {"torch": "x"}, "methods": {"cad/red": {"k": 1}}},
                        settings=settings_rows({"concepts": ["red", "circle"], "n_boot": 100}))
    return out, sections


def _n_tables(sections) -> int:
    return sum(len(b.get("tables", [])) for s in sections for b in [s, *s.get("details", [])]) + 1  # + settings


def _n_figures(sections) -> int:
    return sum(len(b.get("figures", [])) for s in sections for b in [s, *s.get("details", [])]) + 1  # + headline


def test_report_is_self_contained(report):
    path, sections = report
    assert path.name == "index.html" and path.exists()
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left nothing behind
    html = path.read_text(encoding="utf-8")
    for s in sections:
        assert f">{s['title']}</h2>" in html
        for caption, _ in s.get("tables", []):
            assert caption in html
    assert html.count('<table class="dataframe data"') == _n_tables(sections)
    assert html.count("<details") == sum(len(s.get("details", [])) for s in sections) + 1  # + raw metadata
    assert html.index('id="summary"') < html.index('id="headline"') < html.index('id="section-1"')
    assert "COAR agrees best with true ablation" in html  # COAR has the least noise
    assert '\n  "n_boot": 100,\n' in unescape(html)  # the configuration as pretty JSON, behind a <details>
    assert re.search(r"<td>n_boot</td>\s*<td>100</td>", html)  # and as a readable table
    srcs = re.findall(r'<img[^>]*\bsrc="([^"]*)"', html)
    assert len(srcs) == _n_figures(sections) == 6
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 50
    assert not re.search(r"https?://", html)
    assert not re.search(r"<link\b|<script\b[^>]*\bsrc=", html)  # no external stylesheet or script
    assert len(re.findall(r"<script\b", html)) == 1  # the inline table script
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


def test_bad_sections_are_refused(tmp_path):
    with pytest.raises(ValueError, match="data:image/png"):
        render_report(tmp_path, title="t", summary=[], config={},
                      sections=[{"title": "s", "figures": [("remote", "https://example.org/a.png")]}])
    with pytest.raises(ValueError, match="data:image/png"):
        render_report(tmp_path, title="t", summary=[], config={}, sections=[],
                      headline=[("remote", "/tmp/a.png")])
    with pytest.raises(ValueError, match="needs a 'title'"):
        render_report(tmp_path, title="t", summary=[], config={}, sections=[{"title": "s", "details": [{}]}])
    with pytest.raises(ValueError, match="unknown keys"):
        render_report(tmp_path, title="t", summary=[], config={}, sections=[{"title": "s", "figure": []}])


def test_settings_rows_flatten_and_skip():
    rows = settings_rows({"config": {"concepts": ["a", "b"], "seed": 0, "x": None}, "wall": 12.3456,
                          "methods": {"big": 1}, "long": list(range(20))}, skip=("methods",), max_items=5)
    got = dict(zip(rows["setting"], rows["value"]))
    assert got == {"config.concepts": "a, b", "config.seed": "0", "config.x": "\u2014", "wall": "12.35",
                   "long": "0, 1, 2, 3, 4, ... (20 in all)"}


def test_plots_return_figures_and_handle_missing_rows(results):
    df, _, maps = results
    assert plots.trace_map_unet(maps, "no-such-concept").axes  # a message figure, not an exception
    assert plots.trace_maps(maps, ["no-such-concept"]).axes
    assert plots.localization_heatmap(df, "no-such-method").axes
    assert plots.localization_grid(df, ["no-such-method"]).axes
    assert plots.accuracy_vs_cost(pd.DataFrame(columns=["method", "alpha", "lds_spearman", "forward_evals"])).axes
    uri = plots.fig_to_base64_png(plots.scatter_vs_reference(df, "red"))
    assert uri.startswith("data:image/png;base64,")


def test_accuracy_vs_cost_draws_equal_values_across_concepts():
    """Three concepts with the same LDS: their mean exceeds the max by a rounding error (0.10000000000000002), which
    made the min-max bar negative and the whole comparison fail (found on 3 text-encoder layers)."""
    acc = pd.DataFrame({"method": "cad", "variant": "cad", "alpha": 0.2, "lds_spearman": [0.1, 0.1, 0.1],
                        "forward_evals": [3.0, 3.0, 3.0], "concept": ["red", "blue", "circle"]})
    assert sum(acc["lds_spearman"]) / 3 > 0.1  # the rounding this guards against
    assert plots.fig_to_png(plots.accuracy_vs_cost(acc))


def test_small_effects_get_an_offset_not_long_tick_labels(results):
    """Effects of single components are ~1e-5: ticks read 1, 2, 3 with a x10^-5 label, not 0.00001 0.00002."""
    df, *_ = results
    small = df.assign(score=df["score"] * 1e-5)
    fig = plots.scatter_vs_reference(small, "red", methods=["cad", "coar"])
    fig.draw_without_rendering()  # sets the offset texts
    ax = fig.axes[0]
    labels = [re.sub(r"[$]|\\mathdefault\{|\}", "", t.get_text())
              for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
    assert labels and max(len(t) for t in labels) <= 6, labels
    assert "10^{\u22125}" in ax.xaxis.get_offset_text().get_text().replace("-", "\u2212")
    assert ax.get_shared_x_axes().joined(fig.axes[0], fig.axes[1])  # small multiples share their axes


def test_localization_grid_uses_one_colour_scale(results):
    df, *_ = results
    fig = plots.localization_grid(df, ["ablation", "cad", "coar"])
    meshes = [ax.collections[0] for ax in fig.axes if ax.collections and ax.get_label() != "<colorbar>"]
    assert len(meshes) == 6  # 3 methods x (supports, opposes)
    assert len({m.norm.vmax for m in meshes}) == 1 and len({m.norm.vmin for m in meshes}) == 1
    fig.draw_without_rendering()
    heat = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [t.get_text() for t in heat[0].get_yticklabels()][:1] == ["text.L0"]  # layer names, once per row


# -- findings --------------------------------------------------------------------------------------------------------
#: The method of each budget or rate variant in the synthetic tables (a main estimate is named as its method).
VARIANT_OF = {"coar@89": "coar", "maskgrad@0.2": "maskgrad"}


def _tables_for_findings():
    concepts = ["red", "blue"]
    method = lambda v: VARIANT_OF.get(v, v)  # noqa: E731
    sp = {"cad": (0.99, 0.98), "midpoint": (0.995, 0.985), "coar": (0.90, 0.72), "ig": (0.9, 0.6),
          "screen": (1.0, 1.0), "coar@89": (0.2, 0.1)}
    corr = pd.DataFrame([{"concept": c, "method": method(m), "variant": m, "n": 100, "pearson": v[i],
                          "pearson_lo": v[i] - 0.02,
                          "pearson_hi": v[i] + 0.01, "spearman": v[i], "spearman_lo": v[i] - 0.02,
                          "spearman_hi": min(1.0, v[i] + 0.01), "kendall": v[i], "kendall_lo": 0, "kendall_hi": 1}
                         for m, v in sp.items() for i, c in enumerate(concepts)])
    fpe = {"ablation": 448, "cad": 3, "midpoint": 3.5, "coar": 896, "ig": 48, "screen": 81, "coar@89": 89,
           "maskgrad@0.2": 36}
    cost = pd.DataFrame([{"concept": c, "method": method(m), "variant": m, "forward_equivalents": f}
                         for m, f in fpe.items()
                         for c in concepts])
    lds = {("cad", 0.01): (0.99, 0.97), ("cad", 0.2): (0.98, 0.63), ("coar", 0.01): (0.96, 0.9),
           ("coar", 0.2): (0.987, 0.933), ("maskgrad@0.2", 0.01): (0.95, 0.86), ("maskgrad@0.2", 0.2): (0.99, 0.962),
           ("ablation", 0.2): (0.999, 0.999), ("coar@89", 0.2): (0.1, -0.4)}
    acc = pd.DataFrame([{"concept": c, "method": method(m), "variant": m, "alpha": a, "lds_spearman": v[i],
                         "n_masks": 64,
                         "forward_evals": fpe[m]} for (m, a), v in lds.items() for i, c in enumerate(concepts)])
    vs = pd.DataFrame([{"concept": c, "alpha": 0.2, "method": "maskgrad", "variant": "maskgrad@0.2", "baseline": "coar",
                        "difference": d, "difference_lo": d - 0.01, "difference_hi": d + 0.02}
                       for c, d in (("red", 0.003), ("blue", 0.029))])
    return {"correlations": corr, "cost": cost, "accuracy_vs_cost": acc, "lds_vs_coar": vs}


def test_compare_findings_name_the_trusted_methods_with_their_numbers():
    tables = _tables_for_findings()
    out = compare_findings(tables, n_components=448)
    text = " ".join(out)
    # single: CAD and the midpoint gradient agree equally (lowest 0.98 / 0.985); CAD is cheaper; screen is excluded
    assert out[0].startswith("Single ablations: trust CAD.")
    assert "0.98 to 0.99" in out[0] and "lowest for 'blue', 0.98 [95% CI 0.96, 0.99]" in out[0]
    assert "The midpoint gradient agrees as closely" in out[0] and "the 448 components" in out[0]
    assert "integrated gradients (Spearman 0.60 to 0.90)" in text and "COAR (Spearman 0.72 to 0.90)" in text
    assert "screen" not in out[0]
    # joint: the variant maskgrad@0.2 wins at the largest rate; its share of COAR's cost and its paired intervals
    joint = next(s for s in out if s.startswith("Joint ablations of 20%"))
    assert "trust the mask-averaged gradient (maskgrad@0.2), mean LDS 0.976 (lowest for 'blue', 0.962)" in joint
    assert "4.0% of COAR's 896" in joint
    assert "+0.003 ('red', 95% interval [-0.007, +0.023]) to +0.029 ('blue'" in text
    assert "better for 1, worse for 0 of 2 concepts" in text  # blue's interval excludes 0
    assert "first order does not carry over" in text  # CAD's lowest 0.63 vs 0.962
    # a different run gives different sentences: CAD ties the best at 20% -> it is trusted for joint too
    tables["accuracy_vs_cost"].loc[tables["accuracy_vs_cost"]["method"] == "cad", "lds_spearman"] = 0.999
    assert any(s.startswith("Joint ablations of 20%") and "trust CAD" in s for s in compare_findings(tables))


def test_findings_flag_concepts_whose_corruption_does_not_remove_them():
    from interp.report.evaluation import corruption_table

    df = pd.DataFrame({"method": ["tracing"] * 3 + ["cad"], "concept": ["red", "circle", "blue", "red"]})
    df.attrs["meta"] = {"tracing/red": {"j_clean": 1.0, "j_corrupted": [0.1, 0.2]},
                        "tracing/circle": {"j_clean": 1.0, "j_corrupted": [4.0, 0.5]},
                        "tracing/blue": {"j_clean": 2.0, "j_corrupted": [1.0, 0.6]},
                        "cad/red": {"cost": {"forward_evals": 1, "backward_evals": 1}}}
    table = corruption_table(df)
    assert len(table) == 6 and set(table["method"]) == {"tracing"}
    assert table.set_index(["concept", "noise"])["removed"].to_dict() == pytest.approx(
        {("blue", 0): 0.5, ("blue", 1): 0.7, ("circle", 0): -3.0, ("circle", 1): 0.5, ("red", 0): 0.9,
         ("red", 1): 0.8})
    assert table.groupby("concept")["valid"].first().to_dict() == {"blue": True, "circle": False, "red": True}
    tables = {**_tables_for_findings(), "corruption": table}
    flagged = [s for s in compare_findings(tables) if "corruption" in s]
    assert flagged == ["Causal tracing's corruption does not remove 'circle' (J changed by +300%, -50%) in every noise draw, so "
                       "its scores for that concept are not restorations of the concept: read them as unreliable. "
                       "For the other 2 concepts its draws remove 50% to 90% of J."]
    table["valid"] = True
    assert not [s for s in compare_findings({**tables, "corruption": table}) if "corruption" in s]


def test_edit_findings_pick_the_best_trade_off():
    rows = [("red", "cad", "CAD-Erase 0.2", 1.0, 0.12, 0.57), ("red", "dqf", "Diff-QuickFix+preserve", 1.0, 0.33, 1.0),
            ("red", "coar", "COAR-Edit k=32", 1.0, 1.0, 1.0), ("circle", "cad", "CAD-Erase 0.2", 0.9, 0.3, 0.6)]
    table = pd.DataFrame(rows, columns=["concept", "edit", "label", "target_before", "target_after", "retained_rate"])
    out = edit_findings(table)
    assert out[0] == ("Erasing 'red' (rate 1.00 on held-out prompts unedited): best trade-off Diff-QuickFix+preserve, "
                      "rate 0.33 (-67 points) while the other values keep 1.00 of their rate; strongest erasure "
                      "CAD-Erase 0.2, rate 0.12 (-88 points), keeping 0.57 of the rest.")
    assert out[1].startswith("Erasing 'circle' (rate 0.90 on held-out prompts unedited): no edit keeps 90%")


def test_variants_are_columns_not_names():
    """A variant is told by its columns: the main estimate is named as its method, whatever the names look like."""
    comp = components(units=2, unet_layers=1, text_units=False)
    main = frame(comp, [1.0, 2.0], "coar", "red")
    variant = frame(comp, [1.0, 2.0], "coar", "red", variant="coar@179", estimator="coar", budget=179,
                    mask_alpha=0.05)
    odd = frame(comp, [1.0, 2.0], "my@method-K4", "red")  # a registered name with "@": still a main estimate
    both = pd.concat([main, variant, odd], ignore_index=True)
    assert is_main(both).tolist() == [True, True, False, False, True, True]
    assert variant[["budget", "mask_alpha", "estimator"]].iloc[0].tolist() == [179, 0.05, "coar"]
    assert main[["budget", "mask_alpha"]].isna().all().all()


# -- in a browser ----------------------------------------------------------------------------------------------------
def _check_as_a_reader(seen, n_images=None):
    vw, vh = seen["viewport"]["width"], seen["viewport"]["height"]
    assert (vw, vh) == VIEW, seen["viewport"]
    first = seen["first_screen"]
    assert first["first_finding"]["bottom"] <= vh, first  # the first finding is read without scrolling
    assert first["headline"]["top"] < vh and first["headline"]["bottom"] <= vh, first  # the headline figure too
    if n_images is not None:
        assert len(seen["images"]) == n_images
    for img in seen["images"]:
        assert img["complete"] and img["natural_width"] > 0, img
    toc = seen["toc_after_scroll"]
    assert toc is not None and 0 <= toc["top"] < 50 and toc["bottom"] > 100, toc  # the contents stay in view
    assert seen["details"], "no collapsible blocks"
    for d in seen["details"]:
        assert d["open"] and d["content_height"] > 10, d
    assert seen["sorting"] and all(s["changed"] for s in seen["sorting"]), seen["sorting"]
    for f in seen["filtering"]:  # typing in a filter box leaves exactly the rows that contain the words
        assert f["all_match"] and f["shown"] == f["expected"] >= 1, f
    assert seen["network"] == {"entries": [], "refs": []}, seen["network"]


def test_report_in_chromium(report, tmp_path):
    require_chromium()
    path, sections = report
    shot = tmp_path / "first-screen.png"
    seen = inspect_page(path, width=VIEW[0], height=VIEW[1], screenshot_to=shot, user_data_dir=tmp_path / "profile")
    _check_as_a_reader(seen, n_images=_n_figures(sections))
    assert len(seen["tables"]) == _n_tables(sections) and all(n >= 1 for n in seen["tables"])
    assert len(seen["details"]) == sum(len(s.get("details", [])) for s in sections) + 1
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == VIEW


def test_browser_check_sees_outside_references_and_broken_sorting(tmp_path):
    """The checks above can fail: a page that points outside itself and whose table does not sort is caught."""
    require_chromium()
    page = tmp_path / "bad.html"
    page.write_text('<html><body><section id="summary"><ul><li>x</li></ul></section>'
                    '<img id="headline" src="http://127.0.0.1:9/a.png"><link rel="stylesheet" href="style.css">'
                    '<details><summary>s</summary><p>hidden</p></details>'
                    '<table><thead><tr><th>a</th></tr></thead><tbody><tr><td>2</td></tr><tr><td>1</td></tr></tbody>'
                    '</table></body></html>')
    seen = inspect_page(page, width=VIEW[0], height=VIEW[1], timeout=20)
    assert any("127.0.0.1" in r for r in seen["network"]["refs"]) and any("style.css" in r for r in seen["network"]["refs"])
    assert seen["network"]["entries"]  # the browser tried to fetch them
    assert len(seen["sorting"]) == 1 and not seen["sorting"][0]["changed"]  # a table without the script
    assert not seen["images"][0]["natural_width"]


# -- a default-shaped comparison run, end to end through the compare module's report ---------------------------------
#: The default run's budget and rate variants: (method, estimator, budget, mask rate, noise of the synthetic scores).
DEFAULT_VARIANTS = {
    "coar@89": ("coar", "coar", 89, 0.05, 0.8), "coar@179": ("coar", "coar", 179, 0.05, 0.5),
    "coar@358": ("coar", "coar", 358, 0.05, 0.2),
    "maskgrad@0.01": ("maskgrad", "maskgrad@0.01", 12, 0.01, 0.05),
    "maskgrad@0.2": ("maskgrad", "maskgrad@0.2", 12, 0.2, 0.03),
    "maskgrad@0.05-K4": ("maskgrad", "maskgrad", 4, 0.05, 0.1),
    "maskgrad@0.05-K8": ("maskgrad", "maskgrad", 8, 0.05, 0.07),
    "maskgrad@0.2-K4": ("maskgrad", "maskgrad@0.2", 4, 0.2, 0.1),
    "maskgrad@0.2-K8": ("maskgrad", "maskgrad@0.2", 8, 0.2, 0.06),
    "maskgrad@0.01-K4": ("maskgrad", "maskgrad@0.01", 4, 0.01, 0.1),
    "maskgrad@0.01-K8": ("maskgrad", "maskgrad@0.01", 8, 0.01, 0.07),
}


@pytest.fixture(scope="module")
def default_shaped_run(tmp_path_factory):
    """Synthetic results with the default run's shape: 5 concepts, 448 feed-forward output neurons in 7 blocks, the
    8 methods with COAR's and the mask-averaged gradient's budget and rate variants, 64 held-out masks at 3 rates."""
    from interp.studies import compare
    from interp.studies.compare_config import CompareConfig

    rng = np.random.default_rng(1)
    comp = components(units=64, unet_layers=7, text_units=False)
    cfg = CompareConfig(n_boot=100)
    noise = {"cad": 0.05, "coar": 0.1, "maskgrad": 0.04, "ig": 0.5, "midpoint": 0.05, "screen": 0.02}
    fpe = {"cad": (1, 1), "coar": (896, 0), "maskgrad": (12, 12), "ig": (16, 16), "midpoint": (1, 1),
           "screen": (57, 12)}
    frames, all_maps, heldout = [], [], {}
    for concept in cfg.concepts:
        truth = rng.normal(size=len(comp)) * 1e-5 * (1 + comp["depth"].to_numpy())
        frames.append(frame(comp, truth, "ablation", concept, meta={"cost": {"forward_evals": len(comp), "seconds": 60.0}}))

        def estimate(m, s, **variant):
            return frame(comp, truth + s * np.abs(truth).mean() * 10 * rng.normal(size=len(comp)), m, concept,
                         **variant)

        for m, s in noise.items():
            f, b = fpe[m]
            meta = {"cost": {"forward_evals": f, "backward_evals": b, "seconds": 1.0}, "variant_costs": {}}
            run = [estimate(m, s)]
            for v, (method, est, budget, alpha, sv) in DEFAULT_VARIANTS.items():
                if method == m:
                    run.append(estimate(m, sv, variant=v, estimator=est, budget=budget, mask_alpha=alpha))
                    passes = (budget, 0) if m == "coar" else (budget, budget)
                    meta["variant_costs"][v] = dict(zip(("forward_evals", "backward_evals"), passes))
            run = pd.concat(run, ignore_index=True)
            run.attrs["meta"] = meta
            frames.append(run)
        all_maps.append(tracing_frames(rng, concept, text_layers=3, unet_layers=7)[1])
        frames.append(frame(comp, rng.normal(size=len(comp)), "tracing", concept,  # as the default run: neurons
                            meta={"cost": {"forward_evals": 155}}))
        for alpha in cfg.lds_alphas:
            masks = (rng.random((cfg.heldout_masks, len(comp))) < alpha).astype(float)
            j = 1.0 - masks @ truth + 2e-5 * rng.normal(size=cfg.heldout_masks) * (alpha * 20)
            heldout[(concept, alpha)] = {"masks": masks, "components": list(comp["component"]), "j": j,
                                         "j_intact": 1.0}
    results, maps = concat(frames), pd.concat(all_maps, ignore_index=True)
    tables = compare.build_tables(results, heldout, cfg)
    figures = {k: plots.fig_to_png(f) for k, f in compare.build_figures(results, maps, tables, cfg).items()}
    meta = {"config": cfg.to_dict(), "n_components": len(comp), "versions": {"torch": "x", "diffusers": "y"},
            "machine": {"platform": "test", "threads": 1}, "wall_seconds_this_run": 1.0,
            "seconds_this_run": {k: 1.0 for k in results.attrs["meta"]}, "methods": results.attrs["meta"]}
    out = tmp_path_factory.mktemp("default-shaped")
    with Run(out, cfg.to_dict(), "compare") as run:  # the one run-folder writer
        compare.write_outputs(run, results, maps, tables, figures, meta, cfg)
        run.complete()
    return out


@pytest.mark.slow
def test_default_shaped_compare_report_reads_top_to_bottom(default_shaped_run, tmp_path):
    html = (default_shaped_run / "index.html").read_text()
    assert "Single ablations: trust" in html and "Joint ablations of 20% of the components" in html
    assert len(html) < 4_000_000  # the default report was 6.1 MB
    require_chromium()
    seen = inspect_page(default_shaped_run / "index.html", width=VIEW[0], height=VIEW[1],
                        full_page_to=tmp_path / "full.png", user_data_dir=tmp_path / "profile")
    _check_as_a_reader(seen)
    assert seen["height_closed"] < 8000, seen["height_closed"]
    # budget and rate variants live in collapsed blocks only: no variant row in a table outside <details>
    outside = re.sub(r"<details.*?</details>", "", html, flags=re.S)
    outside = outside.split('id="configuration"')[0]
    rows = re.findall(r"<tr>\s*<td>([^<]*)</td>", outside)
    assert rows and not [r for r in rows if r in DEFAULT_VARIANTS and r != "maskgrad@0.2"], rows


def test_edit_report_reads_top_to_bottom(tmp_path):
    """The editing report, built by analyses.edit_concepts' own report code from a synthetic sweep table."""
    from types import SimpleNamespace

    from analyses.edit_concepts import report_sections, summary_sentences
    from interp.studies.editing.evaluate import PER_VALUE_COLUMNS, SUMMARY_COLUMNS, EvalConfig, tradeoff_plot

    rng = np.random.default_rng(0)
    rows = []
    for concept, before in (("red", 1.0), ("circle", 0.92)):
        for edit, budgets in (("cad-erase", (0.05, 0.1, 0.2)), ("diff-quickfix", (np.nan,)),
                              ("coar-edit", (32, 128, 512))):
            for i, b in enumerate(budgets):
                r = {c: float(rng.random()) for c in SUMMARY_COLUMNS}
                r.update(edit=edit, label=f"{edit} ({b:g})", concept=concept, attribute="color", budget=b,
                         target_before=before, target_after=before * (0.8 - 0.3 * i), n_images=96)
                rows.append(r)
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    per_value = pd.DataFrame([[e, lab, c, b, "other", "shape", v, 8, 0.9, 0.8, 0.89]
                              for e, lab, c, b in table[["edit", "label", "concept", "budget"]].itertuples(index=False)
                              for v in ("square", "cross")], columns=PER_VALUE_COLUMNS)
    tables = {"tradeoff": table, "per_value": per_value,
              "edits": table[["edit", "label", "concept", "n_components"]].assign(mechanism="ablation")}
    uris = {"tradeoff": plots.fig_to_base64_png(tradeoff_plot(table)),
            "tradeoff-drawn": plots.fig_to_base64_png(tradeoff_plot(table, x="retained_drawn"))}
    cfg = EvalConfig.from_total(96)
    summary = edit_findings(table)
    assert summary[0].startswith("Erasing 'red' (rate 1.00 on held-out prompts unedited)")
    out = render_report(tmp_path / "edit", title="Concept editing from attributions", summary=summary,
                        headline=[("Trade-off", uris["tradeoff"])],
                        sections=report_sections(tables, uris, cfg, SimpleNamespace()),
                        config={"args": {"concepts": ["red", "circle"]}, "methods": {}},
                        settings=settings_rows({"args": {"concepts": ["red", "circle"]}}))
    html = out.read_text()
    assert summary_sentences(table)[0].split(":")[0] in unescape(html)  # per-edit sentences, behind a <details>
    require_chromium()
    seen = inspect_page(out, width=VIEW[0], height=VIEW[1], user_data_dir=tmp_path / "profile")
    _check_as_a_reader(seen, n_images=2)
    assert seen["height_closed"] < 4000, seen["height_closed"]


def test_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch):
    import browser

    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        browser.require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium chromium-driver"):
        browser.require_chromium()


def test_missing_optional_parts_fail_in_ci_and_skip_elsewhere(monkeypatch):
    """The notebook, judge and world tests' skips (a [dev] package missing, a tracked model file missing) are
    failures under CI=true."""
    from helpers import import_or_skip, skip_unless_ci

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true, and this test would have been skipped: no shipped"):
        skip_unless_ci("no shipped CLIP judge")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_here is not installed"):
        import_or_skip("no_such_module_here", module_level=True)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no shipped CLIP judge"):
        skip_unless_ci("no shipped CLIP judge")
    with pytest.raises(pytest.skip.Exception, match="no_such_module_here is not installed"):
        import_or_skip("no_such_module_here")
    assert import_or_skip("json").dumps([]) == "[]"

"""The documentation: the README and the site say what runs, and what they say runs.

- The README's "Development" commands are the ones ``.ci/run`` runs.
- The site builds with ``mkdocs build --strict`` (a broken link or cross-reference fails), without executing the
  notebooks (``.ci/run`` builds it again with them executed).
- The Python blocks of "Getting started" run on the shipped concept world, and those of "Your model on a GPU", with its
  ``compare_methods`` commands (``--plan``, then the small run), on a tiny Stable Diffusion folder of the real classes
  (:func:`interp.testing.tiny_stable_diffusion`): the hub id replaced by the folder, the GPU by the CPU, float16 by
  float32. The README's example and recipe are the pages' own lines, so they are tested with them.
- Every public name of ``interp.__all__`` and of the modules the API reference renders has a docstring.
- The built home page and one API page open in headless Chromium (:mod:`browser`), with their title and a
  screenshot that is not blank.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from browser import inspect_page, require_chromium

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SITE_NAME = "diffusion-concept-interp"

#: How the "Your model" page's code becomes runnable offline on a CPU: the model it names, the device and precision.
HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ON_A_CPU = (('device="cuda"', 'device="cpu"'), ('dtype="float16"', 'dtype="float32"'))
ON_A_CPU_ARGS = {"--device": "cpu", "--precision": "float32"}


def fenced_blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` in a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def section(text: str, heading: str) -> str:
    """The part of a Markdown text under the ``## heading`` line, up to the next ``## `` heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [ln.split("  #")[0].strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


# -- README and CI ---------------------------------------------------------------------------------------------------
def test_readme_development_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    (block,) = fenced_blocks(section(readme, "Development"), "bash")
    commands = shell_commands(block)
    assert len(commands) >= 4, commands  # setup, two test tiers, the documentation build
    ci_lines = {" ".join(ln.replace("pip install -q ", "pip install ").split()) for ln in ci.splitlines()}
    for command in commands:
        assert " ".join(command.split()) in ci_lines, f".ci/run does not run the README's {command!r}"


def test_readme_is_short_and_keeps_no_measurement_log():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for word in ("session", "GFLOP"):
        assert word not in readme, f"the README mentions {word!r}: measurements belong in docs/"
    assert "docs/report.png" in readme and (ROOT / "docs" / "report.png").exists()


def test_readme_example_and_recipe_are_the_pages_own():
    """The README's Python example and "your own model" commands are lines of the pages this module runs."""
    readme = (ROOT / "README.md").read_text()
    started = "\n".join(fenced_blocks((DOCS / "getting-started.md").read_text(), "python"))
    (example,) = fenced_blocks(section(readme, "The library in ten lines"), "python")
    code = [ln for ln in example.splitlines() if ln.strip()]
    assert len(code) <= 10
    for line in code:
        assert line in started, f"README line not in docs/getting-started.md: {line!r}"
    page = [" ".join(c.split()) for b in fenced_blocks((DOCS / "your-model.md").read_text(), "bash")
            for c in shell_commands(b)]
    recipe = [c for b in fenced_blocks(section(readme, "Your own model"), "bash") for c in shell_commands(b)]
    assert any("--plan" in c for c in recipe) and len(recipe) >= 2
    for command in recipe:
        assert " ".join(command.split()) in page, f"README command not in docs/your-model.md: {command!r}"


# -- the site --------------------------------------------------------------------------------------------------------
# The site tests are ``slow`` (a ``mkdocs build`` of every page and the API reference, ~10 s, then a browser), and on
# one xdist worker (their group), so that the module's site is built once.
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built with ``mkdocs build --strict`` into a temporary folder, notebooks not executed."""
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("CI=true but mkdocs is not installed: .ci/run must install the '.[docs]' extra")
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "INTERP_DOCS_EXECUTE": "false", "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("docs-site")
def test_site_builds_strict_with_every_page(site):
    for page in ("index.html", "getting-started.html", "your-model.html", "concepts.html", "methods/index.html",
                 "results.html", "cli.html", "api/index.html", "api/methods.html", "notebooks/01_quickstart.html"):
        assert (site / page).exists(), page
    methods = (site / "api" / "methods.html").read_text()
    for name in ("interp.methods.base.attribute", "interp.methods.coar.COARConfig", "interp.methods.cad.CAD"):
        assert f'id="{name}"' in methods, name
    cli = (site / "cli.html").read_text()
    assert "usage: python -m analyses.compare_methods" in cli and "cli-help" not in cli


def _screenshot_is_not_blank(png: Path) -> None:
    from PIL import Image, ImageStat

    image = Image.open(png).convert("L")
    assert image.size[0] >= 800 and image.size[1] >= 400, image.size
    stat = ImageStat.Stat(image)
    assert stat.stddev[0] > 10, f"{png.name} looks blank (pixel std {stat.stddev[0]:.1f})"
    dark = sum(image.histogram()[:128]) / (image.size[0] * image.size[1])
    assert 0.005 < dark < 0.95, f"{png.name}: {dark:.1%} of the pixels are dark"  # text on a page, not one colour


@pytest.mark.slow
@pytest.mark.xdist_group("docs-site")
@pytest.mark.parametrize("page, title", [("index.html", SITE_NAME), ("api/methods.html", "Methods")])
def test_site_opens_in_a_browser(site, tmp_path, page, title):
    require_chromium()
    shot = tmp_path / (page.replace("/", "-") + ".png")
    seen = inspect_page(site / page, screenshot_to=shot, check_sorting=False)
    assert title in seen["title"] and SITE_NAME in seen["title"], seen["title"]
    assert all(i["natural_width"] > 0 for i in seen["images"]), seen["images"]  # the report's screenshot included
    if page == "index.html":
        assert any(i["natural_width"] > 0 for i in seen["images"]), "the home page shows no image"
    assert not [e for e in seen["network"]["entries"] if e.startswith("http")], seen["network"]["entries"]
    _screenshot_is_not_blank(shot)


# -- the pages' code runs --------------------------------------------------------------------------------------------
def run_blocks(blocks: list[str], cwd: Path) -> dict:
    """Execute Python blocks in order, in one namespace, in ``cwd``; returns the namespace."""
    namespace: dict = {"__name__": "__docs__"}
    old = Path.cwd()
    os.chdir(cwd)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"<block {i}>", "exec"), namespace)
    finally:
        os.chdir(old)
    return namespace


def test_getting_started_python_runs_on_the_concept_world(tmp_path):
    blocks = fenced_blocks((DOCS / "getting-started.md").read_text(), "python")
    assert blocks
    ns = run_blocks(blocks, tmp_path)
    assert len(ns["cad"]) == len(ns["comps"]) == len(ns["truth"])
    assert ns["cad"]["score"].corr(ns["truth"]["score"], method="spearman") > 0.9


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from interp.testing import tiny_stable_diffusion

    return tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd") / "sd1", style="sd1")


def on_tiny_sd(code: str, folder: Path) -> str:
    assert HUB_ID in code
    code = code.replace(HUB_ID, str(folder))
    for gpu, cpu in ON_A_CPU:
        code = code.replace(gpu, cpu)
    return code


def test_your_model_python_runs_on_a_tiny_sd_folder(tmp_path, tiny_sd):
    blocks = fenced_blocks((DOCS / "your-model.md").read_text(), "python")
    assert blocks
    ns = run_blocks([on_tiny_sd(b, tiny_sd) for b in blocks], tmp_path)
    assert len(ns["cad"]) == len(ns["truth"]) == len(ns["comps"]) > 0
    assert (tmp_path / "cache").is_dir()  # store="cache/" kept the results


@pytest.mark.parametrize("step", [
    "plan",
    # the small run: the page's own configuration (default timesteps and bootstrap) on SD-shaped passes, ~20 s
    pytest.param("run", marks=pytest.mark.slow),
])
def test_your_model_recipe_runs_on_a_tiny_sd_folder(tmp_path, tiny_sd, capsys, step):
    """``--plan`` first, then the small run, as the page and the README write them; each its own case, the plan in
    the fast tier, the run in the slow one."""
    from analyses import compare_methods

    commands = [c for b in fenced_blocks((DOCS / "your-model.md").read_text(), "bash") for c in shell_commands(b)
                if c.startswith("python -m analyses.compare_methods")]
    assert len(commands) >= 2 and "--plan" in commands[0], commands
    commands = commands[:1] if step == "plan" else commands[1:]
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        for command in commands:
            argv = shlex.split(on_tiny_sd(command, tiny_sd))[3:]
            for flag, value in ON_A_CPU_ARGS.items():
                if flag in argv:
                    argv[argv.index(flag) + 1] = value
            assert compare_methods.main(argv + ["--no-progress"]) == 0, command
            if "--plan" in argv:
                assert "UNet rows" in capsys.readouterr().out
            else:
                out = tmp_path / argv[argv.index("--out") + 1]
                assert (out / "index.html").exists() and (out / "results.parquet").exists()
    finally:
        os.chdir(old)


# -- docstrings ------------------------------------------------------------------------------------------------------
#: Methods of core classes in modules that were being rewritten when this test was written (their owners document
#: them); every other public name must have a docstring.
PENDING: set[str] = set()  # public names still without a docstring: none


def api_names() -> list[str]:
    """Dotted names of what the API reference renders: each ``::: module`` of docs/api/*.md, with its ``members:``
    list, or every public name of the module (its ``__all__``, else its own functions and classes)."""
    names = []
    for page in sorted((DOCS / "api").glob("*.md")):
        text = page.read_text()
        for m in re.finditer(r"^::: ([\w.]+)\n((?:    .*\n)*)", text, re.MULTILINE):
            module, options = m.group(1), m.group(2)
            listed = re.findall(r"^        - (\w+)$", options, re.MULTILINE)
            if "members: false" in options:
                names.append(module)
                continue
            if not listed:
                mod = importlib.import_module(module)
                listed = list(getattr(mod, "__all__", None) or [
                    n for n, v in vars(mod).items() if not n.startswith("_")
                    and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module])
            names += [module] + [f"{module}.{n}" for n in listed]
    return names


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(dotted)


def _own_doc(obj) -> str | None:
    """The object's own docstring (a class's not inherited, nor the signature a dataclass writes for it)."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        return None if doc and doc.startswith(obj.__name__ + "(") else doc
    return getattr(obj, "__doc__", None)


def test_every_public_name_has_a_docstring():
    import interp

    names = [f"{_resolve_core(n)}" for n in interp.__all__] + api_names()
    missing = []
    for name in dict.fromkeys(names):
        if name in PENDING:
            continue
        obj = _resolve(name)
        if not (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)):
            continue  # data (REGISTRY, constants): documented by the module
        if not (_own_doc(obj) or "").strip():
            missing.append(name)
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_") or f"{name}.{attr}" in PENDING:
                    continue
                fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else (
                    value.fget if isinstance(value, property) else value)
                if inspect.isfunction(fn) and not (fn.__doc__ or "").strip():
                    missing.append(f"{name}.{attr}")
    assert not missing, "public names without a docstring: " + ", ".join(missing)


def _resolve_core(name: str) -> str:
    """``interp.<name>``'s defining module and name."""
    import interp

    return f"{interp._EXPORTS[name]}.{name}"


def test_interp_exports_a_small_documented_core():
    import interp

    assert interp.__all__ == sorted(interp.__all__) and len(interp.__all__) <= 25
    assert set(interp.__all__) <= set(dir(interp))
    for internal in ("tune_cpu_allocator", "notebook_setup", "world_concept", "REGISTRY"):
        assert internal not in dir(interp)
        with pytest.raises(AttributeError, match=internal):
            getattr(interp, internal)
    index = (DOCS / "api" / "index.md").read_text()
    for name in interp.__all__:
        assert f"`interp.{name}`" in index, f"docs/api/index.md does not list interp.{name}"

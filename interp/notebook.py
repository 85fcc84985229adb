"""Setup shared by the notebooks: quiet library chatter and read the size switch the test suite sets."""

from __future__ import annotations

import os
import warnings


def notebook_setup() -> bool:
    """Silence deprecation notices and loading bars of the libraries underneath (the suite's own tqdm bars stay);
    returns ``SMALL``: True when ``INTERP_NOTEBOOK_SMALL=1`` (the tests run every notebook in a small configuration,
    seconds instead of minutes)."""
    import diffusers
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
    diffusers.utils.logging.disable_progress_bar()  # no "Loading pipeline components" bars
    transformers.utils.logging.disable_progress_bar()
    return os.environ.get("INTERP_NOTEBOOK_SMALL") == "1"

"""Setup shared by the notebooks: quiet library chatter and read the size switch the test suite sets."""

from __future__ import annotations

import os
import warnings

from interp.core.runtime import hide_library_progress_bars


def notebook_setup() -> bool:
    """Silence deprecation notices and loading bars of the libraries underneath (the suite's own tqdm bars stay);
    returns ``SMALL``: True when ``INTERP_NOTEBOOK_SMALL=1`` (the tests run every notebook in a small configuration,
    seconds instead of minutes)."""

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
    hide_library_progress_bars()
    return os.environ.get("INTERP_NOTEBOOK_SMALL") == "1"

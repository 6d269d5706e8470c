"""How wanpair's processes log: the `wanpair` command and the training workers it starts
(`wanpair.train.worker`) set up logging the same way, so a worker's lines read like the command's own."""

from __future__ import annotations

import logging
import os
import sys


def configure_logging(verbose: bool) -> None:
    """wanpair's own INFO lines (what was loaded from where, the memory plan) always; the libraries' only
    with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("wanpair").setLevel(logging.INFO)
    if not verbose:
        # diffusers and transformers read these when they set up their loggers; importing them here just
        # to lower their verbosity would cost every command (`inspect`, `check`) seconds
        for lib in ("diffusers", "transformers"):
            os.environ.setdefault(f"{lib.upper()}_VERBOSITY", "error")
            if f"{lib}.utils.logging" in sys.modules:  # already imported (a caller in the same process)
                sys.modules[f"{lib}.utils.logging"].set_verbosity_error()
        for noisy in ("accelerate", "peft"):
            logging.getLogger(noisy).setLevel(logging.ERROR)

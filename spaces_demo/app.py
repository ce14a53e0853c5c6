"""Hugging Face Space entry point for hf-lorafa: serve a base model and its merged fine-tuned adapters.

Run locally: `python spaces_demo/app.py --base-model PATH_OR_ID --adapter PATH_OR_ID [--adapter ...] [--host --port]`.
On Spaces, set the variables `HF_LORAFA_BASE_MODEL` and `HF_LORAFA_ADAPTERS` (comma or space separated) instead.
The logic lives in `hf_lorafa.cli.demo` (also `hf-lorafa demo`); this file only makes it importable and calls it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:
    import hf_lorafa  # noqa: F401  (installed, or uploaded next to this file on a Space)
except ImportError:  # running from a clone of the repository without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_lorafa.cli.demo import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])

"""Secrets never leave the process: token-shaped strings and given secrets are masked in any text we write or raise.

A leaf module (no package imports) so that saving, the Hub client and the model card all share one rule.
"""

from __future__ import annotations

import os
import re
from typing import Any

# Real tokens are "hf_" + 34 characters; 16 keeps ordinary identifiers such as `hf_lorafa` untouched.
TOKEN_PATTERN = re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{16,}\b")
SECRET_KEYS = re.compile(r"token|secret|password|api_key", re.IGNORECASE)


def scrub_secrets(text: str, *secrets: str | None) -> str:
    """Mask every token-shaped string and every given secret in `text`.

    Example:

    ```python
    >>> scrub_secrets("401 for token hf_abcdefghijklmnopqrstuvwxyz0123")
    '401 for token hf_***'
    ```
    """
    from huggingface_hub import get_token

    for secret in {*secrets, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"), get_token()}:
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return TOKEN_PATTERN.sub(lambda m: m.group(0).split("_", 1)[0] + "_***", text)


def drop_secrets(value: Any) -> Any:
    """Fields named like a secret (e.g. `hub_token`) whose value is a string never reach the card."""
    if isinstance(value, dict):
        return {
            k: drop_secrets(v) for k, v in value.items() if not (SECRET_KEYS.search(str(k)) and isinstance(v, str))
        }
    if isinstance(value, list):
        return [drop_secrets(v) for v in value]
    return value

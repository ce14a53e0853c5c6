"""Publish an adapter folder to the Hugging Face Hub with its generated model card.

`push_adapter` refreshes the card, then uses `huggingface_hub.HfApi` (create repo, one commit of the adapter files).
A failure is ONE `HubUploadError` that says which step failed and why (no token, unreachable endpoint, token
rejected, HTTP status), raised within seconds, with the token masked; the local folder is left as it was.
Loading from the Hub is `load_adapter(model, "user/repo", revision=...)` (`saving.resolve_adapter_dir`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..adapter_io.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, HUB_FILES
from ..redact import scrub_secrets
from .card import write_model_card

logger = logging.getLogger(__name__)

# A dead or black-holed endpoint must fail in seconds, not hang: huggingface_hub's shared HTTP client has no
# timeout, so the first request (a token check) gets one; once it answered, the endpoint is known to be alive.
PROBE_TIMEOUT_S = 8.0
LOGIN_HINT = (
    "log in with `hf auth login` (`huggingface-cli login` on huggingface_hub < 1.0), set the HF_TOKEN environment "
    "variable, or pass `token=` (`--hub_token` / `--token` on the command line)"
)


class HubUploadError(RuntimeError):
    """A push to the Hub failed; the message says which step and why, never the token."""


def _upload_files(folder: Path) -> list[Path]:
    """The files a Hub repo of this adapter holds (what `load_adapter` downloads); never checkpoints."""
    from fnmatch import fnmatch

    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in HUB_FILES))


def _reason(err: Exception, endpoint: str, repo_id: str) -> str:
    """One sentence saying what went wrong, from the exception huggingface_hub raised."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # By class name: huggingface_hub < 1.0 raises requests' exceptions, 1.x httpx's, 2.x those of its fork httpx2.
    kinds = {cls.__name__ for cls in type(err).__mro__}
    if isinstance(err, OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to push"
    if kinds & {"TimeoutException", "Timeout"}:
        return (
            f"the endpoint {endpoint} did not answer in time ({type(err).__name__}); check the network or HF_ENDPOINT"
        )
    if kinds & {"TransportError", "ConnectionError"}:
        return (
            f"could not reach the endpoint {endpoint} ({type(err).__name__}: {err}); check the network or HF_ENDPOINT"
        )
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        server = str(err).strip().splitlines()[0][:300]
        if status == 401:
            return f"the token was rejected (HTTP 401: invalid or expired); {LOGIN_HINT} with a valid write token"
        if status == 403:
            return f"the token has no write access to {repo_id!r} (HTTP 403); use a token with the 'write' role"
        if status >= 500:
            return f"the Hub answered with a server error (HTTP {status}): {server}; try again later"
        return f"the Hub refused the request (HTTP {status}): {server}"
    if isinstance(err, ValueError) and "metadata" in str(err):
        return f"the Hub rejected the model card's metadata: {err}"
    return f"{type(err).__name__}: {err}"


def push_adapter(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    card_extra: dict[str, Any] | None = None,
) -> str:
    """Upload an adapter folder (adapter, card, `hf_lorafa.json`, memory figures) to a Hub model repo.

    The card (`README.md`) is refreshed first; the other local files are only read.

    Args:
        folder (`str` or `os.PathLike`): the adapter folder ([`save_adapter`] / `trainer.save_model()`).
        repo_id (`str`): the Hub repo, `"user/name"` or `"org/name"`; created if missing.
        token (`str`, *optional*): a Hub token with write access; defaults to HF_TOKEN or the stored login.
        private (`bool`, *optional*, defaults to `False`): create the repo private (an existing repo keeps its
            visibility).
        revision (`str`, *optional*): branch to commit to (created from `main` if missing); defaults to `main`.
        commit_message (`str`, *optional*): defaults to `"Upload adapter with hf-lorafa"`.
        endpoint (`str`, *optional*): Hub endpoint; defaults to HF_ENDPOINT or https://huggingface.co.
        card_extra (`dict`, *optional*): fields for the card, as in [`write_model_card`]'s `extra`.

    Returns:
        `str`: the URL of the commit.

    Raises:
        `HubUploadError`: no token, unreachable endpoint, token rejected, or an HTTP error, with the step that
            failed; the token never appears in the message.

    Example:

    ```python
    >>> push_adapter("outputs/my-adapter", "me/my-adapter", private=True)  # doctest: +SKIP
    'https://huggingface.co/me/my-adapter/commit/3f2a...'
    ```
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    directory = Path(folder)
    if not ((directory / ADAPTER_CONFIG).is_file() and (directory / ADAPTER_WEIGHTS).is_file()):
        raise ValueError(
            f"`folder`={str(directory)!r} is not an adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} needed); "
            "save the adapter first with save_adapter(model, folder) or trainer.save_model()."
        )
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"`repo_id` must look like 'user/my-adapter'; got {repo_id!r}.")
    # Checked before any network call: without a token every step would fail with a less helpful 401.
    token = token or get_token()
    if not token:
        raise HubUploadError(f"Cannot push {str(directory)!r} to {repo_id!r}: no Hub token found; {LOGIN_HINT}.")
    write_model_card(directory, extra={**(card_extra or {}), "repo_id": repo_id})
    api = HfApi(endpoint=endpoint, token=token)
    step = "checking the token"
    try:
        _check_token(api, token)
        step = f"creating the repo {repo_id!r}"
        api.create_repo(repo_id, exist_ok=True, private=private)
        if revision not in (None, "main"):
            step = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "uploading the files"
        # One explicit commit of exactly the adapter's files, not `upload_folder`: with hf_xet installed that runs
        # a pipeline retrying a failed commit with backoff (~23 s on a 5xx); `create_commit` fails at once.
        info = api.create_commit(
            repo_id,
            operations=[
                CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in _upload_files(directory)
            ],
            commit_message=commit_message or "Upload adapter with hf-lorafa",
            revision=revision,
        )
    except Exception as err:  # noqa: BLE001 - every failure becomes the one documented error
        message = (
            f"Pushing {str(directory)!r} to {repo_id!r} at {api.endpoint} failed while {step}: "
            f"{_reason(err, api.endpoint, repo_id).rstrip('.')}. The local adapter folder is unchanged."
        )
        raise HubUploadError(scrub_secrets(message, token)) from None
    return str(info.commit_url)


def push_checkpoint(folder: str | os.PathLike, repo_id: str, *, step: int, **kwargs: Any) -> bool:
    """[`push_adapter`] for a checkpoint saved mid-training (`hub_strategy="every_save"`); never raises for the Hub.

    A Hub outage must not end a run that may have hours left: a failed push is a warning, the next checkpoint save
    pushes again (it uploads the whole adapter, so nothing is missed), and the final `push_to_hub()` raises.
    Returns whether the push went through.
    """
    try:
        push_adapter(folder, repo_id, commit_message=f"Training in progress, step {step}", **kwargs)
    except HubUploadError as err:
        logger.warning("%s Training goes on; the next checkpoint save pushes again.", err)
        return False
    return True


def _check_token(api, token: str) -> None:
    """The first request, with a timeout (see PROBE_TIMEOUT_S): a dead endpoint or a rejected token fails here."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    response = get_session().get(
        f"{api.endpoint}/api/whoami-v2", headers=build_hf_headers(token=token), timeout=PROBE_TIMEOUT_S
    )
    hf_raise_for_status(response)


def create_hub_repo(repo_id: str, *, token: str | None = None, private: bool = False) -> str:
    """Create (or find) the Hub repo a training run will push to, before training starts.

    What `Trainer.init_hf_repo` does for `push_to_hub=True`, with `push_adapter`'s errors: one `HubUploadError`
    naming the step and the fix, within seconds, the token masked. Returns the repo id.
    """
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise HubUploadError(f"`push_to_hub` is set but no Hub token was found to create {repo_id!r}; {LOGIN_HINT}.")
    api = HfApi(token=token)
    step = "checking the token"
    try:
        _check_token(api, token)
        step = f"creating the repo {repo_id!r}"
        return api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    except Exception as err:  # noqa: BLE001 - every failure becomes the one documented error
        message = (
            f"`push_to_hub` is set but {step} at {api.endpoint} failed: {_reason(err, api.endpoint, repo_id)}. "
            "Fix it or drop `push_to_hub`; nothing was trained yet."
        )
        raise HubUploadError(scrub_secrets(message, token)) from None

"""Publish an adapter folder to the Hugging Face Hub with its generated model card.

`push_adapter` writes the card if the folder has none, then uses `huggingface_hub.HfApi` (create repo, one commit of
the adapter files). Every request has a timeout and each step is retried with backoff on a timeout, a dropped
connection, 429 or 5xx. A failure is ONE `HubUploadError` that says which step failed and why (no token, unreachable
endpoint, token rejected, HTTP status), raised within a bounded time, with the token masked; the local folder is left
as it was. A repo id that contains a token is refused before any request, without repeating it.
Loading from the Hub is `load_adapter(model, "user/repo", revision=...)` (`saving.resolve_adapter_dir`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..adapter_io.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, HUB_FILES
from ..redact import TOKEN_PATTERN, scrub_secrets
from .card import write_model_card

logger = logging.getLogger(__name__)

# A dead or black-holed endpoint must fail in seconds, not hang: huggingface_hub's shared HTTP client has no
# timeout, so the first request (a token check) gets one; once it answered, the endpoint is known to be alive.
PROBE_TIMEOUT_S = 8.0
# Every later request (create repo, commit, uploads): huggingface_hub's own knob for its request timeouts, with a
# longer default than its 10 s since a commit of large files may take a while to be answered.
REQUEST_TIMEOUT_S = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or 60)
ATTEMPTS = 3  # per step, on a timeout, a dropped connection, 429 or 5xx
BACKOFF_S = 0.5  # before the 2nd attempt; doubled before each next one
LOGIN_HINT = (
    "log in with `hf auth login` (`huggingface-cli login` on huggingface_hub < 1.0), set the HF_TOKEN environment "
    "variable, or pass `token=` (`--hub_token` / `--token` on the command line)"
)


class HubUploadError(RuntimeError):
    """A push to the Hub failed; the message says which step and why, never the token."""


def _upload_files(folder: Path) -> list[Path]:
    """The files a Hub repo of this adapter holds (what `load_adapter` downloads); never checkpoints.

    A link whose target lies outside the folder is refused, not skipped: uploading it would publish whatever file it
    points at (a user's notes, a key), and leaving it out silently would publish a repo without a file the user sees.
    """
    from fnmatch import fnmatch

    files = sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in HUB_FILES))
    inside = folder.resolve()
    for path in files:
        if inside not in path.resolve().parents:
            raise ValueError(
                f"{str(path)!r} is a link to a file outside the adapter folder; hf-lorafa does not upload what such a "
                "link points at. Replace the link by a copy of the file you mean to publish, or remove it."
            )
    return files


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


def _transient(err: Exception) -> bool:
    """Whether trying the same request again may work (huggingface_hub's own backoff retries the same)."""
    from huggingface_hub.errors import HfHubHTTPError

    if {cls.__name__ for cls in type(err).__mro__} & {
        "TimeoutException",
        "Timeout",
        "TransportError",
        "ConnectionError",
    }:
        return True
    status = getattr(getattr(err, "response", None), "status_code", None) if isinstance(err, HfHubHTTPError) else None
    return status is not None and (status == 429 or status >= 500)


def _retrying(call: Callable[[], Any]) -> Any:
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - only transient failures are retried, the rest raise at once
            if attempt == ATTEMPTS - 1 or not _transient(err):
                raise
            logger.info("Hub request failed (%s); retrying in %.1f s", type(err).__name__, BACKOFF_S * 2**attempt)
            time.sleep(BACKOFF_S * 2**attempt)


@contextmanager
def bounded_requests() -> Iterator[None]:
    """Give huggingface_hub's shared HTTP client a timeout for the length of a push, then put the caller's back.

    Its client is built with `timeout=None` (1.x/2.x: httpx; < 1.0: requests without one), so a Hub that accepts the
    connection and never answers would hang the commit forever. The factory in use is read from the private global
    that `set_client_factory` / `configure_http_backend` set (huggingface_hub 0.34-2.4), so a user's own client
    factory (proxy, certificates) is kept, only bounded.
    """
    from huggingface_hub.utils import _http

    timeout = REQUEST_TIMEOUT_S
    if hasattr(_http, "set_client_factory"):  # huggingface_hub >= 1.0
        previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

        def factory():
            client = previous()
            client.timeout = timeout
            return client

        install, restore = (lambda: _http.set_client_factory(factory)), (lambda: _http.set_client_factory(previous))
    else:  # requests: a default timeout for every call that does not set its own
        previous = _http._GLOBAL_BACKEND_FACTORY

        def factory():
            session = previous()
            request = session.request
            session.request = lambda *a, **kw: request(*a, **{"timeout": timeout, **kw})
            return session

        install = lambda: _http.configure_http_backend(factory)  # noqa: E731
        restore = lambda: _http.configure_http_backend(previous)  # noqa: E731
    install()
    try:
        yield
    finally:
        restore()


def check_repo_id(repo_id: Any) -> None:
    """Refuse a repo id that is not `user/name`, or that holds a token (it would name a public repo after it)."""
    if isinstance(repo_id, str) and TOKEN_PATTERN.search(repo_id):
        raise ValueError(
            "`repo_id` contains a Hub token (a string starting with 'hf_' followed by its secret), not a repo name; "
            "pass 'user/my-adapter' and the token as `token=` (`--token`). The id is not repeated here; if it was "
            "typed in a shell, revoke the token at https://huggingface.co/settings/tokens."
        )
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"`repo_id` must look like 'user/my-adapter'; got {repo_id!r}.")


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

    The card (`README.md`) is generated only when the folder has none (an existing one, edited or not, is uploaded
    as it is); the other local files are only read. A file that is a link to outside the folder is refused.

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
    check_repo_id(repo_id)
    # Checked before any network call: without a token every step would fail with a less helpful 401.
    token = token or get_token()
    if not token:
        raise HubUploadError(f"Cannot push {str(directory)!r} to {repo_id!r}: no Hub token found; {LOGIN_HINT}.")
    if not (directory / "README.md").exists():
        write_model_card(directory, extra={**(card_extra or {}), "repo_id": repo_id})
    files = _upload_files(directory)  # before any request: a link out of the folder is refused here
    api = HfApi(endpoint=endpoint, token=token)
    step = "checking the token"
    try:
        with bounded_requests():
            _retrying(lambda: _check_token(api, token))
            step = f"creating the repo {repo_id!r}"
            _retrying(lambda: api.create_repo(repo_id, exist_ok=True, private=private))
            if revision not in (None, "main"):
                step = f"creating the branch {revision!r}"
                _retrying(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
            step = "uploading the files"
            # One explicit commit of exactly the adapter's files, not `upload_folder`: with hf_xet installed that
            # runs a pipeline retrying a failed commit for ~23 s on a 5xx; here the retries are ours and bounded.
            info = _retrying(
                lambda: api.create_commit(
                    repo_id,
                    operations=[CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files],
                    commit_message=commit_message or "Upload adapter with hf-lorafa",
                    revision=revision,
                )
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

    check_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise HubUploadError(f"`push_to_hub` is set but no Hub token was found to create {repo_id!r}; {LOGIN_HINT}.")
    api = HfApi(token=token)
    step = "checking the token"
    try:
        with bounded_requests():
            _retrying(lambda: _check_token(api, token))
            step = f"creating the repo {repo_id!r}"
            return _retrying(lambda: api.create_repo(repo_id, exist_ok=True, private=private)).repo_id
    except Exception as err:  # noqa: BLE001 - every failure becomes the one documented error
        message = (
            f"`push_to_hub` is set but {step} at {api.endpoint} failed: {_reason(err, api.endpoint, repo_id)}. "
            "Fix it or drop `push_to_hub`; nothing was trained yet."
        )
        raise HubUploadError(scrub_secrets(message, token)) from None

"""The Hugging Face Hub's plumbing, shared by training (`wanpair.train.hub_push`: `[hub]`, `--resume-from-hub`)
and sharing (`wanpair.export.hub`: `wanpair push`): the hub's address, repository names, the token check, the
repository's folders and the wording of the hub's errors. It imports nothing of wanpair but its errors, so that
the project file's reader, training and sharing may all use it.

Transfers, tokens (HF_TOKEN, `hf auth login`), retries and progress bars are huggingface_hub's own; the hub's
address is HF_ENDPOINT's, read when called (as `wanpair download` reads it). wanpair never writes the token.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import WanpairError

if TYPE_CHECKING:
    from .project import Project

# A repository holds the finished LoRAs, README.md and the workflow at its top, the samples under samples/,
# intermediate LoRAs under intermediate/ and training states under state/ (the run folder's name for them).
SAMPLES, INTERMEDIATE, STATES = "samples", "intermediate", "state"


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def repo_problem(repo: str) -> str:
    """Why `repo` is not a model repository's USER/NAME (huggingface_hub's own rule, and a user or organisation
    named), or "" when it is one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        return str(e).split(":")[0]
    return "" if "/" in repo else "it names no user or organisation"


def parse_repo(value: str, option: str, revision: bool = False) -> tuple[str, str | None]:
    """`USER/NAME` (and with `revision`, `USER/NAME@REVISION`) -> (repo, revision or None)."""
    repo, at, rev = value.partition("@") if revision else (value, "", "")
    if repo_problem(repo) or (at and not rev):
        raise WanpairError(f"{option} {value!r}: give a model repository as USER/NAME (or ORG/NAME)"
                           + (", and a branch, tag or commit after @ if you want one." if revision else "."))
    return repo, rev or None


NO_TOKEN = ("needs a Hugging Face token with write access, and none was found: set HF_TOKEN, or run `hf auth login` "
            "once on this machine")


def has_token() -> bool:
    """Whether huggingface_hub finds a token (in HF_TOKEN or in what `hf auth login` stored)."""
    from huggingface_hub import get_token

    return bool(get_token())


def hub_problems(project: Project) -> list[str]:
    """What stops `[hub]` pushing during training, found before any model loads: a token."""
    if not project.hub.repo or has_token():
        return []
    return [(f"{project.path}: [hub] repo = {project.hub.repo!r} pushes each saved LoRA to the Hub, which {NO_TOKEN} "
             "(or remove [hub] repo to train without pushing).")]


def short_reason(e: BaseException) -> str:
    """The hub's refusal or the network's failure, in a few words: what one log line says."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return "the hub refused the token (401: missing, wrong or expired)"
    if status == 403:
        return "the token may not write there (403: a read-only token, or another user's or organisation's repository)"
    cause = e.__cause__ or e.__context__
    detail = f"{str(e).rstrip('.')}: {type(cause).__name__}: {cause}" if cause is not None and str(cause) not in str(e) \
        else str(e)
    first = detail.splitlines()[0] if detail else ""
    return f"{type(e).__name__}: {first}" if status is None else f"{status}: {first}"


def hub_error(e: BaseException, repo: str, doing: str, writes: bool = True) -> WanpairError:
    """The hub's refusal, or the network's failure, said as what to do about it (`writes`: the call uploads)."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return WanpairError(f"{doing}: {short_reason(e)}. Set HF_TOKEN, or run `hf auth login`, with a token that may "
                            f"{'write to' if writes else 'read'} {repo}.")
    if isinstance(e, RevisionNotFoundError):
        return WanpairError(f"{doing}: {repo} has no such branch, tag or commit ({short_reason(e)}).")
    if isinstance(e, RepositoryNotFoundError):
        return WanpairError(f"{doing}: {repo} does not exist, or your token may not see it (a private repository). "
                            "Check the name and HF_TOKEN / `hf auth login`.")
    return WanpairError(f"{doing} was interrupted ({short_reason(e)}). Check the network connection (or HF_ENDPOINT, "
                        f"for a mirror: {endpoint()}) and run the same command again.")

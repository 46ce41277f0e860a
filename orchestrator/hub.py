"""Hub-style model names (``org/name``) resolved from the local Hugging Face cache, offline.

orch never downloads: a name such as ``meta-llama/Llama-3.1-8B`` is looked up in the
cache that ``hf download`` / ``huggingface-cli download`` fill, with plain file-system
reads (no huggingface_hub import, no network), so ``orch plan`` stays fast and torch-free.

The cache folder is the one huggingface_hub uses: ``HF_HUB_CACHE``, else the legacy
``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``,
else ``~/.cache/huggingface/hub``. Inside it a repository lives in
``models--<org>--<name>/``: ``refs/main`` holds the commit hash of the downloaded revision
and ``snapshots/<hash>/`` the files (links into ``blobs/``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Optional

# What the Hub accepts as a model id: owner/name, letters, digits, '-', '_', '.'.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class NotCached(ValueError):
    """A hub-style model name that the local cache cannot serve (the message is one line)."""


def is_repo_id(name: str) -> bool:
    """True for ``org/name`` (exactly one slash, Hub characters, no '..')."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name


def cache_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """The Hugging Face hub cache folder, by huggingface_hub's rules (see the module docstring)."""
    env = os.environ if env is None else env
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


def snapshot_folder(repo_id: str, env: Optional[Mapping[str, str]] = None) -> Path:
    """The cached snapshot folder of ``repo_id``'s main revision. Raises NotCached (one line).

    ``refs/main`` names the revision; a cache filled by ``hf download --revision <hash>``
    has no ref, and then a single snapshot is taken as the one meant.
    """
    cache = cache_dir(env)
    try:
        return _snapshot_in(cache, repo_id)
    except (OSError, UnicodeDecodeError) as exc:  # an unreadable ref or snapshot folder
        raise NotCached(f"{repo_id!r}: cannot read the Hugging Face cache {cache}: {exc}") from None


def _snapshot_in(cache: Path, repo_id: str) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    download = (f"download it first with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`); "
                "orch never downloads")
    if not (repo / "snapshots").is_dir():
        raise NotCached(f"{repo_id!r} is not a preset, not a local folder and not in the Hugging Face cache {cache}; {download}")
    ref = repo / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text(encoding="utf-8").strip()
        folder = repo / "snapshots" / revision
        if not _COMMIT.fullmatch(revision) or not folder.is_dir():
            raise NotCached(f"{repo_id!r}: the cache's refs/main names {revision[:40]!r}, which has no snapshot folder "
                            f"in {repo / 'snapshots'}; {download}")
        return folder
    snapshots = sorted(p for p in (repo / "snapshots").iterdir() if p.is_dir())
    if len(snapshots) == 1:
        return snapshots[0]
    if not snapshots:
        raise NotCached(f"{repo_id!r} has an empty snapshot folder in the Hugging Face cache {cache}; {download}")
    raise NotCached(f"{repo_id!r}: the Hugging Face cache holds {len(snapshots)} revisions and no refs/main; "
                    f"set model.name to one snapshot folder, e.g. {snapshots[0]}")


def from_cache(name: str) -> bool:
    """True when a non-preset model.name is read from the cache: an ``org/name`` id with no
    local folder of that name (a local folder wins)."""
    return is_repo_id(name) and not Path(name).expanduser().is_dir()


def resolve_folder(name: str, env: Optional[Mapping[str, str]] = None) -> Path:
    """The folder a non-preset model.name points at: the local folder, or the cache snapshot of
    an ``org/name`` id (NotCached if absent). Any other name comes back as a path, for the
    caller's "no such folder" message."""
    if from_cache(name):
        return snapshot_folder(name, env)
    return Path(name).expanduser()

"""`admm-prune publish`: upload a pruned model folder to the Hugging Face hub.

Optional and never part of `admm-prune run`. It uploads what the report stage
exported (reports/model: weights, config with sparsity_config, tokenizer, model
card), or any folder that carries a model card, with huggingface_hub's own upload
API: HfApi.create_repo, then HfApi.upload_folder (one commit). The token is
huggingface_hub's usual one: HF_TOKEN, or the login stored by `hf auth login`.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

CARD_FILE = "README.md"


class PublishError(RuntimeError):
    """The folder is not ready to publish, or the hub refused the upload."""


def check_folder(folder: Path) -> None:
    """A hub-ready folder: a config and a model card (the card says how to load it)."""
    if not folder.is_dir():
        raise PublishError(f"{folder} does not exist; run the pipeline first (`admm-prune run`) or give --folder")
    missing = [name for name in ("config.json", CARD_FILE) if not (folder / name).is_file()]
    if missing:
        raise PublishError(f"{folder} has no {' and no '.join(missing)}: not a model folder written by the "
                           f"pipeline (reports/model, artifacts/converted) or by stages.api.save")


def publish(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
            api: HfApi | None = None) -> str:
    """Create `repo_id` (a model repo; kept if it exists) and upload `folder` to it
    as one commit. Returns the commit's URL."""
    from huggingface_hub import errors

    folder = Path(folder)
    check_folder(folder)
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                                   commit_message=f"Upload pruned model from {folder.name} (admm-prune)",
                                   ignore_patterns=["*.tmp"])
    except errors.LocalTokenNotFoundError:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`") from None
    except errors.HfHubHTTPError as err:
        raise PublishError(f"the hub refused the upload to {repo_id}: {err}") from None
    except OSError as err:  # offline, DNS, connection refused
        raise PublishError(f"cannot reach the Hugging Face hub to upload {repo_id}: {err}") from None
    return getattr(commit, "commit_url", str(commit))

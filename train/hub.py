"""Push an exported model folder to the Hugging Face Hub.

``python -m train.hub MODEL_DIR --repo-id USER/NAME [--private] [--message MSG] [--dry-run]``

The token comes from ``HF_TOKEN`` or a stored ``hf auth login``, through huggingface_hub's
own lookup; it is never printed or logged. Nothing in the local folder is changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError, first_line, report_error
from .export import WEIGHTS

REQUIRED_FILES = (WEIGHTS, "config.json")


def files_to_upload(model_dir: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every file that would be uploaded, after checking the folder."""
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model folder")
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise UserError(f"{model_dir}: not an exported model folder (missing {', '.join(missing)})")
    return [(str(p.relative_to(model_dir)), p.stat().st_size)
            for p in sorted(model_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")]


def push(model_dir: Path, repo_id: str, private: bool, message: str) -> str:
    """Create the repo if needed and upload the folder; returns the commit URL."""
    import huggingface_hub

    files_to_upload(model_dir)
    token = huggingface_hub.get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` first")
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, repo_type="model",
                                   commit_message=message, allow_patterns=["*"], ignore_patterns=[".*"])
    except Exception as exc:  # offline, refused, bad repo id: report without a traceback
        raise UserError(f"push to {repo_id!r} failed: {first_line(exc, with_type=True)}") from None
    return getattr(commit, "commit_url", str(commit))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.hub", description="Upload a model folder to the Hub.",
                                     epilog="Documentation: docs/checkpoints.md")
    parser.add_argument("model_dir", type=Path, help="an exported model folder (RUN/model)")
    parser.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--message", default="Upload model trained with imagenet-trainer", help="commit message")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded and stop")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            files = files_to_upload(args.model_dir)
            visibility = "private" if args.private else "public"
            print(f"dry run: would upload {len(files)} files to {visibility} repo {args.repo_id}:")
            for name, size in files:
                print(f"  {name} ({size:,} bytes)")
            return 0
        url = push(args.model_dir, args.repo_id, args.private, args.message)
    except UserError as exc:
        return report_error(exc)
    print(f"uploaded {args.model_dir} to {args.repo_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hugging Face Hub ids (`owner/name`): downloaded with huggingface_hub when the machine is online.

Offline we fail at once rather than let huggingface_hub retry: the probe is a single TCP
connect run in a daemon thread, so neither DNS nor the connect can hold us past the timeout.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from ...errors import EdgeError, first_line

PROBE_TIMEOUT_S = 2.0
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_HF_LAYOUT = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"]
_MISTRAL_LAYOUT = ["params.json", "consolidated.safetensors", "tokenizer.model*"]


def is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.fullmatch(spec))


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _connects() -> bool:
    try:
        socket.create_connection(_endpoint(), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def is_online() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    result: list[bool] = []
    probe = threading.Thread(target=lambda: result.append(_connects()), daemon=True)
    probe.start()
    probe.join(PROBE_TIMEOUT_S)
    return bool(result and result[0])


def download(repo_id: str) -> Path:
    """A local snapshot of the repo's safetensors, config and tokenizer files (HF layout preferred)."""
    if not is_online():
        raise EdgeError(f"{repo_id} is not a local path and cannot be downloaded: the machine is offline; "
                        "pass a local path (HF directory, mistral-inference directory or .gguf file)")
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        names = list_repo_files(repo_id)
        patterns = _HF_LAYOUT if "config.json" in names else _MISTRAL_LAYOUT
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, OSError) as e:
        raise EdgeError(f"cannot download {repo_id}: {first_line(e)}") from None

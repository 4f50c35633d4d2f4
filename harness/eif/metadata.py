"""The metadata section nitro-cli writes: build facts and the image's own JSON
(docs/eif-format.md)."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

#: ``BuildTool`` written into the metadata (nitro-cli writes its own name there).
BUILD_TOOL = "nitro-harness"


def _sorted_json(value: Any) -> Any:
    """Recursively sort object keys (serde_json's default map type orders keys)."""
    if isinstance(value, dict):
        return {k: _sorted_json(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_json(v) for v in value]
    return value


def build_metadata(*, image_name: str, image_version: str = "1.0",
                   build_time: _dt.datetime | str | None = None, kernel_version: str = "unknown",
                   docker_info: dict | None = None, custom_metadata: dict | None = None,
                   build_tool: str = BUILD_TOOL, build_tool_version: str | None = None,
                   operating_system: str = "linux") -> dict:
    """Return the metadata object nitro-cli writes (docs/eif-format.md), keys in nitro-cli's
    order.

    ``build_time`` defaults to now (UTC) in RFC 3339; ``docker_info`` is a ``docker inspect``
    object or None; ``custom_metadata`` is the user's JSON object or None. Nested objects
    are key-sorted, as serde_json emits them.
    """
    if build_tool_version is None:
        from harness import __version__ as build_tool_version  # noqa: N813
    if build_time is None:
        build_time = _dt.datetime.now(_dt.timezone.utc)
    if isinstance(build_time, _dt.datetime):
        build_time = build_time.isoformat()
    return {
        "ImageName": image_name,
        "ImageVersion": image_version,
        "BuildMetadata": {
            "BuildTime": build_time,
            "BuildTool": build_tool,
            "BuildToolVersion": build_tool_version,
            "OperatingSystem": operating_system,
            "KernelVersion": kernel_version,
        },
        "DockerInfo": _sorted_json(docker_info) if docker_info is not None else None,
        "CustomMetadata": _sorted_json(custom_metadata) if custom_metadata is not None else None,
    }


def encode_metadata(metadata: dict) -> bytes:
    """Compact JSON bytes of a metadata object (no spaces, UTF-8, key order preserved)."""
    return json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

"""A bundle's ONNX files are the ones exported: size first, then sha256 against `export.onnx_sha256`.

The hash is computed once per process per file, and again only when the file's size, mtime or inode change,
so an app that opens the same bundle in a loop pays for it once.
"""

from __future__ import annotations

import os
from pathlib import Path

from dtk.runtime.errors import file_error
from dtk.runtime.files import sha256

_HASHES: dict[str, tuple[tuple, str]] = {}  # real path -> (stat key, sha256)


def check_onnx_files(onnx_path: Path, manifest) -> None:
    """Refuse an ONNX file (or its .data) that differs from what the export recorded in the manifest.

    Only the manifest's own ONNX file is checked; a manifest without recorded hashes (older exports, hand-made
    bundles) passes."""
    onnx_path = Path(onnx_path)
    if onnx_path.name != manifest.onnx:
        return
    export = manifest.export
    files = [(onnx_path, export.get("onnx_bytes"), export.get("onnx_sha256"))]
    data_name = export.get("onnx_data")
    if isinstance(data_name, str) and data_name:
        files.append(
            (onnx_path.with_name(data_name), export.get("onnx_data_bytes"), export.get("onnx_data_sha256"))
        )
    for path, size, digest in files:
        if not isinstance(digest, str):
            continue
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise file_error(path, "is missing; the bundle's manifest names it") from None
        if isinstance(size, int) and stat.st_size != size:
            raise file_error(
                path,
                f"is {stat.st_size} bytes, but the export wrote {size}: not the exported model "
                "(re-export the bundle)",
            )
        if file_hash(path, stat) != digest:
            raise file_error(
                path,
                "does not match the sha256 the export recorded: not the exported model "
                "(re-export the bundle)",
            )


def file_hash(path: Path, stat: os.stat_result | None = None) -> str:
    """sha256 of `path`, from the cache while its size, mtime and inode are unchanged."""
    stat = stat or os.stat(path)
    key = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
    real = os.path.realpath(path)
    cached = _HASHES.get(real)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = sha256(path)
    _HASHES[real] = (key, digest)
    return digest

"""Size and count limits for everything a bundle or a trust update can make edged read.

Every limit is checked before the bytes are read (from a header or a declared size) and again
while reading. The defaults suit models up to a few hundred megabytes on a small device.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class BundleLimits:
    max_archive_bytes: int = 2 * GiB  # the whole tar stream, headers and padding included
    max_file_bytes: int = 2 * GiB  # one model file
    max_total_file_bytes: int = 2 * GiB  # sum of the sizes the manifest declares
    max_manifest_bytes: int = 1 * MiB
    max_files: int = 1000
    max_entries: int = 4000  # tar headers of any kind, directories included
    max_trailing_padding_bytes: int = 1 * MiB  # zeros after the end marker (tar records)
    max_signatures: int = 16
    max_trust_document_bytes: int = 1 * MiB
    max_trust_keys: int = 64
    max_path_bytes: int = 255  # what a ustar header can hold (155-byte prefix + 100-byte name)
    max_path_depth: int = 8
    max_vector_bytes: int = 256 * MiB  # array data of one version's .npz test vectors, in memory
    max_vector_arrays: int = 1024  # arrays in one .npz
    read_chunk_bytes: int = 1 * MiB

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"BundleLimits.{name} must be positive, got {value}")


DEFAULT_LIMITS = BundleLimits()

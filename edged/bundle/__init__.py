"""Signed model bundles: format, trust store, pure verification, crash-safe store, installer.

The public API for the daemon, the fleet transport and the CLI; the modules behind it are
documented in ``docs/bundle-format.md``.
"""

from edged.bundle.build import (
    BundleSpec,
    add_signature,
    build_bundle,
    build_bundle_from_dir,
    collect_version_files,
    make_manifest,
    sign_manifest,
)
from edged.bundle.canonical import encode_canonical, parse_canonical, parse_strict
from edged.bundle.device import detect_device_facts
from edged.bundle.install import Installer, InstallResult, SwapTarget
from edged.bundle.keys import (
    CONTEXT_COMMAND,
    Signature,
    generate_key,
    keyid_of,
    load_private_key,
    load_public_key,
    sign_payload,
    verify_payload,
)
from edged.bundle.limits import BundleLimits
from edged.bundle.manifest import FileEntry, Manifest, Targets, parse_manifest
from edged.bundle.offline import OfflineSelfTest, install_direct, run_self_test
from edged.bundle.store import HeldVersion, ModelStore, RecoveryReport
from edged.bundle.trust import (
    TrustState,
    apply_signers_update,
    build_root,
    build_signers,
    load_trust_state,
)
from edged.bundle.truststore import TrustStore
from edged.bundle.upload import receive_upload, upload_source
from edged.bundle.vectors import check_vector_file
from edged.bundle.verify import (
    DeviceFacts,
    HighWaterMark,
    VerifiedManifest,
    explain_manifest,
    verify_manifest,
)

__all__ = [
    "CONTEXT_COMMAND",
    "BundleLimits",
    "BundleSpec",
    "DeviceFacts",
    "FileEntry",
    "HeldVersion",
    "HighWaterMark",
    "InstallResult",
    "Installer",
    "Manifest",
    "ModelStore",
    "OfflineSelfTest",
    "RecoveryReport",
    "Signature",
    "SwapTarget",
    "Targets",
    "TrustState",
    "TrustStore",
    "VerifiedManifest",
    "add_signature",
    "apply_signers_update",
    "build_bundle",
    "build_bundle_from_dir",
    "build_root",
    "build_signers",
    "check_vector_file",
    "collect_version_files",
    "detect_device_facts",
    "encode_canonical",
    "explain_manifest",
    "generate_key",
    "install_direct",
    "keyid_of",
    "load_private_key",
    "load_public_key",
    "load_trust_state",
    "make_manifest",
    "parse_canonical",
    "parse_manifest",
    "parse_strict",
    "receive_upload",
    "run_self_test",
    "sign_manifest",
    "sign_payload",
    "upload_source",
    "verify_manifest",
    "verify_payload",
]

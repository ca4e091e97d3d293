"""The one exception tree of edged.

Every error edged raises is an ``EdgedError``. Library and OS errors are translated at the
boundary (``raise SpecificError(...) from exc``) and each message says what was wrong and,
where it helps, what to do.

    EdgedError
    ├── ConfigError                      invalid config file / key (message names the key path)
    ├── RuntimeBackendError              ONNX Runtime / LiteRT
    │   ├── UnsupportedModelError        no backend for the files in a version directory
    │   ├── ModelLoadError               the runtime refused the model
    │   └── InferenceFailedError         the runtime failed during run()
    ├── ServeError                       model repository, slots, scheduler, API
    │   ├── ModelNotFoundError           unknown model or version
    │   ├── ModelNotReadyError           model exists but no version is serving
    │   │   └── EngineUnavailableError   no engine process connected (starting, restarting)
    │   ├── InvalidRequestError          bad tensor name/shape/datatype/body (-> HTTP 400)
    │   ├── QueueFullError               back-pressure (-> HTTP 429)
    │   ├── DeadlineExceededError        request deadline passed before it ran (-> HTTP 504)
    │   ├── SelfTestFailedError          a new version failed its test vectors or warm-up
    │   ├── InsufficientMemoryError      old and new version can't both fit, policy refuses
    │   ├── ShuttingDownError            the daemon is draining
    │   ├── ProbationRecordError         the durable probation record cannot be written or read
    │   ├── FeatureDisabledError         the endpoint's subsystem is off in the config (-> 404)
    │   ├── NotPermittedError            operator action over the wrong listener (-> 403)
    │   ├── DaemonUnreachableError       (CLI) the local daemon does not answer
    │   └── ApiError                     (CLI) the local daemon answered with an error
    ├── BundleError                      signed bundles, trust store, crash-safe store
    │   ├── LimitExceededError           a size/count limit (archive, file, manifest, entries)
    │   ├── UnsafePathError              absolute path, "..", or characters bundles forbid
    │   ├── KeyFileError                 key file unreadable, wrong type, exists already
    │   ├── ArchiveError                 the uncompressed ustar container
    │   │   ├── BundleFileError          the bundle file cannot be opened or read
    │   │   ├── CompressedArchiveError   gzip/xz/... input (bundles are plain tar)
    │   │   ├── TruncatedArchiveError    ends inside a header, file data or before end marker
    │   │   ├── MalformedArchiveError    bad header/checksum, order, data after end marker
    │   │   ├── LinkEntryError           symlink or hard link
    │   │   ├── SpecialEntryError        device, FIFO, pax/GNU extension header
    │   │   ├── DuplicateEntryError      a path appears twice
    │   │   ├── UnexpectedEntryError     a file the manifest does not list
    │   │   └── MissingEntryError        a listed file is absent
    │   ├── ManifestError
    │   │   ├── ManifestEncodingError    not strict canonical JSON
    │   │   └── ManifestSchemaError      missing/unknown/ill-typed field (names the field)
    │   ├── SignatureError               manifest, trust document or command signatures
    │   │   ├── NoSignaturesError / UnknownKeyError / RevokedKeyError
    │   │   └── BadSignatureError / DuplicateSignatureError / ThresholdNotMetError
    │   ├── ExpiredBundleError           freeze protection
    │   ├── RollbackError                counter below the high-water mark
    │   ├── ReplayError                  counter equal to it, but another bundle
    │   ├── TargetMismatchError          ArchitectureMismatchError, RuntimeMismatchError,
    │   │                                ProviderMismatchError, EdgedVersionTooOldError
    │   ├── FileIntegrityError           FileSizeMismatchError, FileHashMismatchError
    │   ├── BundleConfigError            config.toml or test vectors unusable
    │   │   └── VectorFileError          an .npz test-vector file malformed or over a limit
    │   ├── TrustStoreError              TrustDocumentError, TrustExpiredError, TrustVersionError
    │   ├── InstallFailedError           an unexpected failure inside the installer (a bug)
    │   ├── RevertedReleaseError         the release failed probation here before
    │   └── StoreError                   StoreCorruptError, VersionConflictError,
    │                                    VersionNotHeldError, InstallBusyError
    ├── TransportError                   MQTT fleet channel
    │   ├── TlsSetupError                CA/cert/key file unusable
    │   │   └── InsecureKeyFileError     client key readable by group or others
    │   ├── ConnectFailedError           broker unreachable
    │   │   ├── TlsHandshakeError        certificate or hostname check failed
    │   │   └── BrokerRefusedError       CONNACK refused (not authorised, ...)
    │   ├── ConnectionLostError          disconnected during an operation
    │   ├── MqttTimeoutError             no broker answer within timeout=
    │   ├── SubscribeDeniedError         SUBACK refused a topic (ACL)
    │   ├── FleetMessageError            malformed fleet message (schema, encoding)
    │   ├── CommandRejectedError         StaleCommandError, ReplayedCommandError,
    │   │                                WrongTargetError
    │   ├── DownloadError                TooLargeError, InsufficientSpaceError,
    │   │                                ChunkHashMismatchError, DownloadStalledError,
    │   │                                ArtifactUnavailableError
    │   ├── InstallCrashLoopError        crashes of the daemon interrupted a deployment's
    │   │                                install mqtt.max_install_crashes times
    │   ├── PushFailedError              (CLI) devices failed or did not answer
    │   ├── RolloutError                 (CLI) a staged rollout: bad plan, state or lock
    │   └── FleetSetupError              fleet directory / PKI: missing, or would be overwritten
    ├── TelemetryError                   metrics, power sources, spool
    │   ├── HistogramMismatchError       snapshots with different bucket layouts
    │   ├── PowerSourceError             a power source or total rail missing or unreadable
    │   └── SpoolError                   the on-disk spool cannot be opened, written, acked
    │       ├── SpoolLockedError         another process owns the spool directory
    │       └── SpoolRecordTooLargeError a record exceeds the per-record limit
    └── DeviceError                      lifecycle, systemd, doctor
        ├── NotifyError                  $NOTIFY_SOCKET / $WATCHDOG_USEC unusable, or a send failed
        └── DemoStepFailedError          (CLI) a step of ``edged demo`` did not work
"""

from __future__ import annotations


class EdgedError(Exception):
    """Base of every error edged raises on purpose."""


class ConfigError(EdgedError):
    """A config file or key is invalid; the message names the key path."""

    def __init__(self, key_path: str, reason: str) -> None:
        self.key_path = key_path
        self.reason = reason
        super().__init__(f"{key_path}: {reason}" if key_path else reason)


# --- runtime -------------------------------------------------------------------------------


class RuntimeBackendError(EdgedError):
    """An inference runtime (ONNX Runtime, LiteRT) failed."""


class UnsupportedModelError(RuntimeBackendError):
    """No backend recognises the files of a model version."""


class ModelLoadError(RuntimeBackendError):
    """The runtime refused to load a model."""


class InferenceFailedError(RuntimeBackendError):
    """The runtime raised while running a batch."""


# --- serve ---------------------------------------------------------------------------------


class ServeError(EdgedError):
    """Model repository, slots, scheduler or local API."""


class ModelNotFoundError(ServeError):
    """Unknown model name or version."""


class ModelNotReadyError(ServeError):
    """The model exists but has no version serving right now."""


class EngineUnavailableError(ModelNotReadyError):
    """No engine process is connected right now (starting, or restarting after a crash)."""


class InvalidRequestError(ServeError):
    """A request is malformed; the message names the tensor and what was wrong."""


class QueueFullError(ServeError):
    """The model's queue is full; the caller should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class DeadlineExceededError(ServeError):
    """A request's deadline passed before it could run."""


class SelfTestFailedError(ServeError):
    """A freshly loaded version failed its test vectors or warm-up; it was not switched in."""


class InsufficientMemoryError(ServeError):
    """Loading a version would not fit in memory under the configured policy."""


class ShuttingDownError(ServeError):
    """The daemon is draining and accepts no new work."""


class ProbationRecordError(ServeError):
    """The durable record of a probation (``<state>/probation/<model>.json``) cannot be
    written (the swap is then refused) or read."""


class FeatureDisabledError(ServeError):
    """The endpoint belongs to a subsystem that the config turns off (e.g. telemetry)."""


class NotPermittedError(ServeError):
    """An operator action (install, rollback) arrived over a listener that may not do it."""


class DaemonUnreachableError(ServeError):
    """A CLI command could not reach the local daemon on its socket or port."""


class ApiError(ServeError):
    """The local daemon answered a CLI request with an error status."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"daemon answered {status}: {message}")


# --- bundle --------------------------------------------------------------------------------


class BundleError(EdgedError):
    """Signed model bundles, trust store or the crash-safe store."""


class LimitExceededError(BundleError):
    """A size or count limit was hit (archive, file, manifest, entries, signatures)."""


class UnsafePathError(BundleError):
    """A path is absolute, climbs out with ``..``, or has characters bundles do not allow."""


class KeyFileError(BundleError):
    """A key file cannot be read, parsed or written (signer's machine)."""


class ArchiveError(BundleError):
    """The bundle is not a well-formed uncompressed POSIX ustar archive."""


class BundleFileError(ArchiveError):
    """The bundle file cannot be opened or read."""


class CompressedArchiveError(ArchiveError):
    """The bundle is compressed (gzip, xz, ...); bundles are plain tar on purpose."""


class TruncatedArchiveError(ArchiveError):
    """The archive ends early: inside a header, inside file data or before its end marker."""


class MalformedArchiveError(ArchiveError):
    """A header is corrupt, entries are out of order, or data follows the end marker."""


class LinkEntryError(ArchiveError):
    """The archive holds a symbolic or hard link."""


class SpecialEntryError(ArchiveError):
    """The archive holds a device, FIFO, pax/GNU extension or other non-regular entry."""


class DuplicateEntryError(ArchiveError):
    """The same path appears twice in the archive."""


class UnexpectedEntryError(ArchiveError):
    """The archive holds a file the signed manifest does not list."""


class MissingEntryError(ArchiveError):
    """A file the signed manifest lists is not in the archive."""


class ManifestError(BundleError):
    """The manifest is not a valid edged bundle manifest."""


class ManifestEncodingError(ManifestError):
    """The manifest is not strict canonical JSON (floats, duplicate keys, whitespace, ...)."""


class ManifestSchemaError(ManifestError):
    """A manifest field is missing, unknown, or has the wrong type or value."""


class SignatureError(BundleError):
    """Signatures over a manifest, a trust document or a command do not satisfy the policy."""


class NoSignaturesError(SignatureError):
    """The document carries no signature at all."""


class UnknownKeyError(SignatureError):
    """A signature is by a key the trust store does not know."""


class RevokedKeyError(SignatureError):
    """A signature is by a key the trust store has revoked."""


class BadSignatureError(SignatureError):
    """A signature does not verify with the key it names."""


class DuplicateSignatureError(SignatureError):
    """Two signatures name the same key."""


class ThresholdNotMetError(SignatureError):
    """Fewer valid signatures from distinct trusted keys than the threshold requires."""


class ExpiredBundleError(BundleError):
    """The bundle's expiry time has passed (freeze protection)."""


class RollbackError(BundleError):
    """The bundle's release counter is below the device's high-water mark."""


class ReplayError(BundleError):
    """The bundle repeats the high-water release counter but is not the bundle that set it."""


class TargetMismatchError(BundleError):
    """The bundle was not built for this device."""


class ArchitectureMismatchError(TargetMismatchError):
    """The device's CPU architecture is not among the bundle's targets."""


class RuntimeMismatchError(TargetMismatchError):
    """The bundle's runtime (onnx, tflite) is not available on this device."""


class ProviderMismatchError(TargetMismatchError):
    """None of the bundle's execution providers / delegates is available on this device."""


class EdgedVersionTooOldError(TargetMismatchError):
    """The bundle needs a newer edged than the one running."""


class FileIntegrityError(BundleError):
    """A file's bytes do not match the manifest."""


class FileSizeMismatchError(FileIntegrityError):
    """A file is longer or shorter than the manifest declares."""


class FileHashMismatchError(FileIntegrityError):
    """A file's SHA-256 differs from the manifest's."""


class BundleConfigError(BundleError):
    """The bundle's config.toml or its test vectors are unusable."""


class VectorFileError(BundleConfigError):
    """An ``.npz`` test-vector file is malformed, compressed, or over a limit."""


class InstallFailedError(BundleError):
    """Something unexpected failed inside the installer; nothing was installed."""


class RevertedReleaseError(BundleError):
    """The release failed probation on this device and was reverted; it is not re-installed."""


class TrustStoreError(BundleError):
    """The device trust store (root.json, signers.json) is missing, invalid or stale."""


class TrustDocumentError(TrustStoreError):
    """A trust document cannot be read or does not follow its schema."""


class TrustExpiredError(TrustStoreError):
    """The signers document has expired; the device needs a fresh root-signed one."""


class TrustVersionError(TrustStoreError):
    """A trust update does not increase the document version."""


class StoreError(BundleError):
    """The crash-safe model store under the state directory."""


class StoreCorruptError(StoreError):
    """A store file (high-water marks, CURRENT) is unreadable; it is never silently reset."""


class VersionConflictError(StoreError):
    """The store already holds this model version with different contents."""


class VersionNotHeldError(StoreError):
    """A rollback names a version the store no longer holds (or none is left)."""


class InstallBusyError(StoreError):
    """Another install, rollback or recovery holds the state directory's lock."""


# --- transport -----------------------------------------------------------------------------


class TransportError(EdgedError):
    """The MQTT fleet channel."""


class TlsSetupError(TransportError):
    """The CA, client certificate or key file cannot be used for TLS."""


class InsecureKeyFileError(TlsSetupError):
    """The client key file is readable by its group or by others."""


class ConnectFailedError(TransportError):
    """The broker could not be reached or the connection could not be set up."""


class TlsHandshakeError(ConnectFailedError):
    """TLS failed: the broker's certificate or hostname did not verify, or ours was refused."""


class BrokerRefusedError(ConnectFailedError):
    """The broker answered CONNECT with a refusal (not authorised, bad identifier, ...)."""


class ConnectionLostError(TransportError):
    """The connection to the broker dropped during an operation."""


class MqttTimeoutError(TransportError):
    """The broker did not acknowledge an operation within its timeout."""


class SubscribeDeniedError(TransportError):
    """The broker refused a subscription (usually its ACL)."""

    def __init__(self, message: str, topics: tuple[str, ...] = ()) -> None:
        self.topics = topics
        super().__init__(message)


class FleetMessageError(TransportError):
    """A fleet message is malformed: not canonical JSON, or a field is missing or wrong."""


class CommandRejectedError(TransportError):
    """A signed command is valid but must not run here (stale, replayed, not for us)."""


class StaleCommandError(CommandRejectedError):
    """A command's timestamp is older than the allowed age, or too far in the future."""


class ReplayedCommandError(CommandRejectedError):
    """A command's nonce was seen before within the allowed age."""


class WrongTargetError(CommandRejectedError):
    """A command was signed for another device or group."""


class DownloadError(TransportError):
    """A bundle download failed."""


class TooLargeError(DownloadError):
    """The announced bundle is larger than ``mqtt.max_bundle_bytes``."""


class InsufficientSpaceError(DownloadError):
    """The state directory's file system has too little free space for the bundle."""


class ChunkHashMismatchError(DownloadError):
    """A chunk's (or the whole bundle's) SHA-256 differs from the signed announcement."""


class DownloadStalledError(DownloadError):
    """No new chunk arrived within ``mqtt.download_stall_timeout_s``."""


class InstallCrashLoopError(TransportError):
    """A deployment's install was interrupted by a crash of the daemon (not a clean shutdown)
    ``mqtt.max_install_crashes`` times: it is reported ``failed``, not tried again."""


class ArtifactUnavailableError(DownloadError):
    """No mirror of an HTTPS artifact can serve it: each refused it (HTTP status), served
    bytes that do not match the signed chunk hashes, or failed TLS verification."""


class FleetSetupError(TransportError):
    """The fleet directory is missing or incomplete, or a command would overwrite a CA, a key
    or a device that already exists."""


class PushFailedError(TransportError):
    """(CLI) A push or command did not succeed on every targeted device."""


class RolloutError(TransportError):
    """(CLI) A staged rollout cannot start or go on: bad plan, unreadable state, or another
    process drives it."""


# --- telemetry -----------------------------------------------------------------------------


class TelemetryError(EdgedError):
    """Metrics, power sources or the telemetry spool."""


class HistogramMismatchError(TelemetryError):
    """Two histogram snapshots with different bucket layouts cannot be merged or subtracted."""


class PowerSourceError(TelemetryError):
    """A power source or a configured total rail is missing or unreadable."""


class SpoolError(TelemetryError):
    """The on-disk telemetry spool cannot be opened, written or acknowledged."""


class SpoolLockedError(SpoolError):
    """Another process holds the spool directory; only one writer may own it."""


class SpoolRecordTooLargeError(SpoolError):
    """A record exceeds the per-record limit derived from ``spool_max_bytes``."""


# --- device --------------------------------------------------------------------------------


class DeviceError(EdgedError):
    """Daemon lifecycle, systemd integration, diagnostics."""


class NotifyError(DeviceError):
    """The systemd notification socket or watchdog settings are unusable, or a send failed."""


class DemoStepFailedError(DeviceError):
    """A step of ``edged demo`` did not work; the message says which and why."""

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
    │   ├── InvalidRequestError          bad tensor name/shape/datatype/body (-> HTTP 400)
    │   ├── QueueFullError               back-pressure (-> HTTP 429)
    │   ├── DeadlineExceededError        request deadline passed before it ran (-> HTTP 504)
    │   ├── SelfTestFailedError          a new version failed its test vectors or warm-up
    │   ├── InsufficientMemoryError      old and new version can't both fit, policy refuses
    │   └── ShuttingDownError            the daemon is draining
    ├── BundleError                      signed bundles, trust store, crash-safe store
    ├── TransportError                   MQTT fleet channel
    ├── TelemetryError                   metrics, power sources, spool
    └── DeviceError                      lifecycle, systemd, doctor
        └── NotifyError                  $NOTIFY_SOCKET / $WATCHDOG_USEC unusable, or a send failed
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


# --- bundle --------------------------------------------------------------------------------


class BundleError(EdgedError):
    """Signed model bundles, trust store or the crash-safe store."""


# --- transport -----------------------------------------------------------------------------


class TransportError(EdgedError):
    """The MQTT fleet channel."""


# --- telemetry -----------------------------------------------------------------------------


class TelemetryError(EdgedError):
    """Metrics, power sources or the telemetry spool."""


# --- device --------------------------------------------------------------------------------


class DeviceError(EdgedError):
    """Daemon lifecycle, systemd integration, diagnostics."""


class NotifyError(DeviceError):
    """The systemd notification socket or watchdog settings are unusable, or a send failed."""

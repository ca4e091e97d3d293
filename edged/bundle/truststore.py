"""The trust store on disk: ``<dir>/root.json`` and ``<dir>/signers.json``.

On a device ``<dir>`` is ``<state>/trust``. Reads verify both documents every time (they are
small); writes are atomic. Only public keys are ever stored here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edged._fs import atomic_write
from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.trust import TrustState, apply_signers_update, load_trust_state
from edged.errors import TrustDocumentError

log = logging.getLogger(__name__)

ROOT_FILE = "root.json"
SIGNERS_FILE = "signers.json"


@dataclass(frozen=True)
class TrustStore:
    directory: Path
    limits: BundleLimits = DEFAULT_LIMITS

    @property
    def root_path(self) -> Path:
        return self.directory / ROOT_FILE

    @property
    def signers_path(self) -> Path:
        return self.directory / SIGNERS_FILE

    def _read(self, path: Path) -> bytes:
        try:
            with path.open("rb") as f:
                data = f.read(self.limits.max_trust_document_bytes + 1)
        except FileNotFoundError:
            raise TrustDocumentError(
                f"{path} does not exist: the trust store is not initialised "
                "(copy root.json and signers.json made by 'edged trust init' there)"
            ) from None
        except OSError as exc:
            raise TrustDocumentError(f"cannot read {path}: {exc.strerror}") from exc
        return data

    def load(self) -> TrustState:
        """The verified trust state (expiry is checked when it is used, not here)."""
        return load_trust_state(
            self._read(self.root_path), self._read(self.signers_path), self.limits
        )

    def initialise(
        self, root_bytes: bytes, signers_bytes: bytes, *, replace: bool = False
    ) -> TrustState:
        """Provision the trust anchor. Refuses to replace an existing root unless told to."""
        state = load_trust_state(root_bytes, signers_bytes, self.limits)
        if self.root_path.exists() and not replace:
            raise TrustDocumentError(
                f"{self.root_path} exists; a root is replaced only on purpose (replace=True)"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root_path, root_bytes)
        atomic_write(self.signers_path, signers_bytes)
        log.info(
            "trust store %s initialised: root v%d, signers v%d",
            self.directory,
            state.root.version,
            state.signers.version,
        )
        return state

    def apply_signers_update(self, new_bytes: bytes, now: int) -> TrustState:
        """Verify a new root-signed signers document and make it the held one."""
        state = self.load()
        new_state = apply_signers_update(state, new_bytes, now, self.limits)
        if new_state is not state:
            atomic_write(self.signers_path, new_bytes)
            log.info(
                "signers.json updated from version %d to %d (%d key(s), threshold %d, %d revoked)",
                state.signers.version,
                new_state.signers.version,
                len(new_state.signers.keys),
                new_state.signers.threshold,
                len(new_state.signers.revoked),
            )
        return new_state

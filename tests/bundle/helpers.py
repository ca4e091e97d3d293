"""Building blocks for the bundle tests: keys, trust documents, bundles (good and tampered),
a state directory with version 1 installed, and the store invariant checks."""

from __future__ import annotations

import asyncio
import io
import json
import platform
import shutil
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edged._fs import Checkpoint, no_checkpoint
from edged.bundle.build import (
    BundleSpec,
    Content,
    collect_version_files,
    make_manifest,
    sign_manifest,
    write_bundle,
)
from edged.bundle.canonical import Json, encode_canonical
from edged.bundle.device import normalise_arch
from edged.bundle.install import Installer, InstallResult
from edged.bundle.keys import Signature
from edged.bundle.offline import OfflineSelfTest, run_self_test
from edged.bundle.store import INSTALL_LOG_FILE, ModelStore
from edged.bundle.swap_policy import policy_for_swap
from edged.bundle.trust import build_root, build_signers
from edged.bundle.truststore import TrustStore
from edged.bundle.verify import DeviceFacts
from edged.config import ModelsConfig
from edged.modelrepo.layout import CURRENT_POINTER
from edged.serve.manager import ModelManager
from edged.serve.watch import EnergyFigure, ProbationOutcome

NOW = 1_800_000_000  # the injected clock of every test
DAY = 86_400
MODEL = "mlp"
LAYERS = (4, 8, 3)

DEVICE = DeviceFacts(
    arch=normalise_arch(platform.machine()),
    runtimes=frozenset({"onnx", "tflite"}),
    providers=frozenset({"CPUExecutionProvider"}),
    edged_version="0.1.0",
)

CONFIG_TOML = b"""\
[self_test]
atol = 1e-4
rtol = 1e-3
warmup_runs = 1
"""


@dataclass
class Keys:
    root: list[Ed25519PrivateKey]
    signers: list[Ed25519PrivateKey]
    outsider: Ed25519PrivateKey


def spec(version: int, counter: int | None = None, **overrides: Any) -> BundleSpec:
    values: dict[str, Any] = {
        "model": MODEL,
        "version": version,
        "counter": version if counter is None else counter,
        "created": NOW - DAY,
        "expires": NOW + 30 * DAY,
        "arch": (DEVICE.arch,),
        "min_edged_version": "0.1.0",
    }
    values.update(overrides)
    return BundleSpec(**values)


def source_files(sources: Path, version: int, model: str = MODEL) -> dict[str, Content]:
    """Bundle path -> content for a generated version (``sources/<model>/<version>``)."""
    files = collect_version_files(sources / model / str(version), model, version)
    files[f"{model}/config.toml"] = CONFIG_TOML
    return files


def pack(
    manifest_json: Mapping[str, Json],
    files: Mapping[str, Content],
    keys: Sequence[Ed25519PrivateKey],
    *,
    extra_signatures: Sequence[Signature] = (),
) -> bytes:
    manifest_bytes = encode_canonical(dict(manifest_json))
    signatures = [sign_manifest(manifest_bytes, k) for k in keys] + list(extra_signatures)
    out = io.BytesIO()
    write_bundle(out, manifest_bytes, signatures, files)
    return out.getvalue()


def bundle_bytes(
    sources: Path,
    keys: Sequence[Ed25519PrivateKey],
    version: int,
    counter: int | None = None,
    *,
    edit: Callable[[dict[str, Any]], None] | None = None,
    files: Mapping[str, Content] | None = None,
    **spec_overrides: Any,
) -> bytes:
    """A signed bundle of generated version ``version``; ``edit`` changes the manifest JSON
    before it is signed (so the signature is valid for the edited manifest)."""
    s = spec(version, counter, **spec_overrides)
    content = dict(files) if files is not None else source_files(sources, version)
    manifest = make_manifest(s, content).to_json()
    if edit is not None:
        edit(manifest)
    return pack(manifest, content, keys)


def tar_members(entries: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A raw ustar archive from explicit headers (for entries our builder never makes)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def split_members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The (header, content) pairs of a bundle made by ``write_bundle``."""
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar.getmembers():
            f = tar.extractfile(info)
            members.append((info, f.read() if f is not None else b""))
    return members


def rebuild(members: Sequence[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    fixed = []
    for info, content in members:
        info.size = len(content)
        fixed.append((info, content))
    return tar_members(fixed)


def member_offsets(data: bytes) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of every member."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(i.name, i.offset, i.offset_data) for i in tar.getmembers()]


@dataclass
class World:
    """A device state directory plus everything to build bundles for it."""

    state: Path
    sources: Path
    keys: Keys
    threshold: int = 1
    checkpoint: Checkpoint = no_checkpoint
    target: OfflineSelfTest = field(default_factory=OfflineSelfTest)

    @property
    def store(self) -> ModelStore:
        return ModelStore(self.state)

    def installer(self, *, keep_previous: int = 2, device: DeviceFacts = DEVICE) -> Installer:
        return Installer(
            self.state,
            self.target,
            device,
            keep_previous=keep_previous,
            clock=lambda: NOW,
            checkpoint=self.checkpoint,
        )

    def bundle(self, version: int, counter: int | None = None, **kwargs: Any) -> bytes:
        keys = kwargs.pop("keys", self.keys.signers[: self.threshold])
        return bundle_bytes(self.sources, keys, version, counter, **kwargs)

    def install(self, data: bytes, **kwargs: Any) -> InstallResult:
        return asyncio.run(self.installer(**kwargs).install_bytes(data))

    def rollback(self, version: int | None = None) -> InstallResult:
        return asyncio.run(self.installer().rollback(MODEL, version))

    # --- invariants -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "current": self.store.current_version(MODEL),
            "versions": sorted(p.name for p in (self.state / "models" / MODEL).iterdir()),
            "highwater": (self.state / "highwater.json").read_bytes()
            if (self.state / "highwater.json").exists()
            else None,
        }

    def assert_serves(self, version: int) -> None:
        """CURRENT names ``version``, whose files hash to its manifest and which loads and
        passes its test vectors; no staging, trash or temp leftovers anywhere."""
        store = self.store
        assert store.current_version(MODEL) == version
        held = store.inspect_version(store.version_dir(MODEL, version), deep=True)
        assert held is not None, f"version {version} is not complete and verified"
        run_self_test(MODEL, held.path)
        assert list((self.state / "staging").iterdir()) == []
        assert list((self.state / "trash").iterdir()) == []
        leftovers = [p for p in self.state.rglob(".*.tmp-*")]
        assert leftovers == []

    def assert_unchanged(self, before: dict[str, Any]) -> None:
        after = self.snapshot()
        assert after == before, f"store changed: {before} -> {after}"
        assert before["current"] is not None
        self.assert_serves(before["current"])


def make_keys(root: int = 2, signers: int = 3) -> Keys:
    return Keys(
        root=[Ed25519PrivateKey.generate() for _ in range(root)],
        signers=[Ed25519PrivateKey.generate() for _ in range(signers)],
        outsider=Ed25519PrivateKey.generate(),
    )


def trust_documents(
    keys: Keys,
    *,
    threshold: int = 1,
    root_threshold: int = 1,
    version: int = 1,
    expires: int = NOW + 365 * DAY,
    signers: Sequence[Ed25519PrivateKey] | None = None,
    revoked: Sequence[str] = (),
    root_signers: Sequence[Ed25519PrivateKey] | None = None,
) -> tuple[bytes, bytes]:
    root = build_root([k.public_key() for k in keys.root], root_threshold, keys.root)
    signer_keys = keys.signers if signers is None else signers
    signers_doc = build_signers(
        [k.public_key() for k in signer_keys],
        threshold,
        version,
        expires,
        keys.root[:root_threshold] if root_signers is None else root_signers,
        revoked,
    )
    return root, signers_doc


def init_trust(state: Path, keys: Keys, **kwargs: Any) -> None:
    root, signers = trust_documents(keys, **kwargs)
    TrustStore(state / "trust").initialise(root, signers)


def copy_state(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    return dest


def log_entries(state: Path) -> list[dict[str, Any]]:
    path = state / INSTALL_LOG_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def current_pointer(state: Path) -> str:
    return (state / "models" / MODEL / CURRENT_POINTER).read_text().strip()


def run_probation(
    world: World,
    bundle: bytes,
    *,
    energy: EnergyFigure | None = None,
    after_install: Callable[[], None] | None = None,
) -> tuple[ProbationOutcome, str]:
    """Serve version 1 with the real manager, install ``bundle`` (whose policy puts it on
    probation) and keep requests coming, paced so that shadows may run, until the probation
    ends: its outcome and the version serving then. ``energy``: per-version energy figures
    (a power source); ``after_install`` runs once the release is on probation."""

    async def scenario() -> tuple[ProbationOutcome, str]:
        manager = ModelManager(ModelsConfig(repository=world.state / "models"))
        manager.probation_policy = policy_for_swap
        manager.energy_per_inference = energy
        installer = Installer(world.state, manager, DEVICE, clock=lambda: NOW)
        ended: asyncio.Queue[ProbationOutcome] = asyncio.Queue()

        async def record(outcome: ProbationOutcome) -> None:
            await installer.record_probation(outcome)
            await ended.put(outcome)

        manager.probation_listeners.append(record)
        await manager.start()
        try:
            x = np.random.default_rng(1).standard_normal((1, 4), dtype=np.float32)
            for _ in range(30):  # the baseline's window
                await manager.infer(MODEL, {"input": x})
            await installer.install_bytes(bundle)
            if after_install is not None:
                after_install()
            deadline = time.monotonic() + 60
            while ended.empty():
                assert time.monotonic() < deadline, manager.status()
                await manager.infer(MODEL, {"input": x})
                await asyncio.sleep(0.005)  # an idle queue between requests: shadows may run
            return await ended.get(), manager.serving(MODEL).version
        finally:
            await manager.close(drain_timeout_s=5)

    return asyncio.run(scenario())

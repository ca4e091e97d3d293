"""``edged keygen``, ``edged bundle build|sign|verify|inspect``, ``edged trust
init|show|update|apply|sign``: the signer's and the operator's tools for signed bundles (the logic
lives in ``edged.bundle``).

Private keys are only read here, on the signer's machine; a device only ever gets public keys
(inside root.json / signers.json) and signed bundles.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from rich.console import Console
from rich.table import Table

from edged._fs import atomic_write
from edged._time import utc_text
from edged.bundle.archive import ArchiveReader
from edged.bundle.build import (
    DEFAULT_ARCH,
    DEFAULT_EXPIRES_IN_DAYS,
    BundleSpec,
    add_signature,
    build_bundle_from_dir,
)
from edged.bundle.device import detect_device_facts
from edged.bundle.keys import (
    KEYID_RE,
    generate_key,
    keyid_of,
    load_private_key,
    load_public_key,
    write_private_key,
    write_public_key,
)
from edged.bundle.limits import DEFAULT_LIMITS
from edged.bundle.manifest import FileEntry, Manifest, manifest_digest, parse_manifest
from edged.bundle.reader import NullSink, read_files, read_head, read_unverified
from edged.bundle.store import ModelStore
from edged.bundle.trust import (
    TrustState,
    add_document_signature,
    build_root,
    build_signers,
    load_trust_state,
    parse_root,
    signers_document_json,
)
from edged.bundle.truststore import ROOT_FILE, SIGNERS_FILE, TrustStore
from edged.bundle.vectors import check_vector_file
from edged.bundle.verify import CheckResult, explain_manifest
from edged.config import StateConfig
from edged.errors import BundleError, ConfigError, SignatureError, TrustDocumentError
from edged.runtime.base import model_files

DAY_S = 86_400
DEFAULT_TRUST_DIR = StateConfig().directory / "trust"
DEFAULT_TRUST_EXPIRES_IN_DAYS = 365


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("keygen", help="make an Ed25519 key pair (private key mode 0600)")
    p.add_argument("name", type=Path, help="writes NAME.key (private) and NAME.pub (public)")
    p.set_defaults(handler=handle_keygen)

    bundle = subparsers.add_parser("bundle", help="build, sign, verify and inspect model bundles")
    sub = bundle.add_subparsers(dest="bundle_command", metavar="COMMAND", required=True)

    p = sub.add_parser("build", help="build and sign a bundle from a model version directory")
    p.add_argument(
        "--model-dir",
        type=Path,
        required=True,
        help="version directory (model.onnx|model.tflite, weights, test_vectors.npz)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="config.toml (default: in or beside --model-dir; else all defaults)",
    )
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--version", type=int, required=True, help="model version (directory number)")
    p.add_argument(
        "--counter", type=int, required=True, help="release counter; must exceed every earlier one"
    )
    p.add_argument(
        "--key", type=Path, action="append", required=True, help="signing key (repeat for k of n)"
    )
    p.add_argument("--expires-in-days", type=float, default=DEFAULT_EXPIRES_IN_DAYS)
    p.add_argument(
        "--arch",
        action="append",
        help=f"target CPU architecture, repeatable (default: {', '.join(DEFAULT_ARCH)})",
    )
    p.add_argument("--runtime", choices=sorted(model_files()), help="default: from the model file")
    p.add_argument(
        "--provider",
        action="append",
        default=[],
        help="execution provider / delegate the device must have one of (repeatable; default: any)",
    )
    p.add_argument(
        "--min-edged-version", default="", help="MAJOR.MINOR.PATCH (default: this edged's)"
    )
    p.add_argument(
        "--rollout",
        type=Path,
        metavar="POLICY_JSON",
        help="the signed rollout policy: probation and gates (docs/bundle-format.md)",
    )
    p.add_argument(
        "--vectors-from",
        type=Path,
        metavar="INPUTS_NPZ",
        help="first write test_vectors.npz into --model-dir: the model's outputs on these inputs",
    )
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(handler=handle_build)

    p = sub.add_parser("sign", help="add a signature to a bundle (for k-of-n thresholds)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("-o", "--output", type=Path, help="default: rewrite the bundle in place")
    p.set_defaults(handler=handle_sign)

    p = sub.add_parser("verify", help="check a bundle against a trust store, check by check")
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--trust",
        type=Path,
        default=DEFAULT_TRUST_DIR,
        help=f"trust directory (default {DEFAULT_TRUST_DIR})",
    )
    p.add_argument(
        "--state", type=Path, help="a device state directory: also check its release counters"
    )
    p.add_argument("--arch", help="check against this architecture instead of this machine's")
    p.set_defaults(handler=handle_verify)

    p = sub.add_parser("inspect", help="show what a bundle claims (without verifying it)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(handler=handle_inspect)

    trust = subparsers.add_parser("trust", help="root keys, bundle-signing keys and thresholds")
    sub = trust.add_subparsers(dest="trust_command", metavar="COMMAND", required=True)

    p = sub.add_parser("init", help="create root.json and signers.json (root keys sign)")
    p.add_argument(
        "--out", type=Path, required=True, help="directory for root.json and signers.json"
    )
    p.add_argument(
        "--root-key",
        type=Path,
        action="append",
        default=[],
        help="root private key that signs now (repeatable)",
    )
    p.add_argument(
        "--root-pub",
        type=Path,
        action="append",
        default=[],
        help="root public key that signs later with 'trust sign'",
    )
    p.add_argument("--root-threshold", type=int, default=1)
    p.add_argument(
        "--signer",
        type=Path,
        action="append",
        required=True,
        help="bundle-signing public key (repeatable)",
    )
    p.add_argument("--threshold", type=int, default=1, help="signatures a bundle needs (k of n)")
    p.add_argument("--expires-in-days", type=float, default=DEFAULT_TRUST_EXPIRES_IN_DAYS)
    p.set_defaults(handler=handle_trust_init)

    p = sub.add_parser("show", help="show a trust store")
    p.add_argument("--trust", type=Path, default=DEFAULT_TRUST_DIR)
    p.set_defaults(handler=handle_trust_show)

    p = sub.add_parser("update", help="make the next signers.json: add, rotate, revoke keys")
    p.add_argument(
        "--trust", type=Path, required=True, help="trust directory holding the current documents"
    )
    p.add_argument(
        "--root-key", type=Path, action="append", default=[], help="root private key (repeatable)"
    )
    p.add_argument("--add-signer", type=Path, action="append", default=[], help="public key to add")
    p.add_argument(
        "--remove",
        action="append",
        default=[],
        metavar="KEYID",
        help="drop a key (unknown from then on)",
    )
    p.add_argument(
        "--revoke",
        action="append",
        default=[],
        metavar="KEYID",
        help="drop a key and list it as revoked",
    )
    p.add_argument("--threshold", type=int, help="new bundle threshold")
    p.add_argument("--expires-in-days", type=float, default=DEFAULT_TRUST_EXPIRES_IN_DAYS)
    p.add_argument(
        "-o", "--output", type=Path, help="write the update here instead of into --trust"
    )
    p.set_defaults(handler=handle_trust_update)

    p = sub.add_parser(
        "apply", help="verify a signers.json update and install it into a trust store"
    )
    p.add_argument("signers", type=Path)
    p.add_argument("--trust", type=Path, default=DEFAULT_TRUST_DIR)
    p.set_defaults(handler=handle_trust_apply)

    p = sub.add_parser("sign", help="add a root signature to root.json or signers.json")
    p.add_argument("document", type=Path)
    p.add_argument("--key", type=Path, required=True)
    p.set_defaults(handler=handle_trust_sign)


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


# --- keys --------------------------------------------------------------------------------


def handle_keygen(args: argparse.Namespace) -> int:
    name: Path = args.name
    private, public = name.with_name(name.name + ".key"), name.with_name(name.name + ".pub")
    private.parent.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    write_private_key(private, key)
    write_public_key(public, key.public_key())
    print(f"private key: {private} (mode 0600; never copy it to a device)")
    print(f"public key:  {public}")
    print(f"key id:      {keyid_of(key.public_key())}")
    return 0


# --- bundles -----------------------------------------------------------------------------


def handle_build(args: argparse.Namespace) -> int:
    from edged.bundle.rollout_policy import load_rollout_file

    keys = [load_private_key(p) for p in args.key]
    if args.vectors_from is not None:
        from edged.cli.vectors import write_test_vectors

        print(f"wrote {write_test_vectors(args.model_dir, args.vectors_from)}")
    now = int(time.time())
    spec = BundleSpec(
        model=args.name,
        version=args.version,
        counter=args.counter,
        created=now,
        expires=now + int(args.expires_in_days * DAY_S),
        arch=tuple(args.arch) if args.arch else DEFAULT_ARCH,
        runtime=args.runtime,
        providers=tuple(args.provider),
        min_edged_version=args.min_edged_version,
        rollout=load_rollout_file(args.rollout) if args.rollout is not None else None,
    )
    manifest = build_bundle_from_dir(args.model_dir, spec, keys, args.output, config=args.config)
    console = Console()
    _print_manifest(console, manifest, [keyid_of(k.public_key()) for k in keys])
    console.print(f"wrote [bold]{args.output}[/bold] ({args.output.stat().st_size} bytes)")
    return 0


def handle_sign(args: argparse.Namespace) -> int:
    signature = add_signature(args.bundle, load_private_key(args.key), args.output)
    print(f"signed {args.output or args.bundle} with key {signature.keyid}")
    return 0


def _print_manifest(
    console: Console, manifest: Manifest, signers: list[str], title: str = "bundle"
) -> None:
    t = manifest.targets
    info = Table(show_header=False, title=title)
    info.add_row("model", f"{manifest.model} version {manifest.version}")
    info.add_row("release counter", str(manifest.counter))
    info.add_row(
        "created / expires", f"{utc_text(manifest.created)} / {utc_text(manifest.expires)}"
    )
    info.add_row(
        "targets",
        f"arch {', '.join(t.arch)}; runtime {t.runtime}; "
        f"providers {', '.join(t.providers) or 'any'}; edged >= {t.min_edged_version}",
    )
    info.add_row("test vectors", ", ".join(manifest.test_vectors) or "inline in config.toml")
    info.add_row("signatures", "\n".join(signers) or "none")
    console.print(info)
    files = Table("file", "bytes", "sha256")
    for f in manifest.files:
        files.add_row(f.path, str(f.size), f.sha256)
    console.print(files)


def handle_inspect(args: argparse.Namespace) -> int:
    with args.bundle.open("rb") as f:
        head, entries = read_unverified(f)
    manifest = parse_manifest(head.manifest_bytes)
    if args.json:
        document = {
            "manifest": manifest.to_json(),
            "manifest_sha256": manifest_digest(head.manifest_bytes),
            "signatures": [s.keyid for s in head.signatures],
            "entries": [e.path for e in entries],
        }
        print(json.dumps(document, indent=2, sort_keys=True))
        return 0
    console = Console()
    console.print(
        "[yellow]not verified: 'edged bundle verify' checks it against a trust store[/yellow]"
    )
    _print_manifest(console, manifest, [s.keyid for s in head.signatures], title=str(args.bundle))
    return 0


def _verify_report(args: argparse.Namespace) -> tuple[list[CheckResult], Manifest | None]:
    results: list[CheckResult] = []
    trust: TrustState | None = None
    try:
        trust = TrustStore(args.trust).load()
        results.append(
            CheckResult(
                "trust store",
                True,
                f"{args.trust}: signers v{trust.signers.version}, "
                f"threshold {trust.signers.threshold}",
            )
        )
    except BundleError as exc:
        results.append(CheckResult("trust store", False, f"{type(exc).__name__}: {exc}"))
    marks = ModelStore(args.state).read_high_water() if args.state else {}
    device = detect_device_facts()
    if args.arch:
        device = type(device)(args.arch, device.runtimes, device.providers, device.edged_version)
    with args.bundle.open("rb") as f:
        reader = ArchiveReader(f, DEFAULT_LIMITS)
        try:
            head, pending = read_head(reader, DEFAULT_LIMITS)
        except BundleError as exc:
            results.append(CheckResult("archive", False, f"{type(exc).__name__}: {exc}"))
            return results, None
        results.append(
            CheckResult("archive", True, f"manifest and {len(head.signatures)} signature(s) read")
        )
        checks, manifest = explain_manifest(
            head.manifest_bytes, head.signatures, trust, marks, device, int(time.time())
        )
        results += checks
        if manifest is None:
            results.append(CheckResult("files", None, "manifest did not parse"))
            return results, None
        with tempfile.TemporaryDirectory(prefix="edged-verify-") as scratch:
            sink = _VectorSink(Path(scratch), set(manifest.test_vectors))
            try:
                read_files(reader, pending, manifest, sink)
                results.append(
                    CheckResult(
                        "files",
                        True,
                        f"{len(manifest.files)} file(s), {manifest.total_size} bytes, "
                        "sizes and SHA-256 match",
                    )
                )
            except BundleError as exc:
                results.append(CheckResult("files", False, f"{type(exc).__name__}: {exc}"))
                results.append(CheckResult("test vectors", None, "files did not verify"))
            else:
                results.append(_check_vectors(sink, manifest))
            finally:
                sink.close()
    return results, manifest


class _VectorSink(NullSink):
    """Keeps the bundle's .npz test vectors (only those) in a scratch directory."""

    def __init__(self, root: Path, wanted: set[str]) -> None:
        self.root = root
        self.wanted = wanted
        self.paths: dict[str, Path] = {}
        self._file: BinaryIO | None = None

    def begin(self, entry: FileEntry) -> None:
        if entry.path in self.wanted:
            path = self.root / f"{len(self.paths)}.npz"
            self.paths[entry.path] = path
            self._file = path.open("wb")

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)

    def end(self, entry: FileEntry) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _check_vectors(sink: _VectorSink, manifest: Manifest) -> CheckResult:
    budget = DEFAULT_LIMITS.max_vector_bytes
    try:
        for name, path in sorted(sink.paths.items()):
            budget -= check_vector_file(path, name, DEFAULT_LIMITS, budget)
    except BundleError as exc:
        return CheckResult("test vectors", False, f"{type(exc).__name__}: {exc}")
    used = DEFAULT_LIMITS.max_vector_bytes - budget
    return CheckResult(
        "test vectors", True, f"{len(sink.paths)} .npz file(s), {used} bytes of arrays"
    )


def handle_verify(args: argparse.Namespace) -> int:
    results, _ = _verify_report(args)
    table = Table("check", "result", "detail", title=f"verify {args.bundle}")
    marks = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "[dim]skipped[/dim]"}
    for r in results:
        table.add_row(r.name, marks[r.ok], r.detail)
    Console().print(table)
    ok = all(r.ok is not False for r in results) and any(
        r.name == "signatures" and r.ok for r in results
    )
    print("bundle OK" if ok else "bundle REJECTED", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


# --- trust -------------------------------------------------------------------------------


def handle_trust_init(args: argparse.Namespace) -> int:
    root_keys = [load_private_key(p) for p in args.root_key]
    root_pubs = [k.public_key() for k in root_keys] + [load_public_key(p) for p in args.root_pub]
    if not root_pubs:
        raise ConfigError("--root-key", "at least one root key is required")
    signer_pubs = [load_public_key(p) for p in args.signer]
    for option, value, count in (
        ("--root-threshold", args.root_threshold, len(root_pubs)),
        ("--threshold", args.threshold, len(signer_pubs)),
    ):
        if not 1 <= value <= count:
            raise ConfigError(
                option, f"must be between 1 and the {count} key(s) given; got {value}"
            )
    expires = int(time.time() + args.expires_in_days * DAY_S)
    root = build_root(root_pubs, args.root_threshold, root_keys)
    signers = build_signers(signer_pubs, args.threshold, 1, expires, root_keys)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in ((ROOT_FILE, root), (SIGNERS_FILE, signers)):
        if (args.out / name).exists():
            raise TrustDocumentError(
                f"{args.out / name} exists; refusing to replace a trust document"
            )
        _write_new(args.out / name, data)
    print(f"wrote {args.out / ROOT_FILE} and {args.out / SIGNERS_FILE}")
    try:
        load_trust_state(root, signers)
    except SignatureError as exc:
        print(f"not yet valid: {exc}\nadd root signatures with 'edged trust sign'", file=sys.stderr)
        return 1
    print("valid: copy both files to <state>/trust/ on each device (public keys only)")
    return 0


def handle_trust_show(args: argparse.Namespace) -> int:
    store = TrustStore(args.trust)
    state = store.load()
    console = Console()
    root = Table(
        "root key id",
        title=f"{store.root_path}: version {state.root.version}, threshold {state.root.threshold}",
    )
    for keyid in sorted(state.root.keys):
        root.add_row(keyid)
    console.print(root)
    s = state.signers
    expired = " [red](EXPIRED)[/red]" if time.time() >= s.expires else ""
    signers = Table(
        "signing key id",
        "status",
        title=f"{store.signers_path}: version {s.version}, threshold {s.threshold} of "
        f"{len(s.keys)}, expires {utc_text(s.expires)}{expired}",
    )
    for keyid in sorted(s.keys):
        signers.add_row(keyid, "trusted")
    for keyid in sorted(s.revoked):
        signers.add_row(keyid, "[red]revoked[/red]")
    console.print(signers)
    return 0


def handle_trust_update(args: argparse.Namespace) -> int:
    store = TrustStore(args.trust)
    state = store.load()
    current = signers_document_json(state)
    keys = dict(state.signers.keys)
    revoked = set(state.signers.revoked)
    for keyid in [*args.remove, *args.revoke]:
        if not KEYID_RE.match(keyid) or keyid not in keys:
            raise ConfigError(
                "--remove/--revoke",
                f"{keyid} is not a key of signers.json version {state.signers.version}",
            )
        del keys[keyid]
    revoked |= set(args.revoke)
    for path in args.add_signer:
        public = load_public_key(path)
        keys[keyid_of(public)] = public
        revoked.discard(keyid_of(public))
    threshold = args.threshold if args.threshold is not None else int(current["threshold"])
    if not keys or not 1 <= threshold <= len(keys):
        raise ConfigError(
            "--threshold",
            f"must be between 1 and the {len(keys)} remaining key(s); got {threshold}",
        )
    root_keys = [load_private_key(p) for p in args.root_key]
    expires = int(time.time() + args.expires_in_days * DAY_S)
    update = build_signers(
        list(keys.values()),
        threshold,
        state.signers.version + 1,
        expires,
        root_keys,
        sorted(revoked),
    )
    if args.output:
        _write_new(args.output, update)
        print(f"wrote signers.json version {state.signers.version + 1} to {args.output}")
        return 0
    new_state = store.apply_signers_update(update, int(time.time()))
    print(
        f"{store.signers_path} is now version {new_state.signers.version}: {len(keys)} key(s), "
        f"threshold {threshold}, {len(revoked)} revoked"
    )
    return 0


def handle_trust_apply(args: argparse.Namespace) -> int:
    state = TrustStore(args.trust).apply_signers_update(args.signers.read_bytes(), int(time.time()))
    print(f"signers.json version {state.signers.version} applied to {args.trust}")
    return 0


def handle_trust_sign(args: argparse.Namespace) -> int:
    data = add_document_signature(args.document.read_bytes(), load_private_key(args.key))
    _write_new(args.document, data)
    try:
        parse_root(data)
        valid = "root.json now meets its threshold"
    except TrustDocumentError:
        valid = ""
    except SignatureError as exc:
        valid = f"still short: {exc}"
    print(f"signed {args.document}{': ' + valid if valid else ''}")
    return 0

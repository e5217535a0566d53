"""The offline key store on the workstation: TUF keys, the trust roots, the image-repo targets.

A key directory made by ``edgepack keys init`` looks like this::

    KEYDIR/
      private/            offline keys (root, targets), PEM PKCS#8, mode 0600. Never leave the workstation.
      online/             online keys for the update server (snapshot, timestamp, director) + trust roots.
      trust/root.json     the image repository's current root (devices and servers pin this)
      trust/roots/N.root.json   every root version, for rotation chains
      trust/director-root.json  the director's root: root keys offline, director key online
      repo/targets.json   the current image-repository targets metadata (cumulative: every signed bundle file)

Why cumulative targets: TUF has one ``targets`` metadata per repository whose version only grows. Listing
every bundle that may still run lets an operator roll a fleet back to an earlier version without the
device ever accepting a lower metadata version. Raising the per-model *floor* (``keys raise-floor``) drops
old bundles from the list and records the floor in the signed metadata, so a replayed old version is refused.

Signing is python-tuf's (``Metadata.sign`` with securesystemslib's ``CryptoSigner``); nothing here does
cryptography by hand.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Role, Root, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from bundles._util import atomic_write, utcnow
from bundles.errors import KeyStoreError

ROLES = ("root", "targets", "snapshot", "timestamp")
OFFLINE_ROLES = ("root", "targets")
ONLINE_ROLES = ("snapshot", "timestamp", "director")
EDGEPACK_FIELD = "x-edgepack"
"""Name of the signed extension field in targets metadata: ``{"floors": {model: release_counter}}``."""

DEFAULT_ROOT_EXPIRY = timedelta(days=365)
DEFAULT_TARGETS_EXPIRY = timedelta(days=365)

_SERIALIZER = JSONSerializer(compact=False)


def dump_metadata(md: Metadata[Any]) -> bytes:
    """Serialize metadata deterministically (sorted keys, indented)."""
    return md.to_bytes(_SERIALIZER)


def _load_signer(path: Path) -> CryptoSigner:
    try:
        private = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyStoreError(f"cannot load private key: {exc}", path=str(path)) from exc
    return CryptoSigner(private)


def _write_private(path: Path, signer: CryptoSigner) -> None:
    atomic_write(path, signer.private_bytes, mode=0o600)


@dataclass
class KeyStore:
    """Keys and metadata of one key directory. Load with :meth:`load`, create with :meth:`init`."""

    directory: Path
    signers: dict[str, list[CryptoSigner]] = field(default_factory=dict)
    """Private keys present here, by role (``root``, ``targets``, ``snapshot``, ``timestamp``, ``director``)."""

    # ---- paths -----------------------------------------------------------------------------------------
    @property
    def root_path(self) -> Path:
        return self.directory / "trust" / "root.json"

    @property
    def director_root_path(self) -> Path:
        return self.directory / "trust" / "director-root.json"

    @property
    def targets_path(self) -> Path:
        return self.directory / "repo" / "targets.json"

    # ---- creation and loading ---------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        root_keys: int = 3,
        root_threshold: int = 2,
        targets_keys: int = 1,
        targets_threshold: int = 1,
        expires: timedelta = DEFAULT_ROOT_EXPIRY,
        now: datetime | None = None,
    ) -> KeyStore:
        """Create a fresh key set, the image and director roots (v1) and an empty targets (v1)."""
        now = now or utcnow()
        if directory.exists() and any(directory.iterdir()):
            raise KeyStoreError(
                "key directory is not empty; refusing to overwrite keys (choose a new --out)",
                path=str(directory),
            )
        for name, count, threshold in (("root", root_keys, root_threshold), ("targets", targets_keys,
                                                                              targets_threshold)):
            if count < 1 or not 1 <= threshold <= count:
                raise KeyStoreError(f"{name}: threshold must be between 1 and the number of keys",
                                    expected=f"1..{count}", found=threshold)
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        store = cls(directory=directory)
        counts = {"root": root_keys, "targets": targets_keys, "snapshot": 1, "timestamp": 1, "director": 1}
        for role, count in counts.items():
            store.signers[role] = [CryptoSigner.generate_ed25519() for _ in range(count)]
            sub = "private" if role in OFFLINE_ROLES else "online"
            for signer in store.signers[role]:
                _write_private(directory / sub / f"{role}-{signer.public_key.keyid[:16]}.pem", signer)

        root = Root(expires=now + expires, consistent_snapshot=True)
        for role in ROLES:
            for signer in store.signers[role]:
                root.add_key(signer.public_key, role)
        root.roles["root"].threshold = root_threshold
        root.roles["targets"].threshold = targets_threshold
        store._write_root(Metadata(root))

        director = Root(expires=now + expires, consistent_snapshot=False)
        for signer in store.signers["root"]:
            director.add_key(signer.public_key, "root")
        for role in ("targets", "snapshot", "timestamp"):
            director.add_key(store.signers["director"][0].public_key, role)
        director.roles["root"].threshold = root_threshold
        store._write_director_root(Metadata(director))

        targets = Metadata(Targets(version=1, expires=now + DEFAULT_TARGETS_EXPIRY))
        targets.signed.unrecognized_fields[EDGEPACK_FIELD] = {"floors": {}}
        store._sign("targets", targets)
        atomic_write(store.targets_path, dump_metadata(targets))
        return store

    @classmethod
    def load(cls, directory: Path) -> KeyStore:
        """Load a key directory; raises :class:`KeyStoreError` with what is missing."""
        if not (directory / "trust" / "root.json").is_file():
            raise KeyStoreError(
                "not an edgepack key directory (no trust/root.json); create one with `edgepack keys init`",
                path=str(directory),
            )
        store = cls(directory=directory)
        for sub in ("private", "online"):
            for pem in sorted((directory / sub).glob("*.pem")):
                role = pem.name.split("-", 1)[0]
                store.signers.setdefault(role, []).append(_load_signer(pem))
        return store

    # ---- metadata accessors ------------------------------------------------------------------------------
    def root(self) -> Metadata[Root]:
        return Metadata[Root].from_bytes(self.root_path.read_bytes())

    def director_root(self) -> Metadata[Root]:
        return Metadata[Root].from_bytes(self.director_root_path.read_bytes())

    def targets(self) -> Metadata[Targets]:
        return Metadata[Targets].from_bytes(self.targets_path.read_bytes())

    def root_chain(self) -> list[bytes]:
        """Every root version in order (1.root.json, 2.root.json, ...), for devices to walk rotations."""
        roots = sorted((self.directory / "trust" / "roots").glob("*.root.json"),
                       key=lambda p: int(p.name.split(".")[0]))
        return [p.read_bytes() for p in roots]

    # ---- signing -----------------------------------------------------------------------------------------
    def _signers_for(self, role: str, root: Root) -> list[CryptoSigner]:
        keyids = set(root.roles[role].keyids)
        return [s for s in self.signers.get(role, []) if s.public_key.keyid in keyids]

    def _sign(self, role: str, md: Metadata[Any], root: Root | None = None) -> None:
        root = root or self.root().signed
        signers = self._signers_for(role, root)
        threshold = root.roles[role].threshold
        if len(signers) < threshold:
            raise KeyStoreError(
                f"{role} needs {threshold} signatures but only {len(signers)} of its keys are in this "
                "directory; copy the missing private keys into private/ to sign",
                path=str(self.directory), expected=threshold, found=len(signers),
            )
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def _write_root(self, md: Metadata[Root]) -> None:
        data = dump_metadata(self._signed_root(md))
        atomic_write(self.directory / "trust" / "roots" / f"{md.signed.version}.root.json", data)
        atomic_write(self.root_path, data)
        atomic_write(self.directory / "online" / "root.json", data)

    def _signed_root(self, md: Metadata[Root]) -> Metadata[Root]:
        if not md.signatures:
            self._sign("root", md, md.signed)
        return md

    def _write_director_root(self, md: Metadata[Root]) -> None:
        self._sign("root", md, md.signed)
        data = dump_metadata(md)
        atomic_write(self.director_root_path, data)
        atomic_write(self.directory / "online" / "director-root.json", data)

    def sign_targets(
        self,
        add: Iterable[TargetFile] = (),
        *,
        floors: dict[str, int] | None = None,
        expires: timedelta = DEFAULT_TARGETS_EXPIRY,
        now: datetime | None = None,
        persist: bool = True,
    ) -> Metadata[Targets]:
        """Add target files and/or raise floors, bump the version, sign, and persist targets.json.

        A floor can only go up; raising it drops every listed bundle of that model whose release counter
        is below it, so those bundles can never verify again. With ``persist=False`` the caller writes it
        with :meth:`save_targets` once what depends on it is safely written (``assemble_bundle``: the archive).
        """
        now = now or utcnow()
        md = self.targets()
        ext = dict(md.signed.unrecognized_fields.get(EDGEPACK_FIELD, {}))
        current_floors: dict[str, int] = dict(ext.get("floors", {}))
        for name, floor in (floors or {}).items():
            if floor < current_floors.get(name, 0):
                raise KeyStoreError(f"the floor of {name!r} can only be raised",
                                    expected=f">= {current_floors[name]}", found=floor)
            current_floors[name] = floor
        for target in add:
            md.signed.targets[target.path] = target
        for path, target in list(md.signed.targets.items()):
            custom = target.custom
            name = custom.get("name")
            if isinstance(name, str) and int(custom.get("release_counter", 0)) < current_floors.get(name, 0):
                del md.signed.targets[path]
        ext["floors"] = current_floors
        md.signed.unrecognized_fields[EDGEPACK_FIELD] = ext
        md.signed.version += 1
        md.signed.expires = now + expires
        self._sign("targets", md)
        if persist:
            self.save_targets(md)
        return md

    def save_targets(self, md: Metadata[Targets]) -> None:
        """Persist targets metadata signed by :meth:`sign_targets` (atomically)."""
        atomic_write(self.targets_path, dump_metadata(md))

    def rotate(
        self,
        role: str,
        *,
        add_keys: int = 1,
        revoke: Iterable[str] = (),
        threshold: int | None = None,
        expires: timedelta = DEFAULT_ROOT_EXPIRY,
        now: datetime | None = None,
    ) -> Metadata[Root]:
        """Rotate keys of ``role``: generate ``add_keys`` new keys, revoke key ids (prefixes allowed).

        The new root (version N+1) is signed by a threshold of the old root keys *and* of the new ones,
        as the TUF specification requires, so devices holding version N can walk to N+1.
        """
        now = now or utcnow()
        if role not in (*ROLES,):
            raise KeyStoreError(f"unknown role {role!r}", expected="|".join(ROLES), found=role)
        old = self.root()
        new = Metadata[Root].from_bytes(dump_metadata(old))
        new.signatures.clear()
        new.signed.version += 1
        new.signed.expires = now + expires
        new_signers = [CryptoSigner.generate_ed25519() for _ in range(add_keys)]
        for signer in new_signers:
            new.signed.add_key(signer.public_key, role)
        revoked: list[str] = []
        for prefix in revoke:
            matches = [k for k in new.signed.roles[role].keyids if k.startswith(prefix)]
            if len(matches) != 1:
                raise KeyStoreError(f"key id prefix {prefix!r} matches {len(matches)} {role} keys",
                                    expected="exactly one", found=len(matches))
            new.signed.revoke_key(matches[0], role)
            revoked.extend(matches)
        if threshold is not None:
            new.signed.roles[role].threshold = threshold
        if new.signed.roles[role].threshold > len(new.signed.roles[role].keyids):
            raise KeyStoreError(f"{role} threshold above its number of keys",
                                expected=f"<= {len(new.signed.roles[role].keyids)}",
                                found=new.signed.roles[role].threshold)
        sub = "private" if role in OFFLINE_ROLES else "online"
        for signer in new_signers:
            _write_private(self.directory / sub / f"{role}-{signer.public_key.keyid[:16]}.pem", signer)
            self.signers.setdefault(role, []).append(signer)
        # Sign with the old root's keys, then (for a root rotation) the new root's keys as well.
        old_signers = self._signers_for("root", old.signed)
        new_root_signers = self._signers_for("root", new.signed)
        need_old, need_new = old.signed.roles["root"].threshold, new.signed.roles["root"].threshold
        if len(old_signers) < need_old or len(new_root_signers) < need_new:
            raise KeyStoreError("not enough root keys here to sign the new root",
                                expected=f"{need_old} old and {need_new} new", found=len(old_signers))
        seen: set[str] = set()
        for signer in [*old_signers, *new_root_signers]:
            if signer.public_key.keyid not in seen:
                new.sign(signer, append=True)
                seen.add(signer.public_key.keyid)
        self._write_root(new)
        for keyid in revoked:
            for pem in self.directory.glob(f"*/{role}-{keyid[:16]}.pem"):
                pem.rename(pem.with_suffix(".pem.revoked"))
        self.signers[role] = [s for s in self.signers.get(role, []) if s.public_key.keyid not in revoked]
        if role == "targets":
            # Re-sign the current targets with the new key set so that it verifies under the new root.
            targets = self.targets()
            targets.signed.version += 1
            self._sign("targets", targets, new.signed)
            atomic_write(self.targets_path, dump_metadata(targets))
        return new

    def role_summary(self) -> dict[str, dict[str, Any]]:
        """Key ids and thresholds per role, and which private keys are present here."""
        root = self.root().signed
        present = {s.public_key.keyid for signers in self.signers.values() for s in signers}
        out: dict[str, dict[str, Any]] = {}
        for name, role in root.roles.items():
            assert isinstance(role, Role)
            out[name] = {
                "threshold": role.threshold,
                "keyids": list(role.keyids),
                "present_here": [k for k in role.keyids if k in present],
            }
        out["director"] = {"keyids": [s.public_key.keyid for s in self.signers.get("director", [])]}
        return out


@dataclass(frozen=True)
class OnlineKeys:
    """What the update server holds: the trust roots and the online keys (snapshot, timestamp, director).

    Load from the ``online/`` folder of a key directory (or the key directory itself, in tests/demo).
    """

    root: bytes
    director_root: bytes
    snapshot: CryptoSigner
    timestamp: CryptoSigner
    director: CryptoSigner

    @classmethod
    def load(cls, directory: Path) -> OnlineKeys:
        if (directory / "online").is_dir():
            directory = directory / "online"
        missing = [n for n in ("root.json", "director-root.json") if not (directory / n).is_file()]
        if missing:
            raise KeyStoreError("online key folder is incomplete", path=str(directory),
                                expected="root.json and director-root.json", found=f"missing {missing}")
        root = Metadata[Root].from_bytes((directory / "root.json").read_bytes()).signed
        director_root = Metadata[Root].from_bytes((directory / "director-root.json").read_bytes()).signed
        # A role's signer must be a key the current root lists for it (rotated-out keys are ignored).
        listed = {"snapshot": set(root.roles["snapshot"].keyids), "timestamp": set(root.roles["timestamp"].keyids),
                  "director": set(director_root.roles["targets"].keyids)}
        found: dict[str, CryptoSigner] = {}
        for pem in sorted(directory.glob("*.pem")):
            role = pem.name.split("-", 1)[0]
            if role in OFFLINE_ROLES:
                raise KeyStoreError("an offline key sits among the online keys; remove it from the server",
                                    path=str(pem))
            signer = _load_signer(pem)
            if signer.public_key.keyid in listed.get(role, set()):
                found[role] = signer
        missing = [r for r in ONLINE_ROLES if r not in found]
        if missing:
            raise KeyStoreError("online key folder is incomplete", path=str(directory),
                                expected="snapshot, timestamp and director keys listed in the roots",
                                found=f"missing {missing}")
        return cls((directory / "root.json").read_bytes(), (directory / "director-root.json").read_bytes(),
                   found["snapshot"], found["timestamp"], found["director"])

"""The bundle library's exception tree.

Every error raised by ``bundles`` derives from :class:`BundleError`; callers can
catch that one class. The tree says who is at fault::

    BundleError
    ├── FormatError            the bundle or a document in it is malformed
    │   ├── ManifestError      manifest.json does not parse or is incomplete
    │   └── UnsupportedError   a newer format / op-set / op than this edgepack knows
    ├── PreprocessingError     the preprocessing pipeline refused an input or config
    ├── ArchiveError           the archive container is unsafe (traversal, links, bombs)
    ├── VerificationError      a signature, hash, length, expiry or counter check failed
    │   ├── UnsignedFileError      a file is present that no signed metadata lists
    │   ├── MissingFileError       a signed file is absent
    │   ├── DigestMismatchError    a file's length or hash differs from its signed value
    │   ├── SignatureError         metadata not signed by a threshold of trusted keys
    │   ├── ExpiredMetadataError   metadata past its expiry
    │   ├── RollbackError          version / release counter below what is trusted
    │   └── HardwareMismatchError  the bundle is not for this hardware
    └── KeyStoreError          the key directory is missing, incomplete or inconsistent

Errors carry ``path`` (which file), ``expected`` and ``found`` where they apply,
so a message always shows what was expected and what was found.
"""

from __future__ import annotations


class BundleError(Exception):
    """Base of every error raised by the bundle library."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        expected: object | None = None,
        found: object | None = None,
    ) -> None:
        self.path = path
        self.expected = expected
        self.found = found
        parts = [message]
        if path is not None:
            parts.append(f"file: {path}")
        if expected is not None:
            parts.append(f"expected: {expected}")
        if found is not None:
            parts.append(f"found: {found}")
        super().__init__("; ".join(parts))
        self.message = message


class FormatError(BundleError):
    """The bundle, or a document inside it, is malformed."""


class ManifestError(FormatError):
    """manifest.json does not parse, or lacks a required field."""


class UnsupportedError(FormatError):
    """The bundle uses a format version, op-set or op this edgepack does not know."""


class PreprocessingError(BundleError):
    """The preprocessing pipeline refused its configuration or an input."""


class ArchiveError(BundleError):
    """The archive container is unsafe or corrupt (traversal, links, bombs, overlaps)."""


class VerificationError(BundleError):
    """A signature, hash, length, expiry or counter check failed. Nothing is trusted."""


class UnsignedFileError(VerificationError):
    """A file is present that no signed metadata lists."""


class MissingFileError(VerificationError):
    """A file that the signed metadata lists is absent."""


class DigestMismatchError(VerificationError):
    """A file's length or hash differs from its signed value."""


class SignatureError(VerificationError):
    """Metadata is not signed by a threshold of the trusted keys for its role."""


class ExpiredMetadataError(VerificationError):
    """Metadata is past its expiry date."""


class RollbackError(VerificationError):
    """A metadata version or bundle release counter is below what is already trusted."""


class HardwareMismatchError(VerificationError):
    """The bundle or assignment is for other hardware."""


class KeyStoreError(BundleError):
    """The key directory is missing, incomplete or inconsistent."""

"""Make the golden bundle of a format version (run once per released format version, then commit).

    python -m tests.bundles.golden.make_golden tests/bundles/golden/format-v1

Writes ``root.json`` (the trust root), ``digits-1.0.0.edgepack`` and ``info.json`` (when it was made, its
content digest). The private keys are thrown away: this bundle can never be re-signed, only verified.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from bundles._util import utcnow
from bundles.keys import KeyStore
from bundles.manifest import FORMAT_VERSION
from tests.support.factories import make_digits_bundle


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    tmp = Path(tempfile.mkdtemp())
    try:
        ks = KeyStore.init(tmp / "keys")
        info = make_digits_bundle(ks, out / "digits-1.0.0.edgepack")
        shutil.copy(ks.root_path, out / "root.json")
        (out / "info.json").write_text(json.dumps({
            "format_version": FORMAT_VERSION, "made_at": utcnow().isoformat(),
            "content_digest": info.content_digest, "name": info.name, "version": info.version,
        }, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""``edgepack-agent tuf``: a TUF client for the public tuf-conformance suite, over the agent's own code.

It follows the suite's client protocol (CLIENT-CLI.md)::

    edgepack-agent tuf --metadata-dir DIR init TRUSTED_ROOT_FILE
    edgepack-agent tuf --metadata-dir DIR --metadata-url URL refresh
    edgepack-agent tuf --metadata-dir DIR --metadata-url URL --target-name NAME [--target-name NAME2 ...] \
        --target-base-url URL --target-dir DIR download

Exit code 0 on success, 1 on any failure. Metadata is stored under non-versioned names (``root.json``,
``timestamp.json``, ...). Metadata goes through :class:`~device_agent.fetcher.DeadlineFetcher` and
targets through :func:`~device_agent.fetcher.download_target`, exactly as in the daemon; a target already in
the target directory with matching hashes is not downloaded again. Like python-tuf's ngclient, targets are
fetched as ``<dir>/<hash>.<basename>`` when the trusted root sets ``consistent_snapshot`` (TUF 5.7.3), by
plain path otherwise.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib import parse

from tuf.api.metadata import Metadata, Root

from device_agent.clock import SystemClock
from device_agent.fetcher import DeadlineFetcher, cached, download_target, open_updater, target_url
from device_agent.transport import Deadline, Urllib3Transport

log = logging.getLogger("edgepack-agent.tuf")
DEADLINE_S = 300.0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="edgepack-agent tuf", description=__doc__.split("\n\n")[0])
    p.add_argument("--metadata-dir", required=True, type=Path)
    p.add_argument("--metadata-url")
    p.add_argument("--target-name", action="append", default=[])
    p.add_argument("--target-base-url")
    p.add_argument("--target-dir", type=Path)
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="overall deadline per command, seconds")
    sub = p.add_subparsers(dest="tuf_command", required=True)
    init = sub.add_parser("init", help="trust the given root (no network)")
    init.add_argument("trusted_root", type=Path)
    sub.add_parser("refresh", help="update top-level metadata")
    sub.add_parser("download", help="refresh, then download the named targets")
    return p


def _updater(args: argparse.Namespace, with_targets: bool):  # type: ignore[no-untyped-def]
    if not args.metadata_url:
        raise ValueError("--metadata-url is required")
    if not (args.metadata_dir / "root.json").exists():
        raise ValueError(f"no trusted root in {args.metadata_dir}; run `init` first")
    clock = SystemClock()
    fetcher = DeadlineFetcher(Urllib3Transport(), clock)
    fetcher.deadline = Deadline(clock, args.deadline, "metadata refresh")
    # Targets are downloaded by download_target below, not by python-tuf; it follows consistent_snapshot.
    return open_updater(args.metadata_dir, args.metadata_url, fetcher, bootstrap=None,
                        target_dir=args.target_dir if with_targets else None,
                        target_url=args.target_base_url if with_targets else None,
                        prefix_targets_with_hash=False), fetcher


def _trusted_root(metadata_dir: Path) -> Root:
    """The root python-tuf trusts after its refresh (it keeps the newest verified one as ``root.json``)."""
    return Metadata[Root].from_bytes((metadata_dir / "root.json").read_bytes()).signed


def run(args: argparse.Namespace) -> int:
    """Run one command; 0 on success, 1 on any failure (the reason goes to stderr)."""
    try:
        if args.tuf_command == "init":
            args.metadata_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.trusted_root, args.metadata_dir / "root.json")
            return 0
        if args.tuf_command == "refresh":
            updater, _ = _updater(args, with_targets=False)
            updater.refresh()
            return 0
        if args.tuf_command == "download":
            if not args.target_name or not args.target_base_url or args.target_dir is None:
                raise ValueError("download needs --target-name, --target-base-url and --target-dir")
            updater, fetcher = _updater(args, with_targets=True)
            updater.refresh()
            hash_prefix = bool(_trusted_root(args.metadata_dir).consistent_snapshot)
            args.target_dir.mkdir(parents=True, exist_ok=True)
            for name in args.target_name:
                info = updater.get_targetinfo(name)
                if info is None:
                    raise LookupError(f"target {name!r} is not listed in the signed metadata")
                dest = args.target_dir / parse.quote(info.path, "")
                if cached(dest, info):
                    continue
                url = target_url(args.target_base_url, info, hash_prefix=hash_prefix)
                download_target(fetcher.transport, url, dest, info, Deadline(fetcher.clock, args.deadline),
                                socket_timeout_s=fetcher.socket_timeout_s)
            return 0
        raise ValueError(f"unknown command {args.tuf_command!r}")
    except Exception as exc:  # the protocol wants exit code 1 for *any* failure, with the reason shown
        print(f"edgepack-agent tuf {args.tuf_command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

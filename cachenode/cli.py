"""The ``cachenode`` command (SPEC §7). Exit 0 on success, 1 when an operation failed, 2 on bad
usage or config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

from cachenode import __version__, ctl
from cachenode.config import Config, default_config_path, load_config, where_glance
from cachenode.errors import CachenodeError, ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cachenode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cachenode {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        default=None,
        help=f"config file (default $CACHENODE_CONFIG or {default_config_path()})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", parents=[common], help="run the sidecar")
    sub.add_parser("check-config", parents=[common], help="check the config file and exit")
    for name, text in (
        ("ls", "list what L1 holds and what is being filled"),
        ("stats", "totals: entries, bytes, capacity, free disk, hit ratio"),
    ):
        cmd = sub.add_parser(name, parents=[common], help=text)
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
    warm = sub.add_parser("warm", parents=[common], help="fill images now")
    warm.add_argument("ids", nargs="*", metavar="ID")
    warm.add_argument("--tag", action="append", default=[], help="every active image with this tag")
    warm.add_argument(
        "--property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="every active image with this property",
    )
    evict = sub.add_parser("evict", parents=[common], help="remove images from L1")
    evict.add_argument("ids", nargs="*", metavar="ID")
    evict.add_argument("--all", action="store_true", help="every image")
    evict.add_argument("--idle-for", metavar="DURATION", help="images not served for this long")
    evict.add_argument("--force", action="store_true", help="pinned images too")
    for name, text in (("pin", "never evict these images"), ("unpin", "let the policy evict them")):
        sub.add_parser(name, parents=[common], help=text).add_argument(
            "ids", nargs="+", metavar="ID"
        )
    sub.add_parser("verify", parents=[common], help="re-hash every entry, evict those that fail")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "warm" and not (args.ids or args.tag or args.property):
        parser.error("warm: give image ids, --tag or --property")
    if args.command == "evict" and sum(map(bool, (args.ids, args.all, args.idle_for))) != 1:
        parser.error("evict: give image ids, --all or --idle-for (one of them)")
    try:
        config = load_config(args.config or default_config_path())
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        tiers = ", ".join(f"{t.name} ({t.kind})" for t in config.tiers) or "none"
        listen = f"{config.listen[0]}:{config.listen[1]}"
        print(
            f"config ok: listen {listen}, glance {where_glance(config)}, "
            f"tiers {tiers}, policy {config.policy.name}"
        )
        return EXIT_OK
    if args.command == "serve":
        return serve(config)
    return ctl.run(lambda: _operate(args, config))


def _operate(args: argparse.Namespace, config: Config) -> int:
    client = ctl.AdminClient(config)
    out = sys.stdout
    if args.command == "ls":
        return ctl.ls(client, args.json, out)
    if args.command == "stats":
        return ctl.stats(client, args.json, out)
    if args.command == "warm":
        ids = list(args.ids) + ctl.glance_image_ids(config, args.tag, args.property)
        if not ids:
            print("cachenode: no active image matches", file=sys.stderr)
            return EXIT_FAILED
        return ctl.warm(client, ids, out)
    if args.command == "evict":
        return ctl.evict(client, args.ids, args.all, args.idle_for, args.force, out)
    if args.command in ("pin", "unpin"):
        return ctl.pin(client, args.ids, args.command == "pin", out)
    return ctl.verify(client, out)


class SecondFormatter(logging.Formatter):
    """``logging.Formatter`` with its default time stamp (``2026-01-01 00:00:00,000``) made once
    a second instead of once a line: ``strftime`` cost each access log line more than the rest
    of its formatting. The text is the same, to the millisecond."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None or self.default_msec_format is None:
            return super().formatTime(record, datefmt)
        second, stamp = self._second
        if int(record.created) != second:
            second = int(record.created)
            stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, stamp)  # one assignment: a handler of another thread
        return self.default_msec_format % (stamp, record.msecs)


def serve(config: Config) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SecondFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])
    try:
        asyncio.run(_serve(config))
    except CachenodeError as exc:
        logging.getLogger("cachenode").error("cannot start: %s", exc)
        return EXIT_FAILED
    except OSError as exc:
        logging.getLogger("cachenode").error("cannot start: %s", exc)
        return EXIT_FAILED
    return EXIT_OK


async def _serve(config: Config) -> None:
    from cachenode.sidecar import Sidecar, StartAbandoned

    log = logging.getLogger("cachenode")
    sidecar = Sidecar(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, sidecar.stop_requested.set)
    try:
        await sidecar.start()  # a stop asked for while it waits ends it (Sidecar._unless_stopped)
    except StartAbandoned as exc:
        log.info("stopping before serving: asked to stop while waiting for %s", exc)
        return
    waits = [asyncio.create_task(e.wait()) for e in (sidecar.stop_requested, sidecar.handed_over)]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        log.info("stopping")
        try:
            await sidecar.stop()
        finally:
            if sidecar.handed_over.is_set() and not sidecar.stop_requested.is_set():
                # Exiting now, even on a failed stop, would have the kubelet restart this
                # container, which would take the sockets back from its successor
                # (cachenode.handover). Holding nothing, it waits for its SIGTERM.
                log.info("stopped after the handover; waiting for SIGTERM")
                await sidecar.stop_requested.wait()

"""The ``cachenode`` command (SPEC §7). Exit 0 on success, 1 when an operation failed, 2 on bad
usage or config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from cachenode import __version__
from cachenode.config import Config, default_config_path, load_config
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config or default_config_path())
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        tiers = ", ".join(f"{t.name} ({t.kind})" for t in config.tiers) or "none"
        print(
            f"config ok: listen {config.listen[0]}:{config.listen[1]}, glance {config.glance_url}, "
            f"tiers {tiers}, policy {config.policy.name}"
        )
        return EXIT_OK
    return serve(config)


def serve(config: Config) -> int:
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
    from cachenode.sidecar import Sidecar

    sidecar = Sidecar(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    try:
        await stop.wait()
    finally:
        logging.getLogger("cachenode").info("stopping")
        await sidecar.stop()

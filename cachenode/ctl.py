"""The operator commands of the CLI (ls, stats, warm, evict, pin, unpin, verify): clients of the
admin API of a running sidecar, found through the same config file (``admin.listen``,
``admin.token_file``). Glance is asked directly only to turn ``warm --tag``/``--property`` into
image ids, with the service credentials.

Each command returns an exit status: 0 done, 1 an operation failed, 2 bad usage or config.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cachenode.config import Config
from cachenode.errors import NoGlanceEndpoint, ServiceAuthFailed
from cachenode.identity import ServiceIdentity
from cachenode.units import format_bytes

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CtlError(Exception):
    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class AdminClient:
    def __init__(self, config: Config, timeout: float = 600.0) -> None:
        if config.admin_token is None:
            raise CtlError(
                "config error: admin.token_file: the CLI needs the admin token", EXIT_USAGE
            )
        host, port = config.admin_listen
        host = f"[{host}]" if ":" in host else host
        self.base = f"http://{host}:{port}/admin/v1"
        self.token = config.admin_token
        self.timeout = timeout

    def get(self, path: str, key: str | None = None) -> Any:
        """The document of a GET that must succeed (``doc[key]`` with a key). Any other answer
        (an older sidecar without the path, during an upgrade; a 500) is one clear line, not a
        traceback."""
        status, doc = self.call("GET", path)
        if status != 200 or not isinstance(doc, dict) or (key is not None and key not in doc):
            error = doc.get("error") if isinstance(doc, dict) else None
            raise CtlError(f"the admin API answered {status} to GET {path}: {error or 'no data'}")
        return doc if key is None else doc[key]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token.reveal()}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                doc = json.load(exc)
            except ValueError:
                doc = {"error": exc.reason}
            if exc.code == 401:
                raise CtlError("the admin API refused the admin token") from None
            return exc.code, doc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CtlError(
                f"cannot reach the admin API at {self.base}: {reason} (is cachenode serving?)"
            ) from None


def glance_image_ids(config: Config, tags: list[str], properties: list[str]) -> list[str]:
    """Active images with any of ``tags`` or ``key=value`` ``properties``, asked of Glance."""
    identity = ServiceIdentity.from_config(config)
    if identity is None:
        raise CtlError("config error: service_auth: needed to ask Glance for tags", EXIT_USAGE)
    try:
        token = identity.token_now()
    except ServiceAuthFailed as exc:
        raise CtlError(str(exc)) from None
    try:
        glance_url = config.glance_url or identity.glance_endpoint_now()
    except NoGlanceEndpoint as exc:
        raise CtlError(str(exc)) from None
    queries = [{"tag": t} for t in tags]
    for prop in properties:
        key, sep, value = prop.partition("=")
        if not sep or not key:
            raise CtlError(f"--property takes key=value, not {prop!r}", EXIT_USAGE)
        queries.append({key: value})
    found: dict[str, None] = {}
    for query in queries:
        path: str | None = "/v2/images?" + urllib.parse.urlencode(
            {**query, "status": "active", "limit": 200}
        )
        while path:
            request = urllib.request.Request(glance_url + path, headers={"X-Auth-Token": token})
            try:
                with urllib.request.urlopen(request, timeout=60) as resp:
                    page = json.load(resp)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise CtlError(f"cannot list images in Glance: {exc}") from None
            found.update((image["id"], None) for image in page.get("images", []))
            path = page.get("next")
    return list(found)


def ls(client: AdminClient, as_json: bool, out: TextIO) -> int:
    images = client.get("/images", "images")
    if as_json:
        json.dump(images, out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(
        f"{'IMAGE':36}  {'STATE':8}  {'SIZE':>9}  {'TIER':12}  {'HITS':>5}  {'IDLE':>8}  PINNED\n"
    )
    now = time.time()
    for image in images:
        idle = _age(now - image["last_access"]) if "last_access" in image else "-"
        size = format_bytes(image["size"])
        if image["state"] == "filling":
            size = f"{100 * image['landed'] // max(1, image['size'])}%"
        out.write(
            f"{image['id']:36}  {image['state']:8}  {size:>9}  {image.get('tier') or '-':12}  "
            f"{image.get('hits', 0):>5}  {idle:>8}  {'yes' if image.get('pinned') else ''}\n"
        )
    return EXIT_OK


def stats(client: AdminClient, as_json: bool, out: TextIO) -> int:
    doc = client.get("/stats")
    if as_json:
        json.dump(doc, out, indent=2)
        out.write("\n")
        return EXIT_OK
    ratio = "-" if doc["hit_ratio"] is None else f"{100 * doc['hit_ratio']:.1f}%"
    cached = f"{format_bytes(doc['bytes'])} of {format_bytes(doc['capacity_bytes'])}"
    lines = [
        ("entries", str(doc["entries"])),
        ("cached", f"{cached} (policy {doc['policy']})"),
        ("disk free", format_bytes(doc["disk_free_bytes"])),
        ("fills running", str(doc["inflight_fills"])),
        ("hit ratio", ratio),
        ("requests", ", ".join(f"{k} {v}" for k, v in sorted(doc["requests"].items())) or "none"),
    ]
    for key, value in lines:
        out.write(f"{key + ':':15}{value}\n")
    return EXIT_OK


@dataclass
class Warming:
    """One image ``warm`` follows: what the admin API last said of it."""

    id: str
    name: str | None
    size: int
    landed: int = 0
    state: str = "filling"  # filling | queued | cached | failed

    @property
    def label(self) -> str:
        """For a terminal: the name is any project's text, so it is shown as text (no markup, see
        ``_follow_with_bars``) and a control character in it (an escape sequence) as ``?``."""
        if not self.name:
            return self.id
        shown = "".join(c if c.isprintable() else "?" for c in self.name)
        return f"{shown}  {self.id[:8]}"


def warm(client: AdminClient, ids: list[str], out: TextIO, poll: float = 0.2) -> int:
    """Warm every image at once (the sidecar's tier limits decide how many fill together) and
    follow them to the end: a bar per image on a terminal, a line per image otherwise."""
    started: list[Warming] = []
    failed = False
    for image_id in dict.fromkeys(ids):
        status, doc = client.call("POST", f"/images/{image_id}/warm")
        if status in (200, 202):
            warming = Warming(image_id, doc.get("name"), int(doc.get("size") or 0))
            if status == 200:  # in L1 already
                warming.state, warming.landed = "cached", warming.size
            started.append(warming)
        else:
            out.write(f"{image_id}  failed: {doc.get('error') or doc.get('state')}\n")
            failed = True
    if out.isatty():
        _follow_with_bars(client, started, out, poll)
    else:
        _follow(client, started, partial(_print_end, out), poll)
    failed |= any(w.state == "failed" for w in started)
    return EXIT_FAILED if failed else EXIT_OK


def _follow(
    client: AdminClient, warmings: list[Warming], changed: Callable[[Warming], None], poll: float
) -> None:
    """Poll the fills in progress until every warm is cached or failed; ``changed`` is called
    for every update, once more when each one ends (``state`` then says how)."""
    pending = [w for w in warmings if w.state != "cached"]
    for done in (w for w in warmings if w.state == "cached"):
        changed(done)
    while pending:
        running = {f["id"]: f for f in client.get("/fills", "fills")}
        for warming in list(pending):
            fill = running.get(warming.id)
            if fill is None:  # over: cached, or gone because it failed
                status, fill = client.call("GET", f"/images/{warming.id}")
                if status != 200 or fill["state"] != "filling":
                    cached = status == 200 and fill["state"] == "cached"
                    warming.state = "cached" if cached else "failed"
                    warming.landed = warming.size if cached else warming.landed
                    pending.remove(warming)
                    changed(warming)
                    continue
            warming.landed = int(fill.get("landed", 0))
            warming.state = "queued" if fill.get("queued") else "filling"
            changed(warming)
        if pending:
            time.sleep(poll)


def _print_end(out: TextIO, warming: Warming) -> None:
    """The one line a warm leaves when stdout is not a terminal, when it ends."""
    if warming.state == "cached":
        out.write(f"{warming.id}  {format_bytes(warming.size)}  cached\n")
    elif warming.state == "failed":
        out.write(f"{warming.id}  failed: the fill did not complete\n")
    out.flush()


_STATES = {"filling": "filling", "queued": "waiting for a slot", "cached": "cached",
           "failed": "[red]failed[/red]"}  # fmt: skip


def _follow_with_bars(
    client: AdminClient, warmings: list[Warming], out: TextIO, poll: float
) -> None:
    """A bar per image, with its rate and time left (rich computes both from the updates)."""
    console = Console(file=out)
    columns = (
        TextColumn("{task.description}", markup=False),  # an image's name, as written
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[state]}"),
    )
    with Progress(*columns, console=console) as progress:
        tasks = {
            w.id: progress.add_task(w.label, total=w.size or None, state=_STATES[w.state])
            for w in warmings
        }

        def changed(warming: Warming) -> None:
            progress.update(
                tasks[warming.id], completed=warming.landed, state=_STATES[warming.state]
            )

        _follow(client, warmings, changed, poll)


def evict(
    client: AdminClient, ids: list[str], every: bool, idle_for: str | None, force: bool, out: TextIO
) -> int:
    body: dict[str, Any] = {"force": force}
    if every:
        body["all"] = True
    elif idle_for:
        body["idle_for"] = idle_for
    else:
        body["ids"] = ids
    status, doc = client.call("POST", "/evict", body)
    if status != 200:
        raise CtlError(f"evict: {doc.get('error')}", EXIT_USAGE if status == 400 else EXIT_FAILED)
    for image_id in doc["evicted"]:
        out.write(f"{image_id}  evicted\n")
    for image_id in doc["kept_pinned"]:
        out.write(f"{image_id}  kept: pinned (--force to evict)\n")
    missing = set(ids) - set(doc["evicted"]) - set(doc["kept_pinned"])
    for image_id in sorted(missing):
        out.write(f"{image_id}  not cached\n")
    return EXIT_OK


def pin(client: AdminClient, ids: list[str], pinned: bool, out: TextIO) -> int:
    failed = False
    for image_id in ids:
        status, doc = client.call("PUT" if pinned else "DELETE", f"/images/{image_id}/pin")
        if status == 200:
            out.write(f"{image_id}  {'pinned' if pinned else 'unpinned'}\n")
        else:
            out.write(f"{image_id}  failed: {doc.get('error')}\n")
            failed = True
    return EXIT_FAILED if failed else EXIT_OK


def verify(client: AdminClient, out: TextIO) -> int:
    _, doc = client.call("POST", "/verify")
    for image_id in doc["failed"]:
        out.write(f"{image_id}  failed its hash: evicted\n")
    out.write(f"{doc['checked']} entries checked, {len(doc['failed'])} failed\n")
    return EXIT_FAILED if doc["failed"] else EXIT_OK


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def run(command: Callable[[], int]) -> int:
    try:
        return command()
    except CtlError as exc:
        print(f"cachenode: {exc}" if exc.status != EXIT_USAGE else str(exc), file=sys.stderr)
        return exc.status

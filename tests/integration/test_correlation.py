"""X-Openstack-Request-Id end to end, against a real glance-api that logs at debug level.

Glance logs each request's lines as ``[None req-<id> <user> <project> ...]`` and adopts a caller's
``X-Openstack-Request-Id`` as that id, so its log says which id each call had, and whose it was.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import glanceclient
import pytest
import requests
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint

from cachenode.correlation import HEADER
from tests.support import rawhttp
from tests.support.glance import ALICE, BOB, CAROL, Glance, Image
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream

ID = re.compile(r"req-[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}")


@pytest.fixture(scope="module")
def chatty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Glance]:
    """A glance-api of its own (no image cache), logging every request's lines with its id."""
    bed = Glance(
        tmp_path_factory.mktemp("glance-debug"),
        flavor="fakeauth",
        env={"GLANCE_EXTRA_CONF": "[DEFAULT]\ndebug = True\n"},
    ).start()
    yield bed
    bed.stop()


@pytest.fixture
def slow_tier(chatty: Glance) -> Iterator[Upstream]:
    """Glance as the one tier, ~2 s for a 4 MiB image: long enough to join a fill."""
    with Upstream(target=chatty.url, faults=[Fault("throttle", rate=2 << 20, times=-1)]) as tier:
        yield tier


@pytest.fixture
def car(tmp_path: Path, chatty: Glance, slow_tier: Upstream) -> Iterator[Sidecar]:
    sidecar = Sidecar(
        tmp_path / "sidecar",
        chatty.url,
        tiers=[{"name": "regional", "kind": "glance", "url": slow_tier.url}],
    ).start()
    yield sidecar
    sidecar.stop()


def glance_log(glance: Glance) -> str:
    return (glance.base / "log" / "glance-api.log").read_text(errors="replace")


def glance_logged(glance: Glance, request_id: str, who: str) -> bool:
    """Whether Glance logged a line of request ``request_id`` made by ``who`` ("alice projA")."""
    return f"[None {request_id} {who} " in glance_log(glance)


def one_id(resp: requests.Response) -> str:
    values = [v for k, v in resp.raw.headers.items() if k.lower() == HEADER.lower()]
    assert len(values) == 1, resp.raw.headers
    assert ID.fullmatch(values[0]), values
    return values[0]


def caller_id() -> str:
    return f"req-{uuid.uuid4()}"


def access_lines(car: Sidecar, image: Image) -> list[str]:
    return [line for line in car.log().splitlines() if f"GET /v2/images/{image.id}/file" in line]


def test_miss_join_and_hit_carry_glances_ids_then_ours(
    chatty: Glance, car: Sidecar, slow_tier: Upstream
) -> None:
    image = chatty.create_image(4 << 20)
    chatty.share(image.id, "projC")
    first, joiner, hitter = caller_id(), caller_id(), caller_id()
    got: dict[str, requests.Response] = {}

    def download(name: str, token: str, headers: dict[str, str]) -> threading.Thread:
        thread = threading.Thread(
            target=lambda: got.update({name: car.get(image.id, token, False, headers=headers)})
        )
        thread.start()
        return thread

    callers = [download("miss", ALICE, {HEADER: first})]
    deadline = time.monotonic() + 10
    while not car.partials() and time.monotonic() < deadline:
        time.sleep(0.02)
    callers.append(download("joined", CAROL, {HEADER: joiner}))
    callers.append(download("anonymous", ALICE, {}))  # no id of its own: Glance's
    for thread in callers:
        thread.join()
    car.settle()
    hit = car.get(image.id, ALICE, headers={HEADER: hitter})

    joined, anonymous_join = got["joined"], got["anonymous"]
    assert [r.headers["X-Cachenode-Status"] for r in (got["miss"], joined, hit)] == [
        "MISS", "JOINED", "HIT",
    ]  # fmt: skip
    assert anonymous_join.headers["X-Cachenode-Status"] == "JOINED"
    # Glance adopted the caller's id for the probe it was sent on, and answered with it.
    assert one_id(got["miss"]) == first and glance_logged(chatty, first, "alice projA")
    assert one_id(joined) == joiner and glance_logged(chatty, joiner, "carol projC")
    glances = one_id(anonymous_join)
    assert glances not in (first, joiner) and glance_logged(chatty, glances, "alice projA")
    # A hit's bytes are ours: our own id, which Glance never saw; the caller's went to the probe.
    ours = one_id(hit)
    assert ours != hitter and ours not in glance_log(chatty)
    assert glance_logged(chatty, hitter, "alice projA")
    # The fill's fetch is the tier's, for every caller: it carries no caller's id.
    assert len(slow_tier.requests_for(image.id)) == 1
    lines = access_lines(car, image)
    assert any(f"HIT l1 {len(image.data)} bytes" in ln and f"{ours} global {hitter}" in ln
               for ln in lines), lines  # fmt: skip
    assert any(f"{first} global {first}" in ln for ln in lines), lines
    assert any(f"{glances} global -" in ln for ln in lines), lines


def test_answers_relayed_from_glance_carry_glances_id(chatty: Glance, car: Sidecar) -> None:
    image = chatty.create_image(1 << 20)
    listing = requests.get(car.url + "/v2/images", headers={"X-Auth-Token": ALICE}, timeout=60)
    refused = car.get(image.id, BOB)  # alice's private image: Glance's 404, relayed
    bypass = car.get(image.id, ALICE, headers={"Range": "bytes=0-1,4-5"})  # Glance's to answer
    assert listing.status_code == 200 and refused.status_code == 404
    assert bypass.headers["X-Cachenode-Status"] == "BYPASS"
    assert glance_logged(chatty, one_id(listing), "alice projA")
    assert glance_logged(chatty, one_id(refused), "bob projB")
    assert glance_logged(chatty, one_id(bypass), "alice projA")
    # ...and the caller's own id goes with the request passed through, as Glance adopts it.
    mine = caller_id()
    refused = car.get(image.id, BOB, headers={HEADER: mine})
    assert one_id(refused) == mine and glance_logged(chatty, mine, "bob projB")
    line = access_lines(car, image)[-1]
    assert " 404 - - " in line and line.endswith(f"{mine} global {mine}"), line


def test_our_own_answers_carry_our_id(chatty: Glance, car: Sidecar) -> None:
    image = chatty.create_image(1 << 20)
    car.get(image.id, ALICE)
    unsatisfiable = car.get(image.id, ALICE, headers={"Range": "bytes=99999999-"})
    assert unsatisfiable.status_code == 416
    assert one_id(unsatisfiable) not in glance_log(chatty)
    malformed = car.get(image.id, "caf\u00e9")  # refused by us, never shown to Glance
    assert malformed.status_code == 401
    assert one_id(malformed) not in glance_log(chatty)


@pytest.mark.parametrize(
    "bad",
    [
        "junk-correlation-1",
        caller_id().upper().replace("REQ-", "req-"),
        caller_id() + "-forged-correlation",
        "req-" + "forged-correlation" * 220,  # ~4 KB: Glance would refuse the probe (431)
    ],
)
def test_an_ill_formed_id_is_neither_forwarded_nor_logged(
    chatty: Glance, car: Sidecar, bad: str
) -> None:
    image = chatty.create_image(1 << 20)
    miss = car.get(image.id, ALICE, headers={HEADER: bad})
    hit = car.get(image.id, ALICE, headers={HEADER: bad})
    assert [miss.status_code, hit.status_code] == [200, 200]
    assert [miss.headers["X-Cachenode-Status"], hit.headers["X-Cachenode-Status"]] == [
        "MISS", "HIT",
    ]  # fmt: skip
    assert glance_logged(chatty, one_id(miss), "alice projA")  # Glance's own, not the caller's
    assert one_id(hit) not in glance_log(chatty)
    assert bad not in glance_log(chatty) and bad.lower() not in glance_log(chatty)
    assert bad not in car.log()
    assert all(line.endswith(" global -") for line in access_lines(car, image))


@pytest.mark.parametrize("newline", ["\r\n ", "\n", "\r"])
def test_an_id_with_a_newline_is_refused_before_anything(
    chatty: Glance, car: Sidecar, newline: str
) -> None:
    """The HTTP parser refuses it (400, as bare bytes: no handler ran, so no id of ours either)."""
    image = chatty.create_image(1 << 20)
    forged = "X-Forged: forged-newline-correlation"
    raw = rawhttp.request(
        "GET",
        f"/v2/images/{image.id}/file",
        [("X-Auth-Token", ALICE), (HEADER, caller_id() + newline + forged)],
    )
    answer = rawhttp.exchange(car.port, raw)
    assert answer is not None and answer.status == 400
    assert "forged-newline-correlation" not in glance_log(chatty)
    assert "forged-newline-correlation" not in car.log()
    assert access_lines(car, image) == []


def test_nova_s_way_of_calling_glance_is_correlated(chatty: Glance, car: Sidecar) -> None:
    """glanceclient with ``global_request_id``, as nova builds it for every call it makes."""
    image = chatty.create_image(1 << 20)
    global_id = caller_id()
    session = ks_session.Session(auth=token_endpoint.Token(car.url, ALICE))
    client = glanceclient.Client(
        "2", session=session, endpoint_override=car.url, global_request_id=global_id
    )
    for status in ("MISS", "HIT"):
        body = client.images.data(image.id)
        assert b"".join(body) == image.data
        car.settle()
        line = access_lines(car, image)[-1]
        assert f" 200 {status} " in line and line.endswith(f" global {global_id}"), line
        # glanceclient hands nova the answer's id: Glance's (the caller's own) on a miss, ours
        # on a hit, which the access line shows next to the caller's
        if status == "MISS":
            assert body.request_ids == [global_id]
        else:
            assert len(body.request_ids) == 1 and body.request_ids[0] != global_id
        assert line.endswith(f"{body.request_ids[0]} global {global_id}")
    assert glance_logged(chatty, global_id, "alice projA")

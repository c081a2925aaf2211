"""Which request ids are forwarded and logged (oslo's form only), and which a response carries."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from cachenode import correlation
from cachenode.correlation import Correlation

GOOD = "req-0123abcd-4567-89ab-cdef-0123456789ab"


def headers(*values: str) -> CIMultiDict[str]:
    return CIMultiDict((correlation.HEADER, v) for v in values)


def test_a_well_formed_id_is_taken() -> None:
    assert correlation.only_valid(headers(GOOD)) == GOOD
    assert correlation.only_valid(CIMultiDict({"x-openstack-request-id": GOOD})) == GOOD


@pytest.mark.parametrize(
    "values",
    [
        (),
        ("junk",),
        (GOOD + "\n",),  # oslo's regex, matched with ``$``, would take it
        (GOOD + "\r\nX-Forged: 1",),
        ("req-" + "a" * 8192,),
        (GOOD.upper().replace("REQ-", "req-"),),  # oslo's form is lowercase
        (GOOD.removeprefix("req-"),),
        (" " + GOOD,),
        (GOOD, GOOD),  # one header or none: which one would Glance judge?
    ],
)
def test_anything_else_is_neither_forwarded_nor_logged(values: tuple[str, ...]) -> None:
    assert correlation.only_valid(headers(*values)) is None


def test_our_own_ids_have_oslos_form_and_are_new_each_time() -> None:
    ids = {correlation.new_id() for _ in range(100)}
    assert len(ids) == 100 and all(correlation.valid(i) for i in ids)


def test_a_miss_carries_the_probes_id_then_the_records_then_our_own() -> None:
    ids = Correlation(caller=None)
    assert ids.for_response("MISS") == ids.own
    ids.record = "req-11111111-1111-4111-8111-111111111111"
    assert ids.for_response("JOINED") == ids.record
    ids.probe = "req-22222222-2222-4222-8222-222222222222"
    assert ids.for_response("MISS") == ids.probe
    assert ids.for_response("HIT") == ids.own  # bytes of ours: our id, whatever Glance said
    assert ids.for_response(None) == ids.own  # an error of ours


def test_glance_calls_send_and_note_ids_only_for_the_request_they_serve() -> None:
    async def scenario() -> tuple[dict[str, str], dict[str, str], Correlation]:
        assert correlation.outbound() == {}  # no request (a warm): nothing sent
        ids = Correlation(caller=GOOD)
        correlation.CURRENT.set(ids)

        async def call() -> dict[str, str]:  # a task, as a coalesced Glance call runs in
            correlation.note("probe", headers("req-33333333-3333-4333-8333-333333333333"))
            correlation.note("record", headers("junk"))  # not Glance's form: not believed
            correlation.note("probe", headers("req-44444444-4444-4444-8444-444444444444"))
            return correlation.outbound()

        sent = await asyncio.ensure_future(call())
        correlation.CURRENT.set(Correlation(caller=None))
        return sent, correlation.outbound(), ids

    sent, anonymous, ids = asyncio.run(scenario())
    assert sent == {correlation.HEADER: GOOD}
    assert anonymous == {}
    assert ids.probe == "req-33333333-3333-4333-8333-333333333333"  # the first answer's
    assert ids.record is None

"""Byte-range sets: checked against a plain set of byte offsets by hypothesis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cachenode.spans import Spans

span = st.tuples(st.integers(0, 200), st.integers(0, 60)).map(lambda t: (t[0], t[0] + t[1]))
ops = st.lists(st.tuples(st.sampled_from(["add", "discard"]), span), max_size=40)


def as_set(spans: Spans) -> set[int]:
    return {i for s, e in spans for i in range(s, e)}


@given(ops)
def test_spans_behave_like_a_set_of_offsets(operations: list[tuple[str, tuple[int, int]]]) -> None:
    spans, model = Spans(), set()
    for op, (s, e) in operations:
        getattr(spans, op)(s, e)
        if op == "add":
            model |= set(range(s, e))
        else:
            model -= set(range(s, e))
        assert as_set(spans) == model
        listed = list(spans)
        assert all(a < b for a, b in listed)  # non-empty
        assert all(
            listed[k][1] < listed[k + 1][0] for k in range(len(listed) - 1)
        )  # merged, sorted
        assert spans.total == len(model)


@given(st.lists(span, max_size=20), span, st.integers(1, 50))
def test_take_overlapping_and_end_of_run(
    added: list[tuple[int, int]], probe: tuple[int, int], limit: int
) -> None:
    spans = Spans(added)
    model = as_set(spans)
    s, e = probe
    assert {i for a, b in spans.overlapping(s, e) for i in range(a, b)} == model & set(range(s, e))
    run_end = spans.end_of_run(s)
    assert set(range(s, run_end)) <= model and run_end not in model
    taken = spans.take(limit)
    if not model:
        assert taken is None
    else:
        assert taken is not None
        a, b = taken
        assert a == min(model) and 0 < b - a <= limit and set(range(a, b)) <= model
        assert as_set(spans) == model - set(range(a, b))

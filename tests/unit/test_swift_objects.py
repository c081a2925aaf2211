"""Which Swift object a tier reads, that it never leaves its account, how a TempURL is signed."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from cachenode.config import TierConfig
from cachenode.errors import BadLocation, TierNotFound
from cachenode.glance import ImageInfo
from cachenode.tiers.swift import SwiftTier, object_in, segment

ID = "8c9c8a8e-3f3a-4b1e-9d55-1b2a3c4d5e6f"
ACCOUNT = "http://swift.example:8080/v1/AUTH_glance"
KEY = "secret"


def image(*locations: str, image_id: str = ID) -> ImageInfo:
    return ImageInfo(id=image_id, status="active", size=1, checksum=None, hash_algo=None,
                     hash_value=None, locations=locations)  # fmt: skip


@pytest.fixture
def tier(tmp_path: Path) -> SwiftTier:
    key = tmp_path / "k"
    key.write_text(KEY + "\n")
    return SwiftTier(TierConfig("s", "swift", ACCOUNT, container="glance", temp_url_key_file=key))


@pytest.fixture(scope="module")
def same_tier(tmp_path_factory: pytest.TempPathFactory) -> SwiftTier:
    """One tier for every example of a hypothesis test (its key never changes)."""
    key = tmp_path_factory.mktemp("key") / "k"
    key.write_text(KEY)
    return SwiftTier(TierConfig("s", "swift", ACCOUNT, temp_url_key_file=key))


def test_locations_glance_store_writes() -> None:
    assert object_in(f"swift+config://ref1/glance/{ID}", ACCOUNT) == ("glance", ID)
    assert object_in(f"SWIFT+CONFIG://ref1/glance_8c9/{ID}", ACCOUNT) == ("glance_8c9", ID)
    # multi-tenant style: a storage URL, accepted when it is exactly this account
    here = f"swift+http://SWIFT.example:8080/v1/AUTH_glance/imgs/{ID}"
    assert object_in(here, ACCOUNT) == ("imgs", ID)
    assert object_in(f"swift+https://h/v1/AUTH_x/c/{ID}", "https://h:443/v1/AUTH_x/") == ("c", ID)
    # names are literal, as glance_store takes them: a space or a letter outside ASCII is a name
    assert object_in(f"swift+config://ref1/c d/{ID}", ACCOUNT) == ("c d", ID)
    assert object_in("swift+config://ref1/glänce/...", ACCOUNT) == ("glänce", "...")
    for other in (f"file:///var/lib/glance/images/{ID}", f"rbd://fsid/images/{ID}/snap",
                  f"http://mirror/{ID}", "", "swiftly://x/y/z"):  # fmt: skip
        assert object_in(other, ACCOUNT) is None  # not Swift's: not this tier's business


HOSTILE = [
    # dot segments, plain and encoded, single and double
    "swift+config://ref1/glance/..", "swift+config://ref1/glance/.", f"swift+config://ref1/../{ID}",
    "swift+config://ref1/glance/%2e%2e", "swift+config://ref1/glance/%2E%2E",
    "swift+config://ref1/glance/.%2e", "swift+config://ref1/%2e/x", "swift+config://ref1/glance/%252e%252e",
    # extra segments, slashes plain and encoded, single and double, and backslashes
    f"swift+config://ref1/glance/x/../{ID}", f"swift+config://ref1/a/b/{ID}",
    f"swift+config://ref1/glance/..%2f..%2fAUTH_other%2fc%2f{ID}", "swift+config://ref1/glance/a%2Fb",
    "swift+config://ref1/glance/a%252fb", "swift+config://ref1/glance/a%25252Fb",
    "swift+config://ref1/glance/a\\..\\b", "swift+config://ref1/glance/a%5cb", "swift+config://ref1/glance/50%",
    # empty segments, too few segments, no path
    f"swift+config://ref1/glance//{ID}", f"swift+config://ref1//glance/{ID}",
    f"swift+config://ref1/glance/{ID}/", f"swift+config://ref1/{ID}", "swift+config://ref1",
    f"swift+config:///glance/{ID}", "swift+config://ref1/",
    # control characters, raw and encoded, and spaces around
    "swift+config://ref1/glance/a\x00b", "swift+config://ref1/glance/a%00b",
    "swift+config://ref1/gla\nnce/x", "swift+config://ref1/glance/.\t.", "swift+config://ref1/glance/a\rb",
    "swift+config://ref1/glance/a\u202eb", "swift+config://ref1/glance/a\u2028b",
    "swift+config://ref1/glance/a\x85b", "swift+config://ref1/glance/a\u200bb",
    f" swift+config://ref1/glance/{ID}", f"swift+config://ref1/glance/{ID} ",
    # queries, fragments, a second scheme
    f"swift+config://ref1/glance/{ID}?multipart-manifest=get", f"swift+config://ref1/glance/{ID}#x",
    f"swift+config://ref1/glance/{ID}?", f"swift+config://ref1/glance/http://evil/{ID}",
    # another account or host, or credentials that open one
    f"swift+http://swift.example:8080/v1/AUTH_other/glance/{ID}",
    f"swift+http://swift.example:8080/v1/AUTH_glance/x/glance/{ID}",
    f"swift+http://swift.example:8080/v1/glance/{ID}",
    f"swift+http://swift.example:8081/v1/AUTH_glance/glance/{ID}",
    f"swift+http://swift.example/v1/AUTH_glance/glance/{ID}",
    f"swift+http://evil.example:8080/v1/AUTH_glance/glance/{ID}",
    f"swift+http://swift.example:8080@evil.example:8080/v1/AUTH_glance/glance/{ID}",
    f"swift+https://glance%3Aglance:k3y@keystone:5000/v3/glance/{ID}",
    f"swift://acct:user:k3y@keystone/v3/glance/{ID}", f"swift+config://user:k3y@ref1/glance/{ID}",
    f"swift+http://swift.example:99999/v1/AUTH_glance/glance/{ID}",
    f"swift+http://swift.example:0/v1/AUTH_glance/glance/{ID}",
    f"swift+http://[::1/v1/AUTH_glance/glance/{ID}",
]  # fmt: skip


@pytest.mark.parametrize("location", HOSTILE)
def test_hostile_locations_are_refused_never_followed(tier: SwiftTier, location: str) -> None:
    with pytest.raises(ValueError) as refused:
        object_in(location, ACCOUNT)
    assert "k3y" not in str(refused.value) and "evil" not in str(refused.value)
    # The tier has nothing for such an image: no fallback to <container>/<id> either.
    with pytest.raises(BadLocation) as exc:
        asyncio.run(
            tier.locate(image("file:///x", location, f"swift+config://ref1/glance/{ID}"), None)
        )
    assert isinstance(exc.value, TierNotFound) and exc.value.kind == "bad_location"
    assert "k3y" not in str(exc.value) and location not in str(exc.value)


def test_the_fallback_layout_is_checked_too(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text(KEY)
    for container in ("..", "a%2fb", "a\\b", "."):
        bad = SwiftTier(
            TierConfig("s", "swift", ACCOUNT, container=container, temp_url_key_file=key)
        )
        with pytest.raises(BadLocation):
            asyncio.run(bad.locate(image(), None))
    good = SwiftTier(TierConfig("s", "swift", ACCOUNT, container="glance", temp_url_key_file=key))
    with pytest.raises(BadLocation):
        asyncio.run(good.locate(image(image_id=".."), None))


def test_the_object_glance_names_is_read_else_the_single_tenant_layout(tier: SwiftTier) -> None:
    assert tier.object_of(image()) == ("glance", ID)
    assert tier.object_of(image(f"file:///{ID}")) == ("glance", ID)  # no Swift location
    named = image("file:///x", f"swift+config://ref/other/{ID}-x", f"swift+config://r/y/{ID}")
    assert tier.object_of(named) == ("other", f"{ID}-x")  # the first Swift location


def test_temp_url_is_signed_over_the_path_requested(tier: SwiftTier, tmp_path: Path) -> None:
    odd = tier.signed("c d", "é?#;x", now=1000.0)
    assert URL(odd).raw_path == "/v1/AUTH_glance/c%20d/%C3%A9%3F%23;x"  # as aiohttp sends it
    assert_stays_in_account(odd, "c d", "é?#;x")

    url = tier.signed("glance", ID, now=1000.0)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert parts.path == f"/v1/AUTH_glance/glance/{ID}"
    assert query["temp_url_expires"] == ["1300"]  # now + temp_url_ttl
    expected = hmac.new(KEY.encode(), f"GET\n1300\n{parts.path}".encode(), hashlib.sha256)
    assert query["temp_url_sig"] == [expected.hexdigest()]
    (tmp_path / "k").write_text("rotated\n")  # a new key is used without a restart
    rotated = parse_qs(urlsplit(tier.signed("glance", ID, now=1000.0)).query)["temp_url_sig"]
    assert rotated != [expected.hexdigest()]


def assert_stays_in_account(url: str, container: str, obj: str) -> None:
    """The request goes to this account's host, to exactly (container, object) under it, and its
    signature is over the path Swift decodes from it (Swift's tempurl check)."""
    sent = URL(url)
    assert (sent.host, sent.port) == ("swift.example", 8080)
    decoded = unquote(sent.raw_path)  # what Swift's WSGI layer hands to tempurl
    assert decoded == sent.path == f"/v1/AUTH_glance/{container}/{obj}"
    assert [unquote(p) for p in sent.raw_path.split("/")] == [
        "",
        "v1",
        "AUTH_glance",
        container,
        obj,
    ]
    expires = sent.query["temp_url_expires"]
    expected = hmac.new(KEY.encode(), f"GET\n{expires}\n{decoded}".encode(), hashlib.sha256)
    assert sent.query["temp_url_sig"] == expected.hexdigest()


# Segments built from the pieces attacks are made of, and any text at all.
PIECES = [".", "..", "/", "\\", "%", "%2e", "%2E", "%2f", "%2F", "%25", "%5c", "%00", "\x00",
          "\n", "\t", "?", "#", ";", "@", ":", "//", "glance", ID, "AUTH_other", "v1", " ", "é",
          "\u202e"]  # fmt: skip
segments = st.one_of(
    st.lists(st.sampled_from(PIECES), min_size=0, max_size=5).map("".join),
    st.text(max_size=12),
)


@settings(max_examples=400)
@given(segments, segments)
def test_any_segment_is_refused_or_stays_one_segment(
    same_tier: SwiftTier, container: str, obj: str
) -> None:
    try:
        segment(container), segment(obj)
    except ValueError:
        return
    assert_stays_in_account(same_tier.signed(container, obj, now=1000.0), container, obj)


@settings(max_examples=600)
@given(
    st.sampled_from(["swift+config://ref1", "swift+http://swift.example:8080/v1/AUTH_glance",
                     "swift+http://swift.example:8080/v1/AUTH_other", "swift://u:k@auth/v3",
                     "swift+https://swift.example/v1/AUTH_glance"]),
    st.lists(segments, min_size=0, max_size=4),
)  # fmt: skip
def test_any_location_is_refused_or_read_in_this_account(
    same_tier: SwiftTier, prefix: str, names: list[str]
) -> None:
    location = "/".join([prefix, *names])
    try:
        named = object_in(location, ACCOUNT)
    except ValueError:
        return
    assert named is not None
    container, obj = same_tier.object_of(image(location))
    literal = tuple(location.rsplit("/", 2)[1:])  # the last two segments, never decoded
    assert (container, obj) == named == literal
    assert_stays_in_account(same_tier.signed(container, obj, now=1000.0), container, obj)

"""Which Swift object a tier reads, and how a TempURL is signed."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cachenode.config import TierConfig
from cachenode.glance import ImageInfo
from cachenode.tiers.swift import SwiftTier, object_in

ID = "8c9c8a8e-3f3a-4b1e-9d55-1b2a3c4d5e6f"


def image(*locations: str) -> ImageInfo:
    return ImageInfo(id=ID, status="active", size=1, checksum=None, hash_algo=None, hash_value=None,
                     locations=locations)  # fmt: skip


def test_locations_glance_store_writes() -> None:
    assert object_in(f"swift+config://ref1/glance/{ID}") == ("glance", ID)
    assert object_in(f"swift+https://acct:user:key@auth.example/v3/imgs/{ID}") == ("imgs", ID)
    assert object_in(f"swift://auth.example/v1/c%20d/{ID}") == ("c d", ID)
    assert object_in(f"file:///var/lib/glance/images/{ID}") is None
    assert object_in("swift+config://ref1/only-one") is None


def test_object_path_prefers_glance_s_location(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("secret\n")
    account = "http://swift:8080/v1/AUTH_glance"
    tier = SwiftTier(TierConfig("s", "swift", account, container="glance", temp_url_key_file=key))
    assert tier.object_path(image()) == f"/glance/{ID}"
    assert (
        tier.object_path(image("file:///x", f"swift+config://ref/other/{ID}-x")) == f"/other/{ID}-x"
    )

    url = tier.signed(f"/glance/{ID}", now=1000.0)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert parts.path == f"/v1/AUTH_glance/glance/{ID}"
    assert query["temp_url_expires"] == ["1300"]  # now + temp_url_ttl
    expected = hmac.new(b"secret", f"GET\n1300\n{parts.path}".encode(), hashlib.sha256).hexdigest()
    assert query["temp_url_sig"] == [expected]
    key.write_text("rotated\n")  # a new key is used without a restart
    assert parse_qs(urlsplit(tier.signed(f"/glance/{ID}", now=1000.0)).query)["temp_url_sig"] != [
        expected
    ]

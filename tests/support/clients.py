"""Callers for concurrency tests: each records when its first byte came and what it received."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests


@dataclass
class Caller:
    url: str
    token: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    sha512: str = ""
    received: int = 0
    first_byte: float | None = None
    finished: float | None = None
    error: str | None = None

    def run(self) -> None:
        digest = hashlib.sha512()
        try:
            with requests.get(
                self.url,
                headers={"X-Auth-Token": self.token, **self.headers},
                stream=True,
                timeout=120,
            ) as resp:
                self.status = resp.status_code
                self.response_headers = dict(resp.headers)
                for chunk in resp.iter_content(1 << 16):
                    if self.first_byte is None:
                        self.first_byte = time.monotonic()
                    digest.update(chunk)
                    self.received += len(chunk)
            self.finished = time.monotonic()
        except requests.RequestException as exc:
            self.error = type(exc).__name__
        self.sha512 = digest.hexdigest()


def run_all(callers: list[Caller], stagger: float = 0.0) -> list[Caller]:
    threads = []
    for caller in callers:
        thread = threading.Thread(target=caller.run)
        thread.start()
        threads.append(thread)
        if stagger:
            time.sleep(stagger)
    for thread in threads:
        thread.join(180)
    return callers


def start(caller: Caller) -> threading.Thread:
    thread = threading.Thread(target=caller.run)
    thread.start()
    return thread


def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)

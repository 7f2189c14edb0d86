"""With a Prefect server, the promotion and ingest lock is a global concurrency limit:
one holder at a time, whichever process or machine asks."""

from __future__ import annotations

import threading
import time

import pytest

from visionops.io.locks import LockTimeout, exclusive, file_lock


def test_holders_of_the_prefect_lock_take_turns(prefect_server, tmp_path):
    held: list[tuple[str, float, float]] = []

    def hold(who: str) -> None:
        with exclusive("promotion-locks-test", tmp_path / "here.lock") as where:
            assert where == ["prefect:visionops-promotion-locks-test",
                             str(tmp_path / "here.lock")]
            start = time.monotonic()
            time.sleep(1.0)
            held.append((who, start, time.monotonic()))

    threads = [threading.Thread(target=hold, args=(who,)) for who in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(held) == 2
    (_, _, first_end), (_, second_start, _) = sorted(held, key=lambda h: h[1])
    assert second_start >= first_end


def test_a_file_lock_held_too_long_is_an_error_naming_the_file(tmp_path):
    waiting = file_lock(tmp_path / "busy.lock", timeout_s=0.5)
    with file_lock(tmp_path / "busy.lock"), \
            pytest.raises(LockTimeout, match="busy.lock: held by another process"), waiting:
        pass

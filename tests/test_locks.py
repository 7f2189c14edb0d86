"""With a Prefect server, the promotion and ingest lock is a global concurrency limit:
one holder at a time, whichever process or machine asks."""

from __future__ import annotations

import threading
import time

from visionops.locks import exclusive


def test_holders_of_the_prefect_lock_take_turns(prefect_server, tmp_path):
    held: list[tuple[str, float, float]] = []

    def hold(who: str) -> None:
        with exclusive("promotion-locks-test", tmp_path / "unused.lock") as where:
            assert where == "prefect:visionops-promotion-locks-test"
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
    assert not (tmp_path / "unused.lock").exists()

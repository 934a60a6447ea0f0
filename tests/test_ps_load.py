"""Load: many concurrent clients against one shard, bounded in time and request count.

Reports pushes per second and checks that no acknowledged update was lost: the server's
version and applied-push counter equal the number of acknowledgements exactly.
"""

import threading
import time

import numpy as np
import pytest

from ps_helpers import ServerPool
from radam_dist.ps.client import PSClient

CLIENTS = 16
PUSHES_PER_CLIENT = 25
TIME_BUDGET_S = 60.0


@pytest.mark.timeout(180)
def test_many_concurrent_clients_lose_no_update(tmp_path, record_property):
    pool = ServerPool(tmp_path)
    try:
        server = pool.start(["--mode", "async", "--max-staleness", "-1", "--max-threads", "32"])[0]
        shapes = {"a": (256, 64), "b": (64,), "emb": (1000, 16)}
        PSClient([server.target]).register(
            {n: np.zeros(s, np.float32) for n, s in shapes.items()}, {"learning_rate": 1e-3})
        acks = [0] * CLIENTS
        versions = [[] for _ in range(CLIENTS)]
        errors = []
        deadline = time.monotonic() + TIME_BUDGET_S

        def client_loop(i):
            rng = np.random.default_rng(i)
            try:
                with PSClient([server.target], worker_id=f"load-{i}") as client:
                    client.attach()
                    for n in range(PUSHES_PER_CLIENT):
                        if time.monotonic() > deadline:
                            break
                        grads = {"a": rng.normal(size=shapes["a"]).astype(np.float32),
                                 "b": rng.normal(size=shapes["b"]).astype(np.float32),
                                 "emb": (rng.normal(size=(32, 16)).astype(np.float32),
                                         rng.integers(0, 1000, 32))}
                        if n % 5 == 4:  # the version of the values pulled back, not unique
                            client.push_pull(grads)
                        else:
                            versions[i].append(client.push(grads))
                        acks[i] += 1
            except Exception as err:  # noqa: BLE001
                errors.append(err)

        start = time.monotonic()
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIME_BUDGET_S + 60)
        elapsed = time.monotonic() - start
        assert not errors, errors[:3]
        total = sum(acks)
        stats = PSClient([server.target]).stats()[0]
        throughput = total / elapsed
        record_property("pushes_per_second", round(throughput, 1))
        print(f"\nload: {CLIENTS} clients, {total} pushes in {elapsed:.2f}s = {throughput:.1f} pushes/s, "
              f"{stats['bytes_received'] / elapsed / 1e6:.1f} MB/s in")
        assert total >= CLIENTS * 5  # made real progress inside the time budget
        assert stats["version"] == total
        assert stats["pushes_applied"] == total
        # Every push acknowledged its own version: no two pushes were merged or dropped.
        every = [v for vs in versions for v in vs]
        assert len(set(every)) == len(every) and max(every) <= total
    finally:
        pool.close()

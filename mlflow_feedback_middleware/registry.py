"""The traces this process issued recently, so feedback can tell "not exported yet" from "never existed".

MLflow answers RESOURCE_DOES_NOT_EXIST both for a trace still waiting in its export queue and for a made-up
ID. A trace ID (or client request ID) found here was handed to a client by this process, so feedback for
it is worth waiting for; one not found here gets no such benefit of the doubt.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class RecentTraces:
    """A bounded, thread-safe map of client request ID to trace ID, oldest evicted first."""

    # Waiting only matters within MLflow's export delay (seconds); older client request IDs are found
    # by a search instead. 10,000 entries take about 3 MB.
    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._by_request_id: OrderedDict[str, str] = OrderedDict()
        self._trace_ids: set[str] = set()
        self._open: set[str] = set()  # root spans not ended yet (streams still running)
        self.issued = 0  # trace IDs handed out since start-up
        self._lock = threading.Lock()

    def add(self, trace_id: str, client_request_id: str, own: bool = True) -> None:
        """Remember that this process issued `trace_id` for `client_request_id`; it is open until `ended`.

        A trace this service did not start (a caller's, continued) is found by its client request ID but
        never counts as issued here."""
        with self._lock:
            self.issued += 1
            self._open.add(trace_id)
            old = self._by_request_id.pop(client_request_id, None)
            if old is not None:
                self._trace_ids.discard(old)
            self._by_request_id[client_request_id] = trace_id
            if own:
                self._trace_ids.add(trace_id)
            while len(self._by_request_id) > self._capacity:
                _, evicted = self._by_request_id.popitem(last=False)
                self._trace_ids.discard(evicted)

    def ended(self, trace_id: str) -> None:
        """The root span of `trace_id` has ended: MLflow may export it from now on."""
        with self._lock:
            self._open.discard(trace_id)

    def is_open(self, trace_id: str) -> bool:
        """Whether `trace_id` is a request of this process still being answered."""
        with self._lock:
            return trace_id in self._open

    def trace_for(self, client_request_id: str) -> str | None:
        """The trace issued for `client_request_id`, if this process issued it recently."""
        with self._lock:
            return self._by_request_id.get(client_request_id)

    def __contains__(self, trace_id: object) -> bool:
        with self._lock:
            return trace_id in self._trace_ids

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_request_id)

"""The traces this process issued recently, so feedback can tell "not exported yet" from "never existed".

MLflow answers RESOURCE_DOES_NOT_EXIST both for a trace still waiting in its export queue and for a made-up
ID. A trace ID (or client request ID) found here was handed to a client by this process, so feedback for
it is worth waiting for; one not found here gets no such benefit of the doubt.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestLookup:
    """What this process knows of a client request ID."""

    trace_id: str | None  # None when unknown here, or when it named more than one request
    ambiguous: bool = False  # issued for two or more requests: it names none of them
    chosen_by_client: bool = False  # the client sent it (X-Request-ID): anyone may know it


class RecentTraces:
    """A bounded, thread-safe map of client request ID to trace ID, oldest evicted first."""

    # Waiting only matters within MLflow's export delay (seconds); older client request IDs are found
    # by a search instead. 10,000 entries take about 3 MB.
    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._by_request_id: OrderedDict[str, str] = OrderedDict()
        self._ambiguous: OrderedDict[str, None] = OrderedDict()
        self._chosen_by_client: set[str] = set()
        self._trace_ids: OrderedDict[str, None] = OrderedDict()
        self._open: set[str] = set()  # root spans not ended yet (streams still running)
        # Issued since the delivery thread last shared them with the other workers (bounded: a lost record
        # only shortens a vote's wait on another worker).
        self._unshared: list[tuple[str, str, bool]] = []
        self.issued = 0  # trace IDs handed out since start-up
        self._lock = threading.Lock()

    def add(self, trace_id: str, client_request_id: str, own: bool = True, chosen_by_client: bool = False) -> None:
        """Remember that this process issued `trace_id` for `client_request_id`; it is open until `ended`.

        A trace this service did not start (a caller's, continued) is found by its client request ID but
        never counts as issued here. A client request ID seen for a second request names neither."""
        with self._lock:
            self.issued += 1
            self._open.add(trace_id)
            if own:
                self._trace_ids[trace_id] = None
                while len(self._trace_ids) > self._capacity:
                    self._trace_ids.popitem(last=False)
                if len(self._unshared) < self._capacity:
                    self._unshared.append((trace_id, client_request_id, chosen_by_client))
            if client_request_id in self._by_request_id or client_request_id in self._ambiguous:
                self._by_request_id.pop(client_request_id, None)
                self._ambiguous[client_request_id] = None
                while len(self._ambiguous) > self._capacity:
                    self._ambiguous.popitem(last=False)
                return
            self._by_request_id[client_request_id] = trace_id
            if chosen_by_client:
                self._chosen_by_client.add(client_request_id)
            while len(self._by_request_id) > self._capacity:
                evicted_id, _ = self._by_request_id.popitem(last=False)
                self._chosen_by_client.discard(evicted_id)

    def take_unshared(self) -> list[tuple[str, str, bool]]:
        """The traces issued since the last call: (trace ID, client request ID, chosen by the client)."""
        with self._lock:
            taken, self._unshared = self._unshared, []
            return taken

    def ended(self, trace_id: str) -> None:
        """The root span of `trace_id` has ended: MLflow may export it from now on."""
        with self._lock:
            self._open.discard(trace_id)

    def is_open(self, trace_id: str) -> bool:
        """Whether `trace_id` is a request of this process still being answered."""
        with self._lock:
            return trace_id in self._open

    def lookup(self, client_request_id: str) -> RequestLookup:
        """Everything this process knows of `client_request_id`."""
        with self._lock:
            if client_request_id in self._ambiguous:
                return RequestLookup(None, ambiguous=True)
            return RequestLookup(
                self._by_request_id.get(client_request_id),
                chosen_by_client=client_request_id in self._chosen_by_client,
            )

    def __contains__(self, trace_id: object) -> bool:
        with self._lock:
            return trace_id in self._trace_ids

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_request_id)

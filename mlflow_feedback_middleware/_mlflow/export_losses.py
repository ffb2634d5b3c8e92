"""What MLflow's export path loses, counted where MLflow only logs it, and the hooks into its exporter that
count it (through `internals`)."""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from typing import Any

from . import internals
from .trace_spool import current_spool

logger = logging.getLogger("mlflow_feedback_middleware")


_REMEMBERED_DROPS = 10_000


class ExportLosses:
    """Counts what MLflow's export path loses, which MLflow itself only logs (and at most every 30 s).

    With MLflow's exporter: traces dropped because its task queue was full, and export calls that
    failed (server down or erroring). With OTLP: spans the batch processor dropped from its full queue.
    Counting hooks into MLflow's exporter objects; where they are not as expected (another MLflow
    version), `watching` stays False and the counts read None. A trace counted as dropped lost its
    trace-info write; it may still land from its spans, without its metadata.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.traces_dropped = 0
        self.span_batches_dropped = 0
        self.exports_failed = 0
        self.otlp_spans_dropped = 0
        self.overflow_spooled = 0  # tasks the full queue refused that went to the trace spool instead
        self.watching = False
        # Traces whose spans were in a dropped batch (most recent first out): their trace info must not
        # claim the spans are in the tracking store, so MLflow's exporter uploads them as an artifact.
        self._spans_dropped_for: OrderedDict[str, None] = OrderedDict()

    def spans_dropped(self, trace_id: str) -> bool:
        """Whether a batch holding spans of `trace_id` was dropped from MLflow's full export queue."""
        with self._lock:
            return trace_id in self._spans_dropped_for

    def _remember_dropped_spans(self, spans: Any) -> None:
        with self._lock:
            for span in spans if isinstance(spans, list) else ():
                trace_id = getattr(span, "trace_id", None)
                if isinstance(trace_id, str):
                    self._spans_dropped_for[trace_id] = None
            while len(self._spans_dropped_for) > _REMEMBERED_DROPS:
                self._spans_dropped_for.popitem(last=False)

    def _forget_dropped_spans(self, spans: list[Any]) -> None:
        with self._lock:
            for span in spans:
                self._spans_dropped_for.pop(getattr(span, "trace_id", None), None)  # type: ignore[arg-type]

    def count_failure(self) -> None:
        """An export call failed (counted where MLflow's exporter would only log it)."""
        self._count("exports_failed")

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def watch(self) -> None:
        """Hook the exporter MLflow uses now; call again after it is rebuilt. Never raises."""
        try:
            export_queue = internals.export_queue(internals.trace_exporter())
            if type(export_queue) is queue.Queue:
                export_queue.__class__ = self._counting_queue()
                self.watching = True
            elif isinstance(export_queue, queue.Queue):
                self.watching = True  # hooked already
            metrics = internals.otlp_drop_metrics(internals.span_processor())
            drop_items = getattr(metrics, "drop_items", None)
            if metrics is not None and drop_items is not None and not getattr(drop_items, "_counted", False):

                def counted_drop(count: int, *args: Any, **kwargs: Any) -> Any:
                    with self._lock:
                        self.otlp_spans_dropped += count
                    return drop_items(count, *args, **kwargs)

                counted_drop._counted = True  # type: ignore[attr-defined]
                metrics.drop_items = counted_drop
                self.watching = True
        except Exception:  # counting is a courtesy: MLflow's exporter works the same without it
            logger.debug("cannot count MLflow's export losses", exc_info=True)

    def _counting_queue(self) -> type[queue.Queue[Any]]:
        losses = self

        class CountingQueue(queue.Queue[Any]):
            def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
                internals.wrap_task_handler(item, losses._counting_handler)
                try:
                    super().put(item, block, timeout)
                except queue.Full:
                    if not losses._overflow_to_spool(item):
                        losses._count_dropped(item)
                        raise

        return CountingQueue

    def _count_dropped(self, task: Any) -> None:
        """Count a task MLflow's full export queue refused (or the spool could not take)."""
        decoded = internals.decode_task(task)
        if decoded is not None and decoded.spans is not None:
            self._count("span_batches_dropped")
            self._remember_dropped_spans(decoded.spans)
        else:
            self._count("traces_dropped")

    def _overflow_to_spool(self, task: Any) -> bool:
        """Hand a task the full export queue refused to the trace spool (written off this thread, replayed
        at the server's pace); False when there is no spool or the task is not one it knows."""
        spool = current_spool()
        decoded = internals.decode_task(task)
        if spool is None or decoded is None:
            return False
        if decoded.trace is not None:
            trace = decoded.trace
            release_held(trace.info.trace_id)  # the spool keeps the whole trace: held batches are in it
            spans = list(getattr(trace.data, "spans", None) or [])
            spool.add_later(lambda: spool.add_info(trace.info, spans), lambda: self._count_dropped(task), 1)
        else:
            location, spans = str(decoded.location), decoded.spans or []
            # Until the spool has them, these spans count as lost: a trace info sent meanwhile keeps MLflow's
            # artifact upload (at worst a second copy, never none).
            self._remember_dropped_spans(spans)

            def add_spans() -> bool:
                stored = spool.add_spans(location, spans)
                if stored:
                    self._forget_dropped_spans(spans)
                return stored

            spool.add_later(add_spans, lambda: self._count("span_batches_dropped"), 0)
        self._count("overflow_spooled")
        return True

    def _counting_handler(self, handler: Any) -> Any:
        def counted(*args: Any) -> Any:
            try:
                return handler(*args)
            except Exception:
                self._count("exports_failed")
                raise

        return counted

    def snapshot(self) -> dict[str, int | None]:
        """The counts since start-up (None where they cannot be counted)."""
        with self._lock:
            counts = {
                "traces_dropped": self.traces_dropped,
                "span_batches_dropped": self.span_batches_dropped,
                "export_failures": self.exports_failed,
                "otlp_spans_dropped": self.otlp_spans_dropped,
                "export_queue_overflow_spooled": self.overflow_spooled,
            }
            return {k: v if self.watching else None for k, v in counts.items()}


# MLflow's exporter is one per process, so are its losses: every middleware instance reports these.
export_losses = ExportLosses()


def release_held(trace_id: str) -> None:
    """Forget the span batches the fast trace-info client holds for `trace_id` (spooled with its trace)."""
    take = getattr(internals.exporter_client(internals.trace_exporter()), "take_held", None)
    if take is not None:
        take(trace_id)

"""EventOverlap: what every async call returns (DeepEP's shape: wait on it or use it as a context)."""
import torch


class EventOverlap:
    """A CUDA event captured on the stream that did the work, plus tensors to keep alive until it fires.

    `current_stream_wait()` makes the caller's stream wait for it; `with event: ...` runs the body and
    then waits (DeepEP's idiom for overlapping work with communication). `hook`, when given, is the
    receive hook of a zero-SM low-latency call. On CPU there is no event and every wait is a no-op:
    the work is complete when the call returns.
    """

    def __init__(self, event=None, extra_tensors=None, hook=None):
        self.event = event
        self.extra_tensors = extra_tensors
        self.hook = hook

    @classmethod
    def record(cls, stream=None, extra_tensors=None):
        """Record an event on `stream` (default: the current CUDA stream); a no-op event on CPU."""
        if not torch.cuda.is_available() or (stream is None and not torch.cuda.is_initialized()):
            return cls(None, extra_tensors)
        stream = stream if stream is not None else torch.cuda.current_stream()
        event = torch.cuda.Event()
        event.record(stream)
        return cls(event, extra_tensors)

    def current_stream_wait(self):
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def synchronize(self):
        if self.event is not None:
            self.event.synchronize()

    def query(self):
        return True if self.event is None else self.event.query()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.current_stream_wait()
        return False

    def __repr__(self):
        return f"EventOverlap(event={'none' if self.event is None else 'cuda'})"

"""What every public API shares: request preparation (validation, tokenization, adapter check) and results."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from router.scheduler import EndEvent, Entry, ErrorEvent, Event, Scheduler
from router.settings import RouterSettings
from router.tokenizer import TextTokenizer
from router.validation import GenerateParameters, ValidationError, check_lengths


class ApiError(Exception):
    """An error with its HTTP status and TGI ``error_type``; gRPC maps the type to a status code."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def adapter_not_found(adapter_id: str) -> ApiError:
    return ApiError(404, "adapter_not_found", f"adapter {adapter_id!r} not found")


@dataclass
class ServerInfo:
    model_id: str
    model_dir: str
    dtype: str
    device: str
    num_shard: int


class RouterService:
    """Turns validated requests into scheduler entries and scheduler events into results."""

    def __init__(
        self, scheduler: Scheduler, tokenizer: TextTokenizer, settings: RouterSettings, info: ServerInfo
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.settings = settings
        self.info = info
        self.adapters: set[str] = set()

    def known_adapter(self, adapter_id: str) -> bool:
        return not adapter_id or adapter_id in self.adapters

    def prepare(self, inputs: object, params: GenerateParameters) -> Entry:
        """Validate, tokenize, truncate and queue; raises ApiError before anything is generated."""
        if not isinstance(inputs, str):
            raise ApiError(422, "validation", "`inputs` must be a string")
        if not inputs:
            raise ApiError(422, "validation", "`inputs` cannot be empty")
        if not self.known_adapter(params.adapter_id):
            raise adapter_not_found(params.adapter_id)
        ids = self.tokenizer.encode(inputs)
        if params.truncate is not None:
            ids = ids[-params.truncate :]
        try:
            max_new = check_lengths(len(ids), params, self.settings)
        except ValidationError as exc:
            raise ApiError(422, "validation", str(exc)) from exc
        entry = Entry(ids, params, max_new)
        try:
            self.scheduler.submit(entry)
        except Exception as exc:
            raise ApiError(429, "overloaded", str(exc)) from exc
        self.scheduler.metrics.adapter_requests.labels(params.adapter_id or "base").inc()
        return entry

    async def events(self, entry: Entry) -> AsyncIterator[Event]:
        """The entry's events until its end; leaving early (client gone) cancels the request."""
        try:
            while True:
                event = await entry.events.get()
                yield event
                if isinstance(event, EndEvent | ErrorEvent):
                    return
        finally:
            self.scheduler.cancel(entry)

    async def result(self, entry: Entry) -> EndEvent:
        async for event in self.events(entry):
            if isinstance(event, ErrorEvent):
                raise ApiError(404 if event.error_type == "adapter_not_found" else 424, event.error_type, event.message)
            if isinstance(event, EndEvent):
                return event
        raise ApiError(424, "generation", "generation ended without a result")

    def full_text(self, inputs: str, end: EndEvent, params: GenerateParameters) -> str:
        return inputs + end.generated_text if params.return_full_text else end.generated_text

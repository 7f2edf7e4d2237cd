"""Who joins the running batch next: arrival order (or cache-aware) under token budgets, KV blocks and adapter slots."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from loraplex.router.inflight import InFlightRequest
from loraplex.router.kv_budget import Admission, KvBudget
from loraplex.router.settings import RouterSettings


@dataclass
class Admitted:
    """One admission pass: the requests taken, with the prompt tokens each runs in this step, the queue
    left behind (in its new order), and the cancelled requests met on the way (to be finished)."""

    batch: dict[InFlightRequest, int] = field(default_factory=dict)
    waiting: deque[InFlightRequest] = field(default_factory=deque)
    cancelled: list[InFlightRequest] = field(default_factory=list)


def admit(
    waiting: deque[InFlightRequest],
    running: Mapping[int, InFlightRequest],
    settings: RouterSettings,
    kv: KvBudget,
    *,
    adapter_slots: int,
    budget: int,
    chunked: bool,
    one_at_a_time: bool,
    now: float,
    to_compute: Callable[[InFlightRequest], int] | None = None,
) -> Admitted:
    """Take waiting requests in arrival order while the token budget, KV blocks and adapter slots allow.

    A request whose adapter is not on the device needs a free slot (``--max-active-adapters``);
    slot-needers are served strictly in arrival order. Requests for adapters already running may
    overtake a slot-needer only while it has waited less than ``--adapter-slot-patience`` seconds;
    after that nothing overtakes it, the running adapters drain, and it gets the first free slot.
    So no adapter starves, and a crowd of cold adapters cannot evict the ones in use (no thrash).

    Each request takes the prompt tokens it will compute (``to_compute``: its prompt less what the shards are
    expected to have cached; its whole prompt without it) from ``budget``, or with ``chunked`` what is left of
    the budget (its first chunk). KV blocks are counted for the whole prompt either way, so the router's count
    stays an upper bound of what the shards hold. ``one_at_a_time``: the shards refused against our count; only
    a lone request goes in until one leaves. ``waiting`` is consumed.
    """
    out = Admitted()
    blocks = Admission(kv, (e.length for e in running.values()))
    active = {e.params.adapter_id for e in running.values() if e.params.adapter_id}
    used = 0
    blocked: InFlightRequest | None = None  # the oldest request waiting for an adapter slot
    while waiting:
        e = waiting.popleft()
        if e.cancelled:
            out.cancelled.append(e)
            continue
        # A preempted request's prompt holds its generated tokens too, and may pass the prefill budget:
        # alone in its batch it is taken anyway, or it would wait forever.
        need = to_compute(e) if to_compute is not None else e.length
        cost = min(need, budget - used) if chunked else need
        if (
            (out.batch and used + cost > budget)
            or cost <= 0
            or (one_at_a_time and (running or out.batch))
            or not blocks.fits(e.length)
            or len(running) + len(out.batch) >= settings.max_batch_size
        ):
            waiting.appendleft(e)
            break
        adapter = e.params.adapter_id
        if adapter and adapter not in active:
            if blocked is not None or len(active) >= adapter_slots:
                blocked = blocked or e
                out.waiting.append(e)
                continue
            active.add(adapter)
        elif blocked is not None and now - blocked.queued_at > settings.adapter_slot_patience:
            out.waiting.append(e)
            continue
        out.batch[e] = cost
        used += cost
        blocks.take(e.length)
    out.waiting.extend(waiting)
    return out


def cached_first(
    waiting: deque[InFlightRequest],
    has_cached_prefix: Callable[[InFlightRequest], bool],
    *,
    patience: float,
    window: int,
) -> deque[InFlightRequest]:
    """The queue in cache-aware order: requests expected to find their prompt's prefix cached move ahead of
    those that will not, but never ahead of one that arrived ``patience`` seconds or more before them.

    Why: requests that share a prompt prefix (a system prompt under one adapter) wait behind ones that must
    compute theirs, although each costs a fraction of the budget once the first of them has run. Taking them
    first answers more requests sooner for the same work (SGLang orders by cached prefix as well). The bound
    is on arrival times, not on time waited: a burst that arrives at once is reordered whole however long it
    takes to serve, while a request is only ever overtaken by those that arrived less than ``patience`` after
    it, so a steady stream of cheap requests cannot starve an expensive one. Only the first ``window``
    requests are looked at: a step admits no more than that.
    """
    if patience <= 0 or len(waiting) < 2:
        return waiting
    head = [waiting.popleft() for _ in range(min(window, len(waiting)))]
    out: list[tuple[InFlightRequest, bool]] = []
    for e in head:
        cached = has_cached_prefix(e)
        at = len(out)
        while cached and at and not out[at - 1][1] and out[at - 1][0].queued_at > e.queued_at - patience:
            at -= 1
        out.insert(at, (e, cached))
    waiting.extendleft(reversed([e for e, _ in out]))
    return waiting

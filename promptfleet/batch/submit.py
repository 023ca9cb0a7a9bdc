"""Submitting batches so that each is created, and paid for, once.

A batch's identity (the run's id, a token) is journaled as an intent before the provider
hears of it. An upload or a create that fails is tried again after a pause, a few times,
never in a loop: a refusal (4xx, 429) means no batch exists; any other failure (a 5xx, a
timeout, a reset) may have made one, so the provider is asked for a batch carrying the
identity before another create. When it cannot be asked, the run stops and says so; the
intent keeps its lines until the same command asks again (`reconcile`).

Files uploaded for batches that were never created, and extra copies left by uploads
tried again, are deleted at the end of the run, or by the next run of the experiment.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from promptfleet.batch.jobs import BatchAPI, Found, Intent, key_prefix, utcnow
from promptfleet.batch.journal import BatchJournal, Ledger
from promptfleet.batch.split import Chunker
from promptfleet.core.engine import Prompt
from promptfleet.core.messages import parse_conversation
from promptfleet.providers import provider_class
from promptfleet.providers.base import parameters_of
from promptfleet.providers.errors import ErrorKind, ProviderError, classify

if TYPE_CHECKING:
    from promptfleet.batch.state import BatchRun

log = logging.getLogger("promptfleet.batch")

TRIES = 6  # per upload, create or lookup; pauses of 1, 2, 4, 8, 16 s between (at most --batch-poll)
BACKOFF_S = 1.0
# The provider refused the create: no batch exists. Any other failure may have made one.
_NOT_CREATED = {ErrorKind.BAD_REQUEST, ErrorKind.AUTH, ErrorKind.NOT_FOUND, ErrorKind.RATE_LIMIT}

T = TypeVar("T")
Chunk = list[tuple[Prompt, Any, tuple[float, int]]]  # (prompt, encoded request, worst-case cost and tokens)


class Submitter:
    def __init__(self, run: BatchRun):
        self.run = run
        self.lookups_failed: Counter[str] = Counter()  # token -> failed lookups in this run
        self.waiting: dict[str, tuple[str, ...]] = {}  # token -> batches that may be its own, as last said

    # -- intents whose create went unanswered -----------------------------------------------

    async def reconcile(self) -> None:
        r = self.run
        for intent in r.ledger.unresolved():
            try:
                found = await r.api_for(intent.api, intent.model).find(intent)
            except ProviderError as err:
                self.lookups_failed[intent.token] += 1
                if self.lookups_failed[intent.token] >= TRIES:
                    r.halt(_cannot_ask(intent, r.redact(err)))
                else:
                    log.warning("cannot look up the batch of %d prompt(s) of %s/%s yet: %s", len(intent.lines), intent.api, intent.model,
                                r.redact(err))  # fmt: skip
                continue
            self.settle(intent, found)

    def settle(self, intent: Intent, found: Found) -> None:
        r = self.run
        if found.batch_id:
            log.info("found batch %s, created for %d prompt(s) of %s/%s before its answer was lost", found.batch_id, len(intent.lines),
                     intent.api, intent.model)  # fmt: skip
            r.journal.submitted(r.ledger, intent.token, found.batch_id)
            r.committed[found.batch_id] = (intent.worst_usd, 0)
        elif found.unverified:
            if self.waiting.get(intent.token) != found.unverified:
                log.info("%s may hold the %d prompt(s) of an unanswered create to %s/%s; they wait until it ends and its keys can be read",
                         ", ".join(found.unverified), len(intent.lines), intent.api, intent.model)  # fmt: skip
            self.waiting[intent.token] = found.unverified
        else:
            r.journal.abandoned(r.ledger, intent.token, "not found at the provider")
            r.may_have_pending = True

    # -- submit what no batch holds ---------------------------------------------------------

    async def submit(self) -> None:
        r = self.run
        r.held_back = None
        if r.ctx.stats.budget_stop:
            return
        r.may_have_pending = not await self._submit_all()

    async def _submit_all(self) -> bool:
        """One scan of the input; True when every line no batch holds was submitted (or failed)."""
        r = self.run
        held = r.ledger.held_lines()
        attempts = r.ledger.attempts()
        chunkers: dict[tuple[str, str], Chunker] = {}
        limits = (r.settings.batch_max_requests, r.settings.batch_max_bytes)
        for prompt in r.prompts(None):
            line, record = prompt.line, prompt.record
            if line in r.done or line in held or line in r.online:
                continue
            if attempts[line] and r.settings.batch_fallback == "online":
                r.online[line] = attempts[line]  # a retry after a crash: online, as chosen
                continue
            key = (record["api"], record["model_name"])
            try:
                api = r.api_for(*key)
                messages = list(parse_conversation(record["prompt"], record.get("multimedia")).messages)
                parameters = parameters_of(provider_class(key[0]), record)  # as online: prompto's top-level keys too
                chunker = chunkers.setdefault(key, Chunker(api.limits.capped(*limits)))

                def encode(token: str) -> tuple[Any, int]:
                    return api.encode(f"{key_prefix(r.run_id, token)}{line}", key[1], messages, parameters)  # noqa: B023

                item, size = encode(chunker.token)
            except Exception as err:  # noqa: BLE001 - a media file swapped after validation, a bad parameter: this line's error
                self._unbuildable(prompt, err, attempts[line])
                continue
            if not chunker.fits(size):
                error = ProviderError(f"request of {size} bytes exceeds the batch limit of {chunker.limits.max_bytes} bytes",
                                      kind=ErrorKind.BAD_REQUEST)  # fmt: skip
                r.errored(prompt, error, None, attempts[line])
                continue
            if not chunker.has_room(size):
                if not await self._submit_chunk(key, chunker):
                    return False
                try:
                    item, size = encode(chunker.token)  # its key carries the next batch's token
                except Exception as err:  # noqa: BLE001 - as above
                    self._unbuildable(prompt, err, attempts[line])
                    continue
            chunker.add((prompt, item, r.worst(record)), size)
        for key, chunker in chunkers.items():
            if chunker.items and not await self._submit_chunk(key, chunker):
                return False
        return True

    def _unbuildable(self, prompt: Prompt, err: Exception, attempts: int) -> None:
        error = classify(err)
        kind = error.kind if not error.retryable else ErrorKind.BAD_REQUEST  # the same request would fail the same way
        self.run.errored(prompt, ProviderError(error.message, kind=kind), None, attempts)

    async def _submit_chunk(self, key: tuple[str, str], chunker: Chunker) -> bool:
        """Journal the intent, upload, create, journal the batch id. False: stop submitting this pass."""
        r = self.run
        if r.ctx.stop.is_set():  # Ctrl-C while submitting: what is not submitted waits for the rerun
            return False
        token, chunk = chunker.flush()
        worst = (sum(w[0] for _, _, w in chunk), sum(w[1] for _, _, w in chunk))
        if reason := self._over_budget(*worst):
            if reason != r.held_back:
                log.warning("budget: %s; holding back until live batches end", reason)
            r.held_back = reason
            return False
        api = r.api_for(*key)
        items = [item for _, item, _ in chunk]
        try:
            before, _ = await self._retrying(api.before)
        except ProviderError as err:
            return self._not_submitted(key, chunk, err, "listing the recent batches before a create")
        intent = Intent(token, *key, tuple(p.line for p, _, _ in chunk), utcnow(), tuple(p.key for p, _, _ in chunk), r.run_id, before,
                        worst[0])  # fmt: skip
        r.journal.intent(r.ledger, intent)
        file_id = None
        if api.uses_files:
            try:
                file_id, tries = await self._retrying(lambda: api.upload(intent, items))
            except ProviderError as err:  # no batch without its file; a copy that did land is swept at the end
                r.journal.abandoned(r.ledger, token, f"upload failed: {r.redact(err)}")
                return self._not_submitted(key, chunk, err, "uploading the requests")
            r.journal.uploaded(r.ledger, token, file_id, tries)  # type: ignore[arg-type]
        return await self._create(api, intent, items, file_id, chunk, worst)

    async def _create(self, api: BatchAPI, intent: Intent, items: list[Any], file_id: str | None, chunk: Chunk,
                      worst: tuple[float, int]) -> bool:  # fmt: skip
        r = self.run
        last: ProviderError | None = None
        for attempt in range(TRIES):
            if last is not None and not await self._pause(attempt - 1, last):
                break
            try:
                batch_id = await api.create(intent, items, file_id)
            except ProviderError as err:
                last = err
                if err.kind in _NOT_CREATED and not err.retryable:  # refused for good, as a 4xx online
                    r.journal.abandoned(r.ledger, intent.token, r.redact(err))
                    return self._not_submitted((intent.api, intent.model), chunk, err, "creating a batch")
                if err.kind in _NOT_CREATED:
                    continue  # 429: nothing was made; again after the pause
                log.warning("%s/%s: the create of a batch of %d prompt(s) failed (%s: %s); looking for it before another create",
                            intent.api, intent.model, len(chunk), err.kind, r.redact(err))  # fmt: skip
                found = await self._look_up(api, intent, err)
                if found is None:
                    return False
                if found.batch_id or found.unverified:
                    self.settle(intent, found)
                    return True
                continue
            r.journal.submitted(r.ledger, intent.token, batch_id)
            r.committed[batch_id] = worst
            log.info("submitted batch %s: %d prompt(s) to %s/%s", batch_id, len(chunk), intent.api, intent.model)
            return True
        r.journal.abandoned(r.ledger, intent.token, f"create failed: {r.redact(last)}" if last else "stopped")
        if r.ctx.stop.is_set() or last is None:
            return False
        return self._not_submitted((intent.api, intent.model), chunk, last, "creating a batch")

    async def _look_up(self, api: BatchAPI, intent: Intent, create_error: ProviderError) -> Found | None:
        """What the provider holds for an unanswered create; None when it cannot be asked (the run stops)."""
        r = self.run
        err = create_error
        for attempt in range(TRIES):
            if not await self._pause(attempt, err):  # a listing may lag the create it would show
                return None
            try:
                return await api.find(intent)
            except ProviderError as lookup_error:
                err = lookup_error
                if not err.retryable:
                    break
        if not r.ctx.stop.is_set():
            r.halt(_cannot_ask(intent, r.redact(err), r.redact(create_error)))
        return None

    def _not_submitted(self, key: tuple[str, str], chunk: Chunk, err: ProviderError, what: str) -> bool:
        """A step of a submission failed for good: a refusal fails the lines with its message (as a
        4xx online); a provider still failing after the pauses stops the run instead of looping."""
        r = self.run
        if err.retryable and r.ctx.stop.is_set():
            return False  # Ctrl-C during a pause: nothing was submitted, the rerun goes on
        if err.retryable:
            r.halt(f"{key[0]}/{key[1]}: {what} for {len(chunk)} prompt(s) failed {TRIES} times ({err.kind}: {r.redact(err)}); "
                   "nothing was submitted, nothing is paid")  # fmt: skip
            return False
        log.warning("%s/%s: %s for %d prompt(s) was refused (%s): %s", *key, what, len(chunk), err.kind, r.redact(err))
        attempts = r.ledger.attempts()
        for prompt, _, _ in chunk:
            r.errored(prompt, err, None, attempts[prompt.line] + 1)
        return True

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> tuple[T, int]:
        """(what the call returned, how many tries it took); retryable errors are tried again after a pause."""
        for attempt in range(TRIES):
            try:
                return await call(), attempt + 1
            except ProviderError as err:
                if not err.retryable or attempt + 1 == TRIES or not await self._pause(attempt, err):
                    raise
        raise AssertionError("unreachable")

    async def _pause(self, attempt: int, err: ProviderError) -> bool:
        """Back off (Retry-After when longer, --batch-poll at most); False when the run was stopped meanwhile."""
        r = self.run
        delay = min(r.settings.batch_poll, max(BACKOFF_S * 2**attempt, err.retry_after or 0.0))
        try:
            await asyncio.wait_for(r.ctx.stop.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass
        return not r.ctx.stop.is_set()

    def _over_budget(self, cost: float, tokens: int) -> str | None:
        """A batch cannot be stopped halfway: it goes only if its worst case, plus that of the live
        batches, plus what was spent, stays within --max-cost and --max-tokens-total."""
        r = self.run
        budget, spend = r.ctx.budget, r.ctx.spend
        if budget is None or spend is None:
            return None
        cost += spend.cost + sum(c for c, _ in r.committed.values())
        tokens += spend.tokens + sum(t for _, t in r.committed.values())
        if budget.max_cost is not None and cost > budget.max_cost:
            return f"worst case ${cost:.4f} with the next batch would pass --max-cost ${budget.max_cost:g}"
        if budget.max_tokens is not None and tokens > budget.max_tokens:
            return f"worst case {tokens} tokens with the next batch would pass --max-tokens-total {budget.max_tokens}"
        return None

    # -- uploads no batch needs ---------------------------------------------------------------

    async def sweep(self) -> None:
        """Delete the files uploaded for intents that never became a batch, and the extra copies
        of uploads that were tried again, in this run's journal and in those of earlier runs of
        the experiment (the experiment's lock makes them ours)."""
        r = self.run
        own = r.journal.path
        suffix = own.name[own.name.index("-batches-"):]
        earlier = sorted(p for p in own.parent.iterdir() if p.name.endswith(suffix) and p != own) if own.parent.is_dir() else []
        for journal, ledger in [(r.journal, r.ledger), *((j, j.load()) for j in map(BatchJournal, earlier))]:
            await self._sweep_journal(journal, ledger)

    async def _sweep_journal(self, journal: BatchJournal, ledger: Ledger) -> None:
        r = self.run
        groups: dict[tuple[str, str], list[Intent]] = defaultdict(list)
        for token, intent in ledger.intents.items():
            due = token in ledger.abandoned or (token in ledger.submitted and token in ledger.retried_uploads)
            if due and token not in ledger.swept and _uses_files(r, intent):
                groups[(intent.api, intent.model)].append(intent)
        for key, intents in groups.items():
            api = r.api_for(*key)
            try:
                named = await api.files_named({i.label for i in intents}, min(i.at for i in intents))
            except ProviderError as err:
                log.warning("%s/%s: cannot list the uploaded batch files (%s); the next run looks again", *key, r.redact(err))
                continue
            for intent in intents:
                token = intent.token
                keep = set(ledger.files.get(token, [])[-1:]) if token in ledger.submitted else set()  # the batch's own file
                doomed = sorted((set(named.get(intent.label, [])) | set(ledger.files.get(token, []))) - keep - set(ledger.deleted))
                left = 0
                for file_id in doomed:
                    try:
                        await api.delete_file(file_id)
                    except ProviderError as err:
                        left += 1
                        log.warning("%s/%s: cannot delete the uploaded file %s (%s); the next run tries again", *key, file_id, r.redact(err))
                        continue
                    journal.deleted(ledger, token, file_id)
                    log.info("%s/%s: deleted the uploaded file %s, which no batch uses", *key, file_id)
                if not left:
                    journal.swept(ledger, token)


def _uses_files(r: BatchRun, intent: Intent) -> bool:
    try:
        return r.api_for(intent.api, intent.model).uses_files
    except (ProviderError, KeyError):  # an earlier run's model without credentials (or api) here: left for a run that has them
        return False


def _cannot_ask(intent: Intent, error: str, create_error: str | None = None) -> str:
    unanswered = f" ({create_error})" if create_error else ""
    return (f"{intent.api}/{intent.model}: a batch create for {len(intent.lines)} prompt(s) went unanswered{unanswered} and the "
            f"provider cannot be asked whether it made one ({error}); nothing more is submitted and those prompts wait: "
            "the same command asks again")  # fmt: skip

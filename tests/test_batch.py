"""Batch mode through the official SDKs against the local batch fake: a mixed file of the
four batch apis, splitting, per-line failures and follow-up batches, expiry, cancel,
--detach then collect, a crash between submission and journal, and kill -9 then rerun."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from promptfleet.api import run_all
from promptfleet.batch.journal import BatchJournal
from promptfleet.core.config import Settings
from promptfleet.core.run import open_run
from promptfleet.core.session import Session
from tests.conftest import read_jsonl, write_jsonl
from tests.fake_batches import FakeBatchServer

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

MODELS = {"openai": "gpt-4o-mini", "azure-openai": "my-deployment", "anthropic": "claude-3-5-haiku", "gemini": "gemini-2.0-flash"}


def mixed(n: int, apis: tuple[str, ...] = tuple(MODELS)) -> list[dict[str, Any]]:
    return [{"id": i, "api": apis[i % len(apis)], "model_name": MODELS[apis[i % len(apis)]], "prompt": f"q{i}",
             "parameters": {"temperature": 0.5}} for i in range(n)]  # fmt: skip


def settings(data: Path, **extra: Any) -> Settings:
    return Settings(**{"data_folder": data, "batch": True, "batch_poll": 0.01, "max_attempts": 3, **extra})


def run_once(path: Path, s: Settings, session: Session | None = None) -> dict[str, Any]:
    """One run of the file as the Python API does it (no Prefect): queues and batches, then the tables."""

    async def go() -> dict[str, Any]:
        run = open_run(path, s, session=session or Session())
        try:
            return (await run_all(run)).to_dict()
        finally:
            await run.aclose()

    return asyncio.run(go())


def outputs(data: Path, name: str = "exp") -> tuple[list[dict], list[dict]]:
    out = data / "output" / name
    return read_jsonl(next(out.glob("*-completed-*.jsonl"))), read_jsonl(next(out.glob("*-failed-*.jsonl")))


def test_mixed_file_of_four_apis_is_answered_through_their_batch_apis_at_batch_prices(tmp_path: Path, fake: FakeBatchServer):
    rows = mixed(12) + [{"id": "turns", "api": "openai", "model_name": "gpt-4o-mini", "prompt": ["t1", "t2"]}]
    path = write_jsonl(tmp_path / "exp.jsonl", rows)
    summary = run_once(path, settings(tmp_path / "data", max_queries=600))
    assert summary["complete"] and summary["answered"] == 13 and summary["failed"] == 0
    completed, failed = outputs(tmp_path / "data")
    by_id = {r["id"]: r for r in completed}
    assert by_id[0]["response"] == "answer to: q0" and by_id[0]["batch"].startswith("batch_")
    assert by_id[2]["batch"].startswith("msgbatch_") and by_id[3]["batch"].startswith("batches/")
    assert by_id["turns"]["response"] == ["answer to: t1", "answer to: t2"] and "batch" not in by_id["turns"]
    assert fake.state.online == Counter({"t1": 1, "t2": 1})  # multi-turn goes online, turn by turn
    assert fake.state.creates == Counter({"openai": 2, "anthropic": 1, "gemini": 1})  # openai + azure share the protocol
    assert all(fake.state.submissions[f"q{i}"] == 1 for i in range(12)) and sum(fake.state.answered.values()) == 12
    # the same body as online: parameters, model, messages
    openai_body = next(j for j in fake.state.jobs.values() if j.protocol == "openai" and j.model == "gpt-4o-mini").requests[0][1]
    assert openai_body == {"temperature": 0.5, "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q0"}]}
    cost = summary["cost"]
    assert cost["batch_saved_usd"] > 0 and "my-deployment" in cost["unpriced_models"]
    # Each fake answer is 1 input + 3 output tokens. Batch lines at half the list price (USD per M tokens):
    # gpt-4o-mini 3 x (0.075 + 3 x 0.3), claude-3-5-haiku 3 x (0.4 + 3 x 2), gemini-2.0-flash 3 x (0.05 + 3 x 0.2);
    # the two online turns at full gpt-4o-mini price 2 x (0.15 + 3 x 0.6).
    batch_paid, online_paid = (2.925 + 19.2 + 1.95) / 1e6, 3.9 / 1e6
    assert cost["batch_saved_usd"] == pytest.approx(batch_paid, abs=1e-6)
    assert cost["estimated_usd"] == pytest.approx(batch_paid + online_paid, abs=1e-6)
    journal = BatchJournal(next((tmp_path / "data" / "output" / "exp").glob("*-batches-exp.jsonl"))).load()
    assert len(journal.submitted) == 4 and set(journal.ended.values()) == {"completed"} and not journal.live()
    assert failed == []


def test_split_across_the_request_limit(tmp_path: Path, fake: FakeBatchServer):
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(25, ("anthropic",)))
    summary = run_once(path, settings(tmp_path / "data", batch_max_requests=10))
    assert summary["answered"] == 25
    sizes = sorted(len(j.requests) for j in fake.state.jobs.values())
    assert sizes == [5, 10, 10]
    assert max(fake.state.submissions.values()) == 1


def test_split_by_bytes_and_a_request_too_large_for_any_batch_fails_alone(tmp_path: Path, fake: FakeBatchServer):
    rows = mixed(6, ("openai",)) + [{"id": "big", "api": "openai", "model_name": "gpt-4o-mini", "prompt": "x" * 5000}]
    path = write_jsonl(tmp_path / "exp.jsonl", rows)
    summary = run_once(path, settings(tmp_path / "data", batch_max_bytes=400))
    assert summary["answered"] == 6 and summary["failed"] == 1
    assert all(len(j.requests) < 6 for j in fake.state.jobs.values())
    _, failed = outputs(tmp_path / "data")
    assert failed[0]["id"] == "big" and "exceeds the batch limit" in failed[0]["error"]["message"]
    assert fake.state.submissions["x" * 5000] == 0


def test_per_line_failures_retryable_go_to_a_follow_up_batch_others_fail_with_the_message(tmp_path: Path, fake: FakeBatchServer):
    rows = mixed(8)
    fake.state.script = {"q0": [500], "q1": [503, 500], "q2": [400], "q3": ["expired"], "q5": [500, 500, 500]}
    path = write_jsonl(tmp_path / "exp.jsonl", rows)
    summary = run_once(path, settings(tmp_path / "data"))  # max_attempts=3
    completed, failed = outputs(tmp_path / "data")
    assert sorted(r["id"] for r in completed) == [0, 1, 3, 4, 6, 7]
    assert {r["id"]: r["error"]["type"] for r in failed} == {2: "bad_request", 5: "server"}
    assert "fake error 400" in next(r for r in failed if r["id"] == 2)["error"]["message"]
    assert next(r for r in failed if r["id"] == 5)["error"]["attempts"] == 3
    assert {r["id"]: r["attempts"] for r in completed}[1] == 3
    assert fake.state.submissions["q1"] == 3 and fake.state.submissions["q2"] == 1 and fake.state.submissions["q4"] == 1
    assert summary["complete"] and sum(fake.state.answered.values()) == 6


def test_fallback_online_sends_retryable_lines_online(tmp_path: Path, fake: FakeBatchServer):
    fake.state.script = {"q0": [500], "q1": [400]}
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(3, ("openai",)))
    summary = run_once(path, settings(tmp_path / "data", batch_fallback="online", max_queries=600))
    assert summary["complete"] and summary["answered"] == 2 and summary["failed"] == 1
    assert fake.state.creates["openai"] == 1 and fake.state.online == Counter({"q0": 1})
    completed, failed = outputs(tmp_path / "data")
    assert {r["id"]: "batch" in r for r in completed} == {0: False, 2: True} and failed[0]["id"] == 1


def test_expired_batch_keeps_finished_lines_and_resubmits_the_rest(tmp_path: Path, fake: FakeBatchServer):
    fake.state.expire, fake.state.keep = True, 3
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(5, ("gemini",)))

    detached = settings(tmp_path / "data", batch_detach=True)
    assert run_once(path, detached)["live_batches"] == 1  # submitted
    run_once(path, detached)  # polled: running
    run_once(path, detached)  # expired: 3 kept, 2 resubmitted
    fake.state.expire = False
    while (summary := run_once(path, detached))["live_batches"]:
        pass
    assert summary["complete"] and summary["answered"] == 5
    assert [fake.state.submissions[f"q{i}"] for i in range(5)] == [1, 1, 1, 2, 2]
    assert max(fake.state.answered.values()) == 1


def test_cancelled_batch_keeps_finished_lines_and_fails_the_rest(tmp_path: Path, fake: FakeBatchServer):
    fake.state.hold, fake.state.keep = True, 2
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(4, ("anthropic",)))

    run_once(path, settings(tmp_path / "data", batch_detach=True))
    [job] = fake.state.jobs.values()
    job.cancel_requested = True  # as `promptfleet batches cancel` would
    summary = run_once(path, settings(tmp_path / "data", batch_detach=True))
    completed, failed = outputs(tmp_path / "data")
    assert sorted(r["id"] for r in completed) == [0, 1]
    assert [r["error"]["type"] for r in failed] == ["cancelled", "cancelled"]
    assert summary["complete"] and fake.state.creates["anthropic"] == 1


def test_detach_returns_after_submitting_and_a_rerun_collects_without_resubmitting(tmp_path: Path, fake: FakeBatchServer):
    fake.state.hold = True
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(8))
    first = run_once(path, settings(tmp_path / "data", batch_detach=True))
    assert not first["complete"] and first["live_batches"] == 4 and first["unfinished"] == 8
    again = run_once(path, settings(tmp_path / "data", batch_detach=True))  # still running: nothing new
    assert again["live_batches"] == 4 and sum(fake.state.creates.values()) == 4
    fake.state.hold = False
    final = run_once(path, settings(tmp_path / "data"))
    assert final["complete"] and final["answered"] == 8 and final["resumed"]
    assert sum(fake.state.creates.values()) == 4 and max(fake.state.submissions.values()) == 1
    completed, _ = outputs(tmp_path / "data")
    assert Counter(r["input_line"] for r in completed) == Counter(range(1, 9))


def test_crash_between_create_and_journal_adopts_the_batch_instead_of_resubmitting(tmp_path: Path, fake: FakeBatchServer, monkeypatch):
    """The provider created the batch but the process died before journaling its id."""
    from promptfleet.batch.journal import BatchJournal as Journal

    path = write_jsonl(tmp_path / "exp.jsonl", mixed(4))
    fake.state.hold = True
    real = Journal.submitted

    class Crash(Exception):
        pass

    def crash(self, ledger, token, batch_id):
        raise Crash  # dies right after the provider answered

    monkeypatch.setattr(Journal, "submitted", crash)
    with pytest.raises(Crash):
        run_once(path, settings(tmp_path / "data"))
    monkeypatch.setattr(Journal, "submitted", real)
    assert sum(fake.state.creates.values()) == 1
    fake.state.hold = False
    summary = run_once(path, settings(tmp_path / "data"))
    assert summary["complete"] and summary["answered"] == 4
    assert sum(fake.state.creates.values()) == 4 and max(fake.state.submissions.values()) == 1


def test_a_refused_create_fails_its_lines_with_the_providers_message(tmp_path: Path, fake: FakeBatchServer):
    fake.state.faults["create"] = [400]
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(2, ("anthropic",)))
    summary = run_once(path, settings(tmp_path / "data"))
    assert summary["complete"] and summary["failed"] == 2 and fake.state.creates["anthropic"] == 0
    _, failed = outputs(tmp_path / "data")
    assert all("fake error 400" in r["error"]["message"] and r["error"]["type"] == "bad_request" for r in failed)


def test_a_failed_create_is_retried_in_the_next_pass_and_never_doubles(tmp_path: Path, fake: FakeBatchServer):
    fake.state.faults["create"] = [429, 500]  # 429: not created, try again; 500: may exist, looked up, not found
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(3, ("openai",)))
    summary = run_once(path, settings(tmp_path / "data"))
    assert summary["complete"] and summary["answered"] == 3
    assert fake.state.creates["openai"] == 1 and max(fake.state.submissions.values()) == 1
    assert fake.state.calls["openai:create"] == 3 and fake.state.calls["openai:list"] == 1  # looked up after the 500 only
    journal = BatchJournal(next((tmp_path / "data" / "output" / "exp").glob("*-batches-exp.jsonl"))).load()
    assert len(journal.intents) == 1 and len(journal.submitted) == 1 and not journal.abandoned  # one intent, created once


def test_torn_batch_journal_record_is_set_aside(tmp_path: Path, fake: FakeBatchServer):
    fake.state.hold = True
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(2, ("openai",)))
    run_once(path, settings(tmp_path / "data", batch_detach=True))
    journal = next((tmp_path / "data" / "output" / "exp").glob("*-batches-exp.jsonl"))
    with journal.open("a") as fh:
        fh.write('{"event": "ended", "bat')
    fake.state.hold = False
    summary = run_once(path, settings(tmp_path / "data"))
    assert summary["complete"] and fake.state.creates["openai"] == 1
    assert BatchJournal(journal).load().torn == 1
    assert all(json.loads(t) for t in journal.read_text().splitlines()[-1:])  # a fresh line after the torn one


def test_check_batch_shows_the_worst_case_at_batch_prices_beside_online(tmp_path: Path):
    from typer.testing import CliRunner

    from promptfleet.cli import app

    rows = [{"api": "openai", "model_name": "gpt-4o", "prompt": "x" * 400, "parameters": {"max_tokens": 100}},
            {"api": "openai", "model_name": "gpt-4o", "prompt": ["a", "b"], "parameters": {"max_tokens": 100}}]  # fmt: skip
    path = write_jsonl(tmp_path / "exp.jsonl", rows)
    env = tmp_path / "keys.env"
    env.write_text("OPENAI_API_KEY=sk-check-0000000000\n")
    result = CliRunner().invoke(app, ["check", "-f", str(path), "-d", str(tmp_path / "data"), "-e", str(env), "--batch"])
    assert result.exit_code == 0, result.output
    # gpt-4o: $2.5 in, $10 out per M. Batchable: 101 in + 100 out; multi-turn (online): 2 + 103 in + 200 out.
    online = (101 * 2.5 + 100 * 10 + 105 * 2.5 + 200 * 10) / 1e6
    batch = (101 * 1.25 + 100 * 5 + 105 * 2.5 + 200 * 10) / 1e6
    assert f"with --batch: 1 prompt(s) through batch APIs, the rest online; worst case about ${batch:.4f} instead of ${online:.4f}" in result.output


def test_batches_list_and_cancel_read_the_journals_and_ask_the_providers(tmp_path: Path, fake: FakeBatchServer):
    from typer.testing import CliRunner

    from promptfleet.cli import app

    fake.state.hold = True
    path = write_jsonl(tmp_path / "my exp é.jsonl", mixed(4, ("openai", "gemini")))
    data = tmp_path / "data"
    run_once(path, settings(data, batch_detach=True))
    runner = CliRunner()
    listed = runner.invoke(app, ["batches", "list", "-d", str(data), "-e", str(tmp_path / "none.env")])
    assert listed.exit_code == 0, listed.output
    assert "my exp é" in listed.output and "in_progress" in listed.output
    assert "sk-fake" not in listed.output
    unknown = runner.invoke(app, ["batches", "cancel", "nope", "-d", str(data), "-e", str(tmp_path / "none.env")])
    assert unknown.exit_code == 1 and "nope: no such batch" in unknown.output
    cancelled = runner.invoke(app, ["batches", "cancel", "-d", str(data), "-e", str(tmp_path / "none.env")])
    assert cancelled.exit_code == 0 and cancelled.output.count("cancelling") == 2
    assert all(j.cancel_requested for j in fake.state.jobs.values())
    summary = run_once(path, settings(data))
    assert summary["complete"] and summary["failed"] == 4  # nothing had finished: all cancelled, none resubmitted
    assert sum(fake.state.creates.values()) == 2


@pytest.mark.slow
def test_cli_detach_then_collect_through_the_flow(tmp_path: Path, fake: FakeBatchServer, prefect_api: str):
    from typer.testing import CliRunner

    from promptfleet.cli import app

    fake.state.hold = True
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(6))
    data = tmp_path / "data"
    data.mkdir()
    args = ["run", "-f", str(path), "-d", str(data), "--batch", "--batch-poll", "0.05", "-e", str(tmp_path / "none.env")]
    detached = CliRunner().invoke(app, [*args, "--detach"])
    assert detached.exit_code == 0, detached.output
    assert "6 prompt(s) in 4 live batch(es)" in detached.output
    fake.state.hold = False
    collected = CliRunner().invoke(app, args)
    assert collected.exit_code == 0, collected.output
    assert "saved" in collected.output
    assert sum(fake.state.creates.values()) == 4 and fake.state.answered == Counter({f"q{i}": 1 for i in range(6)})
    assert CliRunner().invoke(app, ["run", "-f", str(path), "-d", str(data), "--detach"]).exit_code == 1  # --detach needs --batch


@pytest.mark.parametrize("api", ["openai", "anthropic", "gemini"])
def test_each_batch_request_is_exactly_the_online_request(tmp_path: Path, fake: FakeBatchServer, api: str, monkeypatch):
    """Same provider code, same body: system prompt, parameters, images, as the online path sends them."""
    from tests.fakes import FakeServer

    media = tmp_path / "data" / "media"
    media.mkdir(parents=True)
    (media / "dot.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    params = {"openai": {"temperature": 0.2, "max_tokens": 7}, "anthropic": {"temperature": 0.2, "max_tokens": 7},
              "gemini": {"temperature": 0.2, "max_output_tokens": 7}}[api]  # fmt: skip
    record = {"api": api, "model_name": MODELS[api], "parameters": params, "multimedia": [{"type": "image", "media": "dot.png"}],
              "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "look"}]}  # fmt: skip
    path = write_jsonl(tmp_path / "exp.jsonl", [record])
    summary = run_once(path, settings(tmp_path / "data"))
    assert summary["answered"] == 1
    [job] = fake.state.jobs.values()
    batch_body = job.requests[0][1]

    with FakeServer() as chat:  # the online path, same record, same provider code
        base = {"openai": chat.base_url, "anthropic": chat.url, "gemini": chat.url}[api]
        monkeypatch.setenv({"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL", "gemini": "GEMINI_BASE_URL"}[api], base)
        online = run_once(path.rename(tmp_path / "online.jsonl"), settings(tmp_path / "data", batch=False, max_queries=600))
        assert online["answered"] == 1
        [online_body] = chat.state.requests
    if api == "gemini":
        online_body.pop("model", None)
    assert batch_body == online_body
    assert "be brief" in json.dumps(batch_body) and "iVBORw0KGgpmYWtl" in json.dumps(batch_body)  # system prompt and image bytes are there


def test_budget_admits_a_batch_only_if_its_worst_case_fits(tmp_path: Path, fake: FakeBatchServer):
    # claude-3-5-haiku at batch prices ($0.4 in, $2 out per M): a prompt "qN" may cost 1 x 0.4 + 1024 x 2 = $0.0020484.
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(4, ("anthropic",)))
    summary = run_once(path, settings(tmp_path / "data", batch_max_requests=2, max_cost=0.005))
    assert summary["complete"] and summary["answered"] == 4
    assert fake.state.creates["anthropic"] == 2 and fake.state.most_live == 1  # the second waited for the first
    tight = write_jsonl(tmp_path / "tight.jsonl", mixed(4, ("anthropic",)))
    stopped = run_once(tight, settings(tmp_path / "data", batch_max_requests=2, max_cost=0.003))
    assert not stopped["complete"] and stopped["unfinished"] == 4 and "would pass --max-cost" in stopped["budget_stop"]
    assert fake.state.creates["anthropic"] == 2


@pytest.mark.slow
def test_pipeline_with_batch_never_waits_each_poll_submits_or_collects(tmp_path: Path, fake: FakeBatchServer, prefect_api: str):
    from typer.testing import CliRunner

    from promptfleet.cli import app

    fake.state.hold = True
    data = tmp_path / "data"
    write_jsonl(data / "input" / "exp.jsonl", mixed(4, ("openai", "anthropic")))
    args = ["pipeline", "-d", str(data), "--once", "--batch", "--settle", "0", "-e", str(tmp_path / "none.env")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (data / "input" / "exp.jsonl").exists()  # submitted, not finished: back in the inbox for the next poll
    assert sum(fake.state.creates.values()) == 2
    fake.state.hold, fake.state.polls_to_finish = False, 0  # ended by the next look
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "exp: 4 answered, 0 failed" in second.output and not (data / "input" / "exp.jsonl").exists()
    assert sum(fake.state.creates.values()) == 2 and max(fake.state.submissions.values()) == 1


def test_the_offline_example_checks_clean(tmp_path: Path):
    from typer.testing import CliRunner

    from promptfleet.cli import app

    root = Path(__file__).resolve().parents[1] / "data" / "examples"
    result = CliRunner().invoke(app, ["check", "-f", str(root / "batch-mixed.jsonl"), "-d", str(tmp_path), "-e",
                                      str(root / "batch-fake.env"), "--batch"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "with --batch: 7 prompt(s) through batch APIs" in result.output


def test_ctrl_c_while_polling_returns_without_cancelling_and_a_rerun_collects(tmp_path: Path, fake: FakeBatchServer):
    fake.state.hold = True
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(4, ("openai", "gemini")))

    async def interrupted() -> dict[str, Any]:
        session = Session()
        run = open_run(path, settings(tmp_path / "data", batch_poll=30.0), session=session)  # a long wait, cut short

        async def press_ctrl_c() -> None:
            while sum(fake.state.creates.values()) < 2:
                await asyncio.sleep(0.01)
            session.request_stop()

        try:
            presser = asyncio.create_task(press_ctrl_c())
            summary = await asyncio.wait_for(run_all(run), timeout=20)
            await presser
            return summary.to_dict()
        finally:
            await run.aclose()

    summary = asyncio.run(interrupted())
    assert summary["live_batches"] == 2 and summary["unfinished"] == 4 and summary["queues"][0]["stopped"]
    assert not any(j.cancel_requested for j in fake.state.jobs.values())
    fake.state.hold = False
    final = run_once(path, settings(tmp_path / "data"))
    assert final["complete"] and final["answered"] == 4 and sum(fake.state.creates.values()) == 2


def test_no_key_reaches_the_journal_outputs_or_log(tmp_path: Path, fake: FakeBatchServer):
    fake.state.script = {"q1": [401]}
    path = write_jsonl(tmp_path / "exp.jsonl", mixed(4))
    run_once(path, settings(tmp_path / "data"))
    out = tmp_path / "data" / "output" / "exp"
    text = "".join(p.read_text(errors="replace") for p in out.iterdir() if p.suffix in (".jsonl", ".txt", ".json"))
    for key in ("sk-fake-batch-0000000000", "fake-azure-key-000000", "sk-ant-fake-0000000000", "fake-gemini-key-000000"):
        assert key not in text
    assert "-batches-exp.jsonl" in " ".join(p.name for p in out.iterdir())


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_garbage_results_are_read_again(tmp_path: Path, fake: FakeBatchServer, api: str):
    fake.state.corrupt_results = 1  # once: the next pass reads them fine (test_batch_faults: garbage for good)
    path = write_jsonl(tmp_path / "once.jsonl", mixed(3, (api,)))
    summary = run_once(path, settings(tmp_path / "data"))
    assert summary["complete"] and summary["answered"] == 3 and sum(fake.state.creates.values()) == 1


def test_a_request_that_cannot_be_built_fails_alone_as_online(tmp_path: Path, fake: FakeBatchServer):
    # an unknown parameter is refused at `check` now; a part Gemini has no field for is only found building the request
    rows = mixed(2, ("gemini",)) + [{"id": "bad", "api": "gemini", "model_name": "gemini-2.0-flash",
                                     "prompt": [{"role": "user", "content": [{"text": "x", "not_a_parameter": 1}]}]}]  # fmt: skip
    path = write_jsonl(tmp_path / "exp.jsonl", rows)
    summary = run_once(path, settings(tmp_path / "data"))
    assert summary["complete"] and summary["answered"] == 2 and summary["failed"] == 1
    _, [failed] = outputs(tmp_path / "data")
    assert failed["id"] == "bad" and failed["error"]["type"] == "bad_request" and "not_a_parameter" in failed["error"]["message"]
    assert fake.state.submissions["x"] == 0 and fake.state.creates["gemini"] == 1

"""Runs one experiment with one tool in this process and prints its measurements as JSON.
Executed by the harness as a subprocess: with this project's Python for promptfleet, with
a scratch venv's Python for prompto (which is never a dependency of promptfleet).

    python runner.py TOOL FILE DATA MAX_QUERIES MAX_ATTEMPTS PARALLEL LIMITS_JSON
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import sys
import time
from pathlib import Path


def usage() -> tuple[float, float]:
    """CPU seconds and peak RSS in MB. The peak is VmHWM: ru_maxrss survives exec on Linux
    and would report the (large) harness that started us."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    hwm = next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return r.ru_utime + r.ru_stime, int(hwm) / 1024


async def run_promptfleet(file: Path, data: Path, mq: int, ma: int, parallel: bool, limits: dict) -> dict:
    from promptfleet import Experiment, Settings

    mqj = None
    if limits:
        mqj = data / "limits.json"
        mqj.write_text(json.dumps(limits))
    summary = await Experiment(file, Settings(data_folder=data, max_queries=mq, max_attempts=ma, parallel=parallel,
                                              max_queries_json=mqj, timeout=60)).process()  # fmt: skip
    summary = summary.to_dict()
    return {"answered": summary["answered"], "failed": summary["failed"], "queues": {q["queue"]: q["wall_s"] for q in summary["queues"]}}


async def run_prompto(file: Path, data: Path, mq: int, ma: int, parallel: bool, limits: dict) -> dict:
    import logging

    logging.disable(logging.CRITICAL)
    from prompto.experiment import Experiment
    from prompto.settings import Settings

    (data / "input").mkdir(parents=True, exist_ok=True)
    shutil.copy(file, data / "input" / file.name)
    experiment = Experiment(file.name, Settings(data_folder=str(data), max_queries=mq, max_attempts=ma, parallel=parallel,
                                                max_queries_dict=limits))  # fmt: skip
    responses, _ = await experiment.process()
    failed = [r for r in responses if isinstance(r.get("response"), str) and r["response"].startswith(("NotImplementedError", "Exception", "ValueError", "RateLimitError", "InternalServerError", "APIStatusError", "ResponseError", "ResourceExhausted"))]  # noqa: E501
    # prompto writes failures into `response` after its last attempt
    return {"answered": len(responses) - len(failed), "failed": len(failed)}


def main() -> None:
    tool, file, data, mq, ma, parallel, limits = sys.argv[1:8]
    runner = run_promptfleet if tool == "promptfleet" else run_prompto
    if tool == "prompto":
        import prompto.experiment  # noqa: F401 - imports its API clients, before the clock
    else:
        from promptfleet.core.experiment import iter_valid
        from promptfleet.providers import provider_class

        for api in {record["api"] for _, record in iter_valid(Path(file))}:  # likewise
            provider_class(api)
    cpu0, _ = usage()
    started_at, start = time.time(), time.monotonic()
    result = asyncio.run(runner(Path(file), Path(data), int(mq), int(ma), parallel == "1", json.loads(limits)))
    wall = time.monotonic() - start
    cpu1, rss = usage()
    # started_at/ended_at (wall clock) line up with the fake's request stamps: where the time goes
    result.update(wall_s=wall, cpu_s=cpu1 - cpu0, peak_rss_mb=rss, started_at=started_at, ended_at=time.time())
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

"""The run manifest: what a reader needs to reproduce or audit a run, next to its outputs.

It records the software (promptfleet, Python, Prefect, each provider SDK used), the
effective settings with their limits and prices, the input's SHA-256, when the run
started and ended, the Prefect flow run when there is one, per model, the model
versions and fingerprints the providers reported in the answers, and in batch mode every
provider batch and uploaded file the run created. Keys are never in it:
settings hold none, and nothing is read from the environment.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promptfleet.core.config import Settings
from promptfleet.core.costs import price_of
from promptfleet.core.rundir import RunPaths

if TYPE_CHECKING:
    import polars as pl

    from promptfleet.core.summary import RunSummary

# The distribution that talks to each built-in api; other providers are looked up by module.
SDK_OF_API = {
    "openai": "openai",
    "azure-openai": "openai",
    "huggingface-tgi": "openai",
    "anthropic": "anthropic",
    "gemini": "google-genai",
    "vertexai": "google-genai",
    "ollama": "httpx",
    "quart": "aiohttp",
}


def version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _sdk_of(api: str) -> str | None:
    if api in SDK_OF_API or api == "test":
        return SDK_OF_API.get(api)
    from promptfleet.providers import provider_class

    top = provider_class(api).__module__.split(".")[0]
    found = metadata.packages_distributions().get(top)
    return found[0] if found else None


def _distinct(column: str) -> pl.Expr:
    import polars as pl

    return pl.col(column).drop_nulls().unique().sort().alias(f"{column}s")


def models_seen(parquet: Path) -> list[dict[str, Any]]:
    """Per api/model: prompts, answers, and the distinct versions, fingerprints and seeds
    the answers reported (read from the result table, so a resumed run counts every session)."""
    if not parquet.exists():
        return []
    import polars as pl

    table = (
        pl.scan_parquet(parquet, glob=False)
        .group_by("api", "model_name")
        .agg(
            pl.len().alias("prompts"),
            (pl.col("status") == "completed").sum().alias("answered"),
            _distinct("model_version"),
            _distinct("system_fingerprint"),
            _distinct("seed"),
        )
        .sort("api", "model_name")
        .collect()
    )
    return table.to_dicts()


def effective_settings(settings: Settings, models: list[dict[str, Any]]) -> dict[str, Any]:
    """The settings as used: flags, the rate limits file's content, and the price of each model."""
    out = settings.model_dump(mode="json")
    out["rate_limits"] = settings.rate_limits
    table = settings.price_table
    out["prices"] = table.describe()  # which price data (package and version) priced the run
    out["prices_usd_per_million_tokens"] = {
        m["model_name"]: price.as_dict() if (price := price_of(m["model_name"], table, m["api"])) else None for m in models
    }
    return out


def build(
    paths: RunPaths,
    settings: Settings,
    state: dict[str, Any],
    summary: RunSummary,
    orchestration: dict[str, Any] | None = None,
    models: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`models`: what `models_seen` returns, when the caller added it up already (the run does,
    while writing the table, instead of reading the table again)."""
    from promptfleet import __version__

    models = models_seen(paths.parquet) if models is None else models
    apis = sorted({m["api"] for m in models})
    sdks = sorted({sdk for api in apis if (sdk := _sdk_of(api))})
    return {
        "experiment": paths.name,
        "run": paths.stamp,
        "promptfleet": __version__,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": {name: version_of(name) for name in ["prefect", "polars", "pydantic", "genai-prices", *sdks]},
        "input_file": state.get("input_file"),
        "input_sha256": state.get("input_sha256"),
        "started": state.get("started"),  # a resumed run keeps its first start
        "ended": state.get("ended") or datetime.now(timezone.utc).isoformat(),
        "complete": summary.complete,
        "prompts": summary.prompts,
        "answered": summary.answered,
        "failed": summary.failed,
        "resumed": summary.resumed,
        "stopped_by": summary.stopped_by,
        "settings": effective_settings(settings, models),
        "prefect": orchestration,
        "models": models,
        "batches": summary.batches,  # batch mode: every provider batch and uploaded file the run created, and what became of it
    }


def write(paths: RunPaths, manifest: dict[str, Any]) -> Path:
    """Replace the manifest atomically: a reader never sees half of one."""
    tmp = paths.manifest.with_name(paths.manifest.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, paths.manifest)
    return paths.manifest

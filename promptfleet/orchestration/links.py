"""Links between flow runs that belong together: a judging and the run it judges, each
pointing at the other in the UI (an artifact on each flow run, and a tag to filter by)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("promptfleet")


def this_flow_run() -> dict[str, Any] | None:
    """The flow run the caller runs in (id, name, flow, URL), for manifests and links."""
    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    if not flow_run.id:
        return None
    url = url_for("flow-run", obj_id=flow_run.id)  # the UI's route (`runtime.flow_run.ui_url` names another)
    return {"flow_run_id": flow_run.id, "flow_run_name": flow_run.name, "flow_name": flow_run.flow_name, "flow_run_url": url}


async def link_judging(name: str, judged: dict[str, Any] | None) -> None:
    """This judging links the run of `name` it judges (a link artifact, the tag
    `judges:<name>`), and that run links this judging (a markdown artifact on it)."""
    from prefect import get_client
    from prefect.artifacts import acreate_link_artifact
    from prefect.client.schemas.actions import ArtifactCreate

    me = this_flow_run()
    if me is None:
        return
    try:
        async with get_client() as client:
            run = await client.read_flow_run(me["flow_run_id"])
            await client.update_flow_run(run.id, tags=sorted({*run.tags, "judge", f"judges:{name}"}))
            if not judged or not judged.get("flow_run_id"):
                return
            await acreate_link_artifact(judged["flow_run_url"], link_text=f"{judged['flow_run_name']}: the run of {name} judged here",
                                        description=f"the run this judging judges ({name})")  # fmt: skip
            await client.create_artifact(ArtifactCreate(
                type="markdown", flow_run_id=judged["flow_run_id"], description=f"judgings of {name}",
                data=f"Judged by [{me['flow_run_name']}]({me['flow_run_url']})",
            ))  # fmt: skip
    except Exception as error:  # noqa: BLE001 - a missing link never fails a judging
        log.warning("could not link the judging of %s to its run: %s", name, error)

"""A run whose process was killed (kill -9, power loss) must not look Running forever in
the background server's UI. Prefect's own answer: flow runs send heartbeat events, and an
automation marks a run Crashed when its heartbeats stop before it reached a final state
(Prefect's "detect zombie flows" recipe). promptfleet sets both up for its background
server; a server the user runs is left to the user.
"""

from __future__ import annotations

from datetime import timedelta

HEARTBEAT_SECONDS = 30  # Prefect's minimum
AUTOMATION_NAME = "promptfleet: crash runs whose process is gone"
FINAL_EVENTS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed")


def heartbeat_env() -> dict[str, str]:
    """Environment that makes this process's flow runs send heartbeats."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}


async def ensure_crash_automation(silence: timedelta = timedelta(seconds=3 * HEARTBEAT_SECONDS)) -> bool:
    """Create the automation on the current API unless it exists; True when created."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        await Automation.aread(name=AUTOMATION_NAME)
        return False
    except ValueError:  # not there yet
        pass
    await Automation(
        name=AUTOMATION_NAME,
        description="Marks a flow run Crashed when its heartbeats stop before it finished (its process was killed).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=silence,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {silence.total_seconds():.0f} s: its process is gone")],
    ).acreate()
    return True

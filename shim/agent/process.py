"""A process in the guest as the agent knows it: its state (shared with the Task service's
process model) and its stdio."""

from __future__ import annotations

from shim.agent.stdio import ProcessStreams
from shim.task.process import Process, StdioRequest


class AgentProcess(Process):
    def __init__(self, container_id: str, exec_id: str, streams: ProcessStreams) -> None:
        # The agent has no stdio paths: the host reads and writes the streams through calls.
        super().__init__(container_id, exec_id, StdioRequest("", "", "", streams.terminal))
        self.streams = streams
        self.oom_sequence = 0  # OomLog.last when the exit was recorded

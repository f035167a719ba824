"""``topyaz-mount attach SESSION``: take a detached session over from a new process.

The client that started the session died (or runs in another shell): this process
serves the root again for the session (the record in detached.py has the root, the
policy and the secret), attaches with a *fresh* stream (agent/host.py), asks for what
the old client had not written out (``Reattach``: the jobs' output from the recorded
offsets, then each job's ``Exited``), lets the outputs commit, and ends the session as
the old client would have. Its exit status is the job's.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import click

from ..errors import AgentUnavailable
from ..policy import Policy, PolicyOptions, Refusal, summarize
from ..safetext import printable
from ..waiting import first_of
from ..wire import proto
from ..wire.rpc import ConnectionLost, RemoteError
from .detached import Record
from .session import Job, RunResult, open_session
from .session_exec import writer
from .translate import PathMap
from .transport import SshSettings


async def attach_async(settings: SshSettings, record: Record) -> RunResult:
    """Serve the session of ``record`` until its jobs end; the last job's result."""
    options = PolicyOptions(read_only=record.read_only, allow_home=True)  # checked at start
    policy = Policy(record.protect, record.hide, record.read_only, options)
    settings = replace(settings, agent_args=(*settings.agent_args, "--attach", record.session))
    async with open_session(settings, record.root, policy=policy, take_over=record) as session:
        out, err = writer(sys.stdout.buffer), writer(sys.stderr.buffer)

        def adopt(job_id: int) -> Job:
            job = Job(session, job_id)
            job.sinks = {1: out, 2: err}
            job.started.set()
            return job

        session.adopt = adopt
        session.on_warning = lambda text: err(
            f"topyaz-mount: warning: {printable(text)}\n".encode()
        )
        session.on_link = lambda text: click.echo(f"topyaz-mount: {printable(text)}", err=True)
        assert session.peer is not None
        try:
            reply = await session.peer.call(proto.Reattach(record.offset_list()))
        except RemoteError as e:
            raise AgentUnavailable(f"{settings.remote}: {e.strerror}") from None
        except ConnectionLost:
            raise await session._loss_error(" on attach") from None
        session.pathmap = PathMap(str(session.root), reply.mountpoint)
        result = RunResult(0)
        for job_id in reply.jobs:
            job = session._job(job_id)
            assert job is not None
            await first_of(job.done, session.lost)
            exited = job.exited
            if exited is None:
                raise await session._loss_error()
            result = RunResult(
                exited.code,
                list(exited.lost),
                list(job.warnings),
                dict(exited.stats),
                summarize([Refusal(r.path, r.op, r.why) for r in exited.refused]),
            )
        return result

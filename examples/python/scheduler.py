#!/usr/bin/env python3
"""A small gpufleet scheduler client: submits a job, watches it to the end,
and prints its logs.

    pip install -r requirements.txt
    python3 scheduler.py --controller 127.0.0.1:7070 --gpus 2 -- \
        sh -c 'echo $CUDA_VISIBLE_DEVICES'

The gRPC stubs are generated from ../../proto/proto at start-up into a
temporary directory (grpcio-tools bundles protoc), so they always match the
protos of this checkout. Exit status: 0 when the job succeeded, 1 when it
ended otherwise, 2 on bad usage or an unreachable controller.

With several controllers sharing etcd (docs/ha.md), give them all:
--controller a:7070,b:7070,c:7070. A standby answers UNAVAILABLE with the
leader's URL in the `gpufleet-leader` metadata; the script dials it and
repeats the call (safe: a standby did nothing), and a watch that breaks
because the leader died is resumed on the new one.
"""

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto" / "proto"
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_LOST"}


def generate_stubs(out_dir):
    """Compiles gpufleet/v1/*.proto with the protoc inside grpcio-tools."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "gpufleet" / "v1").glob("*.proto"))
    if not protos:
        sys.exit(f"scheduler.py: no .proto files under {PROTO_ROOT}")
    # grpc_tools ships google/protobuf/*.proto (timestamp, ...).
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}",
                        f"--grpc_python_out={out_dir}", *protos])
    if code != 0:
        sys.exit(f"scheduler.py: protoc failed ({code}) on {PROTO_ROOT}")
    sys.path.insert(0, str(out_dir))
    jobs_pb2 = importlib.import_module("gpufleet.v1.jobs_pb2")
    jobs_grpc = importlib.import_module("gpufleet.v1.jobs_pb2_grpc")
    types_pb2 = importlib.import_module("gpufleet.v1.types_pb2")
    return jobs_pb2, jobs_grpc, types_pb2


LEADER_METADATA = "gpufleet-leader"


class Controllers:
    """The controllers the script was given, and the one it talks to."""

    def __init__(self, addresses, jobs_grpc):
        self.addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        self.jobs_grpc = jobs_grpc
        self.current = None
        self.channel = None
        self.jobs = None

    def use(self, address, wait=5):
        """Dials `address` (host:port or a leader's http:// URL)."""
        address = address.removeprefix("http://")
        channel = grpc.insecure_channel(address)
        try:
            grpc.channel_ready_future(channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            channel.close()
            return False
        if self.channel is not None:
            self.channel.close()
        self.current, self.channel = address, channel
        self.jobs = self.jobs_grpc.JobsStub(channel)
        return True

    def connect(self, deadline):
        """Dials the first controller that answers, trying each in turn."""
        while time.monotonic() < deadline:
            for address in self.addresses:
                if self.use(address):
                    return True
        return False

    def follow(self, error, deadline):
        """After an UNAVAILABLE: dials the leader a standby named, else the
        first controller that answers."""
        leader = dict(error.trailing_metadata() or ()).get(LEADER_METADATA)
        if leader and leader.removeprefix("http://") != self.current:
            print(f"{self.current} is a standby; following the leader at {leader}", file=sys.stderr)
            if self.use(leader):
                return True
        time.sleep(0.2)
        return self.connect(deadline)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--controller", default="127.0.0.1:7070",
                   help="controller host:port (plaintext gRPC), or several comma-separated")
    p.add_argument("--token", default=os.environ.get("GPUFLEET_TOKEN", ""),
                   help="bearer token with the submitter role or above (default: $GPUFLEET_TOKEN)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for the job's one task")
    p.add_argument("--name", default="python-example")
    p.add_argument("--tenant", default="")
    p.add_argument("--generation", action="append", default=[],
                   help="allowed GPU generation, e.g. hopper (repeatable)")
    p.add_argument("--max-price", type=float, help="bid: highest USD per GPU-hour")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the job")
    p.add_argument("argv", nargs="+", help="the command to run, after --")
    args = p.parse_args()
    if args.gpus < 1:
        p.error("--gpus must be at least 1")
    if args.max_price is not None and args.max_price < 0:
        p.error("--max-price must not be negative")
    return args


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="gpufleet-stubs-") as stubs:
        jobs_pb2, jobs_grpc, types_pb2 = generate_stubs(stubs)
        controllers = Controllers(args.controller, jobs_grpc)
        if not controllers.connect(time.monotonic() + 30):
            print(f"scheduler.py: cannot reach the controller at {args.controller}", file=sys.stderr)
            return 2
        # Every call carries the token; the controller answers UNAUTHENTICATED without one.
        md = (("authorization", f"Bearer {args.token}"),) if args.token else ()

        constraints = jobs_pb2.JobConstraints()
        for g in args.generation:
            name = "GPU_GENERATION_" + g.upper()
            try:
                constraints.generations.append(types_pb2.GpuGeneration.Value(name))
            except ValueError:
                known = [n.removeprefix("GPU_GENERATION_").lower() for n in types_pb2.GpuGeneration.keys()]
                print(f"scheduler.py: unknown generation {g!r}; known: {', '.join(known)}", file=sys.stderr)
                return 2
        if args.max_price is not None:
            constraints.max_price_per_gpu_hour_micro_usd = round(args.max_price * 1_000_000)
        spec = jobs_pb2.JobSpec(
            name=args.name, tenant=args.tenant, tasks=1, gpus_per_task=args.gpus,
            constraints=constraints, workload=types_pb2.WorkloadSpec(argv=args.argv),
        )
        request = jobs_pb2.SubmitJobRequest(spec=spec)
        try:
            # Repeated only after a standby's redirect or an unreachable
            # controller, never after the leader may have taken it.
            job = submit(controllers, request, md)
        except grpc.RpcError as e:
            print(f"scheduler.py: SubmitJob failed: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
        print(f"submitted {job.id}")

        state_name = jobs_pb2.JobState.Name
        last = None
        deadline = time.monotonic() + args.timeout
        job_id = job.id
        while True:
            try:
                watch = controllers.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id),
                                                  timeout=max(1.0, deadline - time.monotonic()), metadata=md)
                for job in watch:
                    state = state_name(job.state)
                    if state != last:
                        line = f"{job.id} {state.removeprefix('JOB_STATE_')}"
                        if job.state == jobs_pb2.JOB_STATE_PENDING and job.pending_reason.message:
                            line += f" ({job.pending_reason.message})"
                        print(line, flush=True)
                        last = state
                    if state in TERMINAL:
                        break
                break
            except grpc.RpcError as e:
                # The leader died mid-watch: watch again on the new one.
                if e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
                    print(f"scheduler.py: {controllers.current}: {e.details()}; finding the leader",
                          file=sys.stderr)
                    controllers.follow(e, deadline)
                    continue
                print(f"scheduler.py: WatchJob ended: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
        jobs = controllers.jobs

        for task in job.tasks:
            print(f"task {task.index}: node {task.node_id} ({task.provider}/{task.region}) "
                  f"gpus {','.join(task.gpu_uuids)} exit {task.exit_code if task.HasField('exit_code') else '-'}")
        if job.tasks:
            print("--- logs of task 0")
            for chunk in jobs.StreamJobLogs(jobs_pb2.StreamJobLogsRequest(job_id=job.id, task_index=0),
                                            timeout=30, metadata=md):
                sys.stdout.write(chunk.data.decode("utf-8", errors="replace"))
            print("--- end of logs")
        print(f"{job.id} finished: {state_name(job.state)}")
        return 0 if job.state == jobs_pb2.JOB_STATE_SUCCEEDED else 1


def submit(controllers, request, md):
    """SubmitJob on the leader. A standby's UNAVAILABLE (it names the
    leader) is safe to repeat elsewhere; an UNAVAILABLE without that name
    may come from a leader that took the job and died, so it is raised."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return controllers.jobs.SubmitJob(request, timeout=30, metadata=md).job
        except grpc.RpcError as e:
            leader = dict(e.trailing_metadata() or ()).get(LEADER_METADATA)
            if e.code() != grpc.StatusCode.UNAVAILABLE or not leader or time.monotonic() > deadline:
                raise
            controllers.follow(e, deadline)


if __name__ == "__main__":
    sys.exit(main())

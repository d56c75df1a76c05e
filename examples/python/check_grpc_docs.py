#!/usr/bin/env python3
"""Checks the grpcurl examples in docs/grpc.md against the protos: every
method exists, and every -d body parses (protobuf JSON mapping, unknown
fields rejected) as that method's request message. Run by ci.sh."""

import importlib
import re
import shlex
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pool, json_format, message_factory

import scheduler

DOC = Path(__file__).resolve().parents[2] / "docs" / "grpc.md"


def commands(text):
    """grpcurl command lines from the ```sh blocks, continuations joined."""
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        # A quoted -d body may span lines: join lines until quotes balance.
        current = ""
        for line in joined.splitlines():
            current = f"{current}\n{line}" if current else line
            if current.count("'") % 2 == 0:
                if current.lstrip().startswith("grpcurl"):
                    yield current
                current = ""


def main():
    problems, checked = [], 0
    with tempfile.TemporaryDirectory(prefix="gpufleet-stubs-") as stubs:
        scheduler.generate_stubs(stubs)
        for module in ("auth", "fleet", "jobs", "usage", "telemetry", "agent", "agent_control", "types"):
            importlib.import_module(f"gpufleet.v1.{module}_pb2")
        pool = descriptor_pool.Default()
        for cmd in commands(DOC.read_text()):
            words = shlex.split(cmd.replace("\n", " "))
            body = words[words.index("-d") + 1] if "-d" in words else None
            target = words[-1]
            if "/" in target and target.startswith("gpufleet."):
                service_name, method_name = target.split("/")
                try:
                    method = pool.FindServiceByName(service_name).methods_by_name[method_name]
                except KeyError:
                    problems.append(f"{target}: no such method")
                    continue
                request = message_factory.GetMessageClass(method.input_type)()
                if body is not None:
                    try:
                        json_format.Parse(body, request)
                    except json_format.ParseError as e:
                        problems.append(f"{target}: body {body!r} does not parse: {e}")
                checked += 1
            elif "describe" in words and target.startswith("gpufleet."):
                try:
                    pool.FindServiceByName(target)
                except KeyError:
                    try:
                        pool.FindMessageTypeByName(target)
                    except KeyError:
                        problems.append(f"describe {target}: no such service or message")
                checked += 1
    for p in problems:
        print(f"docs/grpc.md: {p}")
    print(f"docs/grpc.md: {checked} grpcurl examples checked against the protos")
    return 1 if problems or checked == 0 else 0


if __name__ == "__main__":
    sys.exit(main())

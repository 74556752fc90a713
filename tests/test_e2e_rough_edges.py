"""Rough edges a newcomer hit (issue 12, item 8), each on the real server, SDK and gRPC."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory

import cuepoint
from cuepoint.v1 import device_pb2, device_pb2_grpc
from cuepoint_server.api.auth import AuthConfig

from .conftest import ROOT, SHIPPED, StartServer, phone

FITKIT_KEY = "fk_test_4f9a1c2e7b3d5a60"
AUTH = AuthConfig.from_dict({"apps": {"fitkit": {"api_keys": [FITKIT_KEY]}}})

HELP = """
id: help
trigger: {event: help}
cue: {message: "hi", channel: chat}
"""


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cuepoint_server.cli", *args], capture_output=True, text=True, timeout=timeout
    )


async def test_hello_without_app_id_is_invalid_argument_even_with_auth_on(start_server: StartServer) -> None:
    server = await start_server(HELP, auth=AUTH)

    async def frames() -> AsyncIterator[device_pb2.DeviceMessage]:
        yield device_pb2.DeviceMessage(hello=device_pb2.Hello(device_id="phone-1"))
        await asyncio.sleep(5)

    async with grpc.aio.insecure_channel(server.address) as channel:
        call = device_pb2_grpc.DeviceServiceStub(channel).Connect(
            frames(), metadata=(("authorization", f"Bearer {FITKIT_KEY}"),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with asyncio.timeout(5):
                async for _ in call:
                    pass
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("hello.app_id: required")


async def test_serve_on_a_busy_port_says_so_and_exits_2(start_server: StartServer, tmp_path: Path) -> None:
    server = await start_server(HELP)
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "s.yaml").write_text(HELP)
    done = await asyncio.to_thread(
        cli, "serve", "--scenarios", str(folder), "--db", str(tmp_path / "other.db"), "--port", str(server.port)
    )
    assert done.returncode == 2, done.stderr
    assert f"cannot start: 127.0.0.1:{server.port} is already in use" in done.stderr
    assert "Traceback" not in done.stderr
    # The running server was not disturbed.
    client = await phone(server)
    await client.track("help")
    assert (await client.next_cue(timeout=5)).message == "hi"
    await client.close()


def test_unknown_template_keys_are_a_validate_error_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        "id: greet\ntrigger: {event: help}\ncue:\n  channel: chat\n"
        '  message: "Hi {{ user.first_name }}, key {{ secret.key }}"\n'
    )
    done = cli("validate", str(tmp_path))
    assert done.returncode == 1
    assert f"{tmp_path}/s.yaml:5: cue.message: unknown template key 'secret.key'" in done.stdout
    assert "user.first_name" not in done.stdout  # a real context key is fine


MIXED = """
id: Sales_Help
trigger: {event: help}
cue: {message: "Talk to sales?", channel: chat, queue: Sales_Closers_Tier2, skills: [Enterprise_Deals]}
"""


async def test_ids_may_use_mixed_case_and_underscores(start_server: StartServer) -> None:
    server = await start_server(MIXED)
    associate = await cuepoint.connect_associate(
        server.address, associate_id="dana", queues=["Sales_Closers_Tier2"], skills=["Enterprise_Deals"]
    )
    client = await phone(server)
    await client.track("help")
    cue = await client.next_cue(timeout=5)
    assert cue.scenario_id == "Sales_Help"
    engagement = await client.accept(cue)
    assigned = await associate.next_engagement(timeout=5)
    assert assigned.queue == "Sales_Closers_Tier2"
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    await client.close()
    await associate.close()


def test_a_bad_id_is_explained_in_our_words(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(MIXED.replace("Sales_Closers_Tier2", "Sales Closers/2"))
    done = cli("validate", str(tmp_path))
    assert done.returncode == 1
    line = next(line for line in done.stdout.splitlines() if "cue.queue" in line)
    assert "'Sales Closers/2' is not a valid id" in line
    assert "letters, digits" in line
    assert "pattern" not in done.stdout and "^[" not in done.stdout


DEVICE_PROTO = ROOT / "proto" / "cuepoint" / "v1" / "device.proto"


def test_the_proto_documents_auth_metadata_and_message_ordering() -> None:
    device = DEVICE_PROTO.read_text()
    common = (ROOT / "proto" / "cuepoint" / "v1" / "common.proto").read_text()
    assert "`authorization: Bearer <key>`" in device
    assert "may arrive before that batch's" in device
    assert "the sender included" in device
    assert "Unset: the server's time of arrival is used." in common


async def test_rich_errors_decode_with_the_google_rpc_protos_shipped_in_proto(
    start_server: StartServer, tmp_path: Path
) -> None:
    shipped = [ROOT / "proto" / "google" / "rpc" / name for name in ("status.proto", "error_details.proto")]
    for path in shipped:
        assert path.read_text().startswith("// Copyright"), path
        assert "Licensed under the Apache License, Version 2.0" in path.read_text()
    # What a client in another language does: compile them, with nothing but protoc's well-known types.
    descriptors = tmp_path / "rpc.pb"
    from grpc_tools import protoc

    include = str(Path(protoc.__file__).parent / "_proto")
    argv = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--descriptor_set_out={descriptors}"]
    assert protoc.main([*argv, "google/rpc/status.proto", "google/rpc/error_details.proto"]) == 0
    pool = descriptor_pool.DescriptorPool()
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes())
    for well_known in (any_pb2, duration_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        well_known.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    for file in files.file:
        pool.Add(file)
    status_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))
    bad_request_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.BadRequest"))

    server = await start_server(HELP)

    async def frames() -> AsyncIterator[device_pb2.DeviceMessage]:
        yield device_pb2.DeviceMessage(hello=device_pb2.Hello(app_id="Not An App", device_id="phone-1"))
        await asyncio.sleep(5)

    async with grpc.aio.insecure_channel(server.address) as channel:
        call = device_pb2_grpc.DeviceServiceStub(channel).Connect(frames())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with asyncio.timeout(5):
                async for _ in call:
                    pass
    trailer = dict(info.value.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_class.FromString(trailer)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad_request = bad_request_class.FromString(status.details[0].value)
    assert bad_request.field_violations[0].field == "hello.app_id"


ROUTED = """
scenarios:
  - id: help
    trigger: {event: help}
    cue: {message: "Need help?", channel: chat, queue: support}
  - id: sales
    trigger: {event: pricing}
    cue: {message: "Pricing questions?", channel: chat, queue: support}
routing:
  rules:
    - when: {attribute: user.tier, equals: premium}
      apps: [shopapp]
      queue: shop-support
    - when: {attribute: user.tier, equals: premium}
      scenarios: [sales]
      queue: Sales_Closers_Tier2
"""


async def test_routing_rules_scoped_per_app_and_per_scenario(start_server: StartServer) -> None:
    server = await start_server(ROUTED)
    associates = {
        queue: await cuepoint.connect_associate(server.address, associate_id=f"a-{queue}", queues=[queue])
        for queue in ("support", "shop-support", "Sales_Closers_Tier2")
    }
    cases = [("fit-1", "fitkit", "help", "support"), ("fit-2", "fitkit", "pricing", "Sales_Closers_Tier2")]
    cases.append(("shop-1", "shopapp", "help", "shop-support"))
    for device, app, event, queue in cases:
        client = await phone(server, device, user_id=f"u-{device}", app_id=app)
        await client.track(event)
        await client.accept(await client.next_cue(timeout=5))
        assigned = await associates[queue].next_engagement(timeout=5)
        assert assigned.queue == queue, device
        await client.close()
    for associate in associates.values():
        await associate.close()


def test_a_rule_scoped_to_an_unknown_scenario_is_a_validate_error(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(ROUTED.replace("scenarios: [sales]", "scenarios: [sale]"))
    done = cli("validate", str(tmp_path))
    assert done.returncode == 1
    assert f"{tmp_path}/r.yaml:15: routing.rules[1].scenarios[0]: unknown scenario 'sale'" in done.stdout


TRACE = SHIPPED / "traces" / "fitkit-sync-failure.jsonl"


async def test_cuepoint_device_plays_a_trace_against_a_running_server(start_server: StartServer) -> None:
    server = await start_server(scenarios=SHIPPED)
    associate = await cuepoint.connect_associate(server.address, associate_id="dana", queues=["fitkit-support"])
    # Played as fast as the server answers: the shipped trace for simulate, unchanged.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cuepoint_server.cli", "device", server.address, str(TRACE), "--speed", "0",
        "--linger", "0.5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    await associate.close()
    assert proc.returncode == 0, err.decode()
    lines = [line.split(" ", 1)[1] for line in out.decode().splitlines()]
    assert lines[0].startswith("d1 CONNECTED session ")
    assert 'd1 CUE fitkit-sync-failure audio "Unable to sync? I can help you." (cue#1)' in lines
    # Nothing waits in real time, so cue#1 is still on screen when d1 answers "last": it starts an engagement.
    assert "d1 ANSWERED cue#1 accepted" in lines
    assert any(line.startswith("d1 ENGAGEMENT cue#1 assigned queue=fitkit-support") for line in lines)
    assert not any(line.startswith("d3 CUE") for line in lines)  # free tier: never targeted
    stored = await server.store.cues_for_subject("user:user-1042")
    assert [c.scenario_id for c in stored] == ["fitkit-sync-failure"]


def test_cuepoint_device_refuses_a_broken_trace(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"t": 0, "device": "d1", "event": "x"}\n')
    done = cli("device", "127.0.0.1:1", str(tmp_path / "bad.jsonl"))
    assert done.returncode == 2
    assert "bad.jsonl:1: device 'd1' has not said hello yet" in done.stderr

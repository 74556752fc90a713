"""Delivery between replicas survives a lossy bus (issue 14): traffic is an outbox row before it is a message.

Two real `cuepoint serve` processes on the run's PostgreSQL and the local NATS (tests/cluster.py), started with
the hidden `--test-delivery-faults`: the wake-ups a replica receives are dropped (every Nth, or all) and the
others handled twice. What the bus lost is taken from the delivery outbox (core/delivery.py) by the next
wake-up for the same stream or by the 5 s cluster sweep; what it repeated is sent once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import cuepoint
from cuepoint_server.storage import PostgresStore

# `cluster`: test_e2e_cluster.py's fixture (two real replicas), used here under its own name.
from .test_e2e_cluster import HELP, StartCluster, cluster, device  # noqa: F401

# Seconds to wait for what only the sweep recovers (several sweeps of 5 s).
RECOVERY = 60

LINES = 6


def faults(spec: str) -> tuple[str, ...]:
    return ("--test-delivery-faults", spec)


async def _chat_lines(source: AsyncIterator[cuepoint.ChatMessage], n: int) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    async for message in source:
        seen.append((message.sender, message.text))
        if len(seen) == n:
            break
    return seen


async def test_with_wakeups_dropped_and_repeated_the_whole_chat_arrives_in_order_once(cluster: StartCluster) -> None:  # noqa: F811
    # Every third wake-up each replica receives is lost, every other one arrives twice.
    a, b = await cluster(HELP, extra=faults("drop=3,replay"))
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", display_name="Dana", queues=["support"])
    phone = await device(a, "phone-a")
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=10))
    # A device on A still reaches the associate on B: the offer travels as a row.
    assigned = await dana.next_engagement(timeout=RECOVERY)
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=RECOVERY)
    assert (assigned.engagement_id, assigned.context.device_id) == (engagement.engagement_id, "phone-a")
    # Both sides talk at once; A (the engagement's owner) puts the lines in one order.
    for n in range(LINES):
        await engagement.send_chat(f"user {n}")
        await dana.send_chat(assigned, f"dana {n}")
    async with asyncio.timeout(RECOVERY):
        seen_by_dana = await _chat_lines(dana.messages(assigned), 2 * LINES)
        seen_by_phone = await _chat_lines(engagement.messages(), 2 * LINES)
    # Every line exactly once, each side's lines in the order sent, and both sides see the same order.
    texts = [text for _, text in seen_by_dana]
    assert sorted(texts) == sorted([f"user {n}" for n in range(LINES)] + [f"dana {n}" for n in range(LINES)])
    assert [t for t in texts if t.startswith("user")] == [f"user {n}" for n in range(LINES)]
    assert [t for t in texts if t.startswith("dana")] == [f"dana {n}" for n in range(LINES)]
    assert seen_by_phone == seen_by_dana
    # Nothing more comes after the last line: no line arrives twice (the repeated wake-ups found nothing).
    await dana.end(assigned, disposition="resolved")
    await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=RECOVERY)
    assert [m.text for m in dana.transcript(assigned)] == texts
    # Everything is taken: no row is left behind in the outbox. The end's own rows (A's "ended" for Dana's
    # link, say) may still wait for a sweep when their wake-up was one of those dropped, so wait for it.
    async with await PostgresStore.open(a.database) as store:
        left = await store.delivery_recipients()
        async with asyncio.timeout(RECOVERY):
            while left:
                await asyncio.sleep(0.5)
                left = await store.delivery_recipients()
        assert left == []
    await phone.close()
    await dana.close()


async def test_a_claim_whose_wakeup_is_lost_still_takes_effect(cluster: StartCluster) -> None:  # noqa: F811
    # A hears no wake-up at all: what B's associate sends reaches A's stand-in only from the outbox.
    (a,) = await cluster(HELP, count=1, extra=faults("drop=1"))
    (b,) = await cluster(HELP, count=1)
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", queues=["support"], manual_claim=True)
    phone = await device(a, "phone-a")
    await phone.track("help")
    engagement = await phone.accept(await phone.next_cue(timeout=10))
    offered = await dana.next_offer(timeout=RECOVERY)
    assert offered.engagement_id == engagement.engagement_id
    # Her claim is a row for A's stand-in; its bus message is dropped; A's sweep applies it.
    claimed = await dana.claim(offered, timeout=RECOVERY)
    assert claimed.engagement_id == engagement.engagement_id
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=RECOVERY)
    assert list(dana.active) == [engagement.engagement_id]
    await phone.close()
    await dana.close()


async def test_an_invitation_reaches_a_device_held_by_the_other_replica(cluster: StartCluster) -> None:  # noqa: F811
    # A hears no wake-up (the invitation reaches it only from the outbox); B loses every other one.
    (a,) = await cluster(HELP, count=1, extra=faults("drop=1"))
    (b,) = await cluster(HELP, count=1, extra=faults("drop=2,replay"))
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", display_name="Dana", queues=["support"])
    phone = await device(a, "phone-a")
    await phone.track("checkout_error")
    await phone.flush(timeout=10)
    # Dana's stream is on B, the phone's on A: A's stand-in of her stream invites it.
    result = await dana.invite(
        "phone-a", cuepoint.Channel.CHAT, "Need a hand?", reason="seen in live now", timeout=RECOVERY
    )
    assert result.invited and result.blocked_reason == ""
    cue = await phone.next_cue(timeout=RECOVERY)
    assert (cue.cue_id, cue.message) == (result.cue_id, "Need a hand?")
    # Accepted, the engagement comes to her, the inviter.
    engagement = await phone.accept(cue)
    taken = await dana.next_engagement(timeout=RECOVERY)
    assert taken.engagement_id == engagement.engagement_id
    await phone.close()
    await dana.close()


async def test_an_invitation_sent_before_the_inviters_link_reached_the_device_s_replica(cluster: StartCluster) -> None:  # noqa: F811
    # A drops the first two announcements of Dana's link (her sign-in and the next sweep's): for about 4 s A
    # has no stand-in of her stream, and her invitation arrives in that window. It carries her sign-in, so A
    # opens the stand-in then and invites through it, instead of dropping it (and her answer never coming).
    (a,) = await cluster(HELP, count=1, extra=faults("desk=2"))
    (b,) = await cluster(HELP, count=1)
    phone = await device(a, "phone-a")
    await phone.track("checkout_error")
    await phone.flush(timeout=10)
    dana = await cuepoint.connect_associate(b.address, associate_id="dana", display_name="Dana", queues=["support"])
    result = await dana.invite(
        "phone-a", cuepoint.Channel.CHAT, "Need a hand?", reason="seen in live now", timeout=RECOVERY
    )
    assert result.invited and result.blocked_reason == ""
    cue = await phone.next_cue(timeout=RECOVERY)
    assert cue.cue_id == result.cue_id
    engagement = await phone.accept(cue)
    taken = await dana.next_engagement(timeout=RECOVERY)
    assert taken.engagement_id == engagement.engagement_id
    # The stand-in opened by the invitation is the link's one: the announcements heard later keep it, and the
    # engagement stays with Dana through several sweeps (a stand-in not heard from for three signs out).
    await asyncio.sleep(8)
    await dana.send_chat(taken, "still here")
    async with asyncio.timeout(RECOVERY):
        assert [text for _, text in await _chat_lines(engagement.messages(), 1)] == ["still here"]
    await phone.close()
    await dana.close()

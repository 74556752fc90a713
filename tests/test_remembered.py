"""Which subjects' arbiter memory is whole (core/remembered.py): what lets a lone server skip the guard's read."""

from __future__ import annotations

from cuepoint_server.core.remembered import Remembered


def test_whole_once_replayed_and_only_then() -> None:
    memory = Remembered()
    token = memory.begin("user:a")
    assert token is not None
    assert not memory.whole("user:a")  # replaying: stored cues may not be in memory yet
    assert memory.begin("user:a") is None  # replayed once per process
    memory.replayed("user:a", token)
    assert memory.whole("user:a")


def test_a_replay_overlapping_a_forget_does_not_claim_whole() -> None:
    memory = Remembered()
    old = memory.begin("user:a")
    assert old is not None
    memory.forget("user:a")  # evicted while the replay read storage
    new = memory.begin("user:a")
    assert new is not None
    memory.replayed("user:a", old)  # the first replay ends late: what it read predates the forget
    assert not memory.whole("user:a")
    memory.replayed("user:a", new)
    assert memory.whole("user:a")


def test_a_merge_from_a_partial_memory_is_partial_until_forgotten() -> None:
    memory = Remembered()
    device = memory.begin("device:d")  # the device's replay is still reading
    user = memory.begin("user:u")
    assert device is not None and user is not None
    memory.replayed("user:u", user)
    memory.merged("device:d", "user:u")
    assert not memory.whole("user:u")
    again = memory.begin("user:u")
    assert again is None  # already replayed: nothing would make it whole but a forget
    memory.forget("user:u")
    token = memory.begin("user:u")
    assert token is not None
    memory.replayed("user:u", token)
    assert memory.whole("user:u")


def test_a_merge_of_two_whole_memories_stays_whole() -> None:
    memory = Remembered()
    for subject in ("device:d", "user:u"):
        token = memory.begin(subject)
        assert token is not None
        memory.replayed(subject, token)
    memory.merged("device:d", "user:u")
    assert memory.whole("user:u")


def test_forgetting_another_subject_does_not_spoil_a_replay() -> None:
    memory = Remembered()
    token = memory.begin("user:a")
    assert token is not None
    memory.forget("user:b")  # another device went away meanwhile
    memory.replayed("user:a", token)
    assert memory.whole("user:a")

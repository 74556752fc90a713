"""The predict package on its own: model quality on synthetic journeys, cold start, persistence, no leakage.

Unit level on purpose (no server): 5,000 sessions of online learning take about a second here, and the
properties are about the model and its features. The end-to-end use of scores is in test_e2e_predict.py.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

from cuepoint_server.engine.state import DeviceState
from cuepoint_server.predict.features import Journey, features
from cuepoint_server.predict.model import Example, ModelSettings, OutcomeModel
from cuepoint_server.predict.registry import LabelledSession, Predictor, describe_scores
from cuepoint_server.predict.synthetic import CONVERTING, sessions
from cuepoint_server.predict.trainer import LEASE, Trainer
from cuepoint_server.scenarios.model import OutcomeSpec
from cuepoint_server.storage import ModelRecord, SqliteStore

# Labels arrive this many sessions after the prediction was made (sessions end later than they are scored).
DELAY = 50


def _train(count: int, *, min_sessions: int = 200) -> tuple[OutcomeModel, list[tuple[float, int]]]:
    """Delayed progressive validation: predict at the scoring moment, learn when the label arrives."""
    model = OutcomeModel("purchased", ModelSettings(min_sessions=min_sessions))
    waiting: deque[tuple[Example, bool]] = deque()
    for session in sessions(count):
        waiting.append((Example(session.x, model.predict(session.x)), session.converted))
        if len(waiting) > DELAY:
            example, converted = waiting.popleft()
            model.learn([example], converted)
    return model, list(model.validation)


def test_after_5000_sessions_the_model_ranks_and_is_calibrated() -> None:
    model, _ = _train(5000)
    report = model.report()
    # The report covers the most recent 4,000 predictions, each made before its label was known.
    assert report.validated == 4000
    assert report.auc is not None and report.auc > 0.8, report.auc
    enough = [c for c in report.calibration if c.count >= 200]
    assert len(enough) >= 8, report.calibration
    for decile in enough:
        assert abs(decile.mean_predicted - decile.observed) <= 0.05, decile
    assert report.status == "trained"
    # The known converting features are among the strongest learned weights.
    top = {name for name, _ in report.top_features[:6]}
    assert "milestone:payment" in top and "events_5m:add_to_cart" in top, report.top_features


def test_adding_the_converting_behaviour_raises_the_score() -> None:
    model, _ = _train(3000)
    session = next(s for s in sessions(50, seed=99) if "payment" not in s.milestones)
    before = model.score(session.x)[0]
    journey = session.journey
    milestones = dict(session.milestones)
    later = session.now + 5
    journey.observe("add_to_cart", later, {})
    journey.observe("add_to_cart", later, {})
    journey.observe("screen_viewed", later, {"screen": "payment"})
    milestones["payment"] = later
    after = model.score(features(journey, milestones, session.context, later, exclude=("purchased",)))[0]
    assert after > before + 0.2, (before, after)
    assert CONVERTING["milestone:payment"] > 0


def test_cold_start_scores_the_base_rate_under_a_beta_prior() -> None:
    model = OutcomeModel("purchased", ModelSettings(min_sessions=100))
    assert model.score({"a": 1.0})[0] == 0.5  # Beta(1, 1) before any label
    outcomes = [True] * 3 + [False] * 17
    for reached in outcomes:
        model.learn([Example({"a": 1.0}, 0.5)], reached)
    assert not model.trained
    expected = (3 + 1) / (20 + 2)
    assert model.score({"a": 1.0})[0] == expected
    assert model.score({"a": 99.0, "b": 3.0})[0] == expected
    assert model.report().status == "training"


def test_save_and_reload_give_identical_predictions() -> None:
    model, _ = _train(1500)
    state = json.loads(json.dumps(model.state()))
    again = OutcomeModel.from_state(state, ModelSettings())
    for session in sessions(200, seed=3):
        assert again.score(session.x) == model.score(session.x)
        assert again.contributions(session.x) == model.contributions(session.x)
    # And both go on learning the same way.
    for session in sessions(100, seed=4):
        model.learn([Example(session.x, 0.0)], session.converted)
        again.learn([Example(session.x, 0.0)], session.converted)
    probe = next(sessions(1, seed=5)).x
    assert again.predict(probe) == model.predict(probe)


def test_no_feature_reads_the_future() -> None:
    journey = Journey(started_at=1000.0, prior_sessions=2, prior_milestones={"purchased": 1})
    context = {"device.os": "iOS", "app.version": "4.2.0", "device.timezone": "Europe/Paris"}
    milestones = {"browse": 1010.0}
    journey.observe("screen_viewed", 1005.0, {"screen": "home"})
    journey.observe("add_to_cart", 1020.0, {})
    at = 1030.0
    before = features(journey, milestones, context, at, exclude=("purchased",))
    # Everything that happens after the scoring moment: events, screens, milestones, the outcome itself.
    journey.observe("add_to_cart", 1031.0, {})
    journey.observe("screen_viewed", 1032.0, {"screen": "payment"})
    journey.observe("search", 1040.0, {})
    milestones["payment"] = 1032.0
    milestones["purchased"] = 1050.0
    assert features(journey, milestones, context, at, exclude=("purchased",)) == before
    assert not any("purchased" in name and not name.startswith("prior:") for name in before)
    later = features(journey, milestones, context, 1060.0, exclude=("purchased",))
    assert later["events_1m:add_to_cart"] == 2 and later["milestone:payment"] == 1
    assert "milestone:purchased" not in later


def _signal(name: str, at: float, **props: object) -> object:
    class S:
        kind = "event"

    s = S()
    s.name, s.time, s.payload = name, at, props  # type: ignore[attr-defined]
    return s


def test_a_session_is_labelled_once_with_examples_from_before_the_outcome() -> None:
    predictor = Predictor()
    predictor.configure([OutcomeSpec(id="purchased", milestone="purchased", min_sessions=1)])
    got: list[LabelledSession] = []
    predictor.labelled = got.append
    state = DeviceState("d1", "shop", context={"device.os": "iOS"})
    predictor.session_opened(state, "s1", 100.0)
    assert predictor.observe(state, [_signal("add_to_cart", 101.0)], 101.0) == ["score:purchased"]
    assert state.scores is not None and state.scores["purchased"].probability == 0.5
    assert describe_scores(state)["purchased"]["status"] == "training"
    state.milestones["purchased"] = 110.0
    predictor.observe(state, [_signal("purchase_completed", 110.0)], 110.0)
    assert state.scores["purchased"].probability == 1.0
    predictor.session_ended("d1", "s1", 120.0)
    assert [(g.session_id, g.reached, len(g.examples)) for g in got] == [("s1", True, 1)]
    assert "milestone:purchased" not in got[0].examples[0].x


async def test_trainer_learns_stored_labels_once_saves_and_reloads(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    spec = OutcomeSpec(id="purchased", milestone="purchased", min_sessions=5)
    async with await SqliteStore.open(db) as store:
        predictor = Predictor()
        predictor.configure([spec])
        trainer = Trainer(store, predictor)
        await trainer.start()
        assert trainer.training
        # A second process sharing the database does not get the lease.
        assert await store.take_lease(LEASE, "someone-else", 0.0, 30.0) is None
        for i, s in enumerate(sessions(40)):
            trainer.submit(LabelledSession("purchased", f"s{i}", s.converted, (Example(s.x, 0.5),), 0.0))
        await trainer.stop()
        model = predictor.models["purchased"]
        assert model.labelled == 40
        [record] = await store.models()
        assert record.version >= 1 and record.cursor == 40
        assert await store.labels_after(0) == []  # learned, so pruned
    async with await SqliteStore.open(db) as store:
        again = Predictor()
        again.configure([spec])
        restarted = Trainer(store, again)
        await restarted.start()
        probe = next(sessions(1, seed=11)).x
        assert again.models["purchased"].labelled == 40
        assert again.models["purchased"].score(probe) == model.score(probe)
        # A trainer that lost its lease (older epoch) cannot overwrite the newer model.
        stale = ModelRecord("purchased", 999, 0, 0, {"format": 1}, 0.0)
        await store.save_model(stale)
        [kept] = await store.models()
        assert kept.version == record.version
        await restarted.stop()


def test_score_leaf_bounds_training_and_shadow() -> None:
    from cuepoint_server.engine.state import Score
    from cuepoint_server.scenarios.compiler import compile_routing
    from cuepoint_server.scenarios.model import RoutingSpec

    spec = RoutingSpec.model_validate(
        {
            "rules": [
                {"when": {"score": "purchased", "gte": 0.2, "trained": True}, "queue": "trained-closers"},
                {"when": {"score": "purchased", "gte": 0.2}, "queue": "closers"},
            ]
        }
    )
    routing = compile_routing(spec, {})
    state = DeviceState("d1", "shop")

    def route() -> str:
        return routing.route(state, 0.0, "default", 0, ())[0]

    assert route() == "default"  # not scored yet: no score condition holds
    state.scores = {"purchased": Score(0.3, False, False, list)}
    assert route() == "closers"  # the base rate while training passes the bound, not `trained: true`
    state.scores = {"purchased": Score(0.3, True, False, list)}
    assert route() == "trained-closers"
    state.scores = {"purchased": Score(0.9, True, True, list)}
    assert route() == "default"  # shadow: scored and shown, never decides
    state.scores = {"purchased": Score(0.1, True, False, list)}
    assert route() == "default"


def test_timers_rescore_time_driven_features() -> None:
    predictor = Predictor()
    predictor.configure([OutcomeSpec(id="purchased", milestone="purchased", min_sessions=1)])
    model = predictor.models["purchased"]
    # Teach it that long sessions convert: log_seconds_in_session carries the signal.
    for i in range(400):
        journey = Journey(0.0)
        seconds = 5.0 if i % 2 else 600.0
        model.learn([Example(features(journey, {}, {}, seconds), 0.0)], seconds > 60)
    state = DeviceState("d1", "shop")
    predictor.session_opened(state, "s1", 0.0)
    predictor.observe(state, [_signal("search", 1.0)], 1.0)
    assert state.scores is not None
    early = state.scores["purchased"].probability
    predictor.refresh(state, 900.0)  # a timer fired: no signal, but time in session moved
    assert state.scores["purchased"].probability > early + 0.2


async def test_two_processes_one_trainer_each_label_learned_once(tmp_path: Path) -> None:
    """Two servers sharing a database: one trains, both label; the other takes over when the first stops."""
    from cuepoint_server.predict.trainer import TrainerConfig

    db = tmp_path / "shared.db"
    spec = OutcomeSpec(id="purchased", milestone="purchased", min_sessions=5)
    fast = TrainerConfig(poll=0.05, lease_ttl=30.0, save_every=0.0)
    async with await SqliteStore.open(db) as store_a, await SqliteStore.open(db) as store_b:
        a, b = Predictor(), Predictor()
        a.configure([spec])
        b.configure([spec])
        trainer_a, trainer_b = Trainer(store_a, a, fast), Trainer(store_b, b, fast)
        await trainer_a.start()
        await trainer_b.start()
        assert trainer_a.training and not trainer_b.training
        data = list(sessions(30))
        for i, s in enumerate(data[:20]):
            # Half the sessions end on each process; only A learns, from the stored queue.
            (trainer_a if i % 2 else trainer_b).submit(
                LabelledSession("purchased", f"s{i}", s.converted, (Example(s.x, 0.5),), 0.0)
            )
        await trainer_b.stop()  # B's pending label writes are flushed
        await trainer_a.stop()  # A learns what is stored, saves, and lets the lease go
        assert a.models["purchased"].labelled == 20
        trainer_b = Trainer(store_b, b, fast)
        await trainer_b.start()  # B takes over at the next epoch, from A's saved state and cursor
        assert trainer_b.training and trainer_b.epoch == 2
        assert b.models["purchased"].labelled == 20
        for i, s in enumerate(data[20:], start=20):
            trainer_b.submit(LabelledSession("purchased", f"s{i}", s.converted, (Example(s.x, 0.5),), 0.0))
        await trainer_b.stop()
        assert b.models["purchased"].labelled == 30  # each label learned exactly once across both
        [record] = await store_a.models()
        assert record.epoch == 2 and record.state["labelled"] == 30

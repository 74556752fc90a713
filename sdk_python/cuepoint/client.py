"""The device client: one session stream per app install.

Three tasks share the stream: the caller's (track/accept/flush), a sender
that cuts batches from the queue, and a reader that dispatches whatever the
server pushes. Every path that can learn the stream is gone funnels into
``Client._fail``, which either ends the client (``_terminate``) or, for a
retryable failure, reconnects:

    CONNECTING --Welcome--> CONNECTED --retryable failure--> STALE
    STALE --(backoff; new stream; Hello with the current context; Welcome)--> CONNECTED
    STALE/CONNECTED --non-retryable failure, attempts exhausted, close()--> CLOSED

On the way back to CONNECTED the batcher puts sent-but-unacked signals back in
front of the queue (``requeue_in_flight``) so everything unacked is resent in
its original order with its original ids and times; the server acks those it
already stored as duplicates. Signals tracked while STALE simply queue.
Failures reported for a stream that is no longer current are ignored.

Cues are surfaced once per cue_id: the server re-offers a still-pending cue
on every new session, so a repeat is dropped, and if the app had already
answered it (the answer evidently never arrived) the answer is sent again.

Ordering assumptions about the server: Welcome is the first message; acks
name individual signal ids; EngagementUpdate carries the cue_id it belongs to.
Chat, upgrade, channel-change, call-signal and fallback messages are routed by
engagement_id, which the engagement's first EngagementUpdate (QUEUED) binds to
the accepted cue; any that arrive before it are held (bounded) and delivered
right after it. How chat echoes and channel changes are matched to sends is in
``cuepoint._conversation``.
"""

# ruff: noqa: ASYNC109 -- `timeout=` arguments are part of the public API by design;
# they are applied with asyncio.timeout inside.

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal

from google.protobuf.message import DecodeError

from cuepoint.v1 import common_pb2, device_pb2, device_pb2_grpc

from . import _convert, _validate
from ._batcher import SignalBatcher
from ._ids import IdGenerator
from ._inbox import Inbox, drain, get_within
from ._journal import Journal, JournalError
from ._reconnect import Backoff, is_retryable, is_throttled
from ._transport import BidiStream, handshake
from ._version import SDK_AGENT
from .config import ClientConfig
from .engagement import Engagement, EngagementItem
from .errors import (
    ClientClosed,
    ConnectionLost,
    CuepointError,
    InvalidSignal,
    Rejected,
    TimedOut,
)
from .models import (
    ButtonAction,
    ConnectionState,
    Consent,
    Context,
    Cue,
    CueButton,
    CueResponse,
    CueWithdrawal,
    EngagementState,
    EngagementUpdate,
    FeedbackRequest,
    Location,
    Scalar,
    ServerEvent,
    User,
    UserVerification,
)

__all__ = ["Client", "CueCallback", "Engagement", "StateCallback", "connect"]

log = logging.getLogger("cuepoint")

CueCallback = Callable[[Cue], object]
"""Called with each new cue; may be a plain function or return an awaitable."""

StateCallback = Callable[[ConnectionState], object]
"""Called with each new :class:`ConnectionState`; may be a plain function or return an awaitable."""

# Cues nobody consumed via cues()/next_cue() are kept up to this many; the
# oldest go first because a stale offer is the least useful one to show.
_CUE_INBOX_SIZE = 100

# Engagement traffic that arrived before the update binding its engagement_id
# to a cue: at most this many engagements, this many items each.
_ORPHAN_ENGAGEMENTS = 16
_ORPHAN_ITEMS = 256

# Hello.engaged_cue_ids: at most this many (the server refuses more).
_ENGAGED_CUES = 32

# Cue ids already surfaced (and answers already given), remembered to drop the
# server's re-offer of a pending cue after a reconnect.
_SEEN_CUES = 1024

# A session counts as progress (resetting the reconnect backoff) once it acks a
# batch or stays up this long.
_STABLE_AFTER = 10.0

# The server rejects signals more than 7 days old, and one rejected signal ends
# the session: older unacked signals are dropped before they are resent.
_MAX_SIGNAL_AGE = 6 * 86400.0

"""Engagement traffic the client routes to an :class:`Engagement` by engagement id."""

_Stream = BidiStream[device_pb2.DeviceMessage, device_pb2.ServerMessage]
_State = Literal["new", "starting", "open", "closing", "closed"]


async def connect(
    target: str,
    *,
    app_id: str,
    device_id: str,
    context: Context | None = None,
    user: User | None = None,
    consent: Consent = Consent.NONE,
    config: ClientConfig | None = None,
    device_secret: str | None = None,
    user_token: str | None = None,
) -> Client:
    """Open a device session and return the started :class:`Client`.

    ``device_secret``: the secret the server issued to this install (see :attr:`Client.device_secret`);
    with ``config.outbox_path`` the SDK keeps it itself. ``user_token``: a short-lived JWT from the app's
    backend asserting the signed-in user (see :meth:`Client.set_user_token`).

    Raises a :class:`~cuepoint.errors.CuepointError` subclass if the server is
    unreachable, refuses the Hello, or sends no Welcome within
    ``config.connect_timeout``.
    """
    client = Client(
        target,
        app_id=app_id,
        device_id=device_id,
        context=context,
        user=user,
        consent=consent,
        config=config,
        device_secret=device_secret,
        user_token=user_token,
    )
    return await client.start()


class Client:
    """A device session. Use :func:`connect`, or ``async with Client(...)``.

    Not thread-safe: call it from the event loop it was started on.
    """

    def __init__(
        self,
        target: str,
        *,
        app_id: str,
        device_id: str,
        context: Context | None = None,
        user: User | None = None,
        consent: Consent = Consent.NONE,
        config: ClientConfig | None = None,
        device_secret: str | None = None,
        user_token: str | None = None,
    ) -> None:
        _validate.identity(app_id, device_id)
        if not isinstance(consent, Consent):
            raise InvalidSignal("consent must be a cuepoint.Consent", field="hello.consent")
        self._target = target
        self._app_id = app_id
        self._device_id = device_id
        self._context = _validate.context(context or Context())
        self._user = _validate.user(user)
        self._consent = consent
        self._config = config or ClientConfig()
        self._new_id = IdGenerator(self._config.clock)
        # Issued by the server on this install's first connection; presented in every Hello.
        self._device_secret = device_secret or ""
        # The app backend's token for the signed-in user; sent in every Hello (and by set_user_token).
        self._user_token = _validate.user_token(user_token) if user_token else ""
        self._verification: UserVerification | None = None
        self._verification_waiters: list[asyncio.Future[UserVerification]] = []

        self._state: _State = "new"
        self._failure: CuepointError | None = None
        self._stream: _Stream | None = None
        self._session_id = ""
        self._server_time: float | None = None
        # Whether the server reads a batch's property keys and types given once (Welcome.accepts_property_shape).
        self._shaped = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._heartbeats: dict[str, asyncio.Future[None]] = {}
        self._last_heard = 0.0

        # Its clock is time.monotonic() (asyncio's own), not asyncio.get_running_loop().time(): on Python 3.11
        # get_running_loop() makes a getpid() system call, ~0.8 us of each track() on a VM (issue 13).
        self._batcher: SignalBatcher[_convert.Outgoing] = SignalBatcher(self._config.max_batch, self._config.linger)
        self._wake_sender = asyncio.Event()
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []

        self._cue_inbox: Inbox[Cue] = Inbox(maxlen=_CUE_INBOX_SIZE)
        self._feedback_inbox: Inbox[FeedbackRequest] = Inbox(maxlen=_CUE_INBOX_SIZE)
        # Engagements whose feedback question was surfaced (insertion-ordered, the oldest dropped first).
        self._feedback_asked: dict[str, None] = {}
        self._subscribers: weakref.WeakSet[Inbox[ServerEvent]] = weakref.WeakSet()
        self._callbacks: list[CueCallback] = []
        self._engagements: dict[str, Engagement] = {}
        self._by_engagement_id: dict[str, Engagement] = {}
        self._orphans: dict[str, list[EngagementItem]] = {}
        self._answered: set[str] = set()
        self._withdrawn: set[str] = set()
        # cue_id -> the CueResponse message sent for it (None: surfaced, not answered).
        self._seen_cues: OrderedDict[str, device_pb2.DeviceMessage | None] = OrderedDict()

        self._conn_state = ConnectionState.CONNECTING
        self._connected = asyncio.Event()  # set while CONNECTED or CLOSED: wakes _writable()
        self._state_callbacks: list[StateCallback] = []
        self._state_subscribers: weakref.WeakSet[Inbox[ConnectionState]] = weakref.WeakSet()
        self._backoff = Backoff(self._config.reconnect_initial_backoff, self._config.reconnect_max_backoff)
        self._reconnector: asyncio.Task[None] | None = None
        self._attempts = 0  # consecutive reconnect attempts without progress
        self._connected_at = 0.0
        self._last_error: CuepointError | None = None
        self._draining = False  # close() half-closed the stream: its end is expected

        self._journal: Journal | None = None
        # Whether _open_journal has run (or, without an outbox, has nothing to do): read on every track().
        self._journal_opened = self._config.outbox_path is None
        self._journal_commit: asyncio.Handle | None = None

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> Client:
        """Open the stream, send Hello, wait for Welcome. Returns ``self``."""
        if self._state == "open":
            return self
        if self._state != "new":
            raise ClientClosed(f"cannot start a client that is {self._state}")
        self._state = "starting"
        self._open_journal()
        stream = self._open_stream()
        try:
            welcome = await self._handshake(stream)
            if self._state != "starting":
                raise ClientClosed("the client was closed while starting")
        except BaseException as exc:
            await stream.close()
            if self._state == "starting":  # else close() got here first and cleaned up
                self._state = "closed"
                if isinstance(exc, CuepointError):
                    self._failure = exc
                self._close_journal()
                self._set_state(ConnectionState.CLOSED)
                self._close_consumers(self._failure or ClientClosed("client start was interrupted"))
            raise
        self._state = "open"
        self._install(stream, welcome)
        return self

    def _open_stream(self) -> _Stream:
        return BidiStream.open(
            self._target,
            lambda channel: device_pb2_grpc.DeviceServiceStub(channel).Connect,
            credentials=self._config.credentials,
            options=self._config.grpc_options(),
            metadata=self._config.call_metadata(),
        )

    def _install(self, stream: _Stream, welcome: device_pb2.Welcome) -> None:
        """Make ``stream`` (past its Welcome) the session: start its reader and sender."""
        self._stream = stream
        self._session_id = welcome.session_id
        if welcome.device_secret:
            self._device_secret = welcome.device_secret
            if self._journal is not None:
                self._journal.save_device_secret(welcome.device_secret)
        self._server_time = _convert.time_from_proto(welcome, "server_time")
        self._batcher.limit_batch(welcome.max_signals_per_batch)
        self._shaped = welcome.accepts_property_shape
        self._connected_at = asyncio.get_running_loop().time()
        self._reader = self._spawn(self._read_loop(stream))
        self._sender = self._spawn(self._send_loop(stream))
        self._last_heard = self._connected_at
        if self._config.heartbeat_interval > 0:
            self._heartbeat = self._spawn(self._heartbeat_loop(stream))
        self._wake_sender.set()
        self._set_state(ConnectionState.CONNECTED)
        log.debug("cuepoint session %s open (max_batch=%d)", self._session_id, self._batcher.max_batch)

    async def _handshake(self, stream: _Stream) -> device_pb2.Welcome:
        hello = _convert.hello(
            app_id=self._app_id,
            device_id=self._device_id,
            context=self._context,
            user=self._user,
            consent=self._consent,
            sdk_version=SDK_AGENT,
            # After a drop, ask to resume: the server keeps session-scoped rules.
            resume_session_id=self._session_id or "",
            device_secret=self._device_secret,
            user_token=self._user_token,
            # _dispatch reads a batch's ack sent beside the cue it fired (ServerMessage.cue_ack).
            accepts_cue_ack=True,
            # ... and the acks of several batches committed together, as one message (ServerMessage.acks).
            accepts_ack_groups=True,
            # Engagements not yet seen to end: one that ended while this client was away is answered with
            # its ENDED update, which no stream was there to hear (the most recent, as the server caps them).
            engaged_cue_ids=list(self._engagements)[-_ENGAGED_CUES:],
        )
        welcome: device_pb2.Welcome = await handshake(
            stream, hello, expect="welcome", target=self._target, within=self._config.connect_timeout
        )
        return welcome

    async def close(self) -> None:
        """Flush (bounded by ``close_timeout``), half-close, stop tasks. Never raises.

        While STALE the flush keeps reconnecting until the timeout. Signals
        still unacked then are dropped, or with ``outbox_path`` left in the
        journal for the next client with the same app and device ids.
        """
        if self._state in ("closing", "closed"):
            return
        if self._state in ("new", "starting"):
            self._state = "closed"
            self._close_journal()
            self._set_state(ConnectionState.CLOSED)
            self._close_consumers(None)
            return
        self._state = "closing"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.close_timeout
        if self._failure is None:
            try:
                await self._flush(timeout=self._config.close_timeout)
            except CuepointError as err:
                pending = self._batcher.pending_count
                kept = " (kept in the outbox)" if self._journal is not None else ""
                log.warning("cuepoint: closing with %d unacked signal(s)%s: %s", pending, kept, err)
            # From here on the stream's end is expected, not a reason to reconnect.
            self._draining = True
            await self._cancel(self._reconnector)
            # The sender must be idle before half-closing; cancelling it
            # mid-write would make grpc cancel the whole call.
            await self._cancel(self._sender)
            await self._cancel(self._heartbeat)
            stream = self._stream
            if stream is not None and self._conn_state is ConnectionState.CONNECTED:
                await stream.done_writing()
                if self._reader is not None and self._failure is None:
                    # Let the server end the stream itself so it logs a clean goodbye.
                    await asyncio.wait({self._reader}, timeout=max(0.0, deadline - loop.time()))
        self._draining = True
        for task in list(self._tasks):
            await self._cancel(task)
        if self._stream is not None:
            await self._stream.close()
        self._state = "closed"
        self._close_journal()
        self._set_state(ConnectionState.CLOSED)
        self._close_consumers(self._failure)

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- state ----------------------------------------------------------------

    @property
    def user_verification(self) -> UserVerification | None:
        """The server's verdict on the latest user token (None before one was presented and answered)."""
        return self._verification

    async def set_user_token(self, token: str, *, timeout: float | None = None) -> UserVerification:
        """Present a user token from the app's backend: after sign-in, or to refresh one about to expire.

        The token (a short-lived JWT whose ``sub`` is the user id) is kept and sent in every later Hello,
        so a reconnect stays verified while it is valid. Returns the server's verdict; raises
        :class:`TimedOut` after ``timeout``. Never log the token.
        """
        self._check_usable(started=True)
        self._user_token = _validate.user_token(token)
        waiter: asyncio.Future[UserVerification] = asyncio.get_running_loop().create_future()
        self._verification_waiters.append(waiter)
        try:
            await self._send_engagement(device_pb2.DeviceMessage(user_token=device_pb2.UserToken(token=token)))
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError as exc:
            raise TimedOut(f"no verdict on the user token within {timeout}s") from exc
        finally:
            with contextlib.suppress(ValueError):
                self._verification_waiters.remove(waiter)

    @property
    def device_secret(self) -> str:
        """The secret the server issued to this install ("" before the first Welcome).

        Servers with auth refuse a Hello for a known device id without it. With ``config.outbox_path``
        the SDK keeps it in that file; otherwise keep it with the install (the platform's keychain) and
        pass it back as ``connect(..., device_secret=...)``. Never log it.
        """
        return self._device_secret

    @property
    def session_id(self) -> str:
        """Assigned by the server's Welcome; empty before ``start()``. A reconnect gets a new one."""
        return self._session_id

    @property
    def state(self) -> ConnectionState:
        """CONNECTING, CONNECTED, STALE (reconnecting, signals buffered) or CLOSED."""
        return self._conn_state

    @property
    def last_error(self) -> CuepointError | None:
        """The error behind the latest disconnect or failed reconnect attempt (None if none yet).

        Unlike :attr:`failure` it does not mean the client is over: while STALE it says why.
        """
        return self._last_error

    def on_state(self, callback: StateCallback) -> Callable[[], None]:
        """Call ``callback(state)`` on every ConnectionState change from now on; returns an unsubscribe function.

        Async callbacks run as tasks; exceptions are logged, never raised into the SDK.
        """
        self._state_callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._state_callbacks.remove(callback)

        return unsubscribe

    def states(self) -> AsyncIterator[ConnectionState]:
        """The current ConnectionState, then every change; ends after CLOSED.

        Each call is an independent subscription. A consumer that lags sees every
        transition in order (none are coalesced).
        """
        inbox: Inbox[ConnectionState] = Inbox()
        inbox.put(self._conn_state)
        if self._conn_state is ConnectionState.CLOSED:
            inbox.close()
        else:
            self._state_subscribers.add(inbox)
        return drain(inbox, self._state_subscribers)

    @property
    def server_time(self) -> float | None:
        """The server clock at Welcome, epoch seconds."""
        return self._server_time

    @property
    def max_batch(self) -> int:
        """Effective batch size: ``config.max_batch`` capped by the server."""
        return self._batcher.max_batch

    @property
    def is_open(self) -> bool:
        """Started, not closed, not failed; also True while STALE (the client is still usable)."""
        return self._state == "open" and self._failure is None

    @property
    def failure(self) -> CuepointError | None:
        """The error that ended the session, if one did."""
        return self._failure

    @property
    def pending_signals(self) -> int:
        """Signals tracked but not yet acked by the server."""
        return self._batcher.pending_count

    @property
    def context(self) -> Context:
        """The device context as the server should now see it (Hello plus updates)."""
        return self._context

    @property
    def user(self) -> User | None:
        return self._user

    # --- signals --------------------------------------------------------------

    async def track(self, name: str, /, **properties: Scalar) -> str:
        """Queue an app event; returns its signal id. Sending happens in the background.

        Raises :class:`InvalidSignal` (nothing queued) for a bad name or property.
        """
        self._check_usable()
        name = _validate.event_name(name)
        props = _validate.own_attributes(properties, "properties")  # a dict of this call's own: no copy
        signal_id = self._new_id()
        self._enqueue(signal_id, _convert.event_row((signal_id, self._config.clock(), name, props)))
        return signal_id

    async def set_context(
        self,
        *,
        app_version: str | None = None,
        os: str | None = None,
        os_version: str | None = None,
        device_model: str | None = None,
        locale: str | None = None,
        timezone: str | None = None,
        location: Location | None = None,
        attributes: Mapping[str, Scalar] | None = None,
        user: User | None = None,
        clear_keys: Iterable[str] = (),
    ) -> str:
        """Queue a context change; returns its signal id.

        Given fields replace, ``attributes`` merge into the existing ones,
        ``user`` fields replace and its attributes merge, and ``clear_keys``
        (scenario paths like ``attributes.cart_value`` or ``user.id``) remove.
        """
        self._check_usable()
        strings = {
            "app_version": app_version,
            "os": os,
            "os_version": os_version,
            "device_model": device_model,
            "locale": locale,
            "timezone": timezone,
        }
        for key, value in strings.items():
            if value is not None:
                _validate.string(value, f"context.{key}")
        _validate.location(location, "context.location")
        attrs = _validate.attributes(attributes, "context.attributes")
        user = _validate.user(user)
        cleared = _validate.clear_keys(clear_keys)
        partial = _convert.partial_context(location=location, attributes=attrs, **strings)
        changed = len(_convert.flatten_context_update(_convert.context_update(partial, user, ())))
        if not changed and not cleared:
            raise InvalidSignal("set_context() was given nothing to change")
        if changed > _validate.MAX_ENTRIES:
            raise InvalidSignal(f"a context update may change at most {_validate.MAX_ENTRIES} keys")

        signal_id = self._new_id()
        signal = _convert.context_signal(signal_id, self._config.clock(), partial, user, cleared)
        self._enqueue(signal_id, signal)
        self._context, self._user = _merge_context(
            self._context, self._user, _convert.context_from_proto(partial), user, cleared
        )
        return signal_id

    async def flush(self, *, timeout: float | None = None) -> None:
        """Send everything queued now and wait until the server has acked all of it.

        Signals tracked after the call do not extend the wait. Keeps waiting
        across reconnects; raises :class:`TimedOut` after ``timeout`` and the
        failure if the client fails for good.
        """
        self._check_usable(started=True)
        await self._flush(timeout=timeout)

    async def _flush(self, *, timeout: float | None) -> None:
        target = self._batcher.request_flush()
        if self._batcher.acked_through(target):
            return
        if self._failure is not None:
            raise self._failure
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (target, waiter)
        self._flush_waiters.append(entry)
        self._wake_sender.set()
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except CuepointError:
            raise
        except TimeoutError as exc:
            raise TimedOut(f"{self._batcher.pending_count} signal(s) still unacked after {timeout}s") from exc
        finally:
            with contextlib.suppress(ValueError):
                self._flush_waiters.remove(entry)

    def _enqueue(self, signal_id: str, signal: _convert.Outgoing) -> None:
        # Once per track(): each check here is inline, not a call (issue 13).
        if not self._journal_opened:
            self._open_journal()  # signals left by an earlier run go first
        self._batcher.add(signal_id, signal, time.monotonic(), self._config.max_pending_signals)
        if self._journal is not None:
            self._journal.add(signal_id, _signal_time(signal), _convert.as_signal(signal).SerializeToString())
            self._schedule_journal_commit()
        self._wake_sender.set()

    # --- outbox journal (ClientConfig.outbox_path) -----------------------------

    def _open_journal(self) -> None:
        """Open the outbox once and queue the signals an earlier run left unacked."""
        path = self._config.outbox_path
        if self._journal_opened or path is None:
            return
        self._journal_opened = True
        try:
            journal = Journal(path, self._app_id, self._device_id)
            rows = journal.load(not_before=self._config.clock() - _MAX_SIGNAL_AGE)
        except JournalError as exc:
            # Persistence is a bonus: without it signals still flow, from memory.
            log.warning("cuepoint: outbox disabled: %s", exc)
            return
        self._journal = journal
        if not self._device_secret:
            try:
                self._device_secret = journal.device_secret() or ""
            except JournalError as exc:
                log.warning("cuepoint: %s", exc)
        now = time.monotonic()
        pending = set(self._batcher.unacked_ids())
        restored = 0
        for signal_id, payload in rows:
            try:
                signal = common_pb2.Signal.FromString(payload)
            except DecodeError:
                signal = None
            if signal is None or signal.id != signal_id or signal_id in pending:
                journal.remove([signal_id])
                continue
            # Over max_pending_signals if need be: they were accepted once already.
            self._batcher.add(signal_id, signal, now)
            pending.add(signal_id)
            restored += 1
        if journal.buffered:
            self._schedule_journal_commit()
        if restored:
            log.info("cuepoint: %d unacked signal(s) from an earlier run will be resent", restored)

    def _schedule_journal_commit(self) -> None:
        """Commit once per event-loop pass, however many signals were tracked in it."""
        if self._journal_commit is None:
            self._journal_commit = asyncio.get_running_loop().call_soon(self._commit_journal)

    def _commit_journal(self) -> None:
        self._journal_commit = None
        if self._journal is not None:
            self._journal.commit()

    def _close_journal(self) -> None:
        if self._journal_commit is not None:
            self._journal_commit.cancel()
            self._journal_commit = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # --- cues -----------------------------------------------------------------

    def cues(self) -> AsyncIterator[Cue]:
        """Cues not yet taken, from session start on, oldest first.

        Consumers share one queue (each cue goes to one of them). Withdrawn and
        already-answered cues are dropped from it. Ends when the client closes;
        raises the session's error if it fails.
        """
        return self._cue_inbox

    async def next_cue(self, *, timeout: float | None = None) -> Cue:
        """The next cue from :meth:`cues`; raises :class:`TimedOut` after ``timeout`` s."""
        return await get_within(self._cue_inbox, timeout, "cue")

    async def next_feedback_request(self, *, timeout: float | None = None) -> FeedbackRequest:
        """The next request for a rating, sent when an engagement ends; :class:`TimedOut` after ``timeout`` s."""
        return await get_within(self._feedback_inbox, timeout, "feedback request")

    async def give_feedback(self, request: FeedbackRequest, score: int, comment: str = "") -> None:
        """Answer a rating request; returns once sent. The server keeps the first answer per engagement.

        A score outside ``min_score``..``max_score``, or a comment the request does not allow, raises
        :class:`InvalidSignal` here rather than ending the session at the server.
        """
        self._check_usable(started=True)
        if isinstance(score, bool) or not isinstance(score, int) or not request.min_score <= score <= request.max_score:
            raise InvalidSignal(
                f"score must be an integer from {request.min_score} to {request.max_score}", field="feedback.score"
            )
        if comment and not request.comment_allowed:
            raise InvalidSignal("this request takes no comment", field="feedback.comment")
        if len(comment) > 1000:
            raise InvalidSignal("at most 1000 characters", field="feedback.comment")
        await self._send_engagement(_convert.feedback_answer(request.engagement_id, score, comment))

    def on_cue(self, callback: CueCallback) -> Callable[[], None]:
        """Call ``callback(cue)`` for every cue from now on; returns an unsubscribe function.

        Async callbacks run as tasks; exceptions are logged, never raised into the SDK.
        Cues are still queued for :meth:`cues` as well.
        """
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    def events(self) -> AsyncIterator[ServerEvent]:
        """Every Cue, CueWithdrawal and EngagementUpdate received after this call.

        Each call is an independent subscription (unlike :meth:`cues`).
        """
        inbox: Inbox[ServerEvent] = Inbox()
        if self._state == "closed" or self._failure is not None:
            inbox.close(self._failure)
        else:
            self._subscribers.add(inbox)
        return drain(inbox, self._subscribers)

    async def accept(self, cue: Cue | str) -> Engagement:
        """Accept the cue; the returned handle follows the engagement it starts."""
        return await self._accept(cue, "")

    async def press(self, cue: Cue, button: CueButton | str) -> Engagement | None:
        """The user pressed one of the cue's buttons: answer as its action says, recording which button.

        An ACCEPT button starts the engagement on the button's channel and returns its handle;
        DECLINE, DISMISS and OPEN_URL (the app opens ``button.url`` itself) return None.
        """
        button_id = button.button_id if isinstance(button, CueButton) else button
        pressed = cue.button(button_id)
        if pressed is None or pressed.action is None:
            raise Rejected(f"cue {cue.cue_id} has no button {button_id!r}")
        if pressed.action is ButtonAction.ACCEPT:
            return await self._accept(cue, button_id)
        await self._respond(cue.cue_id, pressed.action.response, button_id)
        return None

    async def _accept(self, cue: Cue | str, button_id: str) -> Engagement:
        handle = Engagement(
            cue if isinstance(cue, Cue) else Cue(cue_id=_validate.cue_id(cue)),
            _send=self._send_engagement,
            _new_id=self._new_id,
        )
        previous = self._engagements.get(handle.cue_id)
        # Registered before the response is written: the first update may
        # arrive while the write is still in progress.
        self._engagements[handle.cue_id] = handle
        try:
            await self._respond(handle.cue_id, CueResponse.ACCEPTED, button_id)
        except BaseException:
            if previous is None:
                self._engagements.pop(handle.cue_id, None)
            else:
                self._engagements[handle.cue_id] = previous
            raise
        return handle

    async def decline(self, cue: Cue | str) -> None:
        await self._respond(_cue_id(cue), CueResponse.DECLINED)

    async def dismiss(self, cue: Cue | str) -> None:
        """The user closed the cue without answering."""
        await self._respond(_cue_id(cue), CueResponse.DISMISSED)

    async def expire(self, cue: Cue | str) -> None:
        """The cue was shown but timed out on the device."""
        await self._respond(_cue_id(cue), CueResponse.EXPIRED)

    async def _respond(self, cue_id: str, response: CueResponse, button_id: str = "") -> None:
        """Send an answer; while STALE (or if the write breaks the stream) it is only recorded.

        The server re-offers a cue it has no answer for on the next session;
        ``_on_cue`` then sends the recorded answer again.
        """
        self._check_usable(started=True)
        _validate.cue_id(cue_id)
        if cue_id in self._withdrawn:
            raise Rejected(f"cue {cue_id} was withdrawn by the server")
        if cue_id in self._answered:
            raise Rejected(f"cue {cue_id} was already answered")
        self._answered.add(cue_id)
        self._cue_inbox.discard(lambda c: c.cue_id == cue_id)
        message = _convert.cue_response(cue_id, response, self._config.clock(), button_id)
        self._remember_cue(cue_id, message)
        stream = self._stream
        if stream is None or self._conn_state is not ConnectionState.CONNECTED:
            log.info("cuepoint: not connected; the answer to cue %s goes out when the server re-offers it", cue_id)
            return
        try:
            await stream.write(message)
        except CuepointError as err:
            self._fail(err, stream)
            if self._failure is not None:
                raise

    # --- background tasks -----------------------------------------------------

    async def _read_loop(self, stream: _Stream) -> None:
        try:
            while True:
                message = await stream.read()
                if message is None:
                    if self._draining or self._state == "closed":
                        return
                    raise ConnectionLost("the server ended the session stream")
                self._last_heard = asyncio.get_running_loop().time()
                self._dispatch(message)
        except CuepointError as err:
            self._fail(err, stream)
        except Exception as exc:
            log.exception("cuepoint: unexpected error handling a server message")
            self._fail(CuepointError(f"unexpected error handling a server message: {exc!r}"), stream)

    async def _send_loop(self, stream: _Stream) -> None:
        try:
            while True:
                self._wake_sender.clear()
                wait = self._batcher.time_until_due(time.monotonic())
                if wait == 0.0:
                    batch = [signal for _, signal in self._batcher.take_batch()]
                    # Events go by column (SignalColumns); a batch with a context update as Signal messages.
                    message = _convert.signals_message(self._new_id(), self._config.clock(), batch, shaped=self._shaped)
                    await stream.write(message)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake_sender.wait()
        except CuepointError as err:
            self._fail(err, stream)

    async def _heartbeat_loop(self, stream: _Stream) -> None:
        """Probe a silent link with an empty batch; an unanswered probe means the link is dead."""
        interval, timeout = self._config.heartbeat_interval, self._config.heartbeat_timeout
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(max(0.0, self._last_heard + interval - loop.time()))
                if loop.time() - self._last_heard < interval:
                    continue  # the server spoke meanwhile: the link is alive
                beat = f"hb-{self._new_id()}"
                answered = self._heartbeats[beat] = loop.create_future()
                try:
                    await stream.write(_convert.signal_batch(beat, self._config.clock(), []))
                    async with asyncio.timeout(timeout):
                        await answered
                except TimeoutError:
                    self._fail(ConnectionLost(f"no answer to a heartbeat within {timeout}s"), stream)
                    return
                finally:
                    self._heartbeats.pop(beat, None)
        except CuepointError as err:
            self._fail(err, stream)

    def _dispatch(self, message: device_pb2.ServerMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "ack":
            self._on_ack(message.ack)
        elif kind == "acks":
            # Several batches' acks in one message (Hello.accepts_ack_groups): each as if it came on its own.
            for ack in message.acks.acks:
                self._on_ack(ack)
        elif kind == "cue":
            self._on_cue(_convert.cue_from_proto(message.cue))
            if message.HasField("cue_ack"):
                # The ack of the batch that fired the cue, in the same message (Hello.accepts_cue_ack): as if
                # it had arrived right after the cue.
                self._on_ack(message.cue_ack)
        elif kind == "withdrawal":
            self._on_withdrawal(_convert.withdrawal_from_proto(message.withdrawal))
        elif kind == "engagement":
            self._on_engagement(_convert.engagement_update_from_proto(message.engagement))
        elif kind == "chat":
            self._route(_convert.chat_message_from_proto(message.chat))
        elif kind == "upgrade_request":
            self._route(_convert.upgrade_request_from_proto(message.upgrade_request))
        elif kind == "channel_change":
            self._route(_convert.channel_change_from_proto(message.channel_change))
        elif kind == "call_signal":
            self._route(_convert.call_signal_from_proto(message.call_signal))
        elif kind == "fallback":
            self._route(_convert.fallback_offer_from_proto(message.fallback))
        elif kind == "user_verification":
            self._on_verification(_convert.user_verification_from_proto(message.user_verification))
        elif kind == "feedback_request":
            self._on_feedback_request(_convert.feedback_request_from_proto(message.feedback_request))
        elif kind == "welcome":
            log.warning("cuepoint: ignoring a second Welcome")
        else:
            # A newer server may send kinds this SDK does not know yet.
            log.debug("cuepoint: ignoring server message of kind %r", kind)

    def _on_ack(self, ack: device_pb2.SignalAck) -> None:
        if ack.batch_id in self._heartbeats:
            beat = self._heartbeats[ack.batch_id]
            if not beat.done():
                beat.set_result(None)
            return
        acked = [*itertools.chain(ack.signal_ids, ack.duplicate_ids)]
        self._batcher.ack(acked)
        self._batcher.relax()
        self._attempts = 0  # this session makes progress
        if self._journal is not None:
            self._journal.remove(acked)
            self._schedule_journal_commit()
        self._resolve_flush_waiters()

    def _on_verification(self, verdict: UserVerification) -> None:
        self._verification = verdict
        if not verdict.verified:
            log.warning("cuepoint: the user token was not accepted (%s); the user id is only claimed", verdict.reason)
        waiters, self._verification_waiters = self._verification_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(verdict)
        self._publish(verdict)

    def _on_cue(self, cue: Cue) -> None:
        if cue.cue_id in self._seen_cues or cue.cue_id in self._withdrawn:
            # The server re-offers a pending cue on each new session: surfaced once only.
            answer = self._seen_cues.get(cue.cue_id)
            if answer is not None and self._stream is not None:
                # Still pending although answered: the answer was lost with the old stream.
                log.info("cuepoint: re-sending the answer to re-offered cue %s", cue.cue_id)
                self._spawn(self._resend(self._stream, answer))
            else:
                log.debug("cuepoint: dropping repeated cue %s", cue.cue_id)
            return
        self._remember_cue(cue.cue_id, None)
        self._cue_inbox.put(cue)
        self._publish(cue)
        for callback in list(self._callbacks):
            try:
                result = callback(cue)
            except Exception:
                log.exception("cuepoint: on_cue callback failed")
                continue
            if inspect.isawaitable(result):
                self._spawn(_run_callback(result))

    def _on_withdrawal(self, withdrawal: CueWithdrawal) -> None:
        self._withdrawn.add(withdrawal.cue_id)
        self._cue_inbox.discard(lambda c: c.cue_id == withdrawal.cue_id)
        handle = self._engagements.get(withdrawal.cue_id)
        if handle is not None and handle.last_update is None:
            # The server answers a response to an already settled cue with a
            # withdrawal: this accept will never start an engagement.
            del self._engagements[withdrawal.cue_id]
            reason = f" ({withdrawal.reason})" if withdrawal.reason else ""
            handle._finish(Rejected(f"cue {withdrawal.cue_id} is no longer available{reason}"))
        self._publish(withdrawal)

    def _on_feedback_request(self, request: FeedbackRequest) -> None:
        # One question per engagement: the server asks again with the ENDED it repeats after a reconnect.
        if request.engagement_id in self._feedback_asked:
            return
        self._feedback_asked[request.engagement_id] = None
        while len(self._feedback_asked) > _SEEN_CUES:
            del self._feedback_asked[next(iter(self._feedback_asked))]
        self._feedback_inbox.put(request)

    def _on_engagement(self, update: EngagementUpdate) -> None:
        handle = self._engagements.get(update.cue_id)
        engagement_id = update.engagement_id
        if handle is not None:
            handle._push(update)
            if update.state is EngagementState.ENDED:
                del self._engagements[update.cue_id]
                self._by_engagement_id.pop(engagement_id, None)
                self._orphans.pop(engagement_id, None)
            elif engagement_id and engagement_id not in self._by_engagement_id:
                self._by_engagement_id[engagement_id] = handle
                for item in self._orphans.pop(engagement_id, ()):
                    handle._receive(item)
        self._publish(update)

    def _route(self, item: EngagementItem) -> None:
        handle = self._by_engagement_id.get(item.engagement_id)
        if handle is not None:
            handle._receive(item)
            return
        # Not bound yet (its first update is still to come), or not ours / over.
        held = self._orphans.setdefault(item.engagement_id, [])
        if len(held) < _ORPHAN_ITEMS:
            held.append(item)
        while len(self._orphans) > _ORPHAN_ENGAGEMENTS:
            del self._orphans[next(iter(self._orphans))]
        log.debug("cuepoint: holding %s for unknown engagement %s", type(item).__name__, item.engagement_id)

    def _remember_cue(self, cue_id: str, answer: device_pb2.DeviceMessage | None) -> None:
        self._seen_cues[cue_id] = answer
        self._seen_cues.move_to_end(cue_id)
        while len(self._seen_cues) > _SEEN_CUES:
            self._seen_cues.popitem(last=False)

    async def _resend(self, stream: _Stream, message: device_pb2.DeviceMessage) -> None:
        try:
            await stream.write(message)
        except CuepointError as err:
            self._fail(err, stream)

    async def _send_engagement(self, message: device_pb2.DeviceMessage) -> None:
        """Write one engagement message (chat, upgrade, call signal, end, fallback choice).

        While STALE it waits for the reconnect (up to ``connect_timeout``);
        a write that fails raises (the message may or may not have arrived),
        and is not retried: the app may send it again.
        """
        stream = await self._writable()
        try:
            await stream.write(message)
        except CuepointError as err:
            self._fail(err, stream)
            raise

    async def _writable(self) -> _Stream:
        """The current stream, waiting up to ``connect_timeout`` while reconnecting."""
        timeout = self._config.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._check_usable(started=True)
                    stream = self._stream
                    if stream is not None and self._conn_state is ConnectionState.CONNECTED:
                        return stream
                    await self._connected.wait()
        except TimeoutError as exc:
            cause = f": {self._last_error}" if self._last_error else ""
            raise ConnectionLost(f"still reconnecting after {timeout}s{cause}") from exc

    def _publish(self, event: ServerEvent) -> None:
        for inbox in list(self._subscribers):
            inbox.put(event)

    def _resolve_flush_waiters(self) -> None:
        for target, waiter in self._flush_waiters:
            if not waiter.done() and self._batcher.acked_through(target):
                waiter.set_result(None)

    def _fail(self, error: CuepointError, stream: _Stream | None = None) -> None:
        """A stream failed: reconnect if the error is retryable, else end the client.

        ``stream`` is the stream the error came from; news about a stream that
        is no longer current (a late error from before a reconnect) is ignored.
        """
        if self._failure is not None or self._state == "closed":
            return
        if stream is not None and stream is not self._stream:
            return
        if self._reconnector is not None and not self._reconnector.done():
            return  # already reconnecting; the reconnector ends the client if it must
        if self._config.reconnect and self._state in ("open", "closing") and not self._draining:
            if is_retryable(error):
                self._disconnect(error)
                return
        self._terminate(error)

    def _terminate(self, error: CuepointError) -> None:
        """The session is over for good: every waiter and iterator gets ``error``."""
        if self._failure is not None or self._state == "closed":
            return
        self._failure = error
        self._last_error = error
        log.warning("cuepoint: session %s failed: %s", self._session_id or "-", error)
        for _, waiter in self._flush_waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._close_consumers(error)
        current = asyncio.current_task()
        for task in (self._sender, self._reader, self._heartbeat, self._reconnector):
            if task is not None and task is not current:
                task.cancel()
        self._set_state(ConnectionState.CLOSED)

    def _disconnect(self, error: CuepointError) -> None:
        """Drop the broken stream, go STALE and start reconnecting. Waiters and iterators keep waiting."""
        self._last_error = error
        log.warning("cuepoint: session %s lost, reconnecting: %s", self._session_id or "-", error)
        if is_throttled(error):
            self._batcher.throttle()
        stream, self._stream = self._stream, None
        if asyncio.get_running_loop().time() - self._connected_at >= _STABLE_AFTER:
            self._attempts = 0
        current = asyncio.current_task()
        for task in (self._sender, self._reader, self._heartbeat):
            if task is not None and task is not current:
                task.cancel()
        self._sender = self._reader = self._heartbeat = None
        self._set_state(ConnectionState.STALE)
        self._reconnector = self._spawn(self._reconnect(stream, error))

    async def _reconnect(self, old: _Stream | None, error: CuepointError) -> None:
        """Back off, open a new stream, say Hello (current context), resume; until it works or must stop."""
        if old is not None:
            await old.close()
        max_attempts = self._config.reconnect_max_attempts
        while True:
            if max_attempts is not None and self._attempts >= max_attempts:
                gave_up = ConnectionLost(
                    f"gave up after {self._attempts} reconnect attempt(s): {error}",
                    code=error.code,
                    details=error.details,
                )
                gave_up.__cause__ = error
                self._reconnector = None
                self._terminate(gave_up)
                return
            delay = self._backoff.delay(self._attempts, throttled=is_throttled(error))
            self._attempts += 1
            log.debug("cuepoint: reconnect attempt %d in %.3fs", self._attempts, delay)
            await asyncio.sleep(delay)
            stream = self._open_stream()
            try:
                welcome = await self._handshake(stream)
            except CuepointError as err:
                await stream.close()
                error = self._last_error = err
                if is_throttled(err):
                    self._batcher.throttle()
                if not is_retryable(err):
                    self._reconnector = None
                    self._terminate(err)
                    return
                log.info("cuepoint: reconnect attempt %d failed: %s", self._attempts, err)
                continue
            except BaseException:
                await stream.close()
                raise
            break
        if self._state == "closed" or self._draining:
            await stream.close()
            return
        self._reconnector = None
        dropped = self._drop_expired()
        requeued = self._batcher.requeue_in_flight()
        self._install(stream, welcome)
        log.info(
            "cuepoint: reconnected as session %s; resending %d unacked signal(s) (%d in flight)%s",
            self._session_id,
            self._batcher.pending_count,
            requeued,
            f", dropped {dropped} too old" if dropped else "",
        )

    def _drop_expired(self) -> int:
        """Forget unacked signals the server would reject as too old (it would end the session)."""
        oldest = self._config.clock() - _MAX_SIGNAL_AGE
        expired = [signal_id for signal_id, signal in self._batcher.pending_items() if _signal_time(signal) < oldest]
        if not expired:
            return 0
        log.warning("cuepoint: dropping %d unacked signal(s) older than the server accepts", len(expired))
        self._batcher.drop(expired)
        if self._journal is not None:
            self._journal.remove(expired)
            self._schedule_journal_commit()
        self._resolve_flush_waiters()
        return len(expired)

    def _set_state(self, state: ConnectionState) -> None:
        previous = self._conn_state
        if state is previous or previous is ConnectionState.CLOSED:
            return
        self._conn_state = state
        if state in (ConnectionState.CONNECTED, ConnectionState.CLOSED):
            self._connected.set()
        else:
            self._connected.clear()
        log.debug("cuepoint: %s -> %s", previous.name, state.name)
        for inbox in list(self._state_subscribers):
            inbox.put(state)
            if state is ConnectionState.CLOSED:
                inbox.close()
        for callback in list(self._state_callbacks):
            try:
                result = callback(state)
            except Exception:
                log.exception("cuepoint: on_state callback failed")
                continue
            if inspect.isawaitable(result):
                self._spawn(_run_callback(result, "on_state"))

    def _close_consumers(self, error: CuepointError | None) -> None:
        self._cue_inbox.close(error)
        for inbox in list(self._subscribers):
            inbox.close(error)
        for handle in self._engagements.values():
            handle._finish(error)
        closed = ClientClosed("the client was closed")
        for _, waiter in self._flush_waiters:
            if not waiter.done():
                waiter.set_exception(error or closed)

    def _check_usable(self, *, started: bool = False) -> None:
        if self._failure is not None:
            # Not the failure itself: a valid track() must not raise InvalidSignal
            # because of an earlier bad one. The cause is chained and on .failure.
            raise ClientClosed(f"the session has ended: {self._failure}") from self._failure
        if self._state in ("closing", "closed"):
            raise ClientClosed("the client is closed")
        if started and self._state != "open":
            raise ClientClosed("the client is not started; call start() or use cuepoint.connect()")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _cancel(task: asyncio.Task[None] | None) -> None:
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- helpers ------------------------------------------------------------------


def _cue_id(cue: Cue | str) -> str:
    return cue.cue_id if isinstance(cue, Cue) else cue


async def _run_callback(result: Awaitable[object], what: str = "on_cue") -> None:
    try:
        await result
    except Exception:
        log.exception("cuepoint: %s callback failed", what)


def _signal_time(signal: _convert.Outgoing) -> float:
    return _convert.outgoing_time(signal)


def _merge_context(
    context: Context,
    user: User | None,
    change: Context,
    user_change: User | None,
    cleared: Iterable[str],
) -> tuple[Context, User | None]:
    """Apply a ContextUpdate locally with the wire's rules (empty means unchanged)."""
    fields = {
        name: getattr(change, name) or getattr(context, name)
        for name in ("app_version", "os", "os_version", "device_model", "locale", "timezone")
    }
    location = context.location
    if change.location is not None:
        old = location or Location()
        location = Location(
            country=change.location.country or old.country,
            region=change.location.region or old.region,
            city=change.location.city or old.city,
        )
    attributes = {**context.attributes, **change.attributes}
    if user_change is not None:
        old_user = user or User()
        user = User(
            user_id=user_change.user_id or old_user.user_id,
            tier=user_change.tier or old_user.tier,
            attributes={**old_user.attributes, **user_change.attributes},
        )
    for key in cleared:
        section, _, rest = key.partition(".")
        if section == "attributes":
            attributes.pop(rest, None)
        elif section == "location" and location is not None:
            location = dataclasses.replace(location, **{rest: ""})
        elif section == "user" and user is not None:
            if rest == "id":
                user = dataclasses.replace(user, user_id="")
            elif rest == "tier":
                user = dataclasses.replace(user, tier="")
            else:
                kept = {k: v for k, v in user.attributes.items() if k != rest}
                user = dataclasses.replace(user, attributes=kept)
        elif key in _CLEARED_FIELD:
            fields[_CLEARED_FIELD[key]] = ""
    return Context(location=location, attributes=attributes, **fields), user


_CLEARED_FIELD = {
    "app.version": "app_version",
    "device.os": "os",
    "device.os_version": "os_version",
    "device.model": "device_model",
    "device.locale": "locale",
    "device.timezone": "timezone",
}

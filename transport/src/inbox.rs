//! Incoming messages on their way to [`Session::recv`](crate::Session::recv), and who accepts the
//! peer's message streams.
//!
//! # Who accepts
//! A caller waiting in `Session::recv` accepts the next message stream itself and parses it
//! inline (no other task wakes up for a message that arrived whole). The session driver accepts
//! only while nobody is waiting, so that messages are still decoded (and acknowledged, and
//! entered in the context) when the caller is busy elsewhere or never receives. The two are
//! never both registered with quinn for long: a stream arriving while both wait would wake both.
//!
//! The hand-over between them ([`AcceptTurn`]) costs the driver at most a couple of wake-ups per
//! [`STANDBY_RECHECK`] while callers keep receiving, not one per message:
//! - *accepting*: the driver waits for streams; a caller that starts waiting wakes it, and it
//!   stands by;
//! - *standby*: the driver does not accept; after [`STANDBY_RECHECK`] it accepts again if no
//!   caller waits and none started waiting meanwhile (else it checks again, or parks);
//! - *parked*: a caller was waiting at the last check; the caller that stops waiting last wakes
//!   the driver, which stands by again.
//!
//! Whoever accepts a stream runs its message task until the task first has to wait, and spawns
//! the rest as a task of its own, with no `.await` in between: a stream once accepted is always
//! run to its end, and its message reaches this inbox, even if the accepting `recv` future is
//! dropped right after.
//!
//! # Order
//! Messages are queued in the order the peer opened their streams (the stream index), whatever
//! order their first bytes arrive in: a message whose header has been read is queued only once
//! every stream opened before it has queued its message or ended without one. Until then its
//! task goes on reading and decoding (it is acknowledged and enters the context as usual) and
//! keeps its events; at its end it waits for its turn. (Under packet reordering the header of a
//! later message can otherwise be read first, and a server answering turns in `recv` order
//! would answer them out of order.)

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, TryAcquireError};
use tracing::Instrument;
use unimic_protocol::ErrorCode;

use crate::recv::{self, IncomingMessage};
use crate::session::Shared;
use crate::wire;

/// How long the driver stands by after callers were seen waiting before it accepts streams
/// itself again.
pub(crate) const STANDBY_RECHECK: Duration = Duration::from_millis(5);

/// Messages whose header has been read, waiting for `Session::recv` (bounded: a message task
/// waits for room, which holds its stream and so the peer's stream credit).
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<IncomingMessage>>,
    /// One permit per message queued, or per message task that ended while none were running
    /// (see [`Inbox::task_ended`]).
    ready: Notify,
    /// Free places in the queue; closed when the session is dropped (tasks then stop queueing).
    room: Semaphore,
    /// Message tasks started and not ended.
    live: AtomicUsize,
    /// Whose turn it is to queue a message (see the module docs, "Order").
    turns: Mutex<Turns>,
    /// Signalled whenever the turn moves on, or the inbox closes.
    turn_moved: Notify,
}

/// The stream indices whose message has been queued, or that ended without one.
#[derive(Default)]
struct Turns {
    /// Every stream index below it is done.
    next: u64,
    /// Indices at or above `next` that are done already (out of order).
    done: BTreeSet<u64>,
}

impl Inbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            room: Semaphore::new(capacity.max(1)),
            live: AtomicUsize::new(0),
            turns: Mutex::new(Turns::default()),
            turn_moved: Notify::new(),
        }
    }

    fn turns(&self) -> MutexGuard<'_, Turns> {
        // Only small, consistent updates happen under it.
        self.turns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The message stream `index` is done: its message was queued, or it ended without one.
    /// Idempotent.
    pub(crate) fn done(&self, index: u64) {
        let moved = {
            let mut t = self.turns();
            if index < t.next {
                return;
            }
            t.done.insert(index);
            let before = t.next;
            while t.done.first() == Some(&t.next) {
                t.done.pop_first();
                t.next += 1;
            }
            t.next != before
        };
        if moved {
            self.turn_moved.notify_waiters();
        }
    }

    /// Whether every message stream opened before `index` is done (its message may be queued
    /// without waiting for its turn).
    pub(crate) fn is_turn(&self, index: u64) -> bool {
        self.turns().next >= index
    }

    /// Waits until every message stream opened before `index` is done; `false` once the inbox
    /// is closed.
    async fn turn(&self, index: u64) -> bool {
        loop {
            let moved = self.turn_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self.room.is_closed() {
                return false;
            }
            if self.turns().next >= index {
                return true;
            }
            moved.await;
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<IncomingMessage>> {
        // Only push and pop happen under it: a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the message of stream `index`, in stream order: waits for its turn (see the
    /// module docs), then while the inbox is full. Once the session is dropped the message is
    /// dropped instead (its task still decodes it, so the context stays in step).
    pub(crate) async fn push(&self, index: u64, message: IncomingMessage) {
        // Without a future to poll when it is the message's turn, as it usually is.
        if !self.is_turn(index) && !self.turn(index).await {
            return;
        }
        // Without waiting first (no future to poll when there is room, as there usually is).
        let permit = match self.room.try_acquire() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return,
            Err(TryAcquireError::NoPermits) => match self.room.acquire().await {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        permit.forget();
        self.queue().push_back(message);
        self.ready.notify_one();
        self.done(index);
    }

    /// The oldest queued message.
    pub(crate) fn pop(&self) -> Option<IncomingMessage> {
        let message = self.queue().pop_front();
        if message.is_some() {
            self.room.add_permits(1);
        }
        message
    }

    /// The session is gone: queued messages are dropped and no more are queued.
    pub(crate) fn close(&self) {
        self.room.close();
        self.turn_moved.notify_waiters();
        let dropped = std::mem::take(&mut *self.queue());
        drop(dropped);
    }

    /// Completes once something was queued (or the last message task ended) since it was
    /// enabled. Enable it before looking at the queue.
    pub(crate) fn ready(&self) -> tokio::sync::futures::Notified<'_> {
        self.ready.notified()
    }

    /// Message tasks still running (they may yet queue a message).
    pub(crate) fn live(&self) -> usize {
        self.live.load(SeqCst)
    }

    /// Counts the message task of stream `index` until the returned guard is dropped (which
    /// also marks the stream done, if its message was not queued).
    pub(crate) fn task_started(shared: &Arc<Shared>, index: u64) -> LiveTask {
        shared.inbox.live.fetch_add(1, SeqCst);
        LiveTask(shared.clone(), index)
    }
}

/// A running message task (see [`Inbox::task_started`]) and its stream index.
pub(crate) struct LiveTask(Arc<Shared>, u64);

impl LiveTask {
    /// The index of the task's stream among the peer's message streams.
    pub(crate) fn index(&self) -> u64 {
        self.1
    }
}

impl Drop for LiveTask {
    fn drop(&mut self) {
        let inbox = &self.0.inbox;
        // A message that never got its handle queued (it failed before its header) must not
        // hold back the messages after it.
        inbox.done(self.1);
        if inbox.live.fetch_sub(1, SeqCst) == 1 {
            // A caller waiting for the end of a closed connection looks again.
            inbox.ready.notify_one();
        }
    }
}

/// Who accepts the peer's message streams: the callers waiting in `recv`, or the driver.
pub(crate) struct AcceptTurn {
    /// Callers waiting in `Session::recv` (each accepts streams while it waits).
    waiting: AtomicUsize,
    /// Bumped by every caller that starts waiting.
    epoch: AtomicU64,
    /// The driver is accepting streams.
    driver_accepting: AtomicBool,
    /// The driver is parked: the caller that stops waiting last must wake it.
    driver_parked: AtomicBool,
    wake_driver: Notify,
}

impl AcceptTurn {
    pub(crate) fn new() -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
            driver_accepting: AtomicBool::new(true),
            driver_parked: AtomicBool::new(false),
            wake_driver: Notify::new(),
        }
    }

    /// Counts a caller as waiting (and accepting) until the guard is dropped.
    pub(crate) fn waiting(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, SeqCst);
        self.epoch.fetch_add(1, SeqCst);
        if self.driver_accepting.load(SeqCst) {
            self.wake_driver.notify_one();
        }
        Waiting(self)
    }
}

/// A caller waiting in `recv` (see [`AcceptTurn::waiting`]).
pub(crate) struct Waiting<'a>(&'a AcceptTurn);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let turn = self.0;
        if turn.waiting.fetch_sub(1, SeqCst) == 1 && turn.driver_parked.swap(false, SeqCst) {
            turn.wake_driver.notify_one();
        }
    }
}

/// The driver's side of [`AcceptTurn`].
pub(crate) enum DriverMode {
    /// Accepting streams.
    Accepting,
    /// Not accepting; looks again when the timer fires. `epoch` is the turn's epoch when the
    /// timer was armed.
    Standby {
        timer: std::pin::Pin<Box<tokio::time::Sleep>>,
        epoch: u64,
    },
    /// Not accepting, no timer: the last caller to stop waiting wakes the driver.
    Parked,
}

impl DriverMode {
    fn standby(turn: &AcceptTurn) -> Self {
        turn.driver_accepting.store(false, SeqCst);
        DriverMode::Standby {
            timer: Box::pin(tokio::time::sleep(STANDBY_RECHECK)),
            epoch: turn.epoch.load(SeqCst),
        }
    }

    /// Whether the driver should accept streams now.
    pub(crate) fn accepting(&self) -> bool {
        matches!(self, DriverMode::Accepting)
    }

    /// The driver was woken through the turn (a caller started waiting, or stopped waiting
    /// while the driver was parked).
    pub(crate) fn woken(&mut self, turn: &AcceptTurn) {
        match self {
            DriverMode::Accepting if turn.waiting.load(SeqCst) > 0 => {
                *self = Self::standby(turn);
            }
            DriverMode::Parked => *self = Self::standby(turn),
            // A stale wake-up: nothing changed for this mode.
            DriverMode::Accepting | DriverMode::Standby { .. } => {}
        }
    }

    /// Completes when the standby timer fires (never in another mode).
    pub(crate) async fn recheck_due(&mut self) {
        match self {
            DriverMode::Standby { timer, .. } => timer.as_mut().await,
            _ => std::future::pending().await,
        }
    }

    /// The standby timer fired: accept again, stand by again, or park.
    pub(crate) fn recheck(&mut self, turn: &AcceptTurn) {
        let DriverMode::Standby { epoch, .. } = self else {
            return;
        };
        let armed_at = *epoch;
        if turn.waiting.load(SeqCst) > 0 {
            // Park, then look again: a caller that stopped waiting in between either saw the
            // flag (and wakes us) or is seen gone here.
            turn.driver_parked.store(true, SeqCst);
            if turn.waiting.load(SeqCst) > 0 || !turn.driver_parked.swap(false, SeqCst) {
                *self = DriverMode::Parked;
                return;
            }
            *self = Self::standby(turn);
        } else if turn.epoch.load(SeqCst) != armed_at {
            // Callers were receiving meanwhile: they will likely be back.
            *self = Self::standby(turn);
        } else {
            turn.driver_accepting.store(true, SeqCst);
            // A caller that started waiting in between either saw the flag (and wakes us) or
            // is seen here.
            *self = if turn.waiting.load(SeqCst) > 0 {
                Self::standby(turn)
            } else {
                DriverMode::Accepting
            };
        }
    }

    /// Waits for a wake-up through the turn.
    pub(crate) fn wake(turn: &AcceptTurn) -> tokio::sync::futures::Notified<'_> {
        turn.wake_driver.notified()
    }
}

/// Takes an accepted message stream in: refuses it after our go-away (PROTOCOL.md §7.4), else
/// runs its message task here until the task first has to wait (a message that arrived whole is
/// parsed, decoded if small, and queued without a task hop) and spawns the rest.
///
/// It never suspends (its one poll completes at once), so a caller's future that accepted the
/// stream cannot be dropped between the accept and the spawn.
pub(crate) async fn admit(shared: &Arc<Shared>, mut stream: quinn::RecvStream) {
    let index = stream.id().index();
    if shared.sent_go_away.load(SeqCst) {
        let _ = stream.stop(wire::quic_code(ErrorCode::GOING_AWAY));
        shared.inbox.done(index);
        return;
    }
    shared.state().pending_headers += 1;
    let live = Inbox::task_started(shared, index);
    let mut task =
        Box::pin(recv::run(shared.clone(), stream, live).instrument(shared.span.clone()));
    if futures_util::poll!(task.as_mut()).is_pending() {
        tokio::spawn(task);
    }
}

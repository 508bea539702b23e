//! What the connection's writer task receives, and the small writes it completes itself.
//!
//! A small write whose first poll (on the reader) did not finish is waiting for something
//! outside the process's CPU: the partner's ACK of its journal record, a group commit, an
//! io_uring completion. Rather than a task of its own per write (a spawn, a wake of that task
//! when it is ready, then a second wake of the writer for its reply), the reader hands it to the
//! writer, which keeps such requests in a [`FuturesUnordered`] next to its reply channel. One
//! ACK that completes many writes of the connection then wakes the writer once; it polls the
//! ready ones and sends all their replies in one vectored write.
//!
//! Guarantees kept from the per-request tasks:
//! - every handed-over request runs to completion even when the connection's writer ends
//!   first (socket error, or aborted after the shutdown grace): whatever the writer still
//!   holds is handed to tasks of their own when [`Intake`] is dropped, exactly as spawned
//!   requests outlive the writer today (their replies go nowhere, their device work finishes);
//! - a request that panics costs only its own reply (an `EIO` error, logged), not the writer.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tracing::warn;

use crate::proto::NBD_EIO;
use crate::reply::{Reply, ReplyBody};

/// A request that was polled once and is not done: completing it yields its reply.
pub(crate) type RequestFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// What the reader and the request tasks send to the writer.
pub(crate) enum ToWriter {
    /// A finished request's reply.
    Reply(Reply),
    /// A small request still waiting: the writer polls it until its reply is ready.
    Pending(Pending),
}

/// A handed-over request, with what its error reply needs should it panic.
pub(crate) struct Pending {
    cookie: u64,
    command: u16,
    fut: RequestFuture,
}

impl Pending {
    pub(crate) fn new(cookie: u64, command: u16, fut: RequestFuture) -> Pending {
        Pending {
            cookie,
            command,
            fut,
        }
    }

    /// The request on a task of its own, its reply dropped (the writer is gone).
    pub(crate) fn detach(self) {
        // At runtime shutdown there is no runtime to run it on: it is dropped, as spawned
        // request tasks are then.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = self.await;
            });
        }
    }
}

impl Future for Pending {
    type Output = Reply;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        // The request's own state is dropped once it panicked (FuturesUnordered drops a future
        // that returned Ready), so nothing observes it half updated.
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.fut.as_mut().poll(cx))) {
            Ok(p) => p,
            Err(_) => {
                warn!(
                    cookie = self.cookie,
                    command = self.command,
                    "request panicked; answering EIO"
                );
                Poll::Ready(Reply {
                    cookie: self.cookie,
                    command: self.command,
                    body: ReplyBody::Error {
                        errno: NBD_EIO,
                        offset: None,
                        message: Cow::Borrowed(crate::transmission::client_message(NBD_EIO)),
                    },
                    permit: None,
                })
            }
        }
    }
}

/// What the writer's set holds: handed-over requests, and one future that is never ready.
///
/// The never-ready one is there for the set's fairness rule: `FuturesUnordered` wakes its task
/// again whenever one call polled as many futures as it holds. With one request in flight
/// (depth 1) that was every hand-over: the writer polled the new request, which was still
/// waiting, then was woken for nothing, and that wake-up woke the runtime's idle worker (a
/// futex call and a context switch per write in the measurements). The never-ready future is
/// polled once, when the set is made, and never woken, so a call never polls them all.
enum Slot {
    Request(Pending),
    NeverReady,
}

impl Future for Slot {
    type Output = Reply;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        match self.get_mut() {
            Slot::Request(p) => Pin::new(p).poll(cx),
            Slot::NeverReady => Poll::Pending,
        }
    }
}

/// The writer's inputs: the channel, the handed-over requests it drives, and replies taken from
/// either but not yet encoded (they keep their budget permits until they are written).
pub(crate) struct Intake {
    rx: mpsc::UnboundedReceiver<ToWriter>,
    /// Handed-over requests, and one [`Slot::NeverReady`].
    waiting: FuturesUnordered<Slot>,
    ready: VecDeque<Reply>,
    rx_closed: bool,
}

impl Intake {
    pub(crate) fn new(rx: mpsc::UnboundedReceiver<ToWriter>) -> Intake {
        let waiting = FuturesUnordered::new();
        waiting.push(Slot::NeverReady);
        Intake {
            rx,
            waiting,
            ready: VecDeque::new(),
            rx_closed: false,
        }
    }

    /// Takes what the channel holds and polls the handed-over requests, registering `cx` for
    /// both. Never blocks; bounded per call (the channel by tokio's cooperative budget, the set
    /// by `FuturesUnordered`, which yields after polling each of its futures once).
    pub(crate) fn poll_intake(&mut self, cx: &mut Context<'_>) {
        while !self.rx_closed {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(ToWriter::Reply(r))) => self.ready.push_back(r),
                // Pushed requests are polled below, which moves their wake-ups to this task.
                Poll::Ready(Some(ToWriter::Pending(p))) => self.waiting.push(Slot::Request(p)),
                Poll::Ready(None) => self.rx_closed = true,
                Poll::Pending => break,
            }
        }
        while let Poll::Ready(Some(r)) = self.waiting.poll_next_unpin(cx) {
            self.ready.push_back(r);
        }
    }

    /// The next reply to encode.
    pub(crate) fn pop_ready(&mut self) -> Option<Reply> {
        self.ready.pop_front()
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Requests handed over and still waiting.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len() - 1
    }

    /// Nothing more will come: every sender is gone (so every request, which holds one, is
    /// done), and every reply was taken.
    pub(crate) fn finished(&self) -> bool {
        self.rx_closed && self.waiting.len() == 1 && self.ready.is_empty()
    }
}

impl Drop for Intake {
    /// The writer ended (socket error, aborted after the grace period, or done): requests it
    /// was driving finish on tasks of their own, and nothing new can be handed over (a sender
    /// then gets its request back and spawns it).
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(m) = self.rx.try_recv() {
            if let ToWriter::Pending(p) = m {
                p.detach();
            }
        }
        for slot in std::mem::take(&mut self.waiting) {
            if let Slot::Request(p) = slot {
                p.detach();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::NBD_CMD_WRITE;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::sync::oneshot;

    fn done(cookie: u64) -> Reply {
        Reply {
            cookie,
            command: NBD_CMD_WRITE,
            body: ReplyBody::Done,
            permit: None,
        }
    }

    /// A request that finishes when `go` fires and counts its completion.
    fn gated(cookie: u64, go: oneshot::Receiver<()>, finished: Arc<AtomicUsize>) -> Pending {
        Pending::new(
            cookie,
            NBD_CMD_WRITE,
            Box::pin(async move {
                let _ = go.await;
                finished.fetch_add(1, Ordering::SeqCst);
                done(cookie)
            }),
        )
    }

    async fn intake_once(intake: &mut Intake) {
        std::future::poll_fn(|cx| {
            intake.poll_intake(cx);
            Poll::Ready(())
        })
        .await
    }

    #[tokio::test]
    async fn requests_complete_in_any_order_and_all_replies_come_out() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut intake = Intake::new(rx);
        let finished = Arc::new(AtomicUsize::new(0));
        let mut gos = Vec::new();
        for cookie in 0..4 {
            let (go, wait) = oneshot::channel();
            gos.push(go);
            let _ = tx.send(ToWriter::Pending(gated(cookie, wait, finished.clone())));
        }
        intake_once(&mut intake).await;
        assert_eq!(intake.waiting(), 4);
        assert!(!intake.has_ready());
        // Release the last two first.
        for go in gos.drain(2..).rev() {
            let _ = go.send(());
        }
        intake_once(&mut intake).await;
        let mut got: Vec<u64> =
            std::iter::from_fn(|| intake.pop_ready().map(|r| r.cookie)).collect();
        got.sort_unstable();
        assert_eq!(got, vec![2, 3]);
        for go in gos.drain(..) {
            let _ = go.send(());
        }
        drop(tx);
        intake_once(&mut intake).await;
        let mut got: Vec<u64> =
            std::iter::from_fn(|| intake.pop_ready().map(|r| r.cookie)).collect();
        got.sort_unstable();
        assert_eq!(got, vec![0, 1]);
        assert!(intake.finished());
    }

    #[tokio::test]
    async fn dropping_the_intake_lets_its_requests_finish() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut intake = Intake::new(rx);
        let finished = Arc::new(AtomicUsize::new(0));
        let (go1, wait1) = oneshot::channel();
        let (go2, wait2) = oneshot::channel();
        let _ = tx.send(ToWriter::Pending(gated(1, wait1, finished.clone())));
        intake_once(&mut intake).await;
        // One in the set, one still in the channel.
        let _ = tx.send(ToWriter::Pending(gated(2, wait2, finished.clone())));
        drop(intake);
        assert!(tx.is_closed(), "nothing can be handed over any more");
        let _ = go1.send(());
        let _ = go2.send(());
        for _ in 0..100 {
            if finished.load(Ordering::SeqCst) == 2 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!(
            "{} of 2 requests finished after the writer was gone",
            finished.load(Ordering::SeqCst)
        );
    }

    struct CountWakes(AtomicUsize);

    impl std::task::Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// At depth 1 the writer holds one waiting request: taking it must not wake the writer
    /// again (each such wake-up woke the runtime's idle worker).
    #[tokio::test]
    async fn a_lone_waiting_request_does_not_wake_the_writer_again() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut intake = Intake::new(rx);
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        intake.poll_intake(&mut cx);
        let finished = Arc::new(AtomicUsize::new(0));
        for round in 0..3 {
            let before = wakes.0.load(Ordering::SeqCst);
            let (go, wait) = oneshot::channel();
            let _ = tx.send(ToWriter::Pending(gated(round, wait, finished.clone())));
            let sent = wakes.0.load(Ordering::SeqCst);
            assert_eq!(sent, before + 1, "the hand-over wakes the writer");
            intake.poll_intake(&mut cx);
            assert_eq!(intake.waiting(), 1);
            assert_eq!(
                wakes.0.load(Ordering::SeqCst),
                sent,
                "taking the request woke the writer again"
            );
            let _ = go.send(());
            assert_eq!(
                wakes.0.load(Ordering::SeqCst),
                sent + 1,
                "its completion wakes it"
            );
            intake.poll_intake(&mut cx);
            assert_eq!(intake.pop_ready().map(|r| r.cookie), Some(round));
        }
    }

    #[tokio::test]
    async fn a_panicking_request_is_answered_eio() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut intake = Intake::new(rx);
        let (go, wait) = oneshot::channel::<()>();
        let _ = tx.send(ToWriter::Pending(Pending::new(
            7,
            NBD_CMD_WRITE,
            Box::pin(async move {
                let _ = wait.await;
                panic!("device bug");
            }),
        )));
        intake_once(&mut intake).await;
        let _ = go.send(());
        intake_once(&mut intake).await;
        let r = intake.pop_ready().expect("an error reply");
        assert_eq!(r.cookie, 7);
        assert!(matches!(r.body, ReplyBody::Error { errno: NBD_EIO, .. }));
    }
}

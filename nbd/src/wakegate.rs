//! A future that is polled again only after it asked to be: [`WakeGated`].
//!
//! A connection's task waits on its request reader and on its stop signal together
//! (`select!`), so every wake-up of the reader (one per request at depth 1) also polled the stop
//! signal: the server's shutdown `watch` and the export's removal notice, about 700 instructions
//! per depth-1 4 KiB write in a callgrind count, for a future that completes at most once per
//! connection. The gate polls the inner future with a waker of its own and polls it again only
//! once that waker has fired; other polls cost a lock of the task's waker slot and an atomic
//! swap.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// What the inner future's waker reaches: whether it fired, and the task that polls the gate.
struct Gate {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Gate {
    fn task(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        // Only a waker is kept here: a panic elsewhere cannot leave it half-updated.
        self.task.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Set before waking the task, so the poll that follows the wake-up sees it.
        self.woken.store(true, Ordering::Release);
        if let Some(task) = self.task().as_ref() {
            task.wake_by_ref();
        }
    }
}

/// `inner`, polled on the first poll and afterwards only when its own waker has fired since
/// its last poll. Output and completion are the inner future's.
pub struct WakeGated<F> {
    inner: Pin<Box<F>>,
    gate: Arc<Gate>,
    waker: Waker,
}

impl<F: Future> WakeGated<F> {
    pub fn new(inner: F) -> WakeGated<F> {
        let gate = Arc::new(Gate {
            // The first poll always reaches the inner future (it registers its wakers then).
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        WakeGated {
            inner: Box::pin(inner),
            waker: Waker::from(Arc::clone(&gate)),
            gate,
        }
    }
}

impl<F: Future> Future for WakeGated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // The task's waker is stored before the flag is read: a wake-up after the read then
        // reaches the current task, and one before it is seen by the read.
        {
            let mut task = this.gate.task();
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        if !this.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Ready once `ready` is set; counts its polls and keeps the last waker it was given.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = u32;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(7);
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_inner_future_is_polled_first_and_then_only_after_its_wake_up() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let inner_waker = Arc::new(Mutex::new(None::<Waker>));
        let mut gated = WakeGated::new(Probe {
            polls: Arc::clone(&polls),
            ready: Arc::clone(&ready),
            waker: Arc::clone(&inner_waker),
        });
        let first = Arc::new(CountingWaker::default());
        let first_waker = Waker::from(Arc::clone(&first));
        let mut cx = Context::from_waker(&first_waker);
        for _ in 0..3 {
            assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled without a wake-up");

        // The task's waker changes (the task moved); the wake-up must reach the new one.
        let second = Arc::new(CountingWaker::default());
        let second_waker = Waker::from(Arc::clone(&second));
        let mut cx = Context::from_waker(&second_waker);
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1);

        ready.store(true, Ordering::SeqCst);
        let w = inner_waker.lock().unwrap().take().unwrap();
        w.wake();
        assert_eq!(
            second.0.load(Ordering::SeqCst),
            1,
            "the current task was not woken"
        );
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(Pin::new(&mut gated).poll(&mut cx), Poll::Ready(7));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_gated_signal_still_ends_a_select() {
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let stop = WakeGated::new(async move {
            let _ = rx.wait_for(|s| *s).await;
        });
        let setter = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.send_replace(true);
        });
        let other = std::future::pending::<()>();
        let finished = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::select! {
                () = stop => true,
                () = other => false,
            }
        })
        .await;
        assert_eq!(finished, Ok(true));
        setter.await.unwrap();
    }
}

//! webnic patch 1: the endpoint driver's events for one connection (its received packets, a
//! rebind, a close) travel in a plain queue instead of a tokio unbounded channel.
//!
//! A tokio channel allocates its first block of 32 slots when it is created. With events of
//! about 200 bytes, that was 6.7 KB per connection, held for the connection's whole life even
//! while it is idle: the largest single allocation of an idle webnic session. This queue holds
//! nothing while empty and gives its slots back whenever the connection's driver drains it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::ConnectionEvent;

/// Events taken in one go before the receiver yields, as tokio's cooperative budget made the
/// channel do: a driver flooded with packets still gets to send.
const BUDGET: u32 = 128;

/// A connected sender and receiver.
pub(crate) fn channel() -> (EventSender, EventReceiver) {
    let shared = Arc::new(Mutex::new(Queue {
        events: VecDeque::new(),
        waker: None,
        sender_alive: true,
        receiver_alive: true,
    }));
    (
        EventSender(Arc::clone(&shared)),
        EventReceiver {
            shared,
            taken_in_a_row: 0,
        },
    )
}

#[derive(Debug)]
struct Queue {
    events: VecDeque<ConnectionEvent>,
    waker: Option<Waker>,
    sender_alive: bool,
    receiver_alive: bool,
}

fn lock(shared: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The endpoint's end.
#[derive(Debug)]
pub(crate) struct EventSender(Arc<Mutex<Queue>>);

impl EventSender {
    /// Queues `event` and wakes the receiver; gives it back if the receiver is gone.
    pub(crate) fn send(&self, event: ConnectionEvent) -> Result<(), ConnectionEvent> {
        let mut queue = lock(&self.0);
        if !queue.receiver_alive {
            return Err(event);
        }
        queue.events.push_back(event);
        let waker = queue.waker.take();
        drop(queue);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        let mut queue = lock(&self.0);
        queue.sender_alive = false;
        let waker = queue.waker.take();
        drop(queue);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The connection driver's end.
#[derive(Debug)]
pub(crate) struct EventReceiver {
    shared: Arc<Mutex<Queue>>,
    taken_in_a_row: u32,
}

impl EventReceiver {
    /// The next event; `Ready(None)` once the sender is gone and the queue is empty.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<ConnectionEvent>> {
        if self.taken_in_a_row >= BUDGET {
            self.taken_in_a_row = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let mut queue = lock(&self.shared);
        if let Some(event) = queue.events.pop_front() {
            self.taken_in_a_row += 1;
            return Poll::Ready(Some(event));
        }
        self.taken_in_a_row = 0;
        if !queue.sender_alive {
            return Poll::Ready(None);
        }
        // Drained: the slots go back to the allocator until the next packet.
        if queue.events.capacity() > 0 {
            queue.events = VecDeque::new();
        }
        match &queue.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => queue.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        let mut queue = lock(&self.shared);
        queue.receiver_alive = false;
        queue.events = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn close(code: u32) -> ConnectionEvent {
        ConnectionEvent::Close {
            error_code: crate::VarInt::from_u32(code),
            reason: bytes::Bytes::new(),
        }
    }

    fn code(event: Poll<Option<ConnectionEvent>>) -> Option<u64> {
        match event {
            Poll::Ready(Some(ConnectionEvent::Close { error_code, .. })) => {
                Some(error_code.into_inner())
            }
            _ => None,
        }
    }

    #[test]
    fn in_order_wakes_frees_and_ends() {
        let (send, mut recv) = channel();
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        assert!(recv.poll_recv(&mut cx).is_pending());
        for n in 0..3 {
            send.send(close(n)).unwrap();
        }
        assert_eq!(
            counter.0.load(Ordering::Relaxed),
            1,
            "woken once, by the first send"
        );
        for n in 0..3 {
            assert_eq!(code(recv.poll_recv(&mut cx)), Some(n));
        }
        assert!(recv.poll_recv(&mut cx).is_pending());
        assert_eq!(
            lock(&recv.shared).events.capacity(),
            0,
            "slots kept after draining"
        );
        drop(send);
        assert_eq!(
            counter.0.load(Ordering::Relaxed),
            2,
            "not woken when the sender went"
        );
        assert!(matches!(recv.poll_recv(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn yields_after_its_budget_and_refuses_after_the_receiver_went() {
        let (send, mut recv) = channel();
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        for n in 0..BUDGET + 1 {
            send.send(close(n)).unwrap();
        }
        for n in 0..BUDGET {
            assert_eq!(code(recv.poll_recv(&mut cx)), Some(u64::from(n)));
        }
        let before = counter.0.load(Ordering::Relaxed);
        assert!(
            recv.poll_recv(&mut cx).is_pending(),
            "did not yield after its budget"
        );
        assert_eq!(
            counter.0.load(Ordering::Relaxed),
            before + 1,
            "yielded without a wake-up"
        );
        assert_eq!(code(recv.poll_recv(&mut cx)), Some(u64::from(BUDGET)));
        drop(recv);
        assert!(send.send(close(0)).is_err());
    }
}

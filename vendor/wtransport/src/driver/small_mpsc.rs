//! webnic patch 4: a bounded multi-producer, single-consumer channel with the part of
//! `tokio::sync::mpsc`'s API the driver uses, for the driver's eight channels.
//!
//! A tokio channel costs about 800 bytes the moment it is created (its shared state padded to
//! cache lines, and a first block of 32 slots), whatever its capacity: 6.4 KB for the eight
//! channels of every connection, held while the connection idles. These channels carry a
//! handful of values per connection (settings, the session, streams), so a mutex-guarded queue
//! that holds no slots while empty costs nothing measurable and about 150 bytes.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

pub mod error {
    //! The errors, shaped like `tokio::sync::mpsc::error`'s.

    /// The receiver is gone; the value comes back.
    #[derive(Debug, PartialEq, Eq)]
    pub struct SendError<T>(pub T);

    /// Why `try_send` did not queue its value; the value comes back.
    #[derive(Debug, PartialEq, Eq)]
    pub enum TrySendError<T> {
        /// No free slot.
        Full(T),
        /// The receiver is gone.
        Closed(T),
    }
}

use error::{SendError, TrySendError};

/// A channel of at most `capacity` queued or reserved values.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    assert!(capacity > 0, "mpsc bounded channel requires capacity > 0");
    let shared = Arc::new(Mutex::new(State {
        queue: VecDeque::new(),
        capacity,
        reserved: 0,
        senders: 1,
        receiver_alive: true,
        receiver_waker: None,
        sender_wakers: Vec::new(),
    }));
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Receiver { shared },
    )
}

struct State<T> {
    queue: VecDeque<T>,
    capacity: usize,
    /// Slots promised to permits not yet used.
    reserved: usize,
    senders: usize,
    receiver_alive: bool,
    receiver_waker: Option<Waker>,
    /// Senders waiting for a slot; all are woken when one frees (there are few, and a woken
    /// sender whose future was dropped must not swallow the wake-up).
    sender_wakers: Vec<Waker>,
}

impl<T> State<T> {
    fn wake_receiver(&mut self) -> Option<Waker> {
        self.receiver_waker.take()
    }

    fn wake_senders(&mut self) -> Vec<Waker> {
        std::mem::take(&mut self.sender_wakers)
    }
}

/// Like tokio's, without requiring `T: Debug`.
macro_rules! opaque_debug {
    ($($name:ident),*) => {$(
        impl<T> std::fmt::Debug for $name<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(stringify!($name))
            }
        }
    )*};
}

opaque_debug!(Sender, Receiver, OwnedPermit);

impl<T> std::fmt::Debug for Permit<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

fn lock<T>(shared: &Mutex<State<T>>) -> MutexGuard<'_, State<T>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends to the channel.
pub struct Sender<T> {
    shared: Arc<Mutex<State<T>>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        lock(&self.shared).senders += 1;
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut state = lock(&self.shared);
            state.senders -= 1;
            (state.senders == 0)
                .then(|| state.wake_receiver())
                .flatten()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> Sender<T> {
    /// Reserves a slot: `Ready(Ok)` with it reserved, `Ready(Err)` if the receiver is gone.
    fn poll_reserve(&self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        let mut state = lock(&self.shared);
        if !state.receiver_alive {
            return Poll::Ready(Err(()));
        }
        if state.queue.len() + state.reserved < state.capacity {
            state.reserved += 1;
            return Poll::Ready(Ok(()));
        }
        if !state.sender_wakers.iter().any(|w| w.will_wake(cx.waker())) {
            state.sender_wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Queues `value` into a reserved slot.
    fn commit(&self, value: T) {
        let waker = {
            let mut state = lock(&self.shared);
            state.reserved -= 1;
            if !state.receiver_alive {
                // Dropped outside the lock, like tokio drops values sent to a closed channel.
                drop(state);
                drop(value);
                return;
            }
            state.queue.push_back(value);
            state.wake_receiver()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Gives an unused reserved slot back.
    fn release(&self) {
        let wakers = {
            let mut state = lock(&self.shared);
            state.reserved -= 1;
            state.wake_senders()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Waits for a free slot and queues `value`; gives it back if the receiver is gone.
    /// Cancel-safe: nothing is reserved unless the value is queued.
    pub async fn send(&self, value: T) -> Result<(), SendError<T>> {
        match poll_fn(|cx| self.poll_reserve(cx)).await {
            Ok(()) => {
                self.commit(value);
                Ok(())
            }
            Err(()) => Err(SendError(value)),
        }
    }

    /// Queues `value` if a slot is free now.
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        let waker = {
            let mut state = lock(&self.shared);
            if !state.receiver_alive {
                return Err(TrySendError::Closed(value));
            }
            if state.queue.len() + state.reserved >= state.capacity {
                return Err(TrySendError::Full(value));
            }
            state.queue.push_back(value);
            state.wake_receiver()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Waits for a free slot and reserves it. Cancel-safe.
    pub async fn reserve(&self) -> Result<Permit<'_, T>, SendError<()>> {
        match poll_fn(|cx| self.poll_reserve(cx)).await {
            Ok(()) => Ok(Permit { sender: Some(self) }),
            Err(()) => Err(SendError(())),
        }
    }

    /// [`reserve`](Self::reserve) for a permit that owns its sender. Cancel-safe.
    pub async fn reserve_owned(self) -> Result<OwnedPermit<T>, SendError<()>> {
        match poll_fn(|cx| self.poll_reserve(cx)).await {
            Ok(()) => Ok(OwnedPermit { sender: Some(self) }),
            Err(()) => Err(SendError(())),
        }
    }

    /// Slots free now.
    pub fn capacity(&self) -> usize {
        let state = lock(&self.shared);
        state
            .capacity
            .saturating_sub(state.queue.len() + state.reserved)
    }
}

/// A reserved slot; dropped unused, it frees the slot.
pub struct Permit<'a, T> {
    sender: Option<&'a Sender<T>>,
}

impl<T> Permit<'_, T> {
    /// Queues `value` into the reserved slot.
    pub fn send(mut self, value: T) {
        if let Some(sender) = self.sender.take() {
            sender.commit(value);
        }
    }
}

impl<T> Drop for Permit<'_, T> {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            sender.release();
        }
    }
}

/// A reserved slot that owns its sender; dropped unused, it frees the slot.
pub struct OwnedPermit<T> {
    sender: Option<Sender<T>>,
}

impl<T> OwnedPermit<T> {
    /// Queues `value` into the reserved slot and gives the sender back.
    pub fn send(mut self, value: T) -> Sender<T> {
        let sender = self
            .sender
            .take()
            .expect("permit holds its sender until used");
        sender.commit(value);
        sender
    }
}

impl<T> Drop for OwnedPermit<T> {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            sender.release();
        }
    }
}

/// Receives from the channel.
pub struct Receiver<T> {
    shared: Arc<Mutex<State<T>>>,
}

impl<T> Receiver<T> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let (value, wakers) = {
            let mut state = lock(&self.shared);
            match state.queue.pop_front() {
                Some(value) => {
                    if state.queue.is_empty() {
                        // No slots kept while empty: most channels see a value or two in
                        // their connection's life.
                        state.queue = VecDeque::new();
                    }
                    (value, state.wake_senders())
                }
                None if state.senders == 0 => return Poll::Ready(None),
                None => {
                    if !state
                        .receiver_waker
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        state.receiver_waker = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
            }
        };
        wakers.into_iter().for_each(Waker::wake);
        Poll::Ready(Some(value))
    }

    /// The next value; `None` once every sender is gone and the queue is empty. Cancel-safe.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let (queue, wakers) = {
            let mut state = lock(&self.shared);
            state.receiver_alive = false;
            (std::mem::take(&mut state.queue), state.wake_senders())
        };
        drop(queue);
        wakers.into_iter().for_each(Waker::wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets the spawned tasks of this single-threaded test runtime run until they wait.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn bounded_in_order_and_ends_when_senders_go() {
        let (tx, mut rx) = channel::<u32>(2);
        tx.send(1).await.unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.capacity(), 0);
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        // A third send waits until the receiver takes one.
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(3).await })
        };
        settle().await;
        assert!(!waiting.is_finished(), "send did not wait for a free slot");
        assert_eq!(rx.recv().await, Some(1));
        waiting.await.unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn permits_hold_slots_and_free_them_unused() {
        let (tx, mut rx) = channel::<u32>(1);
        let permit = tx.reserve().await.unwrap();
        assert_eq!(tx.capacity(), 0);
        assert_eq!(tx.try_send(9), Err(TrySendError::Full(9)));
        drop(permit);
        assert_eq!(tx.capacity(), 1);
        let owned = tx.clone().reserve_owned().await.unwrap();
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(2).await })
        };
        settle().await;
        assert!(!waiting.is_finished());
        let _sender = owned.send(1);
        assert_eq!(rx.recv().await, Some(1));
        waiting.await.unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(2));
    }

    #[tokio::test]
    async fn a_dropped_receiver_refuses_and_wakes_waiting_senders() {
        let (tx, rx) = channel::<u32>(1);
        tx.send(1).await.unwrap();
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(2).await })
        };
        settle().await;
        drop(rx);
        assert_eq!(waiting.await.unwrap(), Err(SendError(2)));
        assert_eq!(tx.try_send(3), Err(TrySendError::Closed(3)));
        assert!(tx.reserve().await.is_err());
    }
}

//! The packet queues between the caller and smoltcp.
//!
//! smoltcp pulls packets from a [`Device`]; the caller pushes them with
//! [`Stack::handle_packet`](crate::Stack::handle_packet) and pulls outgoing ones with
//! [`Stack::poll_transmit`](crate::Stack::poll_transmit). Both queues are bounded: a full receive
//! queue drops (and counts) the new packet, a full transmit queue makes smoltcp stop emitting until
//! the caller drains it, which is how the transport's backpressure reaches TCP.

use std::collections::VecDeque;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

#[derive(Debug)]
pub(crate) struct QueueDevice {
    pub(crate) rx: VecDeque<Vec<u8>>,
    pub(crate) tx: VecDeque<Vec<u8>>,
    pub(crate) rx_capacity: usize,
    pub(crate) tx_capacity: usize,
    pub(crate) mtu: usize,
    /// Emptied transmit buffers, reused so a steady flow allocates nothing per packet.
    spare: Vec<Vec<u8>>,
}

impl QueueDevice {
    pub(crate) fn new(mtu: usize, rx_capacity: usize, tx_capacity: usize) -> Self {
        Self {
            rx: VecDeque::with_capacity(rx_capacity),
            tx: VecDeque::with_capacity(tx_capacity),
            rx_capacity,
            tx_capacity,
            mtu,
            spare: Vec::new(),
        }
    }

    pub(crate) fn recycle(&mut self, mut buffer: Vec<u8>) {
        if self.spare.len() < self.tx_capacity {
            buffer.clear();
            self.spare.push(buffer);
        }
    }

    pub(crate) fn rx_buffer(&mut self, packet: &[u8]) -> Vec<u8> {
        let mut buffer = self.spare.pop().unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(packet);
        buffer
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((
            RxToken { packet },
            TxToken {
                tx: &mut self.tx,
                spare: &mut self.spare,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        if self.tx.len() >= self.tx_capacity {
            return None;
        }
        Some(TxToken {
            tx: &mut self.tx,
            spare: &mut self.spare,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // No max_burst_size: smoltcp uses it to clamp the advertised TCP window, which would
        // undo window scaling. The transmit queue bound already limits each burst.
        caps
    }
}

pub(crate) struct RxToken {
    packet: Vec<u8>,
}

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.packet)
    }
}

pub(crate) struct TxToken<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buffer = self.spare.pop().unwrap_or_default();
        buffer.resize(len, 0);
        let result = f(&mut buffer);
        self.tx.push_back(buffer);
        result
    }
}

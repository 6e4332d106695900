//! Stream link (PROTOCOL.md §3.2): IP packets carried on a QUIC stream instead of datagrams,
//! each framed as `Length (16) | IP packet`.
//!
//! A browser hands a page its WebTransport datagrams one JavaScript read at a time, and on this
//! machine Chromium delivers them at a fraction of the rate it reads a stream (≈ 25 MB/s of
//! datagrams against ≈ 80–110 MB/s of stream data, the same session and server). A stream
//! arrives in chunks of tens of KiB: one read, many packets. QUIC makes the stream reliable and
//! ordered, so the link never loses a packet, at the price of head-of-line blocking on a lossy
//! path.
//!
//! Sans-IO: the gateway frames with [`put_frame`], the client feeds what it reads to a
//! [`Deframer`].

use thiserror::Error;

/// Bytes of the length that precedes each packet.
pub const FRAME_HEADER_LEN: usize = 2;

/// The largest packet a frame carries, and what a client announces in `LINK_STREAM` to get a
/// gateway's coalesced TCP packets whole (PROTOCOL.md §3.2).
pub const MAX_PACKET: u16 = u16::MAX;

/// The stream broke the framing: the link cannot continue (a stream has no packet boundaries
/// to resynchronise on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum StreamFrameError {
    /// A frame announced an empty packet.
    #[error("a stream frame announced an empty packet")]
    Empty,
}

/// Appends `packet` framed for the stream.
///
/// # Panics
/// If `packet` is longer than [`MAX_PACKET`].
pub fn put_frame(out: &mut Vec<u8>, packet: &[u8]) {
    let len = u16::try_from(packet.len()).expect("an IP packet fits a 16-bit length");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(packet);
}

/// Splits the stream's bytes, in whatever chunks they arrive, back into packets.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
    /// Start of the first byte not yet handed out.
    start: usize,
}

impl Deframer {
    /// An empty deframer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start == self.buf.len() {
            // Everything was handed out: start over instead of growing.
            self.buf.clear();
            self.start = 0;
        } else if self.start > self.buf.len() / 2 {
            // Keep the buffer from creeping: move the partial frame to the front.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete packet, if one has arrived.
    ///
    /// # Errors
    /// The framing is broken; the stream is of no further use.
    pub fn next_packet(&mut self) -> Result<Option<&[u8]>, StreamFrameError> {
        let rest = &self.buf[self.start..];
        let Some(header) = rest.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([header[0], header[1]]));
        if len == 0 {
            return Err(StreamFrameError::Empty);
        }
        if rest.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        let from = self.start + FRAME_HEADER_LEN;
        self.start = from + len;
        Ok(Some(&self.buf[from..from + len]))
    }

    /// Bytes of a frame that has not fully arrived.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packets(deframer: &mut Deframer) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(packet) = deframer.next_packet().unwrap() {
            out.push(packet.to_vec());
        }
        out
    }

    #[test]
    fn frames_split_anywhere_come_back_whole() {
        let sent: Vec<Vec<u8>> = (1..=300usize)
            .map(|n| (0..n * 5).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        let mut stream = Vec::new();
        for packet in &sent {
            put_frame(&mut stream, packet);
        }
        // Chunk sizes from 1 byte to more than a frame, as a stream may deliver them.
        for chunk_len in [1, 2, 3, 7, 1000, 1500, 65_536] {
            let mut deframer = Deframer::new();
            let mut got = Vec::new();
            for chunk in stream.chunks(chunk_len) {
                deframer.extend(chunk);
                got.extend(packets(&mut deframer));
            }
            assert_eq!(got, sent, "chunks of {chunk_len}");
            assert_eq!(deframer.pending(), 0);
        }
    }

    #[test]
    fn an_empty_frame_breaks_the_link() {
        let mut deframer = Deframer::new();
        let mut stream = Vec::new();
        put_frame(&mut stream, b"\x45abc");
        stream.extend_from_slice(&[0, 0, 0x45]);
        deframer.extend(&stream);
        assert_eq!(deframer.next_packet().unwrap(), Some(&b"\x45abc"[..]));
        assert_eq!(deframer.next_packet(), Err(StreamFrameError::Empty));
    }

    #[test]
    fn the_buffer_does_not_creep() {
        let mut deframer = Deframer::new();
        let mut frame = Vec::new();
        put_frame(&mut frame, &[0x45; 1200]);
        // Chunks that always end inside a frame: what was handed out is reclaimed.
        for _ in 0..10_000 {
            deframer.extend(&frame[..700]);
            assert!(packets(&mut deframer).len() <= 1);
            deframer.extend(&frame[700..]);
            assert_eq!(packets(&mut deframer).len(), 1);
        }
        assert!(
            deframer.buf.capacity() < 8 * 1024,
            "{}",
            deframer.buf.capacity()
        );
    }
}

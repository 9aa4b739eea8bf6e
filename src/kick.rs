//! Closing one connection on purpose (`limits.per_uid.on_exceed: close_oldest`, the admin's
//! `DELETE /api/connections/{agent}/{id}`), so that the client sees a clean, *final* disconnect:
//! a kicked socket.io-client must not reconnect and kick the new connection back.
//!
//! - **WebSocket tunnel.** When the tunnel is set up ([`crate::proxy`]'s `connected_to_upstream`),
//!   the agent keeps a `dup` of the backend socket ([`Cut`]; owned, so a closed and reused fd
//!   number can never be hit). Closing is `shutdown(SHUT_RDWR)` on it: the backend sees its
//!   socket close, and Pingora 0.9.1 reads the upstream EOF and calls `response_body_filter`
//!   once more with `end_of_stream` (an upgraded body is read until close), where the agent
//!   appends, for Engine.IO 4, a Socket.IO DISCONNECT of the main namespace (text frame `41`:
//!   socket.io-client reports "io server disconnect" and does not reconnect) and a close frame
//!   1008 naming the reason. Only at a frame boundary of the server→client stream, which
//!   [`FrameTracker`] follows (headers only, payloads skipped); mid-frame, the tunnel just ends.
//! - **Long-polling session.** See [`crate::cluster::Directory::kick_local`]: the agent posts the
//!   backend an Engine.IO close for the sid, and answers the client's pending or next poll
//!   with a Socket.IO DISCONNECT, a poll after that with an Engine.IO close
//!   ([`polling_goodbye`] says why not both at once).

use bytes::{BufMut, Bytes, BytesMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

/// Why a connection was closed (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `limits.per_uid.on_exceed: close_oldest`.
    CloseOldest,
    /// `DELETE /api/connections/{agent}/{id}`.
    Admin,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::CloseOldest => "close_oldest",
            Reason::Admin => "admin",
        }
    }

    /// The close frame's reason text (at most 123 bytes by RFC 6455).
    pub fn text(self) -> &'static str {
        match self {
            Reason::CloseOldest => "gopush: limits.per_uid.max_connections",
            Reason::Admin => "gopush: disconnected by an administrator",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        match s {
            "close_oldest" => Some(Reason::CloseOldest),
            "admin" => Some(Reason::Admin),
            _ => None,
        }
    }
}

/// WebSocket close code 1008, policy violation.
const POLICY: u16 = 1008;

/// The way to end one tunnel from outside its request: a duplicate of its backend socket.
#[derive(Debug)]
pub struct Cut {
    reason: OnceLock<Reason>,
    upstream: Mutex<Option<OwnedFd>>,
}

impl Cut {
    /// Duplicates `fd` (the backend socket Pingora just connected; valid for the call).
    pub fn dup(fd: RawFd) -> Option<Cut> {
        // SAFETY: Pingora hands `connected_to_upstream` the fd of the connection it holds for
        // the whole call; it is only borrowed here to be duplicated.
        let owned = unsafe { BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .ok()?;
        Some(Cut {
            reason: OnceLock::new(),
            upstream: Mutex::new(Some(owned)),
        })
    }

    /// Ends the tunnel: the first reason wins; `false` when it was already cut.
    pub fn fire(&self, reason: Reason) -> bool {
        if self.reason.set(reason).is_err() {
            return false;
        }
        let fd = self
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(fd) = fd {
            // Through std's TcpStream (it owns the duplicate and closes it when dropped).
            let s = std::net::TcpStream::from(fd);
            if let Err(e) = s.shutdown(std::net::Shutdown::Both) {
                tracing::debug!(
                    fd = s.as_raw_fd(),
                    "kick: shutdown of the backend socket: {e}"
                );
            }
        }
        true
    }

    /// Why it was cut, if it was.
    pub fn reason(&self) -> Option<Reason> {
        self.reason.get().copied()
    }

    /// The tunnel ended by itself: let the backend socket go now (the duplicate would keep it
    /// open after Pingora closes its own fd).
    pub fn release(&self) {
        self.upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// Follows the WebSocket frames of one direction of a tunnel: where a frame starts, cheaply
/// (payload bytes are skipped, never looked at).
#[derive(Debug, Default, Clone)]
pub struct FrameTracker {
    head: [u8; 14],
    head_len: u8,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// Inside a fragmented data message (no data frame may start before its last fragment).
    fragmented: bool,
}

/// The full length of a frame header whose first bytes are `h` (`None`: not known yet).
fn header_len(h: &[u8]) -> Option<usize> {
    let b1 = *h.get(1)?;
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    Some(2 + ext + mask)
}

impl FrameTracker {
    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                data = &data[n..];
                self.remaining -= n as u64;
                continue;
            }
            // A header byte.
            self.head[usize::from(self.head_len)] = data[0];
            self.head_len += 1;
            data = &data[1..];
            let h = &self.head[..usize::from(self.head_len)];
            if header_len(h) != Some(h.len()) {
                continue;
            }
            let len7 = h[1] & 0x7f;
            self.remaining = match len7 {
                126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                n => u64::from(n),
            };
            let fin = h[0] & 0x80 != 0;
            match h[0] & 0x0f {
                // A continuation ends the message when final.
                0 => self.fragmented = !fin,
                // Text or binary: a message starts (and goes on when not final).
                1 | 2 => self.fragmented = !fin,
                // Control frames may come between fragments.
                _ => {}
            }
            self.head_len = 0;
        }
    }

    /// Between two frames (a new frame may start here).
    pub fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.remaining == 0
    }

    /// A data frame may start here (at a boundary, outside a fragmented message).
    pub fn between_messages(&self) -> bool {
        self.at_boundary() && !self.fragmented
    }
}

/// What the agent writes to the client when it ends a tunnel at `tracker`'s position: for an
/// Engine.IO 4 connection outside a message, a Socket.IO DISCONNECT (`41`), then the close
/// frame; `None` mid-frame (nothing may be written there: the tunnel just ends).
pub fn closing_frames(tracker: &FrameTracker, eio4: bool, reason: Reason) -> Option<Bytes> {
    if !tracker.at_boundary() {
        return None;
    }
    let text = reason.text().as_bytes();
    let mut out = BytesMut::with_capacity(8 + text.len());
    if eio4 && tracker.between_messages() {
        // FIN + text, unmasked (server to client), 2 bytes.
        out.put_slice(&[0x81, 0x02, b'4', b'1']);
    }
    let text = &text[..text.len().min(123)];
    out.put_u8(0x88);
    out.put_u8(u8::try_from(2 + text.len()).unwrap_or(125));
    out.put_u16(POLICY);
    out.put_slice(text);
    Some(out.freeze())
}

/// The long-polling answers of a session the agent closed, in the payload encoding of Engine.IO
/// `eio`: to the first poll, a Socket.IO DISCONNECT of the main namespace (`41`) alone; to a
/// later one, if any, the Engine.IO close (`1`). Not both at once (`41\x1e1`): socket.io-client
/// 4.8 hands a decoded packet on in a later tick (`Manager::ondecoded`'s nextTick) but acts on
/// the close packet at once, so it would report "transport close" and schedule a reconnection
/// before it sees the DISCONNECT. With `41` alone it reports "io server disconnect", does not
/// reconnect and closes its Engine.IO session itself (a plain Engine.IO client, which ignores
/// `41`, gets the close at its next poll).
pub fn polling_goodbye(eio: u8, first: bool) -> Bytes {
    match (eio == 3, first) {
        // Engine.IO 3 payloads prefix each packet with its length.
        (true, true) => Bytes::from_static(b"2:41"),
        (true, false) => Bytes::from_static(b"1:1"),
        (false, true) => Bytes::from_static(b"41"),
        (false, false) => Bytes::from_static(b"1"),
    }
}

/// The Engine.IO close packet a client would post, in the payload encoding of `eio`.
pub fn polling_close(eio: u8) -> &'static [u8] {
    if eio == 3 {
        b"1:1"
    } else {
        b"1"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One frame as a server would send it: `op`, FIN, `len` payload bytes, optionally masked.
    fn frame(op: u8, fin: bool, len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | op];
        let m = if masked { 0x80 } else { 0 };
        if len < 126 {
            f.push(m | len as u8);
        } else if len <= 0xffff {
            f.push(m | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(m | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        // Payload bytes that look like headers, so a tracker reading them would go wrong.
        f.extend(std::iter::repeat_n(0x81, len));
        f
    }

    #[test]
    fn a_frame_split_anywhere_is_followed() {
        let f = frame(1, true, 300, false);
        for cut in 0..=f.len() {
            let mut t = FrameTracker::default();
            t.feed(&f[..cut]);
            assert_eq!(t.at_boundary(), cut == 0 || cut == f.len(), "cut at {cut}");
            t.feed(&f[cut..]);
            assert!(t.between_messages());
        }
    }

    #[test]
    fn the_closing_frames() {
        let t = FrameTracker::default();
        let out = closing_frames(&t, true, Reason::CloseOldest).unwrap();
        let text = Reason::CloseOldest.text().as_bytes();
        assert_eq!(&out[..4], b"\x81\x0241");
        assert_eq!(out[4], 0x88);
        assert_eq!(usize::from(out[5]), 2 + text.len());
        assert_eq!(&out[6..8], &1008u16.to_be_bytes());
        assert_eq!(&out[8..], text);
        // Not Engine.IO 4: the close frame only.
        let out = closing_frames(&t, false, Reason::Admin).unwrap();
        assert_eq!(out[0], 0x88);
        // Mid-frame: nothing.
        let mut t = FrameTracker::default();
        t.feed(&frame(2, true, 10, false)[..5]);
        assert!(closing_frames(&t, true, Reason::Admin).is_none());
    }

    fn frames() -> impl Strategy<Value = Vec<(u8, bool, usize, bool)>> {
        // Text/binary/continuation/ping/pong; lengths across the 7-bit, 16-bit and 64-bit forms.
        let len = prop_oneof![0usize..130, 120usize..70_000];
        proptest::collection::vec(
            (
                prop_oneof![Just(0u8), Just(1), Just(2), Just(9), Just(10)],
                any::<bool>(),
                len,
                any::<bool>(),
            ),
            0..12,
        )
    }

    proptest! {
        /// Any frame sequence, split into chunks at random places: after each whole frame the
        /// tracker is at a boundary, anywhere else it is not, and its fragmentation state is
        /// the one computed from the frames.
        #[test]
        fn frame_sequences_in_random_chunks(
            seq in frames(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let mut stream = Vec::new();
            let mut ends = Vec::new();
            let mut fragmented = false;
            let mut states = Vec::new();
            for (op, fin, len, masked) in &seq {
                stream.extend(frame(*op, *fin, *len, *masked));
                if *op < 3 {
                    fragmented = !fin;
                }
                ends.push(stream.len());
                states.push(fragmented);
            }
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.push(0);
            points.push(stream.len());
            points.sort_unstable();
            points.dedup();
            let mut t = FrameTracker::default();
            let mut at = 0;
            for p in points {
                t.feed(&stream[at..p]);
                at = p;
                match ends.iter().position(|e| *e == p) {
                    Some(i) => {
                        prop_assert!(t.at_boundary());
                        prop_assert_eq!(t.between_messages(), !states[i]);
                    }
                    None if p == 0 => prop_assert!(t.between_messages()),
                    None => prop_assert!(!t.at_boundary()),
                }
            }
        }
    }
}

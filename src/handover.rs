//! What a process does with its connections while it hands over to a new binary (graceful
//! upgrade) or stops.
//!
//! Two stages, both driven by Pingora's execution phases (see `server::WatchClosing`):
//! 1. **closing** (the listening sockets are being passed on, or the stop began): responses carry
//!    `Connection: close`, so keep-alive clients take their next request to the new process;
//! 2. **no longer accepting** (Pingora's `ShutdownStarted`; the grace period begins): open
//!    WebSocket tunnels are closed one by one, each at its own moment spread over the first half
//!    of the grace period, instead of all together when the grace period ends. Reconnecting
//!    clients then reach the new process as a trickle rather than a storm.
//!
//! A tunnel is closed *cleanly* only where that is safe without parsing every frame: when the
//! backend sends a lone Engine.IO ping (Engine.IO 4; a pong in Engine.IO 3) as one WebSocket
//! frame, the agent sends the client a WebSocket close frame (1001, going away) instead of that
//! ping, then ends the tunnel. Socket.IO backends ping every `pingInterval` (25 s by default), so
//! every idle tunnel sees one; tunnels of other protocols, or whose ping comes too late, are cut
//! at the end of the grace period as before.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The hand-over state of this process, shared by every request.
pub struct HandOver {
    closing: AtomicBool,
    /// Milliseconds after `epoch` (plus one, so that 0 means "still accepting") at which the
    /// listeners stopped accepting.
    stopped_accepting: AtomicU64,
    epoch: Instant,
    /// Tunnels' close moments fall within this long after `stopped_accepting`; zero turns the
    /// spreading off.
    spread_ms: u32,
    /// Tunnels opened so far: the sequence that spreads their close moments evenly.
    opened: AtomicU32,
}

impl HandOver {
    /// A process that is serving normally; tunnels will be closed within `spread` once it stops
    /// accepting (`Duration::ZERO`: not spread, cut at the end of the grace period).
    pub fn new(spread: Duration) -> Self {
        HandOver {
            closing: AtomicBool::new(false),
            stopped_accepting: AtomicU64::new(0),
            epoch: Instant::now(),
            spread_ms: u32::try_from(spread.as_millis()).unwrap_or(u32::MAX),
            opened: AtomicU32::new(0),
        }
    }

    /// Is the process handing over or stopping? (Responses then close their connections.)
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Enters the closing stage; `true` the first time.
    pub fn start_closing(&self) -> bool {
        !self.closing.swap(true, Ordering::Relaxed)
    }

    /// The listeners stopped accepting: open tunnels' close moments start counting. Also enters
    /// the closing stage. `true` the first time.
    pub fn stop_accepting(&self) -> bool {
        self.start_closing();
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        self.stopped_accepting
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Are tunnels closed one by one once the listeners stop accepting (`server.spread_tunnel_closes`)?
    pub fn spreads_closes(&self) -> bool {
        self.spread_ms != 0
    }

    /// A new tunnel's close moment, as milliseconds after the listeners stop accepting, or
    /// `None` when spreading is off. Successive tunnels get the golden-ratio sequence over the
    /// window, which spreads any number of them evenly without knowing that number in advance.
    pub fn tunnel_opened(&self) -> Option<u32> {
        if !self.spreads_closes() {
            return None;
        }
        let n = self.opened.fetch_add(1, Ordering::Relaxed);
        // Fractional part of n × φ, in 32-bit fixed point (2^32 / φ ≈ 0x9E3779B9).
        let frac = n.wrapping_mul(0x9E37_79B9);
        Some(((u64::from(frac) * u64::from(self.spread_ms)) >> 32) as u32)
    }

    /// Is it time to close the tunnel whose moment is `offset_ms`? One atomic load while the
    /// process is serving normally.
    pub fn tunnel_due(&self, offset_ms: u32) -> bool {
        let since = self.stopped_accepting.load(Ordering::Relaxed);
        since != 0 && self.epoch.elapsed().as_millis() as u64 + 1 >= since + u64::from(offset_ms)
    }
}

/// Is this chunk from the backend exactly one Engine.IO ping (Engine.IO 4) or pong (Engine.IO 3)
/// packet, as one unmasked, uncompressed WebSocket text frame? Such a chunk is a whole frame, so
/// a close frame can be sent in its place, and dropping it loses nothing the client needs.
pub fn is_lone_ping(chunk: &[u8]) -> bool {
    matches!(chunk, [0x81, 0x01, b'2' | b'3'])
}

/// A WebSocket close frame from the server: status 1001 (going away), no reason text.
pub const GOING_AWAY: &[u8] = &[0x88, 0x02, 0x03, 0xE9];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_moments_spread_evenly_over_the_window() {
        let h = HandOver::new(Duration::from_secs(10));
        let mut moments: Vec<u32> = (0..100).map(|_| h.tunnel_opened().unwrap()).collect();
        assert!(moments.iter().all(|m| *m < 10_000));
        moments.sort_unstable();
        // Evenly spread: every tenth of the window holds about a tenth of the tunnels.
        for tenth in 0..10 {
            let n = moments.iter().filter(|m| **m / 1000 == tenth).count();
            assert!((7..=13).contains(&n), "{n} tunnels in tenth {tenth}");
        }
    }

    #[test]
    fn nothing_is_due_while_accepting_and_everything_is_due_after_the_window() {
        let h = HandOver::new(Duration::from_millis(1));
        let first = h.tunnel_opened().unwrap();
        assert!(!h.is_closing());
        assert!(!h.tunnel_due(0));
        assert!(h.start_closing());
        assert!(!h.start_closing());
        assert!(!h.tunnel_due(0), "closing alone does not close tunnels");
        assert!(h.stop_accepting());
        assert!(!h.stop_accepting());
        assert!(h.tunnel_due(0));
        assert!(h.tunnel_due(first));
        assert!(!h.tunnel_due(u32::MAX), "a moment far ahead is not due yet");
    }

    #[test]
    fn spreading_can_be_turned_off() {
        let h = HandOver::new(Duration::ZERO);
        assert!(!h.spreads_closes());
        assert_eq!(h.tunnel_opened(), None);
        assert!(HandOver::new(Duration::from_secs(1)).spreads_closes());
    }

    #[test]
    fn only_a_lone_ping_frame_is_replaced() {
        assert!(is_lone_ping(&[0x81, 0x01, b'2']));
        assert!(is_lone_ping(&[0x81, 0x01, b'3']));
        assert!(!is_lone_ping(&[0x81, 0x01, b'4']), "a message");
        assert!(
            !is_lone_ping(&[0x81, 0x01, b'2', 0x81, 0x01, b'2']),
            "two frames"
        );
        assert!(!is_lone_ping(&[0xC1, 0x01, b'2']), "compressed");
        assert!(!is_lone_ping(&[0x01, 0x01, b'2']), "a fragment");
        assert!(
            !is_lone_ping(&[0x81, 0x81, 0, 0, 0, 0, b'2']),
            "masked (a client frame)"
        );
        assert!(!is_lone_ping(b""));
    }
}

//! Failed calls are logged at WARN, but at a bounded rate per peer: a client that sends 20,000 bad calls a
//! second must not turn the log into its own megaphone (nor spend the server's CPU writing it). Past the
//! rate a peer's failures are counted, and the peer's next line that gets through says how many were left
//! out. The call metrics count every failure whatever the log shows.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Lines a peer may have logged per window.
pub const LINES_PER_WINDOW: u32 = 5;
/// The window the lines are counted in.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Peers tracked at once; past it, the peers not yet tracked share one allowance, so many peers cannot grow
/// the table or the log without bound either.
const MAX_PEERS: usize = 4096;

/// Decides which failed calls get a log line.
#[derive(Default)]
pub struct FailureLog {
    peers: Mutex<HashMap<Option<IpAddr>, Allowance>>,
}

struct Allowance {
    window_started: Instant,
    logged: u32,
    /// Failures left out of the log since this peer's last line.
    left_out: u64,
}

/// What to do with one failure's line.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Log it, saying that this many of the peer's failures before it were left out.
    Log { left_out: u64 },
    /// Leave it out (it is counted for the peer's next line).
    LeaveOut,
}

impl FailureLog {
    /// Whether the failure of a call from `peer` (None: no address, e.g. in-process) at `now` is logged.
    pub fn decide(&self, peer: Option<IpAddr>, now: Instant) -> Decision {
        let mut peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, a| now.duration_since(a.window_started) < WINDOW || a.left_out > 0);
        }
        let key = if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            None
        } else {
            peer
        };
        let allowance = peers.entry(key).or_insert(Allowance {
            window_started: now,
            logged: 0,
            left_out: 0,
        });
        if now.duration_since(allowance.window_started) >= WINDOW {
            allowance.window_started = now;
            allowance.logged = 0;
        }
        if allowance.logged < LINES_PER_WINDOW {
            allowance.logged += 1;
            Decision::Log {
                left_out: std::mem::take(&mut allowance.left_out),
            }
        } else {
            allowance.left_out += 1;
            Decision::LeaveOut
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_lines_per_window_and_the_next_line_counts_what_was_left_out() {
        let log = FailureLog::default();
        let (peer, other) = (Some("10.0.0.1".parse().unwrap()), Some("10.0.0.2".parse().unwrap()));
        let start = Instant::now();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(log.decide(peer, start), Decision::Log { left_out: 0 });
        }
        for _ in 0..100 {
            assert_eq!(log.decide(peer, start), Decision::LeaveOut);
        }
        // Another peer's failures are logged meanwhile.
        assert_eq!(log.decide(other, start), Decision::Log { left_out: 0 });
        assert_eq!(log.decide(peer, start + WINDOW), Decision::Log { left_out: 100 });
        assert_eq!(log.decide(peer, start + WINDOW), Decision::Log { left_out: 0 });
    }

    #[test]
    fn past_the_peer_table_new_peers_share_one_allowance() {
        let log = FailureLog::default();
        let now = Instant::now();
        for i in 0..MAX_PEERS as u32 {
            let peer = Some(IpAddr::from(i.to_be_bytes()));
            assert!(matches!(log.decide(peer, now), Decision::Log { .. }));
        }
        let lines = (0..1000u32)
            .map(|i| Some(IpAddr::from((u32::MAX - i).to_be_bytes())))
            .filter(|&peer| log.decide(peer, now) != Decision::LeaveOut)
            .count();
        assert!(lines <= LINES_PER_WINDOW as usize, "{lines} lines from 1,000 new peers");
        assert!(log.peers.lock().unwrap().len() <= MAX_PEERS + 1);
    }
}

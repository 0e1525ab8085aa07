//! What the coordinator knows of one remote peer: the path its traffic
//! takes, the punch key that validates new paths, the sessions on it, and
//! when to punch again.

use std::time::{Duration, Instant};

use super::RelayPath;
use crate::identity::PeerId;
use crate::punch::{Path, Punch, Strategy};
use crate::SocketId;

/// One remote endpoint: a peer ID and the process behind it (two processes
/// with one key are two remotes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteKey {
    pub peer: PeerId,
    pub instance: u64,
}

/// A connected punch kept for its key: it answers the peer's probes on new
/// paths and validates paths we see the peer's packets come from.
#[derive(Debug)]
pub(crate) struct Validator {
    pub punch: Punch,
    /// The punch's socket indices → our sockets (index 0: the main one).
    pub sockets: Vec<SocketId>,
}

impl Validator {
    /// The punch's local path for a path of ours, if its socket is known.
    pub fn local_path(&self, path: Path) -> Option<Path> {
        let i = self.sockets.iter().position(|s| *s == path.socket)?;
        Some(Path {
            socket: SocketId(i),
            remote: path.remote,
        })
    }

    /// Our path for the punch's local one.
    pub fn global_path(&self, path: Path) -> Option<Path> {
        let socket = *self.sockets.get(path.socket.0)?;
        Some(Path {
            socket,
            remote: path.remote,
        })
    }
}

/// The coordinator's state for one remote.
#[derive(Debug)]
pub(crate) struct Remote {
    pub key: RemoteKey,
    /// Where its traffic goes now.
    pub path: Option<Path>,
    pub strategy: Option<Strategy>,
    pub validator: Option<Validator>,
    /// QUIC sessions up on it.
    pub sessions: u32,
    /// We introduced ourselves to it (it is a registered listener), so we
    /// are the side that punches again when the path stalls.
    pub initiator: bool,
    /// A re-punch waits until then.
    pub repunch_at: Option<Instant>,
    pub last_repunch: Option<Instant>,
    /// The re-punch in progress (its session number).
    pub repairing: Option<u64>,
    /// No sessions and no attempts since then (forgotten after a while).
    pub idle_since: Option<Instant>,
    /// The server's relay channel to it, if any.
    pub relay: Option<RelayPath>,
    /// Its traffic goes through the relay now (no direct path yet, or the
    /// direct one died).
    pub on_relay: bool,
    /// A `Connected` was reported for it (so moves are news).
    pub announced: bool,
    /// The next relay keepalive.
    pub keepalive_at: Option<Instant>,
}

impl Remote {
    pub fn new(key: RemoteKey, initiator: bool, now: Instant) -> Self {
        Self {
            key,
            path: None,
            strategy: None,
            validator: None,
            sessions: 0,
            initiator,
            repunch_at: None,
            last_repunch: None,
            repairing: None,
            idle_since: Some(now),
            relay: None,
            on_relay: false,
            announced: false,
            keepalive_at: None,
        }
    }

    pub fn peer(&self) -> PeerId {
        self.key.peer
    }

    /// Whether a new connect can use the path at once: a session is up on
    /// it, so the NAT mappings are alive.
    pub fn live(&self) -> bool {
        self.sessions > 0
            && (self.path.is_some() || (self.on_relay && self.relay.is_some()))
            && self.repairing.is_none()
    }

    /// The earliest of this remote's timers.
    pub fn poll_timeout(&self, linger: Duration) -> Option<Instant> {
        [
            self.repunch_at,
            self.validator.as_ref().and_then(|v| v.punch.poll_timeout()),
            self.idle_since.map(|t| t + linger),
            self.keepalive_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

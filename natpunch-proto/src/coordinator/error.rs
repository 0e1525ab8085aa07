//! Why a connect failed, as data: each variant carries what happened, and
//! [`ConnectError::code`] is a stable name for scripts. Only the CLI turns
//! these into sentences of its own; `Display` here is the plain default.

use std::net::SocketAddr;
use std::time::Duration;

use crate::identity::PeerId;
use crate::punch::PunchFailure;
use crate::rendezvous::wire::{DeclineReason, ErrorCode};

/// Why a connect to a peer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The peer ID is our own.
    #[error("{peer} is this peer's own ID: connect to another peer")]
    OwnPeerId { peer: PeerId },
    /// The server has no registration for the peer.
    #[error("{peer} is offline or unknown to the server")]
    Offline { peer: PeerId },
    /// The peer turned the introduction down.
    #[error("{peer} declined: {}", describe_decline(*.reason))]
    Declined { peer: PeerId, reason: DeclineReason },
    /// The server's budget of introductions to the peer is spent.
    #[error("the server limits introductions to {peer} (too many at once){}", retry_text(*.retry_after))]
    IntroductionLimit {
        peer: PeerId,
        retry_after: Option<Duration>,
    },
    /// The server holds as many sessions as it may.
    #[error("the rendezvous server is full; try again later")]
    ServerFull,
    /// The rendezvous server never answered.
    #[error("no answer from the rendezvous server {server}")]
    ServerUnreachable { server: SocketAddr },
    /// The server serves only the peers its owner has sessions with (a
    /// peer relaying for others), and we or the target are not one.
    #[error(
        "the server serves only peers with a session to its owner, and {peer} or we are not one"
    )]
    NotMember { peer: PeerId },
    /// The server refused a request for a reason no retry fixes.
    #[error("the rendezvous server refused: {}", .code.code())]
    Refused { code: ErrorCode },
    /// Punching found no path.
    #[error("could not reach {peer}: {failure}")]
    Punch { peer: PeerId, failure: PunchFailure },
    /// The endpoint is shutting down.
    #[error("the endpoint is closing")]
    Closing,
}

impl ConnectError {
    /// A stable machine-readable name (the `code` of `--json` events).
    pub fn code(&self) -> &'static str {
        match self {
            ConnectError::OwnPeerId { .. } => "own-peer-id",
            ConnectError::Offline { .. } => "offline",
            ConnectError::Declined { reason, .. } => match reason {
                DeclineReason::NotAccepting => "declined-not-accepting",
                DeclineReason::NotAllowed => "declined-not-allowed",
                DeclineReason::Busy => "declined-busy",
            },
            ConnectError::IntroductionLimit { .. } => "introduction-limit",
            ConnectError::ServerFull => "server-full",
            ConnectError::ServerUnreachable { .. } => "server-unreachable",
            ConnectError::Refused { .. } => "server-refused",
            ConnectError::NotMember { .. } => "not-member",
            ConnectError::Punch { failure, .. } => failure.code(),
            ConnectError::Closing => "closing",
        }
    }
}

fn describe_decline(r: DeclineReason) -> &'static str {
    match r {
        DeclineReason::NotAccepting => "it does not accept sessions (it only connects out)",
        DeclineReason::NotAllowed => "we are not on its allow list (--allow)",
        DeclineReason::Busy => "it has too many connections being set up; try again shortly",
    }
}

fn retry_text(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("; the next one is possible in {:.1} s", d.as_secs_f64()),
        None => String::new(),
    }
}

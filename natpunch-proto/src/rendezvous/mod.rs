//! Rendezvous: peers register under key-bound IDs and the server introduces
//! them, telling both sides when to start punching.
//!
//! - [`wire`]: the versioned frames (magic byte 0x2A + version + postcard).
//! - [`server`]: the server machine (cookies, signatures, rate limits).
//! - [`client`]: the peer's machine (register, refresh, connect, accept).

pub mod client;
pub mod server;
pub mod wire;

pub use client::{ClientEvent, RendezvousClient};
pub use server::RendezvousServer;
pub use wire::{ErrorCode, Frame, NatSummary, Offer, PeerInfo};

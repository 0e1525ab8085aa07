//! STUN: the message codec ([`message`]), client transactions
//! ([`transaction`]) and the RFC 5780 Binding server ([`server`]).

pub mod message;
pub mod server;
pub mod transaction;

pub use message::{Attribute, Class, DecodeError, Message, TransactionId};

//! Datagrams over a byte stream (TCP to the server, for networks that
//! drop UDP): the whole protocol (STUN, rendezvous, relay) works there
//! too, one datagram per record.
//!
//! A record is `0x2F`, the datagram's length (2 bytes, big-endian), then
//! the datagram. The marker keeps the server's TCP port open to plain STUN
//! clients as well (RFC 8489 §6.2.2: a STUN message on a stream starts
//! with 0x00 or 0x01 and carries its own length), so one stream may even
//! mix both. RFC 4571's bare 2-byte length could not be told apart from a
//! STUN header.

use crate::stun::message::framed_len;

/// First byte of a record.
pub const MARK: u8 = 0x2F;
/// Marker and length.
pub const RECORD_HEADER: usize = 3;
/// Largest datagram a record carries (the largest relay frame is 1481).
pub const MAX_RECORD: usize = 2048;

/// One item read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A datagram of ours (STUN, rendezvous or relay) in a record: answers
    /// go back in records.
    Datagram(Vec<u8>),
    /// A bare STUN message (a plain RFC 8489 client): answers go back bare.
    Stun(Vec<u8>),
}

/// Why a stream cannot be read further (the connection should close).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    #[error("stream record of {len} bytes exceeds {MAX_RECORD}")]
    TooLarge { len: usize },
    #[error("stream data is neither a record nor STUN (first byte {first:#04x})")]
    Garbage { first: u8 },
}

/// A datagram as a record.
pub fn encode_record(datagram: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER + datagram.len());
    push_record(datagram, &mut out);
    out
}

/// Appends `datagram` as a record to `out`. Datagrams longer than
/// [`MAX_RECORD`] are never produced by this code; one would be cut to
/// its first `MAX_RECORD` bytes (and then fail to decode at the peer).
pub fn push_record(datagram: &[u8], out: &mut Vec<u8>) {
    let d = &datagram[..datagram.len().min(MAX_RECORD)];
    out.push(MARK);
    out.extend_from_slice(&(d.len() as u16).to_be_bytes());
    out.extend_from_slice(d);
}

/// Splits a byte stream into records; memory is bounded by one record.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Where the next record starts (consumed bytes are dropped once per
    /// push, not per record: many tiny records cost linear time).
    pos: usize,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes waiting for the rest of their record.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next whole record, if one is buffered.
    pub fn next_record(&mut self) -> Result<Option<Record>, StreamError> {
        let buf = &self.buf[self.pos..];
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        if first == MARK {
            if buf.len() < RECORD_HEADER {
                return Ok(None);
            }
            let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
            if len > MAX_RECORD {
                return Err(StreamError::TooLarge { len });
            }
            if buf.len() < RECORD_HEADER + len {
                return Ok(None);
            }
            let d = buf[RECORD_HEADER..RECORD_HEADER + len].to_vec();
            self.pos += RECORD_HEADER + len;
            return Ok(Some(Record::Datagram(d)));
        }
        if first > 0x03 {
            return Err(StreamError::Garbage { first });
        }
        // A STUN message: its header says how long it is.
        if buf.len() < 4 {
            return Ok(None);
        }
        let Some(len) = framed_len(buf) else {
            return Err(StreamError::Garbage { first });
        };
        if len > MAX_RECORD {
            return Err(StreamError::TooLarge { len });
        }
        if buf.len() < len {
            return Ok(None);
        }
        let m = buf[..len].to_vec();
        self.pos += len;
        Ok(Some(Record::Stun(m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_bare_stun_split_at_any_byte() {
        let mut stream = encode_record(b"\x2a\x03hello");
        // A bare STUN Binding request, 20 bytes, no attributes.
        let stun = [
            0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ];
        stream.extend_from_slice(&stun);
        stream.extend(encode_record(&[0x2C; 1400]));
        for cut in [1, 2, 3, 7, 500] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for chunk in stream.chunks(cut) {
                d.push(chunk);
                while let Some(r) = d.next_record().unwrap() {
                    got.push(r);
                }
            }
            assert_eq!(
                got,
                vec![
                    Record::Datagram(b"\x2a\x03hello".to_vec()),
                    Record::Stun(stun.to_vec()),
                    Record::Datagram(vec![0x2C; 1400]),
                ],
                "cut {cut}"
            );
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn garbage_and_oversized_records_end_the_stream() {
        let mut d = Decoder::new();
        d.push(b"GET / HTTP/1.1\r\n");
        assert_eq!(d.next_record(), Err(StreamError::Garbage { first: b'G' }));
        let mut d = Decoder::new();
        d.push(&[MARK, 0xFF, 0xFF]);
        assert_eq!(d.next_record(), Err(StreamError::TooLarge { len: 0xFFFF }));
    }
}

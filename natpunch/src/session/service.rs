//! What runs on a session's streams.
//!
//! Each bidirectional QUIC stream carries one byte stream: the netcat-style
//! pipe, or one TCP connection to a named service. The opener starts with a
//! small header and the acceptor answers with a status; after that the
//! stream is raw bytes both ways, and each direction ends on its own (TCP
//! half-close maps to a QUIC FIN, a TCP reset to a stream reset and back).
//!
//! ```text
//! request:  'N' 0x01 kind(0 = pipe, 1 = service) [len u8, name]
//! response: status(0 = ok, 1 = refused, 2 = service unreachable) [len u8, reason]
//!           or 3 (queued: another pipe session runs; the final status follows)
//! ```
//!
//! The acceptor never connects anywhere but the `HOST:PORT`s it was told
//! to offer (`--expose NAME=HOST:PORT`): the name is looked up, never
//! parsed as an address.

use std::collections::HashMap;
use std::io;

use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{close, Connection};

/// First byte of a stream request: a stream from something that is not
/// natpunch fails at once, not after guessing at its bytes.
const MAGIC: u8 = b'N';
/// The stream protocol's version; a later one gets "refused" with a reason.
const VERSION: u8 = 1;
/// Stream reset code for a TCP connection reset on the other side.
pub const RESET_CODE: u32 = 1;
/// Copy buffer: 64 KiB lets quinn fill whole GSO batches per write.
const COPY_BUF: usize = 64 * 1024;
/// A service name's limit (one length byte).
pub const MAX_NAME: usize = 255;

/// What a stream is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Pipe,
    Service(String),
}

/// The acceptor's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    Refused = 1,
    Unreachable = 2,
    /// Another pipe session runs on the acceptor: wait, the final status
    /// follows when ours begins.
    Queued = 3,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("the peer could not reach the service: {0}")]
    Unreachable(String),
    #[error("bad stream header")]
    BadHeader,
    #[error("service name must be 1 to 255 bytes of A-Z a-z 0-9 . _ -")]
    BadName,
    #[error("the session ended: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the peer stopped reading (code {0})")]
    Stopped(VarInt),
    #[error("the peer reset the stream")]
    Reset,
    #[error("--expose wants NAME=HOST:PORT (NAME of A-Z a-z 0-9 . _ -), got {0:?}")]
    BadExpose(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Checks a service name: short, and plain.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Request {
    fn encode(&self) -> Result<Vec<u8>, ServiceError> {
        Ok(match self {
            Request::Pipe => vec![MAGIC, VERSION, 0],
            Request::Service(name) => {
                if !valid_name(name) {
                    return Err(ServiceError::BadName);
                }
                let mut v = vec![MAGIC, VERSION, 1, name.len() as u8];
                v.extend_from_slice(name.as_bytes());
                v
            }
        })
    }
}

async fn read_short(recv: &mut RecvStream) -> Result<String, ServiceError> {
    let len = recv.read_u8().await? as usize;
    let mut b = vec![0u8; len];
    recv.read_exact(&mut b)
        .await
        .map_err(|_| ServiceError::BadHeader)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// Acceptor side: reads what the opener wants (bounded: ≤ 259 bytes).
pub async fn read_request(recv: &mut RecvStream) -> Result<Request, ServiceError> {
    let mut head = [0u8; 3];
    recv.read_exact(&mut head)
        .await
        .map_err(|_| ServiceError::BadHeader)?;
    match head {
        [MAGIC, VERSION, 0] => Ok(Request::Pipe),
        [MAGIC, VERSION, 1] => {
            let name = read_short(recv).await?;
            if valid_name(&name) {
                Ok(Request::Service(name))
            } else {
                Err(ServiceError::BadName)
            }
        }
        _ => Err(ServiceError::BadHeader),
    }
}

/// Acceptor side: answers a request.
pub async fn respond(
    send: &mut SendStream,
    status: Status,
    reason: &str,
) -> Result<(), ServiceError> {
    let mut v = vec![status as u8];
    if !matches!(status, Status::Ok | Status::Queued) {
        let r = &reason.as_bytes()[..reason.len().min(MAX_NAME)];
        v.push(r.len() as u8);
        v.extend_from_slice(r);
    }
    send.write_all(&v).await.map_err(io::Error::from)?;
    Ok(())
}

/// Opener side: a new stream for `req`, once the peer said yes.
pub async fn open(
    conn: &Connection,
    req: &Request,
) -> Result<(SendStream, RecvStream), ServiceError> {
    open_waiting(conn, req, || {}).await
}

/// [`open`], calling `queued` if the peer makes us wait for another
/// session to finish first.
pub async fn open_waiting(
    conn: &Connection,
    req: &Request,
    queued: impl FnOnce(),
) -> Result<(SendStream, RecvStream), ServiceError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&req.encode()?)
        .await
        .map_err(io::Error::from)?;
    let mut status = recv.read_u8().await?;
    if status == Status::Queued as u8 {
        queued();
        status = recv.read_u8().await?;
    }
    match status {
        0 => Ok((send, recv)),
        1 => Err(ServiceError::Refused(read_short(&mut recv).await?)),
        2 => Err(ServiceError::Unreachable(read_short(&mut recv).await?)),
        _ => Err(ServiceError::BadHeader),
    }
}

/// Bytes moved by a finished splice.
#[derive(Debug, Clone, Copy, Default)]
pub struct Moved {
    pub sent: u64,
    pub received: u64,
}

/// A peer that stops our stream with [`RESET_CODE`] had its TCP connection
/// reset: that is a reset, whichever of its two signals arrives first.
fn stopped(code: VarInt) -> ServiceError {
    if code == VarInt::from_u32(RESET_CODE) {
        ServiceError::Reset
    } else {
        ServiceError::Stopped(code)
    }
}

/// A local connection reset, seen by reading or by writing.
fn is_local_reset(e: &ServiceError) -> bool {
    matches!(e, ServiceError::Io(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe))
}

fn is_done(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(close::DONE))
}

/// Local bytes to the stream; FIN at local EOF; waits until the peer has
/// acknowledged every byte.
async fn upload<R: AsyncRead + Unpin>(
    mut input: R,
    send: &mut SendStream,
    mut peer_done: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<u64, ServiceError> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut n = 0u64;
    loop {
        let read = async {
            match peer_done.as_mut() {
                Some(done) => tokio::select! {
                    r = input.read(&mut buf) => Some(r),
                    _ = done.wait_for(|d| *d) => None,
                },
                None => Some(input.read(&mut buf).await),
            }
        };
        let Some(read) = read.await else {
            // The peer finished and our input is interactive: stop here.
            break;
        };
        let got = match read {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) => return Err(e.into()),
        };
        match send.write_all(&buf[..got]).await {
            Ok(()) => n += got as u64,
            Err(WriteError::Stopped(code)) => return Err(stopped(code)),
            Err(WriteError::ConnectionLost(e)) => return Err(e.into()),
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
    // Finishing twice is the only error here, and we do it once.
    let _ = send.finish();
    match send.stopped().await {
        Ok(None) => Ok(n),
        Ok(Some(code)) => Err(stopped(code)),
        // The peer closes with DONE only after it read our FIN.
        Err(quinn::StoppedError::ConnectionLost(e)) if is_done(&e) => Ok(n),
        Err(quinn::StoppedError::ConnectionLost(e)) => Err(e.into()),
        Err(e) => Err(io::Error::other(e).into()),
    }
}

/// Stream bytes to the local side; shuts the local writer at the peer's FIN.
async fn download<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    mut output: W,
) -> Result<u64, ServiceError> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut n = 0u64;
    loop {
        // `read` gathers every chunk already received, so a fast stream
        // costs one local write per batch, not per QUIC packet.
        match recv.read(&mut buf).await {
            Ok(Some(k)) => {
                output.write_all(&buf[..k]).await?;
                // Interactive use (ssh as ProxyCommand) needs every byte
                // passed on now, not when a buffer fills.
                output.flush().await?;
                n += k as u64;
            }
            Ok(None) => break,
            Err(ReadError::Reset(_)) => return Err(ServiceError::Reset),
            Err(ReadError::ConnectionLost(e)) => return Err(e.into()),
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
    output.flush().await?;
    output.shutdown().await?;
    Ok(n)
}

/// Copies both ways until both directions ended cleanly, or either failed.
pub async fn splice<R, W>(
    input: R,
    output: W,
    send: SendStream,
    recv: RecvStream,
) -> Result<Moved, ServiceError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    splice_until(input, output, send, recv, false).await
}

/// [`splice`], and with `end_with_peer` our side also ends (FIN) once the
/// peer has sent something and finished: netcat's behaviour for a terminal
/// on stdin, so that `natpunch … > file` ends when the file has arrived.
pub async fn splice_until<R, W>(
    input: R,
    output: W,
    mut send: SendStream,
    mut recv: RecvStream,
    end_with_peer: bool,
) -> Result<Moved, ServiceError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let down = async {
        let r = download(&mut recv, output).await;
        // Only a peer that sent something and then finished ends the
        // exchange: a peer with nothing to say (stdin /dev/null) half-closes
        // at once, and a person typing to it must not be cut off.
        let _ = done_tx.send(r.as_ref().is_ok_and(|n| *n > 0));
        r
    };
    let up = upload(input, &mut send, end_with_peer.then_some(done_rx));
    let result = tokio::try_join!(up, down);
    if let Err(e) = &result {
        if is_local_reset(e) {
            // Both directions carry the reset, with the same code, so the
            // peer sees a reset and not a plain stop (dropping `recv` would
            // stop it with code 0), whichever frame it handles first.
            let _ = send.reset(VarInt::from_u32(RESET_CODE));
            let _ = recv.stop(VarInt::from_u32(RESET_CODE));
        }
    }
    let (sent, received) = result?;
    Ok(Moved { sent, received })
}

/// Carries one TCP connection over a stream; a reset either way is passed
/// on as a reset.
pub async fn splice_tcp(
    tcp: TcpStream,
    send: SendStream,
    recv: RecvStream,
) -> Result<Moved, ServiceError> {
    let std = tcp.into_std()?;
    let tcp = TcpStream::from_std(std.try_clone()?)?;
    let (r, w) = tcp.into_split();
    let result = splice(r, w, send, recv).await;
    if matches!(result, Err(ServiceError::Reset)) {
        // SO_LINGER 0: close() sends RST, the TCP form of a stream reset.
        let _ = socket2::SockRef::from(&std).set_linger(Some(std::time::Duration::ZERO));
    }
    drop(std);
    result
}

/// The acceptor's table of offered services: name → HOST:PORT.
#[derive(Debug, Clone, Default)]
pub struct Services {
    map: HashMap<String, String>,
}

impl Services {
    /// Parses `NAME=HOST:PORT`.
    pub fn add(&mut self, spec: &str) -> Result<(), ServiceError> {
        let bad = || ServiceError::BadExpose(spec.to_string());
        let (name, target) = spec.split_once('=').ok_or_else(bad)?;
        let port = target
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok());
        if !valid_name(name) || port.is_none() {
            return Err(bad());
        }
        self.map.insert(name.to_string(), target.to_string());
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Serves one service request: connect to the named target, answer,
    /// splice.
    pub async fn serve(
        &self,
        name: &str,
        mut send: SendStream,
        recv: RecvStream,
    ) -> Result<Moved, ServiceError> {
        let Some(target) = self.map.get(name) else {
            respond(
                &mut send,
                Status::Refused,
                &format!("no service named {name:?} here"),
            )
            .await?;
            return Err(ServiceError::Io(io::Error::new(
                io::ErrorKind::NotFound,
                format!("asked for {name:?}, which is not exposed"),
            )));
        };
        match TcpStream::connect(target.as_str()).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                respond(&mut send, Status::Ok, "").await?;
                splice_tcp(tcp, send, recv).await
            }
            Err(e) => {
                let reason = format!("{name}: {e}");
                respond(&mut send, Status::Unreachable, &reason).await?;
                Err(ServiceError::Unreachable(reason))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        assert!(valid_name("ssh") && valid_name("web-1.local_x"));
        assert!(!valid_name("") && !valid_name("a b") && !valid_name("x:22"));
        assert!(!valid_name(&"a".repeat(256)));
    }

    #[test]
    fn expose_specs_are_checked() {
        let mut s = Services::default();
        assert!(s.add("web=127.0.0.1:8080").is_ok());
        assert!(s.add("ssh=localhost:22").is_ok());
        assert!(s.add("web").is_err());
        assert!(s.add("bad name=127.0.0.1:1").is_err());
        assert!(s.add("web=127.0.0.1").is_err());
        assert!(s.add("web=127.0.0.1:99999").is_err());
    }

    #[test]
    fn requests_encode_as_documented() {
        assert_eq!(Request::Pipe.encode().ok(), Some(vec![b'N', 1, 0]));
        assert_eq!(
            Request::Service("ssh".into()).encode().ok(),
            Some(vec![b'N', 1, 1, 3, b's', b's', b'h'])
        );
        assert!(Request::Service("no/slash".into()).encode().is_err());
    }
}

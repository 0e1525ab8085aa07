//! The path table beneath QUIC: every UDP socket the endpoint owns, under
//! one quinn endpoint, with one stable address per remote peer.
//!
//! [`PathSocket`] is quinn's [`AsyncUdpSocket`]. quinn knows each remote
//! by a *mapped address* (an IPv6 ULA, `fd70:6e70::/32`, that never
//! appears on a wire) for the remote's whole life; the table maps it to
//! the real path: which of our sockets, and the peer's address as seen
//! from it. When a re-punch wins on another socket, or the peer's NAT
//! rebinds, the driver points the route at the new path and quinn notices
//! nothing: no migration, no new handshake (RFC 9000 §9 lets a client not
//! follow a server that moves, so this layer does it for both).
//!
//! Datagrams are told apart by their first byte:
//!
//! | first byte | what                                   |
//! |------------|----------------------------------------|
//! | 0x00–0x03  | STUN (RFC 8489 §5: top two bits zero)  |
//! | 0x2A       | rendezvous frames                      |
//! | 0x2B       | punch probes                           |
//! | 0x2C       | relay frames (QUIC inside)             |
//! | 0x40–0xFF  | QUIC (RFC 9000 §17: fixed bit set; greasing it is off) |
//!
//! Everything else below 0x40 goes to the driver's channel, tagged with
//! the socket it came in on; QUIC stays with quinn (sent and received with
//! quinn-udp's batch and GSO/GRO paths).
//!
//! **Relay paths.** A route may also have a relay channel on the
//! rendezvous server ([`natpunch_proto::relay`]). While the route is on the
//! relay, its QUIC datagrams leave the main socket wrapped in relay frames
//! (each GSO segment gets its 9-byte header, so batches stay batches);
//! relay frames from the server for a known channel are unwrapped and
//! handed to quinn under the route's address, whichever path is current,
//! so packets still in flight on the old path after a move are not lost.
//! QUIC packets never exceed [`natpunch_proto::relay::MAX_QUIC_PAYLOAD`],
//! which every path carries with or without the header. Where UDP is
//! blocked, the relay is reached over a TCP stream instead
//! ([`crate::server_tcp`]): relay frames then go down that stream, and
//! the frames it brings back are injected here.
//!
//! **Punched TCP streams** ([`crate::tcp`]) are sockets too: a stream has
//! a [`SocketId`] like a UDP socket, and a path on it is `(id, the peer's
//! address)`. What is sent there goes down the stream one datagram per
//! record (a full queue is loss, as on UDP); what comes up is sorted as
//! on UDP: QUIC to quinn under the route's address, the rest (punch
//! frames) to the driver.
//!
//! **TURN allocations** ([`crate::turn`]) are sockets the same way: a
//! path on one is `(id, the peer's address as the TURN server sees it)`;
//! what is sent there goes to the allocation's task with its destination
//! (ChannelData once the channel is bound), and what the server relays
//! comes in sorted as on UDP.
//!
//! Receiving QUIC: a known real path gives its route's mapped address. A
//! packet from an unknown path is matched by its destination connection
//! ID (ours, 8 bytes, learned from packets on known paths): that is the
//! peer's NAT rebinding; it is delivered under the route's address and the
//! driver is told, so the coordinator can validate the new path before
//! sending there. A packet matching nothing starts an anonymous route (a
//! peer dialing our public port directly).
//!
//! Per route it also keeps liveness: when we last heard from the peer, and
//! what we sent since, so a dead path is noticed in a second or two.
//!
//! **Path MTU and congestion after a move.** quinn 0.11 cannot reset a
//! connection's congestion controller or MTU, and a move is invisible to
//! it. Its RTT estimator adapts within a few round trips, and a congestion
//! window too large for the new path costs one loss episode. For the MTU
//! the policy is: start at QUIC's 1200-byte minimum, which every path
//! carries; probe up to 1443 bytes (a 1500-byte Ethernet MTU under IPv6
//! and UDP headers, less the relay header, so the relay path carries every
//! packet a direct path does); rely on quinn's black-hole detection to drop back to
//! 1200 when large packets vanish after a move; and probe again every 60 s
//! ([`crate::session::transport`]) so a move to a better path regains the
//! size soon.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use natpunch_proto::coordinator::{RelayPath, RemoteKey};
use natpunch_proto::punch::Path;
use natpunch_proto::relay;
use natpunch_proto::SocketId;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// A datagram for the driver: (socket, source, bytes).
pub type Datagram = (SocketId, SocketAddr, Vec<u8>);

/// Largest control datagram passed on: STUN, rendezvous and probe frames
/// are all far smaller; a bigger one is garbage and must not make the
/// driver's queue hold GRO-sized buffers.
pub const MAX_CONTROL: usize = 2048;

/// Our connection IDs' length (quinn's default, set explicitly in
/// [`crate::session::endpoint`] so that short headers can be parsed).
pub const CID_LEN: usize = 8;

/// Connection IDs remembered per route (quinn issues a few per connection;
/// several connections may share a route).
const CIDS_PER_ROUTE: usize = 16;

/// A peer's packets from a new path are reported at most this often per
/// path, so a burst of them makes one validation, not hundreds.
const NEW_SOURCE_EVERY: Duration = Duration::from_secs(1);

/// Anonymous routes (direct dials from unknown peers) at most; beyond, the
/// oldest is forgotten. Bounds what unsolicited packets can make us keep.
const MAX_ANONYMOUS: usize = 1024;

/// Relayed QUIC packets from a TCP stream waiting for quinn at most;
/// beyond, they are dropped (QUIC sees loss). 1024 full-size packets are
/// 1.5 MB, more than a stream delivers between two reads by quinn.
const MAX_INJECTED: usize = 1024;

/// The first 32 bits of every mapped address: `fd70:6e70::/32` ("pnp"), a
/// unique local range (RFC 4193) nothing routes.
const MAPPED_PREFIX: [u16; 2] = [0xfd70, 0x6e70];

/// RFC 9000 §17.2/§17.3: both header forms set 0x40 (the fixed bit); with
/// greasing off every QUIC packet we accept starts at 0x40 or above.
pub fn is_quic(first: u8) -> bool {
    first >= 0x40
}

/// Whether `addr` is one of our mapped addresses.
pub fn is_mapped(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V6(a) => a.ip().segments()[..2] == MAPPED_PREFIX,
        SocketAddr::V4(_) => false,
    }
}

/// The destination connection ID of a QUIC packet, if it is one of ours
/// (length [`CID_LEN`]).
fn dcid(packet: &[u8]) -> Option<[u8; CID_LEN]> {
    let first = *packet.first()?;
    let bytes = if first & 0x80 != 0 {
        // Long header: flags, version (4), DCID length, DCID.
        let len = *packet.get(5)? as usize;
        if len != CID_LEN {
            return None;
        }
        packet.get(6..6 + CID_LEN)?
    } else {
        packet.get(1..1 + CID_LEN)?
    };
    bytes.try_into().ok()
}

/// Liveness of one route.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// The last datagram from the peer.
    pub last_rx: Instant,
    /// The first datagram we sent after `last_rx`, if any.
    pub first_unanswered: Option<Instant>,
    /// How many datagrams we sent since `last_rx`.
    pub unanswered: u32,
    /// The gap before `last_rx`: small while the peer is sending steadily.
    pub prev_gap: Duration,
}

impl Liveness {
    fn new(now: Instant) -> Self {
        Self {
            last_rx: now,
            first_unanswered: None,
            unanswered: 0,
            prev_gap: Duration::MAX,
        }
    }

    fn heard(&mut self, now: Instant) {
        self.prev_gap = now.saturating_duration_since(self.last_rx);
        self.last_rx = now;
        self.first_unanswered = None;
        self.unanswered = 0;
    }
}

/// The channel and route of a relay frame with QUIC inside, if the channel
/// is one of ours and the frame came from its server.
fn relayed_quic(t: &Table, from: SocketAddr, seg: &[u8]) -> Option<(u64, SocketAddr)> {
    let (ch, payload) = relay::decode(seg).ok()?;
    let (mapped, server) = t.by_channel.get(&ch)?;
    (*server == from && payload.first().is_some_and(|&b| is_quic(b))).then_some((ch, *mapped))
}

/// Removes the relay header from each `stride`-long segment of `buf`,
/// moving the payloads together; returns the new length.
fn strip_relay_headers(buf: &mut [u8], stride: usize) -> usize {
    let mut out = 0;
    let mut start = 0;
    while start < buf.len() {
        let end = (start + stride).min(buf.len());
        let from = (start + relay::HEADER).min(end);
        buf.copy_within(from..end, out);
        out += end - from;
        start = end;
    }
    out
}

#[derive(Debug)]
struct Route {
    key: Option<RemoteKey>,
    path: Option<Path>,
    /// The server's relay channel to the peer.
    relay: Option<RelayPath>,
    /// Traffic goes through `relay`, not `path`.
    on_relay: bool,
    live: Liveness,
    cids: VecDeque<[u8; CID_LEN]>,
    /// New paths reported, and when (bounded by [`NEW_SOURCE_EVERY`]).
    reported: Vec<(Path, Instant)>,
    created: Instant,
}

#[derive(Default)]
struct Table {
    routes: HashMap<SocketAddr, Route>,
    by_key: HashMap<RemoteKey, SocketAddr>,
    by_real: HashMap<(SocketId, SocketAddr), SocketAddr>,
    by_cid: HashMap<[u8; CID_LEN], SocketAddr>,
    /// Relay channels (every one a route ever had) → the route.
    by_channel: HashMap<u64, (SocketAddr, SocketAddr)>,
    next: u64,
}

impl Table {
    fn new_mapped(&mut self) -> SocketAddr {
        self.next += 1;
        let n = self.next;
        let ip = Ipv6Addr::new(
            MAPPED_PREFIX[0],
            MAPPED_PREFIX[1],
            0,
            0,
            (n >> 48) as u16,
            (n >> 32) as u16,
            (n >> 16) as u16,
            n as u16,
        );
        SocketAddr::V6(SocketAddrV6::new(ip, 1, 0, 0))
    }

    fn add_route(&mut self, key: Option<RemoteKey>, now: Instant) -> SocketAddr {
        let mapped = self.new_mapped();
        self.routes.insert(
            mapped,
            Route {
                key,
                path: None,
                relay: None,
                on_relay: false,
                live: Liveness::new(now),
                cids: VecDeque::new(),
                reported: Vec::new(),
                created: now,
            },
        );
        if let Some(k) = key {
            self.by_key.insert(k, mapped);
        }
        mapped
    }

    fn remove_route(&mut self, mapped: SocketAddr) {
        if let Some(r) = self.routes.remove(&mapped) {
            if let Some(k) = r.key {
                if self.by_key.get(&k) == Some(&mapped) {
                    self.by_key.remove(&k);
                }
            }
            for c in r.cids {
                self.by_cid.remove(&c);
            }
        }
        self.by_real.retain(|_, m| *m != mapped);
        self.by_channel.retain(|_, (m, _)| *m != mapped);
    }

    /// Forgets the oldest anonymous route when there are too many.
    fn bound_anonymous(&mut self) {
        let anon: Vec<(SocketAddr, Instant)> = self
            .routes
            .iter()
            .filter(|(_, r)| r.key.is_none())
            .map(|(m, r)| (*m, r.created))
            .collect();
        if anon.len() >= MAX_ANONYMOUS {
            if let Some((oldest, _)) = anon.iter().min_by_key(|(_, t)| *t) {
                self.remove_route(*oldest);
            }
        }
    }
}

/// Counters, read by tests and `-v` logging.
#[derive(Debug, Default)]
pub struct MuxStats {
    pub quic_in: AtomicU64,
    pub diverted: AtomicU64,
    /// Control datagrams dropped because the driver's queue was full.
    pub divert_overflow: AtomicU64,
    /// QUIC segments dropped because a GRO batch mixed them with control
    /// datagrams (QUIC retransmits them).
    pub mixed_dropped: AtomicU64,
    /// QUIC datagrams for a route with no path yet (dropped: lost, to quinn).
    pub no_path: AtomicU64,
    /// QUIC datagrams sent and received through a relay.
    pub relayed_out: AtomicU64,
    pub relayed_in: AtomicU64,
    /// Relay frames for no channel of ours, or from another address than
    /// the channel's server (dropped).
    pub relay_stray: AtomicU64,
    /// Packets from a peer's new path (matched by connection ID).
    pub new_sources: AtomicU64,
}

struct Slot {
    io: Arc<UdpSocket>,
    state: UdpSocketState,
}

/// Where a socket that is not a UDP socket of ours sends.
#[derive(Debug, Clone)]
enum Outlet {
    /// A punched TCP stream: one record per datagram.
    Records(mpsc::Sender<Vec<u8>>),
    /// A TURN allocation: each datagram to the peer's address, relayed.
    Turn(mpsc::Sender<(SocketAddr, Vec<u8>)>),
}

/// A stream or TURN allocation: where it sends, and its local address
/// (for an allocation, the address the TURN server relays to us).
type StreamSlot = (Outlet, SocketAddr);

/// What the socket tells the driver besides control datagrams.
#[derive(Debug, Clone, Copy)]
pub enum SocketNews {
    /// A route's peer sent from a path that is not its route.
    NewSource { mapped: SocketAddr, path: Path },
}

/// See the module documentation.
pub struct PathSocket {
    slots: RwLock<HashMap<SocketId, Arc<Slot>>>,
    /// The main socket (its capabilities stand for all).
    main: Arc<Slot>,
    table: Mutex<Table>,
    divert: mpsc::Sender<Datagram>,
    news: mpsc::UnboundedSender<SocketNews>,
    /// Round-robin start for receiving, so no socket starves the others.
    turn: AtomicUsize,
    /// The socket whose send last blocked (what the writable poller waits on).
    blocked: AtomicUsize,
    /// quinn's receiving task, woken when a socket is added so that it
    /// starts polling it at once (otherwise a new socket is read only when
    /// another one wakes the task).
    receiver: Mutex<Option<std::task::Waker>>,
    /// The TCP stream to the server, when the relay is reached that way.
    stream: RwLock<Option<mpsc::Sender<Vec<u8>>>>,
    /// Relayed QUIC packets that came on the stream: (route, packet).
    injected: Mutex<VecDeque<(SocketAddr, Vec<u8>)>>,
    /// Punched TCP streams: their record queue and local address.
    streams: RwLock<HashMap<SocketId, StreamSlot>>,
    pub stats: MuxStats,
}

impl fmt::Debug for PathSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathSocket")
            .field("local", &self.main.io.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl PathSocket {
    /// The table over `main` (socket 0); control datagrams go to `divert`,
    /// news of new paths to `news`.
    pub fn new(
        main: UdpSocket,
        divert: mpsc::Sender<Datagram>,
        news: mpsc::UnboundedSender<SocketNews>,
    ) -> io::Result<Self> {
        let main = Arc::new(make_slot(main)?);
        tracing::debug!(
            gso = main.state.max_gso_segments(),
            gro = main.state.gro_segments(),
            "QUIC on the shared socket"
        );
        let mut slots = HashMap::new();
        slots.insert(SocketId(0), main.clone());
        Ok(Self {
            slots: RwLock::new(slots),
            main,
            table: Mutex::new(Table::default()),
            divert,
            news,
            turn: AtomicUsize::new(0),
            blocked: AtomicUsize::new(0),
            receiver: Mutex::new(None),
            stream: RwLock::new(None),
            injected: Mutex::new(VecDeque::new()),
            streams: RwLock::new(HashMap::new()),
            stats: MuxStats::default(),
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding this lock cannot leave the maps half-updated
        // in a way that matters; keep going with what is there.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, id: SocketId) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// The main socket's local address.
    pub fn main_local(&self) -> io::Result<SocketAddr> {
        self.main.io.local_addr()
    }

    /// Adds socket `id` (a birthday or fresh-mapping socket).
    pub fn add_socket(&self, id: SocketId, s: UdpSocket) -> io::Result<()> {
        let slot = Arc::new(make_slot(s)?);
        self.slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, slot);
        if let Some(w) = self
            .receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            w.wake();
        }
        Ok(())
    }

    /// Relay frames go down `stream` (records to the server over TCP)
    /// from now on, or on the main socket again with `None`.
    pub fn set_stream(&self, stream: Option<mpsc::Sender<Vec<u8>>>) {
        *self.stream.write().unwrap_or_else(|e| e.into_inner()) = stream;
    }

    /// A relay frame that came from `server` on the TCP stream: its QUIC
    /// packet goes to quinn if the channel is ours. `false`: not ours (a
    /// control datagram, for the driver).
    pub fn inject_relayed(&self, server: SocketAddr, frame: &[u8]) -> bool {
        let now = Instant::now();
        let mapped = {
            let mut t = self.table();
            let Some((_, mapped)) = relayed_quic(&t, server, frame) else {
                return false;
            };
            if let Some(r) = t.routes.get_mut(&mapped) {
                if r.on_relay {
                    r.live.heard(now);
                }
            }
            mapped
        };
        self.queue_injected(mapped, frame.get(relay::HEADER..).unwrap_or_default());
        self.wake_receiver();
        true
    }

    /// Queues a relayed QUIC packet for quinn (bounded: beyond
    /// [`MAX_INJECTED`] it is dropped, as loss).
    fn queue_injected(&self, mapped: SocketAddr, packet: &[u8]) {
        let mut q = self.injected.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_INJECTED {
            self.stats.divert_overflow.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back((mapped, packet.to_vec()));
        self.stats.relayed_in.fetch_add(1, Ordering::Relaxed);
    }

    /// Wakes quinn's receiving task (injected packets wait for it).
    fn wake_receiver(&self) {
        if let Some(w) = self
            .receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            w.wake_by_ref();
        }
    }

    /// Hands quinn the packets injected from the stream (one per slot).
    fn take_injected(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut q = self.injected.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some((mapped, p)) = q.front() else {
                break;
            };
            if p.len() > bufs[n].len() {
                q.pop_front();
                continue;
            }
            bufs[n][..p.len()].copy_from_slice(p);
            meta[n] = RecvMeta {
                addr: *mapped,
                len: p.len(),
                stride: p.len(),
                ecn: None,
                dst_ip: None,
            };
            q.pop_front();
            n += 1;
        }
        n
    }

    /// Adds the punched TCP stream `id` (local address `local`): what is
    /// sent on it goes into `records`.
    pub fn add_stream(&self, id: SocketId, records: mpsc::Sender<Vec<u8>>, local: SocketAddr) {
        self.streams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (Outlet::Records(records), local));
    }

    /// Adds the TURN allocation `id`, which relays `relayed` to us: what
    /// is sent on it goes into `out` with its destination (a full queue is
    /// loss, as on UDP); what it receives comes in by
    /// [`PathSocket::inject_stream`] or as a control datagram.
    pub fn add_turn(
        &self,
        id: SocketId,
        out: mpsc::Sender<(SocketAddr, Vec<u8>)>,
        relayed: SocketAddr,
    ) {
        self.streams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (Outlet::Turn(out), relayed));
    }

    fn stream(&self, id: SocketId) -> Option<Outlet> {
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .map(|(tx, _)| tx.clone())
    }

    /// A control datagram that came through TURN allocation `id` from
    /// `from`, for the driver (bounded like any other).
    pub fn divert_turn(&self, id: SocketId, from: SocketAddr, data: &[u8]) {
        self.divert_one(id, from, data);
    }

    /// A datagram that came up stream `id` from `remote`: QUIC goes to
    /// quinn (`true`), anything else is the caller's (`false`).
    pub fn inject_stream(&self, id: SocketId, remote: SocketAddr, packet: &[u8]) -> bool {
        if !packet.first().is_some_and(|&b| is_quic(b)) {
            return false;
        }
        let now = Instant::now();
        let mapped = {
            let mut t = self.table();
            let path = Path { socket: id, remote };
            let mapped = self.route_in(&mut t, path, packet, now);
            if let Some(r) = t.routes.get_mut(&mapped) {
                if !r.on_relay && r.path == Some(path) {
                    r.live.heard(now);
                }
            }
            mapped
        };
        self.stats.quic_in.fetch_add(1, Ordering::Relaxed);
        let mut q = self.injected.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_INJECTED {
            self.stats.divert_overflow.fetch_add(1, Ordering::Relaxed);
        } else {
            q.push_back((mapped, packet.to_vec()));
        }
        drop(q);
        self.wake_receiver();
        true
    }

    /// Sends each segment of `contents` to `dest` through `outlet`: down a
    /// stream as a record each, or through a TURN allocation.
    fn send_stream(&self, outlet: &Outlet, dest: SocketAddr, contents: &[u8], segment: usize) {
        for chunk in contents.chunks(segment.max(1)) {
            // A full queue is loss, as on UDP.
            match outlet {
                Outlet::Records(records) => {
                    let _ = records.try_send(natpunch_proto::relay::stream::encode_record(chunk));
                }
                Outlet::Turn(out) => {
                    let _ = out.try_send((dest, chunk.to_vec()));
                }
            }
        }
    }

    /// Stops sending on TURN allocation `id` while it is made again: its
    /// routes stay (the same peer on the same socket is the same route
    /// when the new allocation comes, [`PathSocket::add_turn`]).
    pub fn pause_turn(&self, id: SocketId) {
        self.streams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Closes socket `id` (never the main one).
    pub fn remove_socket(&self, id: SocketId) {
        if id.0 == 0 {
            return;
        }
        self.streams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.table().by_real.retain(|(s, _), _| *s != id);
    }

    /// The local address of socket `id`.
    pub fn local_of(&self, id: SocketId) -> Option<SocketAddr> {
        if let Some((_, local)) = self
            .streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Some(*local);
        }
        self.slot(id).and_then(|s| s.io.local_addr().ok())
    }

    /// Whether socket `id` is a punched TCP stream.
    pub fn is_stream(&self, id: SocketId) -> bool {
        matches!(
            self.streams
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id),
            Some((Outlet::Records(_), _))
        )
    }

    /// Whether socket `id` is a TURN allocation.
    pub fn is_turn(&self, id: SocketId) -> bool {
        matches!(
            self.streams
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id),
            Some((Outlet::Turn(_), _))
        )
    }

    /// Sockets open now.
    pub fn socket_count(&self) -> usize {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The mapped address of `key`'s route (made if new).
    pub fn route_for(&self, key: RemoteKey) -> SocketAddr {
        let mut t = self.table();
        if let Some(m) = t.by_key.get(&key) {
            return *m;
        }
        t.add_route(Some(key), Instant::now())
    }

    /// A route for a peer dialed at a known address (no remote key).
    pub fn direct_route(&self, path: Path) -> SocketAddr {
        let mut t = self.table();
        if let Some(m) = t.by_real.get(&(path.socket, path.remote)) {
            let m = *m;
            if let Some(r) = t.routes.get_mut(&m) {
                r.path = Some(path);
            }
            return m;
        }
        let m = t.add_route(None, Instant::now());
        if let Some(r) = t.routes.get_mut(&m) {
            r.path = Some(path);
        }
        t.by_real.insert((path.socket, path.remote), m);
        m
    }

    /// Datagrams from `path` belong to `mapped`'s route; it sends there too
    /// until told otherwise.
    pub fn learn(&self, mapped: SocketAddr, path: Path) {
        let mut t = self.table();
        t.by_real.insert((path.socket, path.remote), mapped);
        if let Some(r) = t.routes.get_mut(&mapped) {
            r.path.get_or_insert(path);
        }
    }

    /// `mapped`'s peer can be reached through `relay` (used once
    /// [`PathSocket::use_relay`] says so); its frames arriving there are
    /// the route's from now on.
    pub fn set_relay(&self, mapped: SocketAddr, relay: RelayPath) {
        let mut t = self.table();
        if let Some(r) = t.routes.get_mut(&mapped) {
            // The previous channel still delivers what is in flight on it;
            // older ones are forgotten.
            let previous = r.relay.replace(relay).map(|p| p.channel);
            t.by_channel
                .retain(|ch, (m, _)| *m != mapped || Some(*ch) == previous || *ch == relay.channel);
            t.by_channel.insert(relay.channel, (mapped, relay.server));
        }
    }

    /// `mapped`'s traffic goes through its relay from now on.
    pub fn use_relay(&self, mapped: SocketAddr) {
        let mut t = self.table();
        if let Some(r) = t.routes.get_mut(&mapped) {
            if r.relay.is_some() && !r.on_relay {
                tracing::debug!(%mapped, relay = ?r.relay, "route moves to the relay");
                r.on_relay = true;
                r.live = Liveness::new(Instant::now());
            }
        }
    }

    /// `mapped`'s relay channel, if it has one.
    pub fn relay_of(&self, mapped: SocketAddr) -> Option<RelayPath> {
        self.table().routes.get(&mapped).and_then(|r| r.relay)
    }

    /// Whether `mapped`'s traffic goes through its relay now.
    pub fn on_relay(&self, mapped: SocketAddr) -> bool {
        self.table().routes.get(&mapped).is_some_and(|r| r.on_relay)
    }

    /// `mapped`'s traffic goes on `path` from now on.
    pub fn set_path(&self, mapped: SocketAddr, path: Path) {
        let mut t = self.table();
        t.by_real.insert((path.socket, path.remote), mapped);
        if let Some(r) = t.routes.get_mut(&mapped) {
            if r.path != Some(path) || r.on_relay {
                tracing::debug!(%mapped, ?path, "route moves");
            }
            r.on_relay = false;
            r.path = Some(path);
            // A new path starts with a clean slate.
            r.live = Liveness::new(Instant::now());
        }
    }

    /// The real path of `mapped`'s route.
    pub fn path_of(&self, mapped: SocketAddr) -> Option<Path> {
        self.table().routes.get(&mapped).and_then(|r| r.path)
    }

    /// The remote behind `mapped`, if known.
    pub fn key_of(&self, mapped: SocketAddr) -> Option<RemoteKey> {
        self.table().routes.get(&mapped).and_then(|r| r.key)
    }

    /// Drops `mapped`'s route.
    pub fn forget(&self, mapped: SocketAddr) {
        self.table().remove_route(mapped);
    }

    pub fn liveness(&self, mapped: SocketAddr) -> Option<Liveness> {
        self.table().routes.get(&mapped).map(|r| r.live)
    }

    /// Sends a control datagram (STUN, rendezvous, punch) on socket `id`,
    /// with its own TTL if asked (per packet: the socket's default, which
    /// QUIC shares, never changes).
    pub async fn send_control(
        &self,
        id: SocketId,
        dest: SocketAddr,
        payload: &[u8],
        ttl: Option<u8>,
    ) -> io::Result<()> {
        if let Some(outlet) = self.stream(id) {
            tracing::trace!(socket = id.0, %dest, len = payload.len(), "control datagram down a punched stream or TURN");
            // Over a stream (or a relay) the TTL is not ours to set.
            self.send_stream(&outlet, dest, payload, payload.len());
            return Ok(());
        }
        let Some(slot) = self.slot(id) else {
            return Ok(());
        };
        let s = &slot.io;
        match ttl {
            Some(t) => {
                s.async_io(Interest::WRITABLE, || {
                    crate::ttl::send_with_ttl(s.as_ref(), payload, dest, t)
                })
                .await?;
            }
            None => {
                s.send_to(payload, dest).await?;
            }
        }
        Ok(())
    }

    fn divert_one(&self, socket: SocketId, from: SocketAddr, data: &[u8]) {
        if data.len() > MAX_CONTROL {
            self.stats.divert_overflow.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%from, len = data.len(), "oversized control datagram dropped");
            return;
        }
        self.stats.diverted.fetch_add(1, Ordering::Relaxed);
        if self.divert.try_send((socket, from, data.to_vec())).is_err() {
            self.stats.divert_overflow.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%from, "control queue full: datagram dropped");
        }
    }

    /// The mapped address for a QUIC packet from `path`.
    fn route_in(&self, t: &mut Table, path: Path, packet: &[u8], now: Instant) -> SocketAddr {
        let cid = dcid(packet);
        if let Some(m) = t.by_real.get(&(path.socket, path.remote)).copied() {
            if let (Some(c), Some(r)) = (cid, t.routes.get_mut(&m)) {
                if !r.cids.contains(&c) {
                    if r.cids.len() >= CIDS_PER_ROUTE {
                        if let Some(old) = r.cids.pop_front() {
                            t.by_cid.remove(&old);
                        }
                    }
                    r.cids.push_back(c);
                    t.by_cid.insert(c, m);
                }
            }
            return m;
        }
        // The peer of a known connection, from a new path: its NAT rebound.
        if let Some(m) = cid.and_then(|c| t.by_cid.get(&c).copied()) {
            if let Some(r) = t.routes.get_mut(&m) {
                r.reported
                    .retain(|(_, at)| now.saturating_duration_since(*at) < NEW_SOURCE_EVERY);
                if !r.reported.iter().any(|(p, _)| *p == path) {
                    r.reported.push((path, now));
                    self.stats.new_sources.fetch_add(1, Ordering::Relaxed);
                    let _ = self.news.send(SocketNews::NewSource { mapped: m, path });
                }
                if r.path.is_none() {
                    r.path = Some(path);
                }
            }
            return m;
        }
        // Nobody we know: a peer dialing us directly.
        t.bound_anonymous();
        let m = t.add_route(None, now);
        if let Some(r) = t.routes.get_mut(&m) {
            r.path = Some(path);
        }
        t.by_real.insert((path.socket, path.remote), m);
        m
    }

    /// Sorts the `n` received batches of socket `id`: control datagrams
    /// out, QUIC kept (compacted to the front, under mapped addresses).
    /// Returns how many batches remain.
    fn sort_received(
        &self,
        id: SocketId,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        n: usize,
    ) -> usize {
        let now = Instant::now();
        let mut kept = 0;
        let mut t = self.table();
        for i in 0..n.min(bufs.len()).min(meta.len()) {
            let m = meta[i];
            let len = m.len.min(bufs[i].len());
            let stride = if m.stride == 0 { len.max(1) } else { m.stride };
            let data = &bufs[i][..len];
            let mut quic = 0usize;
            let mut other = 0usize;
            let mut relayed = 0usize;
            // The route of the batch's relay frames: one channel, from its
            // server, with QUIC inside.
            let mut channel: Option<(u64, SocketAddr)> = None;
            for seg in data.chunks(stride) {
                match seg.first() {
                    Some(&b) if is_quic(b) => quic += 1,
                    Some(&relay::MAGIC) => match relayed_quic(&t, m.addr, seg) {
                        Some((ch, mapped)) if channel.is_none_or(|(c, _)| c == ch) => {
                            channel = Some((ch, mapped));
                            relayed += 1;
                        }
                        _ => {
                            self.stats.relay_stray.fetch_add(1, Ordering::Relaxed);
                            other += 1;
                        }
                    },
                    Some(_) => other += 1,
                    None => {}
                }
            }
            if relayed > 0 && quic == 0 && other == 0 {
                // Unwrap in place: each segment loses its header, so the
                // stride shrinks by it too (the last may be shorter).
                let Some((_, mapped)) = channel else { continue };
                let new_len = strip_relay_headers(&mut bufs[i][..len], stride);
                self.stats
                    .relayed_in
                    .fetch_add(relayed as u64, Ordering::Relaxed);
                if let Some(r) = t.routes.get_mut(&mapped) {
                    if r.on_relay {
                        r.live.heard(now);
                    }
                }
                if kept != i {
                    let (front, back) = bufs.split_at_mut(i);
                    front[kept][..new_len].copy_from_slice(&back[0][..new_len]);
                }
                meta[kept] = RecvMeta {
                    addr: mapped,
                    len: new_len,
                    stride: stride.saturating_sub(relay::HEADER).max(1),
                    dst_ip: None,
                    ..m
                };
                kept += 1;
                continue;
            }
            if other > 0 || relayed > 0 {
                // A mixed batch cannot be handed over in place: relayed
                // packets (of any of our channels) go to quinn one by one
                // through the injection queue, control datagrams to the
                // driver; bare QUIC mixed with control datagrams is dropped
                // (QUIC retransmits it).
                let mut injected = 0;
                for seg in data.chunks(stride) {
                    match seg.first() {
                        Some(&b) if is_quic(b) => {}
                        Some(&relay::MAGIC) => {
                            if let Some((_, mapped)) = relayed_quic(&t, m.addr, seg) {
                                if let Some(r) = t.routes.get_mut(&mapped) {
                                    if r.on_relay {
                                        r.live.heard(now);
                                    }
                                }
                                self.queue_injected(mapped, &seg[relay::HEADER..]);
                                injected += 1;
                            }
                        }
                        Some(_) => self.divert_one(id, m.addr, seg),
                        None => {}
                    }
                }
                if injected > 0 {
                    self.wake_receiver();
                }
                if quic > 0 {
                    self.stats
                        .mixed_dropped
                        .fetch_add(quic as u64, Ordering::Relaxed);
                }
                continue;
            }
            if quic == 0 {
                continue;
            }
            self.stats.quic_in.fetch_add(quic as u64, Ordering::Relaxed);
            let path = Path {
                socket: id,
                remote: m.addr,
            };
            let mapped = self.route_in(&mut t, path, data, now);
            if let Some(r) = t.routes.get_mut(&mapped) {
                // Liveness is the current path's: a peer heard only on the
                // other one does not hide that ours is dead.
                if !r.on_relay {
                    r.live.heard(now);
                }
            }
            if kept != i {
                let (front, back) = bufs.split_at_mut(i);
                front[kept][..len].copy_from_slice(&back[0][..len]);
            }
            meta[kept] = RecvMeta {
                addr: mapped,
                dst_ip: None,
                ..m
            };
            kept += 1;
        }
        kept
    }

    /// Sends a QUIC transmit through `relay` from the main socket: each
    /// segment behind its relay header, as one GSO batch again.
    fn send_relayed(&self, relay: RelayPath, transmit: &Transmit<'_>) -> io::Result<()> {
        let seg = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        let header = relay::header(relay.channel);
        let count = transmit.contents.len().div_ceil(seg);
        let stream = self
            .stream
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(tx) = stream {
            // Over TCP: one record per packet; a full queue is loss.
            let mut rec = Vec::new();
            for chunk in transmit.contents.chunks(seg) {
                rec.clear();
                rec.extend_from_slice(&header);
                rec.extend_from_slice(chunk);
                if tx
                    .try_send(natpunch_proto::relay::stream::encode_record(&rec))
                    .is_ok()
                {
                    self.stats.relayed_out.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Ok(());
        }
        let mut buf = Vec::with_capacity(transmit.contents.len() + count * relay::HEADER);
        for chunk in transmit.contents.chunks(seg) {
            buf.extend_from_slice(&header);
            buf.extend_from_slice(chunk);
        }
        let t = Transmit {
            destination: relay.server,
            ecn: transmit.ecn,
            contents: &buf,
            segment_size: transmit.segment_size.map(|s| s + relay::HEADER),
            src_ip: None,
        };
        let slot = &self.main;
        let r = slot.io.try_io(Interest::WRITABLE, || {
            slot.state.send((&*slot.io).into(), &t)
        });
        match &r {
            Ok(()) => {
                self.stats
                    .relayed_out
                    .fetch_add(count as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.blocked.store(0, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        r
    }

    fn recv_from(
        &self,
        id: SocketId,
        slot: &Slot,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match slot.io.poll_recv_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            match slot.io.try_io(Interest::READABLE, || {
                slot.state.recv((&*slot.io).into(), bufs, meta)
            }) {
                Ok(n) => {
                    let kept = self.sort_received(id, bufs, meta, n);
                    if kept > 0 {
                        return Poll::Ready(Ok(kept));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // ICMP errors and the like: nothing quinn can act on.
                Err(e) => tracing::trace!(socket = id.0, error = %e, "receive error"),
            }
        }
    }
}

fn make_slot(s: UdpSocket) -> io::Result<Slot> {
    let state = UdpSocketState::new(quinn::udp::UdpSockRef::from(&s))?;
    Ok(Slot {
        io: Arc::new(s),
        state,
    })
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            fut: None,
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let (path, relay) = {
            let mut t = self.table();
            match t.routes.get_mut(&transmit.destination) {
                Some(r) => {
                    let l = &mut r.live;
                    l.first_unanswered.get_or_insert_with(Instant::now);
                    l.unanswered = l.unanswered.saturating_add(1);
                    (r.path, r.relay.filter(|_| r.on_relay))
                }
                None => (None, None),
            }
        };
        if let Some(relay) = relay {
            return self.send_relayed(relay, transmit);
        }
        let Some(path) = path else {
            // No path (yet, or any more): as good as lost, for quinn.
            self.stats.no_path.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let Some(slot) = self.slot(path.socket) else {
            match self.stream(path.socket) {
                Some(outlet) => {
                    let seg = transmit.segment_size.unwrap_or(transmit.contents.len());
                    self.send_stream(&outlet, path.remote, transmit.contents, seg);
                }
                None => {
                    self.stats.no_path.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Ok(());
        };
        let t = Transmit {
            destination: path.remote,
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: None,
        };
        let r = slot.io.try_io(Interest::WRITABLE, || {
            slot.state.send((&*slot.io).into(), &t)
        });
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.blocked.store(path.socket.0, Ordering::Relaxed);
        }
        r
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        {
            let mut r = self.receiver.lock().unwrap_or_else(|e| e.into_inner());
            if r.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                *r = Some(cx.waker().clone());
            }
        }
        let slots: Vec<(SocketId, Arc<Slot>)> = {
            let s = self.slots.read().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<(SocketId, Arc<Slot>)> =
                s.iter().map(|(id, slot)| (*id, slot.clone())).collect();
            v.sort_by_key(|(id, _)| *id);
            v
        };
        let n = self.take_injected(bufs, meta);
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        if slots.is_empty() {
            return Poll::Pending;
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % slots.len();
        for k in 0..slots.len() {
            let (id, slot) = &slots[(start + k) % slots.len()];
            match self.recv_from(*id, slot, cx, bufs, meta) {
                Poll::Ready(Ok(n)) => return Poll::Ready(Ok(n)),
                Poll::Ready(Err(e)) => {
                    tracing::trace!(socket = id.0, error = %e, "receive readiness error")
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        // quinn addresses every remote by a mapped IPv6 address.
        let port = self.main.io.local_addr()?.port();
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::UNSPECIFIED,
            port,
            0,
            0,
        )))
    }

    fn may_fragment(&self) -> bool {
        self.main.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.main.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.main.state.gro_segments()
    }
}

type WritableFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// Wakes one quinn task when the socket that last blocked can be written
/// again; each task gets its own, so no waker is overwritten.
struct Writable {
    socket: Arc<PathSocket>,
    fut: Option<WritableFuture>,
}

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable").finish_non_exhaustive()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let fut = this.fut.get_or_insert_with(|| {
            let id = SocketId(this.socket.blocked.load(Ordering::Relaxed));
            let io = this
                .socket
                .slot(id)
                .map_or_else(|| this.socket.main.io.clone(), |s| s.io.clone());
            Box::pin(async move { io.writable().await })
        });
        let r = fut.as_mut().poll(cx);
        if r.is_ready() {
            this.fut = None;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_byte_classes_do_not_overlap() {
        // STUN's first byte is 0..=3, our frames 0x2A/0x2B; QUIC ≥ 0x40.
        for b in 0u8..=3 {
            assert!(!is_quic(b));
        }
        assert!(!is_quic(0x2A) && !is_quic(0x2B));
        assert!(is_quic(0x40) && is_quic(0xC0) && is_quic(0xFF));
    }

    #[test]
    fn connection_ids_are_read_from_both_header_forms() {
        let cid = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut short = vec![0x41];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[9; 20]);
        assert_eq!(dcid(&short), Some(cid));
        let mut long = vec![0xC0, 0, 0, 0, 1, 8];
        long.extend_from_slice(&cid);
        long.extend_from_slice(&[0; 20]);
        assert_eq!(dcid(&long), Some(cid));
        // Another length, or too short: not ours.
        long[5] = 4;
        assert_eq!(dcid(&long), None);
        assert_eq!(dcid(&[0x41, 1, 2]), None);
    }

    #[test]
    fn mapped_addresses_are_recognised() {
        let mut t = Table::default();
        let m = t.add_route(None, Instant::now());
        assert!(is_mapped(&m));
        assert!(!is_mapped(&"127.0.0.1:1".parse().unwrap()));
        assert!(!is_mapped(&"[2001:db8::1]:1".parse().unwrap()));
        let m2 = t.add_route(None, Instant::now());
        assert_ne!(m, m2);
    }
}

//! The library API in 60 lines: an echo service between two peers behind
//! NATs.
//!
//! ```text
//! # terminal 1 (prints its peer ID, then echoes every stream back)
//! cargo run -p natpunch --example echo -- 203.0.113.10:3478
//! # terminal 2
//! cargo run -p natpunch --example echo -- 203.0.113.10:3478 <PEER_ID> "hello"
//! ```

use std::error::Error;

use natpunch::peer::PeerEvent;
use natpunch::proto::identity::{Identity, PeerId};
use natpunch::session::{Endpoint, EndpointConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let server = args
        .next()
        .ok_or("usage: echo SERVER:PORT [PEER_ID MESSAGE]")?;
    // A fresh identity each run; real programs keep theirs (see keyfile).
    let identity = Identity::from_seed(rand::random());
    let endpoint = Endpoint::bind(EndpointConfig::new(identity, server.parse()?))?;
    let mut events = endpoint.events().ok_or("events taken")?;

    match args.next() {
        None => {
            // Wait until registered, so the printed ID is reachable.
            while let Some(ev) = events.recv().await {
                if let PeerEvent::Registered { peer_id, .. } = ev {
                    println!("{peer_id}");
                    break;
                }
            }
            while let Some(conn) = endpoint.accept().await {
                tokio::spawn(async move {
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let msg = recv.read_to_end(64 * 1024).await.unwrap_or_default();
                        let _ = send.write_all(&msg).await;
                        let _ = send.finish();
                    }
                });
            }
        }
        Some(peer) => {
            let peer: PeerId = peer.parse()?;
            let message = args.next().unwrap_or_else(|| "hello".into());
            // Punches through both NATs, then a QUIC handshake in which the
            // peer proves it holds the key of `peer`.
            let conn = endpoint.connect(peer).await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(message.as_bytes()).await?;
            send.finish()?;
            let echoed = recv.read_to_end(64 * 1024).await?;
            println!("{}", String::from_utf8_lossy(&echoed));
            conn.close_and_wait(0, "done").await;
        }
    }
    Ok(())
}

//! The datagram path: one UDP socket that sends this node's status record to the partner and
//! hands every datagram it receives to the controller.
//!
//! The socket knows nothing of the record's contents: decoding, the pair id check and ordering by
//! (generation, sequence) are the controller's (pure code in `twinblock_pair`). A datagram from an
//! address other than the partner's configured one is still handed over: the record inside names
//! its sender and carries a CRC, and UDP source addresses prove nothing anyway.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Largest datagram accepted; status records are far smaller, anything bigger is dropped.
pub const MAX_DATAGRAM_BYTES: usize = 1024;

/// The bound UDP path.
#[derive(Debug, Clone)]
pub struct UdpPath {
    socket: Arc<UdpSocket>,
    partner: SocketAddr,
}

impl UdpPath {
    /// Binds `listen`; records go to `partner`.
    pub async fn bind(listen: SocketAddr, partner: SocketAddr) -> std::io::Result<UdpPath> {
        let socket = UdpSocket::bind(listen).await?;
        Ok(UdpPath {
            socket: Arc::new(socket),
            partner,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends one record. A send error (partner host unreachable, no route) is returned for the
    /// caller to count; the path simply stays silent, which is what the failure detector measures.
    pub async fn send(&self, record: &[u8]) -> std::io::Result<()> {
        self.socket.send_to(record, self.partner).await.map(|_| ())
    }

    /// Receives datagrams until the channel closes; each goes to `tx` as it arrived.
    pub async fn receive_into(self, tx: mpsc::Sender<Vec<u8>>) {
        let mut buf = vec![0u8; MAX_DATAGRAM_BYTES + 1];
        loop {
            match self.socket.recv_from(&mut buf).await {
                Ok((n, _from)) if n <= MAX_DATAGRAM_BYTES => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
                // Oversized: not ours; drop it without a log line per datagram.
                Ok(_) => {}
                // ICMP port-unreachable from an earlier send surfaces here on Linux: the partner
                // is down, which silence already tells.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    tracing::warn!("UDP heartbeat receive failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn datagrams_reach_the_partner_and_oversized_ones_are_dropped() {
        let a_addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b_addr = b.local_addr().unwrap();
        let a = UdpPath::bind(a_addr, b_addr).await.unwrap();
        let a_local = a.local_addr().unwrap();
        a.send(b"status-1").await.unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"status-1");
        assert_eq!(from, a_local);

        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(a.clone().receive_into(tx));
        b.send_to(&vec![7u8; MAX_DATAGRAM_BYTES + 10], a_local)
            .await
            .unwrap();
        b.send_to(b"status-2", a_local).await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"status-2", "the oversized datagram was dropped");
    }
}

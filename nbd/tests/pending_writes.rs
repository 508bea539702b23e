//! Small writes that wait after the reader's first poll (a mirrored write waiting for the
//! partner's ACK) are completed by the connection's writer task rather than a task each
//! (src/pending.rs). Here a device holds each write until the test releases it: replies of
//! writes finished in any order all arrive, each as soon as its write finishes; a disconnect
//! waits for them; and a write whose connection is gone, or whose writer was closed after the
//! shutdown grace period, still finishes on the device.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::Raw;
use tokio::io::DuplexStream;
use tokio::sync::oneshot;
use twinblock_nbd::mem::MemDevice;
use twinblock_nbd::proto::*;
use twinblock_nbd::{
    BlockDevice, DeviceCaps, DeviceResult, Export, Extent, Server, ServerConfig, ZeroFlags,
};

const BLOCK: u32 = 4096;

/// A memory device whose writes at a gated offset wait until the test opens the gate.
struct Gated {
    inner: MemDevice,
    gates: Mutex<HashMap<u64, oneshot::Receiver<()>>>,
    finished: AtomicUsize,
}

impl Gated {
    fn new() -> Arc<Gated> {
        Arc::new(Gated {
            inner: MemDevice::new(1 << 20),
            gates: Mutex::new(HashMap::new()),
            finished: AtomicUsize::new(0),
        })
    }

    /// Gates the next write at `offset`; the returned sender lets it finish.
    fn gate(&self, offset: u64) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        self.gates.lock().unwrap().insert(offset, rx);
        tx
    }

    fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }

    async fn wait_finished(&self, n: usize) {
        for _ in 0..400 {
            if self.finished() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{} of {n} writes finished on the device", self.finished());
    }
}

#[async_trait]
impl BlockDevice for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> DeviceCaps {
        DeviceCaps::default()
    }
    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        let gate = self.gates.lock().unwrap().remove(&offset);
        if let Some(gate) = gate {
            let _ = gate.await;
        }
        self.inner.write(offset, data, fua).await?;
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn flush(&self) -> DeviceResult<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> DeviceResult<()> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> DeviceResult<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> DeviceResult<Vec<Extent>> {
        self.inner.block_status(offset, len).await
    }
}

fn server(dev: Arc<Gated>, config: ServerConfig) -> Server {
    let s = Server::new(config);
    s.add_export(Export {
        name: "d".into(),
        description: String::new(),
        device: dev,
    })
    .unwrap();
    s
}

/// A client in transmission on export `d`, and the connection's task.
async fn connect(
    s: &Server,
) -> (
    Raw<DuplexStream>,
    tokio::task::JoinHandle<Result<(), twinblock_nbd::ConnectionError>>,
) {
    let (client, server_side) = tokio::io::duplex(4 << 20);
    let s = s.clone();
    let task = tokio::spawn(async move { s.handle_connection(server_side, "test").await });
    let mut c = Raw::start(client).await;
    c.go("d").await.unwrap();
    (c, task)
}

fn block(i: u64) -> Vec<u8> {
    vec![(i % 251) as u8 + 1; BLOCK as usize]
}

/// Sends gated writes with cookies `0..n` at block `i`; returns their gates.
async fn pending_writes(
    c: &mut Raw<DuplexStream>,
    dev: &Gated,
    n: u64,
) -> Vec<oneshot::Sender<()>> {
    let mut gates = Vec::new();
    for i in 0..n {
        gates.push(dev.gate(i * u64::from(BLOCK)));
        c.request(NBD_CMD_WRITE, i, i * u64::from(BLOCK), BLOCK, &block(i))
            .await;
    }
    gates
}

/// No reply within a short while.
async fn no_reply_yet(c: &mut Raw<DuplexStream>) {
    let mut probe = [0u8; 1];
    let got = tokio::time::timeout(
        Duration::from_millis(50),
        tokio::io::AsyncReadExt::read(&mut c.s, &mut probe),
    )
    .await;
    assert!(got.is_err(), "a reply came before its write finished");
}

#[tokio::test]
async fn each_waiting_write_is_answered_when_it_finishes_in_any_order() {
    let dev = Gated::new();
    let s = server(dev.clone(), ServerConfig::default());
    let (mut c, _task) = connect(&s).await;
    let mut gates = pending_writes(&mut c, &dev, 6).await;
    no_reply_yet(&mut c).await;
    // Last first, then the others in an order unrelated to arrival.
    for i in [5usize, 2, 4, 0, 3, 1] {
        let _ = std::mem::replace(&mut gates[i], oneshot::channel().0).send(());
        let (err, cookie, _) = c.simple(0).await;
        assert_eq!(
            (err, cookie),
            (0, i as u64),
            "the reply of the write just finished"
        );
    }
    for i in 0..6u64 {
        c.request(NBD_CMD_READ, 100 + i, i * u64::from(BLOCK), BLOCK, &[])
            .await;
        let (err, cookie, data) = c.simple(BLOCK as usize).await;
        assert_eq!((err, cookie), (0, 100 + i));
        assert!(data == block(i), "block {i} holds what was written");
    }
}

#[tokio::test]
async fn writes_finishing_together_are_all_answered() {
    let dev = Gated::new();
    let s = server(dev.clone(), ServerConfig::default());
    let (mut c, _task) = connect(&s).await;
    let n = 40;
    let gates = pending_writes(&mut c, &dev, n).await;
    // Interleaved with requests that finish at once (ungated writes and reads).
    c.request(
        NBD_CMD_WRITE,
        1000,
        200 * u64::from(BLOCK),
        BLOCK,
        &block(7),
    )
    .await;
    assert_eq!(c.simple(0).await, (0, 1000, vec![]));
    for g in gates {
        let _ = g.send(());
    }
    let mut cookies = BTreeSet::new();
    for _ in 0..n {
        let (err, cookie, _) = c.simple(0).await;
        assert_eq!(err, 0);
        assert!(cookies.insert(cookie), "cookie {cookie} answered twice");
    }
    assert_eq!(cookies, (0..n).collect::<BTreeSet<u64>>());
}

#[tokio::test]
async fn disconnect_waits_for_the_writes_still_waiting() {
    let dev = Gated::new();
    let s = server(dev.clone(), ServerConfig::default());
    let (mut c, task) = connect(&s).await;
    let gates = pending_writes(&mut c, &dev, 3).await;
    c.request(NBD_CMD_DISC, 99, 0, 0, &[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !task.is_finished(),
        "the connection closed with writes in flight"
    );
    for g in gates {
        let _ = g.send(());
    }
    let mut cookies = BTreeSet::new();
    for _ in 0..3 {
        let (err, cookie, _) = c.simple(0).await;
        assert_eq!(err, 0);
        cookies.insert(cookie);
    }
    assert_eq!(cookies, BTreeSet::from([0, 1, 2]));
    assert!(c.closed().await, "the server closes after the last reply");
    assert_eq!(dev.finished(), 3);
}

#[tokio::test]
async fn writes_of_a_vanished_client_still_finish_on_the_device() {
    let dev = Gated::new();
    let s = server(dev.clone(), ServerConfig::default());
    let (mut c, task) = connect(&s).await;
    let mut gates = pending_writes(&mut c, &dev, 3).await;
    no_reply_yet(&mut c).await;
    drop(c);
    // The first reply fails to go out: the writer ends, the other two are still waiting.
    let _ = gates.remove(0).send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the connection ends once its client is gone")
        .unwrap()
        .ok();
    for g in gates {
        let _ = g.send(());
    }
    dev.wait_finished(3).await;
}

#[tokio::test]
async fn writes_still_waiting_after_the_shutdown_grace_still_finish() {
    let dev = Gated::new();
    let s = server(
        dev.clone(),
        ServerConfig {
            shutdown_grace: Duration::from_millis(100),
            ..ServerConfig::default()
        },
    );
    let (mut c, task) = connect(&s).await;
    let gates = pending_writes(&mut c, &dev, 2).await;
    no_reply_yet(&mut c).await;
    s.remove_export("d").unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the connection closes after the grace period")
        .unwrap()
        .ok();
    assert_eq!(dev.finished(), 0);
    for g in gates {
        let _ = g.send(());
    }
    dev.wait_finished(2).await;
}

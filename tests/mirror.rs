//! The NVRAM mirror end to end: two `twinblockd` processes, real NBD clients (`qemu-io`) under a
//! verifying workload, a fault-injecting proxy on the interconnect, SIGSTOP of the partner, and
//! hostile interconnect peers.
//!
//! Each test starts its own pair on free loopback ports (see `mirror/harness.rs`). A missing
//! client skips the test with a message, or fails it when env `CI` is set.

mod common;
#[path = "mirror/harness.rs"]
mod harness;

use harness::{start_pair, PairSpec, TestPair};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use twinblock_pair::wire::{
    encode_frame, split_frame, Dialer, FrameKind, FrameOpener, FrameSealer, Identity, LogReset,
    Message, PairKey, RecordFrame, SessionKeys, VolumeAnnounce,
};

const BLOCK: u64 = 4096;
/// Blocks the workload writes (an 8 MiB window).
const BLOCKS: u64 = 2048;
const SYNC_TIMEOUT: Duration = Duration::from_secs(15);

fn qemu_io(uri: &str, cmds: &[String]) -> Result<(), String> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    match common::run_with_timeout(&mut c, Duration::from_secs(60)) {
        Ok(out)
            if out.status.success()
                && !out.stdout.contains("error")
                && !out.stderr.contains("rror") =>
        {
            Ok(())
        }
        Ok(out) => Err(out.describe()),
        Err(e) => Err(e),
    }
}

/// What every block should hold (its pattern byte), for read-back verification.
#[derive(Default, Clone)]
struct Model(Arc<Mutex<BTreeMap<u64, u8>>>);

impl Model {
    /// Writes `n` blocks concurrently (aio) and flushes; records them once acknowledged.
    fn write_batch(&self, uri: &str, n: u64, round: u64) -> Result<(), String> {
        let mut cmds = Vec::new();
        let mut wrote = Vec::new();
        for i in 0..n {
            let block = (round * 97 + i * 31) % BLOCKS;
            let pattern = ((round * 7 + i) % 250 + 1) as u8;
            if wrote.iter().any(|(b, _)| *b == block) {
                continue;
            }
            cmds.push(format!("aio_write -P {pattern} {} {BLOCK}", block * BLOCK));
            wrote.push((block, pattern));
        }
        cmds.push("aio_flush".into());
        qemu_io(uri, &cmds)?;
        let mut m = self.0.lock().unwrap();
        for (b, p) in wrote {
            m.insert(b, p);
        }
        Ok(())
    }

    fn verify(&self, uri: &str) {
        let cmds: Vec<String> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(b, p)| format!("read -P {p} {} {BLOCK}", b * BLOCK))
            .collect();
        assert!(!cmds.is_empty());
        for chunk in cmds.chunks(256) {
            if let Err(e) = qemu_io(uri, chunk) {
                panic!("read-back of acknowledged writes failed:\n{e}");
            }
        }
    }
}

/// A writer thread running batches until stopped; counts acknowledged batches.
struct Workload {
    stop: Arc<AtomicBool>,
    batches: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Workload {
    fn start(uri: String, model: Model) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let batches = Arc::new(AtomicU64::new(0));
        let (s, b) = (stop.clone(), batches.clone());
        let thread = std::thread::spawn(move || {
            let mut round = 0;
            while !s.load(Ordering::SeqCst) {
                model.write_batch(&uri, 8, round)?;
                b.fetch_add(1, Ordering::SeqCst);
                round += 1;
            }
            Ok(())
        });
        Workload {
            stop,
            batches,
            thread: Some(thread),
        }
    }

    fn batches(&self) -> u64 {
        self.batches.load(Ordering::SeqCst)
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if let Err(e) = t.join().expect("workload thread") {
                panic!("workload write failed: {e}");
            }
        }
    }
}

/// (seq, CRC) of each record as the admin API lists them.
fn record_list(v: &serde_json::Value) -> Vec<(u64, u64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|r| (r["seq"].as_u64().unwrap(), r["crc"].as_u64().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the partner's copy of `owner`'s volume lists exactly the owner's unretired
/// records (seq and CRC); returns them.
fn assert_copy_complete(pair: &TestPair, owner: usize) -> Vec<(u64, u64)> {
    let vol = format!("r{owner}");
    let (o, p) = (&pair.nodes[owner], &pair.nodes[1 - owner]);
    let start = Instant::now();
    loop {
        let own = record_list(&o.admin("mirror_records")["own"][&vol]);
        let copy = record_list(&p.admin("mirror_records")["partner"][&vol]);
        if own == copy && !own.is_empty() {
            return own;
        }
        if start.elapsed() > SYNC_TIMEOUT {
            let missing: Vec<_> = own.iter().filter(|r| !copy.contains(r)).take(10).collect();
            panic!(
                "partner copy of {vol} incomplete: owner has {} records, copy {}; missing e.g. {missing:?}",
                own.len(),
                copy.len()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn partner_copy_holds_every_unretired_record() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let mut pair = start_pair(PairSpec {
        cp_interval_ms: 60_000,
        ..PairSpec::default()
    });
    pair.wait_in_sync(SYNC_TIMEOUT);
    let models = [Model::default(), Model::default()];
    std::thread::scope(|s| {
        for (n, m) in pair.nodes.iter().zip(&models) {
            let uri = n.uri();
            s.spawn(move || {
                for round in 0..4 {
                    m.write_batch(&uri, 32, round).unwrap();
                }
            });
        }
    });
    let own0 = assert_copy_complete(&pair, 0);
    assert_copy_complete(&pair, 1);
    assert!(own0.len() >= 100, "only {} records", own0.len());
    let link = pair.nodes[0].admin("status")["pair"]["interconnect"]["outbound"].clone();
    let (sends, records) = (
        link["sends"].as_u64().unwrap(),
        link["records_streamed"].as_u64().unwrap(),
    );
    eprintln!("node 0 streamed {records} records in {sends} sends");
    // io_uring carries the records wherever the kernel allows it (the tokio path otherwise).
    let sender = link["sender"].as_str().unwrap_or_default().to_string();
    eprintln!("node 0's interconnect sender: {sender}");
    let uring_allowed = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|v| v.trim() == "0")
        .unwrap_or(false);
    if uring_allowed {
        assert_eq!(sender, "io_uring", "{link}");
    } else {
        assert!(sender.starts_with("tokio (io_uring unavailable"), "{link}");
    }
    assert!(
        records > sends,
        "concurrent writes never shared a send: {link}"
    );
    for (n, m) in pair.nodes.iter().zip(&models) {
        m.verify(&n.uri());
    }
    // The copy survives the receiving node's death: read it offline, as `twinctl journal dump`.
    pair.nodes[0].kill9();
    pair.nodes[1].kill9();
    let dump = twinblock_journal::dump::dump_file(&pair.nodes[1].partner_copy_path("r0")).unwrap();
    let partner = dump.regions.iter().find(|r| r.name == "partner").unwrap();
    let seqs: Vec<u64> = partner.records.iter().map(|r| r.seq).collect();
    assert!(partner.records.iter().all(|r| r.crc_ok));
    assert_eq!(seqs, own0.iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(
        partner.control.unwrap().store_id != [0; 16],
        "copy not bound to the partner's array"
    );
}

#[test]
fn link_cut_mid_workload_degrades_then_resyncs() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let pair = start_pair(PairSpec {
        mirror_timeout_ms: 300,
        ..PairSpec::default()
    });
    pair.wait_in_sync(SYNC_TIMEOUT);
    let model = Model::default();
    let work = Workload::start(pair.nodes[0].uri(), model.clone());
    std::thread::sleep(Duration::from_millis(500));
    pair.proxy.cut();
    let n0 = &pair.nodes[0];
    n0.wait_mirror("out of sync after the cut", Duration::from_secs(5), |m| {
        m["in_sync"] == false && m["out_of_sync_reason"].is_string()
    });
    let reason = n0.mirror()["out_of_sync_reason"].clone();
    let before = work.batches();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        work.batches() > before + 2,
        "writes did not continue alone (reason {reason})"
    );
    pair.proxy.restore();
    n0.wait_mirror("back in sync", SYNC_TIMEOUT, |m| m["in_sync"] == true);
    std::thread::sleep(Duration::from_millis(300));
    work.finish();
    assert!(n0.mirror()["resyncs"].as_u64().unwrap() >= 2);
    model.verify(&n0.uri());
    assert_copy_complete(&pair, 0);
}

#[test]
fn stopped_partner_holds_writes_for_the_bounded_wait_only() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let timeout_ms = 800;
    let pair = start_pair(PairSpec {
        mirror_timeout_ms: timeout_ms,
        ..PairSpec::default()
    });
    pair.wait_in_sync(SYNC_TIMEOUT);
    let n0 = &pair.nodes[0];
    let write = |pattern: u8| {
        let t = Instant::now();
        qemu_io(&n0.uri(), &[format!("write -P {pattern} 0 4k")]).unwrap();
        t.elapsed()
    };
    let warm = write(1);
    pair.nodes[1].signal("-STOP");
    let blocked = write(2);
    assert!(
        blocked >= Duration::from_millis(timeout_ms - 50),
        "a write was acknowledged after {blocked:?}, before the stopped partner persisted it (warm write {warm:?})"
    );
    let m = n0.mirror();
    assert_eq!(m["in_sync"], false, "{m}");
    assert!(
        m["out_of_sync_reason"]
            .as_str()
            .unwrap()
            .contains("did not acknowledge"),
        "{m}"
    );
    let alone = write(3);
    assert!(
        alone < Duration::from_millis(timeout_ms / 2),
        "out of sync, yet a write waited {alone:?}"
    );
    pair.nodes[1].signal("-CONT");
    n0.wait_mirror("back in sync after SIGCONT", SYNC_TIMEOUT, |m| {
        m["in_sync"] == true
    });
    qemu_io(&n0.uri(), &["read -P 3 0 4k".into()]).unwrap();
    assert_copy_complete(&pair, 0);
}

#[test]
fn lost_nvram_is_fetched_back_from_the_partner_and_nothing_acknowledged_is_lost() {
    if !common::require_tool("qemu-io") {
        return;
    }
    // CPs an hour apart: every acknowledged write stays only in the logs (own and copy).
    let mut pair = start_pair(PairSpec {
        cp_interval_ms: 3_600_000,
        ..PairSpec::default()
    });
    pair.wait_in_sync(SYNC_TIMEOUT);
    let model = Model::default();
    for round in 0..4 {
        model.write_batch(&pair.nodes[0].uri(), 32, round).unwrap();
    }
    let own = assert_copy_complete(&pair, 0);
    let before = pair.nodes[0].admin("volume_list")[0]["journal"].clone();
    assert!(
        before["dirty_bytes"].as_u64().unwrap() > 0,
        "the writes should be only in the logs: {before}"
    );
    // The power cut of node 0: the process dies and its NVRAM file (RAM) is gone.
    pair.nodes[0].kill9();
    let nvram = pair.nodes[0].dir.join("r0.nvram");
    std::fs::remove_file(&nvram).unwrap();
    pair.nodes[0].start();
    let n0 = &pair.nodes[0];
    model.verify(&n0.uri());
    let log = n0.log();
    assert!(
        log.contains("own NVRAM log restored from the partner's copy"),
        "log:\n{log}"
    );
    let status = n0.admin("status");
    assert!(status.get("volumes_held").is_none(), "{status}");
    let volume = n0.admin("volume_list")[0].clone();
    assert!(
        volume["history"]
            .to_string()
            .contains("nvram-restored-from-partner"),
        "{volume}"
    );
    assert!(
        volume["journal_recovery"]["scan"]["records_valid"]
            .as_u64()
            .unwrap()
            > 0,
        "recovery found no restored record: {volume}"
    );
    // The partner's copy accepts the restarted log (same generation line) and is whole again.
    n0.wait_mirror("in sync after the restore", SYNC_TIMEOUT, |m| {
        m["in_sync"] == true
    });
    let after = assert_copy_complete(&pair, 0);
    assert!(
        own.iter().all(|r| r.0 < after[0].0 || after.contains(r)),
        "records lost from the copy after the restore"
    );
    // New writes mirror as before.
    model.write_batch(&n0.uri(), 8, 99).unwrap();
    model.verify(&n0.uri());
}

#[test]
fn lost_nvram_with_the_partner_unreachable_holds_the_volume() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let mut pair = start_pair(PairSpec {
        cp_interval_ms: 3_600_000,
        ..PairSpec::default()
    });
    pair.wait_in_sync(SYNC_TIMEOUT);
    let model = Model::default();
    model.write_batch(&pair.nodes[0].uri(), 16, 0).unwrap();
    assert_copy_complete(&pair, 0);
    pair.nodes[0].kill9();
    std::fs::remove_file(pair.nodes[0].dir.join("r0.nvram")).unwrap();
    pair.proxy.cut();
    // The NBD listener is up even with the only volume held.
    pair.nodes[0].start();
    let status = pair.nodes[0].admin("status");
    let held = &status["volumes_held"][0];
    assert_eq!(held["name"], "r0", "{status}");
    assert!(
        held["partner_fetch_error"].is_string(),
        "the fetch failure is reported: {status}"
    );
    // Once the partner is reachable again, a restart fetches the copy (still whole: the held
    // volume never wrote) and nothing is lost.
    pair.proxy.restore();
    pair.nodes[0].kill9();
    pair.nodes[0].start();
    model.verify(&pair.nodes[0].uri());
}

/// Reads one frame; `None` when the peer closed the connection.
/// The journal status of node `n`'s own journaled volume.
fn journal_status(n: &harness::Node) -> serde_json::Value {
    n.admin_request(&format!(
        "{{\"op\":\"volume_show\",\"name\":\"r{}\"}}",
        n.id
    ))["journal"]
        .clone()
}

fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

#[test]
fn flush_on_tmpfs_completes_on_the_partner_ack_in_sync_and_on_a_cp_out_of_sync() {
    if !common::require_tool("qemu-io") {
        return;
    }
    // NVRAM in `none` mode (what tmpfs gives), and no timer CPs during the test: a CP seen is
    // one a FLUSH asked for.
    let pair = start_pair(PairSpec {
        cp_interval_ms: 600_000,
        mirror_timeout_ms: 300,
        persistence: "none",
        ..PairSpec::default()
    });
    pair.wait_in_sync(SYNC_TIMEOUT);
    let n0 = &pair.nodes[0];
    assert!(
        n0.log().contains("the partner runs on THIS machine"),
        "the startup line does not say that both nodes share this machine's power"
    );
    let before = journal_status(n0);
    assert_eq!(before["ack_survives_power_loss"], false, "{before}");
    qemu_io(&n0.uri(), &["write -P 5 0 4k".into(), "flush".into()]).unwrap();
    let in_sync = journal_status(n0);
    assert!(
        counter(&in_sync, "flushes_by_partner") > counter(&before, "flushes_by_partner"),
        "the FLUSH was not completed by the partner: {in_sync}"
    );
    assert_eq!(
        counter(&in_sync, "flushes_by_cp"),
        counter(&before, "flushes_by_cp"),
        "{in_sync}"
    );
    assert_eq!(
        counter(&in_sync, "cps_done"),
        counter(&before, "cps_done"),
        "a CP ran for a FLUSH the partner covered: {in_sync}"
    );
    // Out of sync: the next write waits out the bounded wait, then FLUSH needs a CP.
    pair.proxy.cut();
    qemu_io(&n0.uri(), &["write -P 6 8k 4k".into(), "flush".into()]).unwrap();
    let alone = journal_status(n0);
    assert_eq!(n0.mirror()["in_sync"], false);
    assert!(
        counter(&alone, "flushes_by_cp") > counter(&in_sync, "flushes_by_cp"),
        "{alone}"
    );
    assert!(
        counter(&alone, "cps_done") > counter(&in_sync, "cps_done"),
        "{alone}"
    );
    qemu_io(&n0.uri(), &["read -P 6 8k 4k".into()]).unwrap();
}

fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(FrameKind, Vec<u8>)> {
    loop {
        if let Ok(Some(f)) = split_frame(buf) {
            let body = buf[f.body_start..f.total].to_vec();
            buf.drain(..f.total);
            return Some((f.kind, body));
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads until the peer closes; returns the kinds of frames it sent first.
fn until_closed(s: &mut TcpStream, buf: &mut Vec<u8>) -> Vec<FrameKind> {
    let mut kinds = Vec::new();
    while let Some((k, _)) = read_frame(s, buf) {
        kinds.push(k);
        assert!(kinds.len() < 100, "the node keeps talking to a bad peer");
    }
    kinds
}

fn connect(pair: &TestPair) -> TcpStream {
    let s = TcpStream::connect(pair.nodes[1].interconnect).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn identity(node: u32, pair_id: [u8; 16]) -> Identity {
    Identity {
        pair_id,
        node_id: node,
        partner_id: 1,
        generation: 1,
    }
}

const EVIL: u64 = 999;

fn evil_volume() -> Vec<VolumeAnnounce> {
    vec![VolumeAnnounce {
        volume: EVIL,
        name: "evil".into(),
        generation: 1,
        log_bytes: 64 * 1024,
        store_id: [1; 16],
    }]
}

/// Reads one frame sealed for this connection (after the handshake).
fn read_sealed(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    opener: &mut FrameOpener,
) -> Option<(FrameKind, Vec<u8>)> {
    loop {
        if let Some(f) = opener.open(buf).expect("the node's frames are sealed") {
            let body = buf[f.body_start..f.total].to_vec();
            buf.drain(..f.total);
            return Some((f.kind, body));
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sealed frames a test sends after the handshake.
fn sealed(seal: &mut FrameSealer, msgs: &[&Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        m.encode_with(seal, &mut out);
    }
    out
}

/// A complete handshake as node 0; returns the stream, the frames it sent, and the keys.
fn handshake(pair: &TestPair, nonce: [u8; 32]) -> (TcpStream, Vec<u8>, Vec<u8>, SessionKeys) {
    let pair_id = *uuid::Uuid::parse_str(harness::PAIR_ID).unwrap().as_bytes();
    let key = PairKey::new(pair.key().trim_ascii_end().to_vec()).unwrap();
    let mut s = connect(pair);
    let mut buf = Vec::new();
    let (d, hello) = Dialer::start(identity(0, pair_id), key, nonce);
    s.write_all(&hello).unwrap();
    let (k, body) = read_frame(&mut s, &mut buf).expect("challenge");
    let (d, auth) = d.on_challenge(k, &body, &evil_volume()).unwrap();
    s.write_all(&auth).unwrap();
    let (k, body) = read_frame(&mut s, &mut buf).expect("accept");
    let peer = d.on_reply(k, &body).unwrap();
    (s, hello, auth, peer.keys)
}

fn evil_record(seq: u64, corrupt: bool) -> Vec<u8> {
    use twinblock_journal::format::{encode_record, RecordHeader, RecordKind};
    let h = RecordHeader {
        kind: RecordKind::Write,
        generation: 1,
        seq,
        volume_id: EVIL,
        offset: 0,
        length: 64,
        payload_bytes: 64,
    };
    let mut r = encode_record(&h, &[7; 64]);
    if corrupt {
        r[100] ^= 1;
    }
    r
}

#[test]
fn bad_interconnect_input_is_refused_and_nothing_stored() {
    if !common::require_tool("qemu-io") {
        return;
    }
    // Node 0 never reaches node 1, so the test can speak as node 0.
    let pair = start_pair(PairSpec {
        node0_isolated: true,
        ..PairSpec::default()
    });
    let pair_id = *uuid::Uuid::parse_str(harness::PAIR_ID).unwrap().as_bytes();
    let key = || PairKey::new(pair.key().trim_ascii_end().to_vec()).unwrap();
    let mut buf = Vec::new();

    // Garbage.
    let mut s = connect(&pair);
    s.write_all(&[0xff; 200]).unwrap();
    assert!(until_closed(&mut s, &mut buf).is_empty());

    // Wrong protocol version, wrong pair, wrong node id: each answered with a REJECT, then closed.
    let (_, hello) = Dialer::start(identity(0, pair_id), key(), rand::random());
    let mut body = hello[12..].to_vec();
    body[8..12].copy_from_slice(&99u32.to_le_bytes());
    let mut wrong_version = Vec::new();
    encode_frame(&mut wrong_version, FrameKind::Hello, &[&body]);
    let (_, wrong_pair) = Dialer::start(identity(0, [3; 16]), key(), rand::random());
    let (_, wrong_node) = Dialer::start(identity(5, pair_id), key(), rand::random());
    for (what, hello) in [
        ("version", wrong_version),
        ("pair", wrong_pair),
        ("node", wrong_node),
    ] {
        let mut s = connect(&pair);
        s.write_all(&hello).unwrap();
        buf.clear();
        assert_eq!(
            until_closed(&mut s, &mut buf),
            vec![FrameKind::Reject],
            "wrong {what}"
        );
    }

    // Wrong key: the AUTH's MAC does not verify.
    let mut s = connect(&pair);
    let (_, hello) = Dialer::start(identity(0, pair_id), key(), rand::random());
    s.write_all(&hello).unwrap();
    buf.clear();
    assert_eq!(
        read_frame(&mut s, &mut buf).unwrap().0,
        FrameKind::Challenge
    );
    let mut auth = Vec::new();
    encode_frame(&mut auth, FrameKind::Auth, &[&[0x42; 32], &[0; 8]]);
    s.write_all(&auth).unwrap();
    assert_eq!(until_closed(&mut s, &mut buf), vec![FrameKind::Reject]);

    // A recorded handshake replayed.
    let (s1, hello, auth, _) = handshake(&pair, [0x33; 32]);
    drop(s1);
    let mut s = connect(&pair);
    s.write_all(&hello).unwrap();
    s.write_all(&auth).unwrap();
    buf.clear();
    assert_eq!(until_closed(&mut s, &mut buf), vec![FrameKind::Reject]);

    // After a valid handshake: a record with a bad CRC, a frame with a bad frame CRC, a record
    // for an unknown volume: each drops the connection, nothing is stored.
    let reset = Message::LogReset(LogReset {
        volume: EVIL,
        generation: 1,
        tail_offset: 0,
        tail_seq: 1,
    });
    let record = |volume, corrupt| {
        Message::Record(RecordFrame {
            volume,
            log_offset: 0,
            seq: 1,
            record: evil_record(1, corrupt),
        })
    };
    // Each case: the frames after LOG_RESET, made with the connection's sealer.
    type Case<'a> = (&'static str, Box<dyn Fn(&mut FrameSealer) -> Vec<u8> + 'a>);
    let cases: Vec<Case<'_>> = vec![
        (
            "bad record CRC",
            Box::new(|w| sealed(w, &[&record(EVIL, true)])),
        ),
        (
            "bad frame CRC",
            Box::new(|w| {
                let mut b = sealed(w, &[&record(EVIL, false)]);
                let last = b.len() - 1;
                b[last] ^= 1;
                b
            }),
        ),
        (
            "unknown volume",
            Box::new(|w| sealed(w, &[&record(12345, false)])),
        ),
        (
            // The frame CRC is recomputed, as anyone on the link could: only the MAC tells.
            "tampered frame",
            Box::new(|w| {
                let mut b = sealed(w, &[&record(EVIL, false)]);
                let last = b.len() - 1;
                b[last] ^= 1;
                let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..8]), &b[12..]);
                b[8..12].copy_from_slice(&crc.to_le_bytes());
                b
            }),
        ),
        (
            // The LOG_RESET frame sent again, byte for byte, instead of a record.
            "replayed frame",
            Box::new(|_| Vec::new()),
        ),
        (
            "unsealed frame",
            Box::new(|_| {
                let mut b = Vec::new();
                record(EVIL, false).encode(&mut b);
                b
            }),
        ),
    ];
    for (what, frames) in cases {
        let (mut s, _, _, keys) = handshake(&pair, rand::random());
        let (mut seal, mut open) = keys.dialer();
        let first = sealed(&mut seal, &[&reset]);
        s.write_all(&first).unwrap();
        let rest = frames(&mut seal);
        s.write_all(if rest.is_empty() { &first } else { &rest })
            .unwrap();
        buf.clear();
        let mut kinds = Vec::new();
        while let Some((k, _)) = read_sealed(&mut s, &mut buf, &mut open) {
            kinds.push(k);
            assert!(kinds.len() < 100, "the node keeps talking to a bad peer");
        }
        assert!(
            kinds.iter().all(|k| *k == FrameKind::Ack),
            "{what}: {kinds:?}"
        );
        let stored = record_list(&pair.nodes[1].admin("mirror_records")["partner"]["evil"]);
        assert!(stored.is_empty(), "{what}: stored {stored:?}");
        let named = match what {
            "tampered frame" | "replayed frame" => Some("failed its MAC"),
            "unsealed frame" => Some("unsealed"),
            _ => None,
        };
        if let Some(named) = named {
            // The node records why it dropped the connection right after closing it.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let status = pair.nodes[1].admin("status");
                let err = status["pair"]["interconnect"]["inbound"]["last_error"].to_string();
                if err.contains(named) {
                    break;
                }
                assert!(Instant::now() < deadline, "{what}: last error {err}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    // The connection survives nothing bad; a good record is stored (the test can tell).
    let (mut s, _, _, keys) = handshake(&pair, rand::random());
    let (mut seal, mut open) = keys.dialer();
    s.write_all(&sealed(&mut seal, &[&reset, &record(EVIL, false)]))
        .unwrap();
    buf.clear();
    let (k, body) = read_sealed(&mut s, &mut buf, &mut open).unwrap();
    assert_eq!(
        Message::decode(k, &body).unwrap(),
        Message::Ack {
            volume: EVIL,
            seq: 1
        }
    );
    drop(s);
    let stored = record_list(&pair.nodes[1].admin("mirror_records")["partner"]["evil"]);
    assert_eq!(stored.len(), 1);

    // Both nodes keep serving.
    for n in &pair.nodes {
        qemu_io(
            &n.uri(),
            &["write -P 9 0 4k".into(), "read -P 9 0 4k".into()],
        )
        .unwrap();
    }
    assert!(pair.nodes[1].log().contains("dropped"));
}

//! The mirror hook and the partner region together: every record a volume appends is shipped,
//! stored at the same log offset in the partner's NVRAM, and the partner's scan finds the same
//! live data records as the owner's (what a takeover would replay).

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use twinblock_journal::format::RecordKind;
use twinblock_journal::{
    replay_region, JournaledVolume, MemBacking, MirrorHook, MirrorOutcome, Nvram, NvramConfig,
    PartnerRegion, VolumeConfig,
};

struct LocalMirror {
    partner: Mutex<PartnerRegion>,
}

#[async_trait]
impl MirrorHook for LocalMirror {
    fn enabled(&self) -> bool {
        true
    }
    async fn ship(&self, log_offset: u64, _seq: u64, record: Bytes) -> MirrorOutcome {
        tokio::task::yield_now().await;
        match self.partner.lock().unwrap().receive(log_offset, &record) {
            Ok(()) => MirrorOutcome::Mirrored,
            Err(e) => panic!("partner refused a record: {e}"),
        }
    }
    fn log_reset(&self, generation: u64, tail_offset: u64, tail_seq: u64) {
        self.partner
            .lock()
            .unwrap()
            .reset(generation, tail_offset, tail_seq)
            .unwrap();
    }
    /// Every record is persisted in the partner region before `ship` returns, and the test
    /// flushes only after every write returned: the partner holds everything, so FLUSH needs no
    /// CP (and the live logs compared below stay live).
    fn partner_durable_seq(&self) -> Option<u64> {
        Some(u64::MAX)
    }
}

fn cfg(dir: &Path, node: u32) -> NvramConfig {
    NvramConfig {
        path: dir.join(format!("node{node}.img")),
        log_bytes_per_region: 128 * 1024,
        ..NvramConfig::new(node, [4; 16])
    }
}

#[tokio::test]
async fn partner_region_mirrors_live_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut partner_nv = Nvram::open(&cfg(dir.path(), 1)).unwrap();
    let mirror = Arc::new(LocalMirror {
        partner: Mutex::new(partner_nv.take_partner().unwrap()),
    });
    let mem = MemBacking::with_yields(1 << 20, 4096);
    let vcfg = VolumeConfig {
        cp_interval_ms: 3_600_000,
        cp_fill_percent: 60,
        max_record_payload_bytes: 8192,
        ..VolumeConfig::default()
    };
    let vol = Arc::new(
        JournaledVolume::open_with_mirror(
            Nvram::open(&cfg(dir.path(), 0)).unwrap(),
            mem.clone(),
            3,
            vcfg,
            mirror.clone(),
        )
        .await
        .unwrap(),
    );
    // Concurrent writers; enough volume to wrap the 128 KiB log several times.
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let vol = Arc::clone(&vol);
        tasks.push(tokio::spawn(async move {
            for i in 0..60u64 {
                let at = ((t * 60 + i) % 200) * 4096;
                vol.write(at, Bytes::from(vec![(t * 60 + i) as u8; 4096]))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    vol.flush().await.unwrap();
    assert!(vol.status().cps_done >= 2, "{:?}", vol.status());

    // The owner's live log and the partner's copy hold the same data records.
    let own_path = dir.path().join("node0.img");
    let own = twinblock_journal::dump::dump_file(&own_path).unwrap();
    let data = |recs: &[twinblock_journal::dump::RecordDump]| -> Vec<(u64, u64, u64)> {
        recs.iter()
            .filter(|r| r.kind == RecordKind::Write)
            .map(|r| (r.seq, r.log_offset, r.offset))
            .collect()
    };
    let own_live = data(&own.regions[0].records);
    let partner_scan = mirror.partner.lock().unwrap().scan();
    let partner_live: Vec<(u64, u64, u64)> = partner_scan
        .records
        .iter()
        .filter(|r| r.header.kind == RecordKind::Write)
        .map(|r| (r.header.seq, r.log_offset, r.header.offset))
        .collect();
    assert!(!own_live.is_empty());
    assert!(own.regions[0].scan.stop.is_clean_end(), "{own}");
    assert_eq!(partner_live, own_live);
    assert!(
        partner_scan.report.stop.is_clean_end(),
        "{:?}",
        partner_scan.report
    );
    // The TRANSITION records carry the mirrored state.
    let text = own.to_string();
    assert!(text.contains("mirrored"), "{text}");

    // Takeover: the owner dies (its array loses what was not flushed), the partner imports the
    // array and replays its mirrored copy: the array then reads as the owner's volume did.
    vol.checkpoint().await.unwrap();
    // Let a fill-triggered CP the flusher may still have pending run first.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    vol.checkpoint().await.unwrap();
    for b in [3u64, 4, 150] {
        vol.write(b * 4096, Bytes::from(vec![0xee; 4096]))
            .await
            .unwrap();
    }
    let view = vol.read(0, 200 * 4096).await.unwrap();
    drop(vol);
    mem.crash();
    let mirror = Arc::try_unwrap(mirror)
        .ok()
        .expect("the volume was dropped, nothing else holds the mirror");
    let partner = mirror.partner.into_inner().unwrap();
    let report = replay_region(partner.region(), &mem, 3, false)
        .await
        .unwrap();
    assert_eq!(report.replayed_records, 3, "{report:?}");
    assert_eq!(&mem.contents()[..200 * 4096], &view[..]);
}

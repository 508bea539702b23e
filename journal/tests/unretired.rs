//! `JournaledVolume::unretired_records`: the resync snapshot of the own log. Fed to an empty
//! partner region after a LOG_RESET to its tail, it must reproduce the owner's live log exactly.

use bytes::Bytes;
use twinblock_journal::{JournaledVolume, MemBacking, Nvram, NvramConfig, VolumeConfig};

fn cfg(dir: &std::path::Path, node: u32) -> NvramConfig {
    NvramConfig {
        path: dir.join(format!("node{node}.img")),
        log_bytes_per_region: 128 * 1024,
        ..NvramConfig::new(node, [4; 16])
    }
}

#[tokio::test]
async fn snapshot_of_unretired_records_rebuilds_the_partner_copy() {
    let dir = tempfile::tempdir().unwrap();
    let vcfg = VolumeConfig {
        cp_interval_ms: 3_600_000,
        max_record_payload_bytes: 8192,
        ..VolumeConfig::default()
    };
    let vol = JournaledVolume::open(
        Nvram::open(&cfg(dir.path(), 0)).unwrap(),
        MemBacking::new(1 << 20, 4096),
        3,
        vcfg,
    )
    .await
    .unwrap();
    for round in 0..3u64 {
        // Enough to wrap the 128 KiB log: CPs retire records in between.
        for i in 0..10u64 {
            vol.write(
                ((round * 10 + i) % 64) * 4096,
                Bytes::from(vec![i as u8; 4096]),
            )
            .await
            .unwrap();
        }
        vol.checkpoint().await.unwrap();
    }
    for i in 0..5u64 {
        vol.write(i * 4096, Bytes::from(vec![0xee; 4096]))
            .await
            .unwrap();
    }
    let snap = vol.unretired_records();
    let seqs: Vec<u64> = snap.records.iter().map(|r| r.seq).collect();
    let expected: Vec<u64> = (snap.tail_seq..snap.next_seq).collect();
    assert_eq!(
        seqs, expected,
        "the snapshot is the contiguous run tail..head"
    );
    assert!(snap.records.len() >= 5);

    let mut partner_nv = Nvram::open(&cfg(dir.path(), 1)).unwrap();
    let mut partner = partner_nv.take_partner().unwrap();
    partner
        .reset(snap.generation, snap.tail_offset, snap.tail_seq)
        .unwrap();
    for r in &snap.records {
        partner.receive(r.log_offset, &r.bytes).unwrap();
    }
    let copy: Vec<(u64, u64)> = partner
        .scan()
        .records
        .iter()
        .map(|r| (r.header.seq, r.log_offset))
        .collect();
    let own: Vec<(u64, u64)> = snap.records.iter().map(|r| (r.seq, r.log_offset)).collect();
    assert_eq!(copy, own);
}

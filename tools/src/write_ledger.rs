//! The verifying writer's bookkeeping: what each block must hold after a failover.
//!
//! Every write fills one 4 KiB block with a self-describing pattern (run id, block number,
//! sequence number, then bytes derived from them), so a read-back tells not only "wrong" but
//! which write it came from. The ledger remembers, per block, the sequence of the last write
//! the server acknowledged, and the one write in flight when the connection died (the writer
//! keeps one request outstanding): that write may or may not have reached the journal, so
//! either value is correct for its block. Pure logic, no I/O: the failover driver feeds it.

/// Bytes per verified block.
pub const BLOCK_BYTES: usize = 4096;
/// First bytes of every block the writer produces.
const MAGIC: &[u8; 8] = b"TBFOVER1";
/// Header: magic, run, block, sequence.
const HEADER_BYTES: usize = 32;
/// Spreads consecutive writes over the region (prime, so every block is visited).
const BLOCK_STRIDE: u64 = 7919;

/// What one block read back as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Holds the last acknowledged write, or the write in flight at the failure.
    Ok,
    /// Never written by this run: nothing to check.
    Unwritten,
    /// Holds something else; says what.
    Lost(String),
}

/// Acknowledged writes of one run over `blocks` blocks.
pub struct Ledger {
    run: u64,
    last_acked: Vec<Option<u64>>,
    in_flight: Option<(u64, u64)>,
    next_seq: u64,
    acked: u64,
}

impl Ledger {
    /// A ledger for a region of `blocks` blocks (at least one); `run` tells this run's writes
    /// from any earlier run's.
    pub fn new(run: u64, blocks: u64) -> Ledger {
        let blocks = blocks.max(1);
        Ledger {
            run,
            last_acked: vec![None; usize::try_from(blocks).unwrap_or(usize::MAX)],
            in_flight: None,
            next_seq: 1,
            acked: 0,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.last_acked.len() as u64
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Blocks that hold an acknowledged write.
    #[cfg(test)]
    fn written_blocks(&self) -> u64 {
        self.last_acked.iter().filter(|s| s.is_some()).count() as u64
    }

    /// Starts the next write: its block and contents. Call [`Ledger::ack`] once the server
    /// acknowledged it; until then it is the write in doubt.
    pub fn begin(&mut self) -> (u64, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let block = (seq.wrapping_mul(BLOCK_STRIDE)) % self.blocks();
        self.in_flight = Some((block, seq));
        (block, contents(self.run, block, seq))
    }

    /// The write begun last was acknowledged.
    pub fn ack(&mut self) {
        if let Some((block, seq)) = self.in_flight.take() {
            if let Some(slot) = self.last_acked.get_mut(block as usize) {
                *slot = Some(seq);
            }
            self.acked += 1;
        }
    }

    /// Judges what `block` read back as.
    pub fn check(&self, block: u64, data: &[u8]) -> Verdict {
        let Some(&last) = self.last_acked.get(block as usize) else {
            return Verdict::Lost(format!("block {block} is outside the region"));
        };
        let doubt = self
            .in_flight
            .filter(|(b, _)| *b == block)
            .map(|(_, seq)| seq);
        if last.is_none() && doubt.is_none() {
            return Verdict::Unwritten;
        }
        let found = decode(self.run, block, data);
        match (found, last, doubt) {
            (Some(seq), Some(want), _) if seq == want => Verdict::Ok,
            (Some(seq), _, Some(maybe)) if seq == maybe => Verdict::Ok,
            // The write in doubt never landed and the block was never acknowledged: fine.
            (_, None, Some(_)) => Verdict::Ok,
            (Some(seq), Some(want), _) => Verdict::Lost(format!(
                "block {block} holds write #{seq}, the last acknowledged was #{want}"
            )),
            (None, Some(want), _) => Verdict::Lost(format!(
                "block {block} does not hold acknowledged write #{want} (not this run's data)"
            )),
            (_, None, None) => Verdict::Unwritten,
        }
    }
}

/// The contents of write `seq` to `block` in run `run`.
pub fn contents(run: u64, block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_BYTES];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&run.to_le_bytes());
    b[16..24].copy_from_slice(&block.to_le_bytes());
    b[24..32].copy_from_slice(&seq.to_le_bytes());
    fill(&mut b[HEADER_BYTES..], run ^ block.rotate_left(32) ^ seq);
    b
}

/// The sequence number of this run's write that `data` holds for `block`, if it is one whole.
fn decode(run: u64, block: u64, data: &[u8]) -> Option<u64> {
    if data.len() != BLOCK_BYTES || &data[..8] != MAGIC {
        return None;
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&data[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let seq = word(24);
    (word(8) == run && word(16) == block && data == contents(run, block, seq).as_slice())
        .then_some(seq)
}

/// Deterministic filler (xorshift64*), so a torn or mixed block is caught.
fn fill(out: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_write_reads_back_ok() {
        let mut l = Ledger::new(7, 16);
        let (block, data) = l.begin();
        l.ack();
        assert_eq!(l.check(block, &data), Verdict::Ok);
        assert_eq!(l.acked(), 1);
    }

    #[test]
    fn older_write_in_an_acknowledged_block_is_a_loss() {
        let mut l = Ledger::new(7, 1);
        let (b, first) = l.begin();
        l.ack();
        let _ = l.begin();
        l.ack();
        assert!(matches!(l.check(b, &first), Verdict::Lost(_)));
    }

    #[test]
    fn write_in_doubt_may_or_may_not_have_landed() {
        let mut l = Ledger::new(7, 1);
        let (b, acked) = l.begin();
        l.ack();
        let (_, doubtful) = l.begin();
        assert_eq!(l.check(b, &acked), Verdict::Ok);
        assert_eq!(l.check(b, &doubtful), Verdict::Ok);
    }

    #[test]
    fn another_runs_data_is_a_loss() {
        let mut l = Ledger::new(7, 1);
        let (b, _) = l.begin();
        l.ack();
        assert!(matches!(l.check(b, &contents(8, b, 1)), Verdict::Lost(_)));
        assert!(matches!(
            l.check(b, &vec![0u8; BLOCK_BYTES]),
            Verdict::Lost(_)
        ));
    }

    #[test]
    fn torn_block_is_a_loss() {
        let mut l = Ledger::new(7, 1);
        let (b, mut data) = l.begin();
        l.ack();
        data[BLOCK_BYTES - 1] ^= 1;
        assert!(matches!(l.check(b, &data), Verdict::Lost(_)));
    }

    #[test]
    fn untouched_block_is_not_checked() {
        let l = Ledger::new(7, 4);
        assert_eq!(l.check(2, &[0u8; BLOCK_BYTES]), Verdict::Unwritten);
    }

    #[test]
    fn writes_cover_the_whole_region() {
        let mut l = Ledger::new(1, 10);
        for _ in 0..10 {
            l.begin();
            l.ack();
        }
        assert_eq!(l.written_blocks(), 10);
    }
}

//! The controller with a fake executor, in-memory datagram links and real mailbox files.

use super::*;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use twinblock_pair::heartbeat::HeartbeatConfig;
use twinblock_pair::state::NodeState;
use twinblock_raid::superblock::{MAILBOX_BYTES, MAILBOX_OFFSET_BYTES};

const PAIR: [u8; 16] = *b"controller-tests";
const INTERVAL_MS: u64 = 20;

#[derive(Default)]
struct FakeExecutor {
    ops: Mutex<Vec<Op>>,
    fenced: Mutex<Vec<DiskSet>>,
}

#[async_trait]
impl Executor for FakeExecutor {
    async fn run(&self, op: Op) -> Outcome {
        self.ops.lock().unwrap().push(op);
        Outcome::Done
    }
    fn fence(&self, set: DiskSet) {
        self.fenced.lock().unwrap().push(set);
    }
}

fn mailbox_disks(dir: &Path) -> Vec<PathBuf> {
    (0..2)
        .map(|i| {
            let p = dir.join(format!("mb{i}.img"));
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(MAILBOX_OFFSET_BYTES + MAILBOX_BYTES).unwrap();
            p
        })
        .collect()
}

fn machine(id: NodeId) -> MachineConfig {
    let mut c = MachineConfig::new(PAIR, id);
    c.heartbeat = HeartbeatConfig {
        interval_ms: INTERVAL_MS,
        silence_intervals: 5,
    };
    c.lease_ms = 4 * INTERVAL_MS;
    c
}

struct TestNode {
    handle: Handle,
    exec: Arc<FakeExecutor>,
}

fn start(id: NodeId, disks: &[PathBuf], link: Link) -> TestNode {
    let exec = Arc::new(FakeExecutor::default());
    let handle = spawn(
        Parts {
            machine: machine(id),
            boot: Boot {
                generation: 1,
                holds_partner_disks: false,
            },
            executor: exec.clone(),
            links: vec![link],
            mailbox: Some(MailboxLoop {
                disks: disks.to_vec(),
                pair_id: PAIR,
                partner: id.partner(),
                interval_ms: INTERVAL_MS,
                health: Default::default(),
            }),
            ops: tokio::runtime::Handle::current(),
        },
        event_channel(),
        Permits::default(),
    );
    // Stands in for the NVRAM mirror reporting its sync state.
    handle
        .events()
        .send(Event::MirrorSync { in_sync: true })
        .unwrap();
    TestNode { handle, exec }
}

/// Two links wired to each other, like a UDP socket pair.
fn link_pair() -> (Link, Link) {
    let (a_tx, a_rx) = mpsc::channel(64);
    let (b_tx, b_rx) = mpsc::channel(64);
    let to_b = Box::new(move |bytes| {
        let _ = b_tx.try_send(bytes);
    });
    let to_a = Box::new(move |bytes| {
        let _ = a_tx.try_send(bytes);
    });
    (
        Link {
            path: HbPath::Udp,
            send: to_b,
            rx: a_rx,
        },
        Link {
            path: HbPath::Udp,
            send: to_a,
            rx: b_rx,
        },
    )
}

async fn wait_for_state(node: &TestNode, want: NodeState, within_ms: u64) -> Snapshot {
    let deadline = now_ms() + within_ms;
    loop {
        let snap = node.handle.snapshot().await.unwrap();
        if snap.view.state == want {
            return snap;
        }
        assert!(
            now_ms() < deadline,
            "state {:?} not reached within {within_ms} ms: {:?}",
            want,
            snap.view
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_nodes_come_up_normal_and_the_survivor_takes_over_a_dead_partner() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let disks = mailbox_disks(dir.path());
    let (la, lb) = link_pair();
    let a = start(NodeId::ZERO, &disks, la);
    let b = start(NodeId::ONE, &disks, lb);
    wait_for_state(&a, NodeState::Normal, 5_000).await;
    let snap = wait_for_state(&b, NodeState::Normal, 5_000).await;
    assert!(
        snap.view.lease_left_ms > 0,
        "lease renewed by mailbox writes"
    );
    assert!(b.handle.permits().own.allows(now_ms()));
    assert!(!b.handle.permits().partner.allows(now_ms()));
    let own_bring_up = [
        Op::Reserve(DiskSet::Own),
        Op::Assemble(DiskSet::Own),
        Op::Replay(DiskSet::Own),
        Op::Serve(DiskSet::Own),
    ];
    assert_eq!(*b.exec.ops.lock().unwrap(), own_bring_up);

    // Node 0 dies: its controller, links and mailbox loop stop.
    drop(a);
    wait_for_state(&b, NodeState::Takeover, 5_000).await;
    let ops = b.exec.ops.lock().unwrap().clone();
    assert_eq!(
        ops[own_bring_up.len()..],
        [
            Op::Preempt(DiskSet::Partner),
            Op::Assemble(DiskSet::Partner),
            Op::Replay(DiskSet::Partner),
            Op::Serve(DiskSet::Partner),
        ]
    );
    assert!(b.handle.permits().partner.allows(now_ms()));
    // The operator gives the disks back.
    b.handle.operator(Command::Giveback).await.unwrap();
    wait_for_state(&b, NodeState::Normal, 5_000).await;
    assert!(!b.handle.permits().partner.allows(now_ms()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_conflict_fences_the_set_and_clears_its_permit() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let disks = mailbox_disks(dir.path());
    let (la, _lb) = link_pair();
    let a = start(NodeId::ZERO, &disks, la);
    // Alone (partner never heard): comes up after the silence window.
    wait_for_state(&a, NodeState::Normal, 5_000).await;
    assert!(a.handle.permits().own.allows(now_ms()));
    a.handle
        .events()
        .send(Event::ReservationConflict { set: DiskSet::Own })
        .unwrap();
    wait_for_state(&a, NodeState::WaitingForGiveback, 5_000).await;
    assert!(!a.handle.permits().own.allows(now_ms()));
    assert_eq!(*a.exec.fenced.lock().unwrap(), [DiskSet::Own]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_are_counted_and_change_nothing() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let disks = mailbox_disks(dir.path());
    let (la, lb) = link_pair();
    let a = start(NodeId::ZERO, &disks, la);
    (lb.send)(b"not a status record".to_vec());
    (lb.send)(vec![0u8; 80]);
    wait_for_state(&a, NodeState::Normal, 5_000).await;
    let snap = a.handle.snapshot().await.unwrap();
    assert_eq!(snap.undecodable, 2);
    assert!(snap.view.partner.is_none());
    assert!(a.handle.operator(Command::Takeover).await.is_err());
}

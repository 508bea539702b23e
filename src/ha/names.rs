//! The admin API's names for HA states, operator commands and takeover blockers: stable
//! snake_case words (`normal`, `waiting_for_giveback`, `partner_heard`), one spelling for this
//! node's state and the partner's, written out here rather than derived from the Rust variant
//! names, so renaming a variant cannot change what scripts read. `docs/OPERATIONS.md` lists them.

use twinblock_pair::state::{Command, NodeState};
use twinblock_pair::status::{TakeoverBlocked, WireState};

/// This node's state.
pub fn node_state(s: NodeState) -> &'static str {
    match s {
        NodeState::Rebooting => "rebooting",
        NodeState::WaitingForGiveback => "waiting_for_giveback",
        NodeState::Normal => "normal",
        NodeState::TakingOver => "taking_over",
        NodeState::Takeover => "takeover",
        NodeState::GivingBack => "giving_back",
        NodeState::Stopped => "stopped",
    }
}

/// The partner's state, as its status record announces it (the same words as [`node_state`]).
pub fn wire_state(s: WireState) -> &'static str {
    match s {
        WireState::Normal => "normal",
        WireState::Takeover => "takeover",
        WireState::Stopped => "stopped",
        WireState::Rebooting => "rebooting",
    }
}

/// An operator command.
pub fn command(c: Command) -> &'static str {
    match c {
        Command::Takeover => "takeover",
        Command::Giveback => "giveback",
        Command::DisableTakeover => "takeover_disable",
        Command::EnableTakeover => "takeover_enable",
        Command::Stop => "stop",
    }
}

/// A takeover blocker's code.
pub fn blocker(b: TakeoverBlocked) -> &'static str {
    match b {
        TakeoverBlocked::DisabledByOperator => "disabled_by_operator",
        TakeoverBlocked::DisabledOnPartner => "disabled_on_partner",
        TakeoverBlocked::MirrorOutOfSync => "mirror_out_of_sync",
        TakeoverBlocked::VersionMismatch => "version_mismatch",
        TakeoverBlocked::PartnerHeard => "partner_heard",
        TakeoverBlocked::JustStarted => "just_started",
        TakeoverBlocked::MailboxUnreadable => "mailbox_unreadable",
        TakeoverBlocked::PartnerNeverHeard => "partner_never_heard",
        TakeoverBlocked::NotNormal => "not_normal",
        TakeoverBlocked::GivebackPending => "giveback_pending",
        TakeoverBlocked::PreviousAttemptFailed => "previous_attempt_failed",
        TakeoverBlocked::OwnLeaseExpired => "own_lease_expired",
    }
}

/// Whether `name` is a stable API name: lower-case words joined by `_`.
pub fn is_snake_case(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('_')
        && !name.ends_with('_')
        && !name.contains("__")
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_blocker_has_a_distinct_snake_case_code() {
        let codes: Vec<&str> = TakeoverBlocked::ALL.iter().map(|b| blocker(*b)).collect();
        for c in &codes {
            assert!(is_snake_case(c), "{c}");
        }
        let mut unique = codes.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), codes.len());
    }

    #[test]
    fn partner_and_node_spell_a_state_the_same() {
        assert_eq!(wire_state(WireState::Normal), node_state(NodeState::Normal));
        assert_eq!(
            wire_state(WireState::Takeover),
            node_state(NodeState::Takeover)
        );
        assert_eq!(command(Command::EnableTakeover), "takeover_enable");
    }

    #[test]
    fn debug_style_names_are_not_snake_case() {
        for bad in [
            "Normal",
            "NORMAL",
            "EnableTakeover",
            "Msync",
            "Blank",
            "a-b",
            "",
        ] {
            assert!(!is_snake_case(bad), "{bad}");
        }
        assert!(is_snake_case("waiting_for_giveback"));
    }
}

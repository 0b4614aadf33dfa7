use tessera_core::{AloneState, Command, Ledger, LedgerConfig, Share, Stamped};

use super::*;

const T: Timing = Timing::HOSTS;

fn split_ledger() -> Ledger {
    let mut ledger = Ledger::new(LedgerConfig::default());
    ledger.apply(&Stamped {
        at_ms: 1,
        command: Command::SetPairSplit {
            backup_percent: Some(50),
        },
    });
    ledger
}

fn host(me: u64, journal: Option<JournalMark>, alone_epoch: Option<u64>) -> Host {
    Host {
        me,
        voters: vec![1, 2],
        journal,
        alone_epoch,
        wall_ms: 1_000,
    }
}

fn heard_at(ms: i64) -> Link {
    Link {
        heard_ms: Some(ms),
        reachable_ms: Some(ms),
        peer_mode: Some(Mode::Paired),
        ..Link::default()
    }
}

fn modes(actions: &[Action]) -> Vec<Mode> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Mode { to, .. } => Some(*to),
            _ => None,
        })
        .collect()
}

#[test]
fn a_single_host_is_off_and_a_split_pair_in_contact_is_paired() {
    let mut machine = PairMachine::new(T, Rules::default());
    assert!(!machine.started());
    let single = Ledger::new(LedgerConfig::default());
    let actions = machine.on_tick(10, &single, &host(1, None, None), &heard_at(10));
    assert_eq!(modes(&actions), vec![Mode::Off]);
    assert!(machine.started());
    let actions = machine.on_tick(20, &split_ledger(), &host(1, None, None), &heard_at(20));
    assert_eq!(modes(&actions), vec![Mode::Paired]);
    // Nothing changes while the other host is heard.
    assert!(
        machine
            .on_tick(300, &split_ledger(), &host(1, None, None), &heard_at(250))
            .is_empty()
    );
    assert_eq!(machine.route(300, &heard_at(250)), Route::Consensus);
}

#[test]
fn silence_for_alone_after_serves_alone_in_a_new_epoch_and_not_before() {
    let ledger = split_ledger();
    let mut machine = PairMachine::new(T, Rules::default());
    machine.on_tick(0, &ledger, &host(2, None, None), &heard_at(0));
    let link = heard_at(0);
    assert!(
        machine
            .on_tick(T.alone_after_ms - 1, &ledger, &host(2, None, None), &link)
            .is_empty()
    );
    let actions = machine.on_tick(T.alone_after_ms, &ledger, &host(2, None, None), &link);
    assert_eq!(
        actions,
        vec![
            Action::AbortRecovery,
            Action::GoAlone {
                share: Share::Backup,
                epoch: 1_000
            }
        ]
    );
    // Still paired until the runtime says the journal and the epoch record are written.
    assert_eq!(machine.mode(), Mode::Paired);
    assert_eq!(modes(&machine.on_alone(true)), vec![Mode::Alone]);
    assert_eq!(machine.route(600, &link), Route::Alone);
}

#[test]
fn a_stopped_peer_is_left_at_once_and_forgotten_once_heard_again() {
    let ledger = split_ledger();
    let mut machine = PairMachine::new(T, Rules::default());
    machine.on_tick(0, &ledger, &host(1, None, None), &heard_at(0));
    machine.on_peer_stopping(10);
    let actions = machine.on_tick(20, &ledger, &host(1, None, None), &heard_at(15));
    assert!(matches!(
        actions[1],
        Action::GoAlone {
            share: Share::Primary,
            ..
        }
    ));
    assert!(machine.peer_stopped());
    machine.on_alone(true);
    // Answers in flight during its shutdown do not count; heard well after, it runs again.
    machine.on_tick(100, &ledger, &host(1, None, None), &heard_at(100));
    assert!(machine.peer_stopped());
    machine.on_tick(1_000, &ledger, &host(1, None, None), &heard_at(990));
    assert!(!machine.peer_stopped());
}

#[test]
fn the_primary_recovers_the_other_hands_over_and_both_rejoin_once_merged() {
    let journal = |share, epoch| Some(JournalMark { share, epoch });
    let mut ledger = split_ledger();
    let mut primary = PairMachine::new(T, Rules::default());
    let mut backup = PairMachine::new(T, Rules::default());
    // Both served alone (a restart with a journal goes alone again at once).
    for (machine, me, share) in [
        (&mut primary, 1, Share::Primary),
        (&mut backup, 2, Share::Backup),
    ] {
        let actions = machine.on_tick(
            0,
            &ledger,
            &host(me, journal(share, 7), Some(7)),
            &heard_at(0),
        );
        assert_eq!(
            actions[1],
            Action::GoAlone {
                share,
                epoch: 1_000
            }
        );
        machine.on_alone(true);
    }
    // The backup reaches the primary, which refuses (alone): the primary drives the merge.
    let reached = Link {
        reachable_ms: Some(1_000),
        peer_alone_ms: Some(1_000),
        peer_mode: Some(Mode::Alone),
        ..heard_at(0)
    };
    let actions = primary.on_tick(
        1_100,
        &ledger,
        &host(1, journal(Share::Primary, 1_000), Some(1_000)),
        &reached,
    );
    assert_eq!(
        actions,
        vec![
            Action::KeepAloneState,
            Action::Mode {
                from: Some(Mode::Alone),
                to: Mode::Recovering
            },
            Action::OpenRoutes,
            Action::StartRecovery
        ]
    );
    assert_eq!(primary.route(1_100, &reached), Route::Recovering);
    // The merge task asks the backup for its state.
    let handover = backup.on_handover().expect("alone: it hands over");
    assert_eq!(modes(&handover), vec![Mode::Recovering]);
    assert_eq!(backup.on_handover(), Some(vec![Action::OpenRoutes]));
    // Before the merge commits, neither rejoins.
    let primary_host = host(1, journal(Share::Primary, 1_000), Some(1_000));
    let backup_host = host(2, journal(Share::Backup, 1_000), Some(1_000));
    assert!(
        primary
            .on_tick(1_200, &ledger, &primary_host, &heard_at(1_200))
            .is_empty()
    );
    assert!(
        backup
            .on_tick(1_200, &ledger, &backup_host, &heard_at(1_200))
            .is_empty()
    );
    // The merge of both epochs commits.
    ledger.apply(&Stamped {
        at_ms: 2,
        command: Command::MergeAlone {
            states: vec![
                AloneState {
                    share: Share::Primary,
                    epoch: 1_000,
                    leases: Vec::new(),
                },
                AloneState {
                    share: Share::Backup,
                    epoch: 1_000,
                    leases: Vec::new(),
                },
            ],
        },
    });
    assert_eq!(
        backup.on_tick(1_300, &ledger, &backup_host, &heard_at(1_300)),
        vec![Action::Rejoin]
    );
    // The driving host waits for its own task to end.
    assert!(
        primary
            .on_tick(1_300, &ledger, &primary_host, &heard_at(1_300))
            .is_empty()
    );
    primary.on_recovery_finished(true);
    assert_eq!(
        primary.on_tick(1_400, &ledger, &primary_host, &heard_at(1_400)),
        vec![Action::Rejoin]
    );
    assert_eq!(modes(&primary.on_rejoined()), vec![Mode::Paired]);
}

#[test]
fn a_failed_merge_task_is_started_again() {
    let ledger = split_ledger();
    let mut machine = PairMachine::new(T, Rules::default());
    let journal = Some(JournalMark {
        share: Share::Primary,
        epoch: 1_000,
    });
    machine.on_tick(0, &ledger, &host(1, journal, Some(1_000)), &heard_at(0));
    machine.on_alone(true);
    let reached = Link {
        peer_mode: Some(Mode::Alone),
        ..heard_at(10)
    };
    let actions = machine.on_tick(20, &ledger, &host(1, journal, Some(1_000)), &reached);
    assert!(actions.contains(&Action::StartRecovery));
    // Running: not started twice.
    assert!(
        machine
            .on_tick(30, &ledger, &host(1, journal, Some(1_000)), &heard_at(30))
            .is_empty()
    );
    machine.on_recovery_finished(false);
    assert_eq!(
        machine.on_tick(40, &ledger, &host(1, journal, Some(1_000)), &heard_at(40)),
        vec![Action::StartRecovery]
    );
}

#[test]
fn a_journal_missing_or_older_than_the_recorded_epoch_is_not_served_from() {
    let ledger = split_ledger();
    for found in [None, Some(3)] {
        let mut machine = PairMachine::new(T, Rules::default());
        let journal = found.map(|epoch| JournalMark {
            share: Share::Backup,
            epoch,
        });
        let silent = Link::default();
        let actions = machine.on_tick(
            T.alone_after_ms,
            &ledger,
            &host(2, journal, Some(9)),
            &silent,
        );
        assert_eq!(
            actions,
            vec![
                Action::AbortRecovery,
                Action::JournalLost { begun: 9, found },
                Action::Mode {
                    from: None,
                    to: Mode::Recovering
                },
                Action::OpenRoutes
            ],
            "journal {found:?}"
        );
        assert_eq!(machine.route(T.alone_after_ms, &silent), Route::Recovering);
        // Once the other host serves paired again (it merged without this host's state),
        // this host rejoins.
        assert_eq!(
            machine.on_tick(1_000, &ledger, &host(2, journal, Some(9)), &heard_at(1_000)),
            vec![Action::Rejoin]
        );
    }
}

#[test]
fn a_paired_host_routes_nowhere_while_the_other_one_is_alone() {
    let ledger = split_ledger();
    let mut machine = PairMachine::new(T, Rules::default());
    machine.on_tick(0, &ledger, &host(2, None, None), &heard_at(0));
    let refused = Link {
        peer_alone_ms: Some(100),
        ..heard_at(100)
    };
    assert_eq!(
        machine.route(100 + T.recent_ms - 1, &refused),
        Route::Recovering
    );
    assert_eq!(machine.route(100 + T.recent_ms, &refused), Route::Consensus);
}

#[test]
fn the_alone_ledger_takes_the_whole_log_and_the_merge_both_states() {
    let mut applied = split_ledger();
    let tail = vec![Stamped {
        at_ms: 5,
        command: Command::SetPairSplit {
            backup_percent: Some(30),
        },
    }];
    applied.apply(&Stamped {
        at_ms: 2,
        command: Command::SetPairSplit {
            backup_percent: Some(50),
        },
    });
    let ledger = alone_ledger(Rules::default(), applied, tail, Share::Backup, &[]);
    assert_eq!(ledger.pair_backup_percent(), Some(30));
    assert_eq!(ledger.alone(), Some(Share::Backup));
    let state = |share| AloneState {
        share,
        epoch: 1,
        leases: Vec::new(),
    };
    let states = merge_states(
        Rules::default(),
        Some(state(Share::Primary)),
        Some(state(Share::Backup)),
    );
    assert_eq!(states.len(), 2);
}

fn paired() -> StatusInputs {
    StatusInputs {
        hosts: 2,
        mode: Mode::Paired,
        peer_status: Some(RUNNING),
        peer_mode: Some(Mode::Paired),
        peer_is_primary: false,
        split: Some(50),
        lag: 0,
    }
}

#[test]
fn the_pair_status_follows_the_reference() {
    assert_eq!(status_text(&paired()), PAIRED_AND_AVAILABLE);
    let single = StatusInputs {
        hosts: 1,
        peer_status: None,
        ..paired()
    };
    assert_eq!(status_text(&single), NOT_PAIRED);
    // The backup stopped, shut down or vanished: seen from the primary.
    for status in [STOPPED, DISCONNECTED, NOT_AVAILABLE] {
        let gone = StatusInputs {
            mode: Mode::Alone,
            peer_status: Some(status),
            peer_mode: None,
            ..paired()
        };
        assert_eq!(status_text(&gone), BACKUP_NOT_AVAILABLE, "{status}");
    }
    // The primary gone: seen from the backup.
    let primary_gone = StatusInputs {
        mode: Mode::Alone,
        peer_status: Some(DISCONNECTED),
        peer_is_primary: true,
        ..paired()
    };
    assert_eq!(status_text(&primary_gone), PRIMARY_NOT_AVAILABLE);
    // Both running: not synced while the split is unset or the backup lags.
    let unsplit = StatusInputs {
        split: None,
        ..paired()
    };
    assert_eq!(status_text(&unsplit), PAIR_NOT_SYNCED);
    let lagging = StatusInputs {
        lag: SYNC_LAG_MAX + 1,
        ..paired()
    };
    assert_eq!(status_text(&lagging), PAIR_NOT_SYNCED);
    // Merging, on either side.
    let merging = StatusInputs {
        mode: Mode::Recovering,
        ..paired()
    };
    assert_eq!(status_text(&merging), RECOVERING);
    let peer_alone = StatusInputs {
        peer_mode: Some(Mode::Alone),
        ..paired()
    };
    assert_eq!(status_text(&peer_alone), RECOVERING);
    // A recovering host whose peer vanished again still says Recovering until it goes alone
    // again.
    let lost_while_merging = StatusInputs {
        mode: Mode::Recovering,
        peer_status: Some(DISCONNECTED),
        ..paired()
    };
    assert_eq!(status_text(&lost_while_merging), RECOVERING);
}

#[test]
fn the_peer_status_names_a_stopped_a_silent_and_a_never_seen_host() {
    let mut machine = PairMachine::new(T, Rules::default());
    assert_eq!(machine.peer_status(0, &Link::default(), false), None);
    assert_eq!(
        machine.peer_status(0, &Link::default(), true),
        Some(NOT_AVAILABLE)
    );
    assert_eq!(machine.peer_status(100, &heard_at(0), true), Some(RUNNING));
    assert_eq!(
        machine.peer_status(T.alone_after_ms, &heard_at(0), true),
        Some(DISCONNECTED)
    );
    machine.on_peer_stopping(0);
    assert_eq!(machine.peer_status(100, &heard_at(0), true), Some(STOPPED));
}

//! The metadata service as one host: a linearizable key-value store (it is one
//! sequential state machine, as the real Raft group is) holding the volume's record and
//! owner key, with compare-and-swap and node sessions. A session not heard from for
//! `Timing::session_timeout` dies, and the owner key tied to it dies with it; a node that
//! registers again gets a new session (its old one dies: the incarnation bump).

use crate::model::{CopyState, Owner, Record, Shared, META, NODES};
use crate::net::{Msg, Rpc};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use tokio::time::{Duration, Instant};

struct State {
    next_session: u64,
    /// Session → (node, last heartbeat, whether its copy is suspect).
    sessions: BTreeMap<u64, (usize, Instant, bool)>,
    owner: Option<(Owner, u64)>,
    owner_version: u64,
    record: Record,
    record_version: u64,
    version: u64,
}

impl State {
    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn end_session(&mut self, sh: &Shared, session: u64) {
        if let Some((node, _, _)) = self.sessions.remove(&session) {
            sh.note(format!("meta: session {session} of node {node} ended"));
        }
        if self.owner.is_some_and(|(_, s)| s == session) {
            self.owner = None;
            self.owner_version = 0;
            sh.note("meta: the owner key died with its session".into());
        }
    }

    fn up(&self) -> Vec<usize> {
        let mut up: Vec<usize> = self.sessions.values().map(|(n, _, _)| *n).collect();
        up.sort_unstable();
        up.dedup();
        up
    }
}

/// Runs the metadata service (never crashes: it stands for a Raft group; it can be cut
/// off by partitions like any host).
pub async fn run(sh: Rc<Shared>) -> turmoil::Result {
    let state = Rc::new(RefCell::new(State {
        next_session: 1,
        sessions: BTreeMap::new(),
        owner: None,
        owner_version: 0,
        // Created by node 0, which took it at epoch 1 (its session comes next).
        record: Record {
            epoch: 0,
            node: 0,
            states: [CopyState::Active; NODES],
            lost_at: None,
            snapshots: Vec::new(),
        },
        record_version: 1,
        version: 1,
    }));
    let (s, sh2) = (state.clone(), sh.clone());
    let _rpc = Rpc::start(sh.clone(), META, move |_from, msg| {
        let (s, sh) = (s.clone(), sh2.clone());
        Box::pin(async move {
            let mut st = s.borrow_mut();
            let reply = handle(&sh, &mut st, msg);
            *sh.published.borrow_mut() = (st.owner.map(|(o, _)| o), Some(st.record.clone()));
            Some(reply)
        })
    })
    .await;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut st = state.borrow_mut();
        let now = Instant::now();
        let dead: Vec<u64> = st
            .sessions
            .iter()
            .filter(|(_, (_, hb, _))| now.duration_since(*hb) > sh.timing.session_timeout)
            .map(|(s, _)| *s)
            .collect();
        for s in dead {
            st.end_session(&sh, s);
        }
        *sh.published.borrow_mut() = (st.owner.map(|(o, _)| o), Some(st.record.clone()));
    }
}

fn handle(sh: &Shared, st: &mut State, msg: Msg) -> Msg {
    match msg {
        Msg::Register { node, suspect } => {
            let old: Vec<u64> =
                st.sessions.iter().filter(|(_, (n, _, _))| *n == node).map(|(s, _)| *s).collect();
            for s in old {
                st.end_session(sh, s);
            }
            let session = st.next_session;
            st.next_session += 1;
            st.sessions.insert(session, (node, Instant::now(), suspect));
            sh.note(format!("meta: node {node} registered, session {session}"));
            Msg::Registered { session }
        }
        Msg::Heartbeat { session, suspect } => match st.sessions.get_mut(&session) {
            Some((_, hb, s)) => {
                *hb = Instant::now();
                *s = suspect;
                Msg::HeartbeatOk
            }
            None => Msg::SessionGone,
        },
        Msg::Get => Msg::Seen {
            owner: st.owner.map(|(o, _)| o),
            owner_version: st.owner_version,
            record: st.record.clone(),
            record_version: st.record_version,
            up: st.up(),
            suspect: st.sessions.values().filter(|(_, _, s)| *s).map(|(n, _, _)| *n).collect(),
        },
        Msg::Take { session, owner_version, record_version, owner, record } => {
            let ok = st.sessions.contains_key(&session)
                && st.owner_version == owner_version
                && st.record_version == record_version;
            if ok {
                st.owner = Some((owner, session));
                st.owner_version = st.bump();
                st.record = record;
                st.record_version = st.bump();
                sh.note(format!(
                    "meta: node {} owns the volume at epoch {}",
                    owner.node, owner.epoch
                ));
            }
            Msg::Cas(ok)
        }
        Msg::SetRecord { owner, record_version, record } => {
            let ok = st.owner.map(|(o, _)| o) == Some(owner) && st.record_version == record_version;
            if ok {
                for n in 0..NODES {
                    if record.states[n] == CopyState::Stale
                        && st.record.states[n] != CopyState::Stale
                    {
                        sh.stale_marks.borrow_mut().push((sh.now(), n));
                    }
                }
                let states: Vec<&str> = record.states.iter().map(|s| s.name()).collect();
                sh.note(format!("meta: epoch {} records {states:?}", owner.epoch));
                st.record = record;
                st.record_version = st.bump();
            }
            Msg::Cas(ok)
        }
        _ => Msg::Failed,
    }
}

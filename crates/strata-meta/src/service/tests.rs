//! Members over real TCP on loopback: a cluster grows from one member by joins, requests
//! made at any member reach the leader, a member with the wrong secret is refused with a
//! clear error and changes nothing, removal keeps an odd number of voters, watches see
//! committed changes in order.

use super::*;
use crate::state::{cas, Compare, Op};

fn fast() -> Timing {
    Timing { heartbeat_ms: 50, election_min_ms: 300, election_max_ms: 600 }
}

pub(crate) async fn member(dir: &std::path::Path, id: NodeId, secret: &[u8]) -> Arc<Member> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let advertise = listener.local_addr().unwrap().to_string();
    let options = Options {
        id,
        dir: dir.join(format!("m{id}")),
        listener,
        advertise,
        secret: secret.to_vec(),
        timing: fast(),
    };
    Member::start(options).await.unwrap()
}

async fn status(m: &Member) -> ClusterStatus {
    match m.request(ClientRequest::Status).await.unwrap() {
        ClientReply::Status(s) => s,
        other => panic!("{other:?}"),
    }
}

fn voters(s: &ClusterStatus) -> Vec<NodeId> {
    s.members.iter().filter(|m| m.role == "voter").map(|m| m.id).collect()
}

async fn write(m: &Member, command: Command) -> Response {
    match m.request(ClientRequest::Write(command)).await.unwrap() {
        ClientReply::Written(r) => r,
        other => panic!("{other:?}"),
    }
}

async fn get(m: &Member, key: &str) -> Option<Entry> {
    match m.request(ClientRequest::Get { key: key.into() }).await.unwrap() {
        ClientReply::Value { entry, .. } => entry,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grows_by_joins_and_serves_requests_at_any_member() {
    let dir = tempfile::tempdir().unwrap();
    let m1 = member(dir.path(), 1, b"secret").await;
    // Before init, a request says what to do.
    let err = m1.request(ClientRequest::Status).await.unwrap_err();
    assert_eq!(err, ServiceError::NotInitialized);
    m1.initialize().await.unwrap();
    let again = m1.initialize().await.unwrap_err();
    assert!(matches!(again, ServiceError::Membership(_)), "{again}");
    let m2 = member(dir.path(), 2, b"secret").await;
    let m3 = member(dir.path(), 3, b"secret").await;
    m2.join(std::slice::from_ref(&m1.addr), Duration::from_secs(10)).await.unwrap();
    // Two members: one voter, one learner.
    assert_eq!(voters(&status(&m1).await), vec![1]);
    // Joining through a learner works too (it forwards to the leader).
    m3.join(std::slice::from_ref(&m2.addr), Duration::from_secs(10)).await.unwrap();
    let s = status(&m3).await;
    assert_eq!(voters(&s), vec![1, 2, 3], "{s:?}");
    assert_eq!(s.leader, 1);

    // A CAS made at a follower applies once, through the leader.
    let op = Origin::Operator;
    let r = write(&m3, cas(op, "/k", 0, b"a".to_vec())).await;
    let Response::Txn { succeeded: true, revision } = r else { panic!("{r:?}") };
    assert_eq!(get(&m2, "/k").await.unwrap().version, revision);
    // A CAS on a wrong version fails and changes nothing.
    let r = write(&m2, cas(op, "/k", revision + 7, b"b".to_vec())).await;
    assert_eq!(r, Response::Txn { succeeded: false, revision });
    assert_eq!(get(&m1, "/k").await.unwrap().value, b"a");
    // A CAS expecting a missing key on an existing one fails; on a missing key with a
    // version, too.
    let r = write(&m2, cas(op, "/k", 0, b"c".to_vec())).await;
    assert!(matches!(r, Response::Txn { succeeded: false, .. }), "{r:?}");
    let r = write(&m2, cas(op, "/missing", 3, b"c".to_vec())).await;
    assert!(matches!(r, Response::Txn { succeeded: false, .. }), "{r:?}");
    assert_eq!(get(&m3, "/missing").await, None);

    // A member with the wrong secret is refused with a clear error and joins nothing.
    let outsider = member(dir.path(), 4, b"not the secret").await;
    let join = outsider.join(std::slice::from_ref(&m1.addr), Duration::from_secs(5));
    let err = join.await.unwrap_err();
    assert!(matches!(err, ServiceError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("secret"), "{err}");
    assert_eq!(status(&m1).await.members.len(), 3);
    assert!(!outsider.initialized().await);

    // A malformed request (an empty key) is refused by the state machine, nothing changes.
    let before = status(&m1).await.revision;
    let bad = Command::Txn {
        origin: op,
        compares: vec![Compare::Version(String::new(), 0)],
        success: vec![Op::Put { key: "/x".into(), value: vec![], lease: None }],
        failure: vec![],
    };
    assert!(matches!(write(&m1, bad).await, Response::Refused(Refusal::Invalid(_))));
    assert_eq!(status(&m1).await.revision, before);

    // Removing a voter leaves two members: one voter.
    m1.request(ClientRequest::Remove { id: 3 }).await.unwrap();
    let s = status(&m2).await;
    assert_eq!(s.members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(voters(&s).len(), 1, "{s:?}");
    let err = m1.request(ClientRequest::Remove { id: 9 }).await.unwrap_err();
    assert!(matches!(err, ServiceError::Membership(_)), "{err}");
    for m in [m1, m2, m3, outsider] {
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_register_and_watches_see_changes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let m1 = member(dir.path(), 1, b"s").await;
    m1.initialize().await.unwrap();
    tokio::spawn(m1.clone().run_session(serde_json::json!({ "site": "a" })));
    // A watcher waiting from the next revision is woken by the registration's record.
    let watcher = {
        let m1 = m1.clone();
        tokio::spawn(async move {
            let request =
                ClientRequest::Watch { prefix: "/nodes/".into(), from: 1, wait_ms: 10_000 };
            m1.request(request).await.unwrap()
        })
    };
    let ClientReply::Changes(Watch::Changes(changes)) = watcher.await.unwrap() else { panic!() };
    assert_eq!(changes[0].key, "/nodes/1");
    let s = status(&m1).await;
    let me = &s.members[0];
    assert_eq!(me.session.as_ref().unwrap().incarnation, 1);
    assert_eq!(me.record.as_ref().unwrap()["site"], "a");
    // Writes as the node carry its incarnation.
    let r = write(&m1, cas(m1.origin(), "/n", 0, b"1".to_vec())).await;
    assert!(matches!(r, Response::Txn { succeeded: true, .. }), "{r:?}");
    let stale = Origin::Node { node: 1, incarnation: 0 };
    let r = write(&m1, cas(stale, "/n2", 0, b"1".to_vec())).await;
    assert!(matches!(r, Response::Refused(Refusal::StaleIncarnation { .. })), "{r:?}");
    m1.shutdown().await;
}

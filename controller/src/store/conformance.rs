//! The contract of [`Store`], run against every backend: a new backend
//! adds one line to `each_backend`. The etcd backend runs against a real
//! 3-member etcd (tests/etcd/setup.sh), each check under its own prefix.

use gpufleet_proto::v1::{Job, Node};

use super::{IdRange, Keyspace, MemoryStore, SledStore, Store, WriteBatch, get, load_all, visit};

fn job(id: &str) -> Job {
    Job {
        id: id.to_string(),
        ..Default::default()
    }
}

fn ids(store: &dyn Store, space: Keyspace, range: IdRange<'_>) -> Vec<String> {
    let mut out = Vec::new();
    store
        .visit_raw(space, range, &mut |id, _| {
            out.push(id.to_string());
            true
        })
        .unwrap();
    out
}

/// Runs `check` against a fresh store of every backend.
fn each_backend(check: impl Fn(&dyn Store)) {
    check(&MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    check(&SledStore::open(dir.path()).unwrap());
    if let Some(store) = super::etcd::test_cluster::fresh_store() {
        check(&store);
    }
}

#[test]
fn a_batch_applies_across_keyspaces_and_deletes() {
    each_backend(|store| {
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Jobs, "job-a", &job("job-a"));
        batch.put(Keyspace::Jobs, "job-b", &job("job-b"));
        batch.put(Keyspace::Nodes, "n1", &Node::default());
        batch.put_raw(Keyspace::Settings, "digest", vec![1, 2, 3]);
        store.apply(batch).unwrap();
        let mut batch = WriteBatch::default();
        batch.delete(Keyspace::Jobs, "job-a");
        batch.put(Keyspace::Jobs, "job-c", &job("job-c"));
        store.apply(batch).unwrap();

        let jobs: Vec<Job> = load_all(store, Keyspace::Jobs).unwrap();
        let names: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(names, ["job-b", "job-c"]);
        assert_eq!(load_all::<Node>(store, Keyspace::Nodes).unwrap().len(), 1);
        assert_eq!(
            store.get_raw(Keyspace::Settings, "digest").unwrap(),
            Some(vec![1, 2, 3])
        );
        assert!(
            get::<Job>(store, Keyspace::Jobs, "job-a")
                .unwrap()
                .is_none()
        );
        assert!(store.apply(WriteBatch::default()).is_ok(), "an empty batch");
    });
}

#[test]
fn keyspaces_do_not_see_each_other_even_with_shared_prefixes() {
    each_backend(|store| {
        let mut batch = WriteBatch::default();
        // "job/" and "job-created/", "node/" and "node-identity/".
        batch.put(Keyspace::Jobs, "x", &job("x"));
        batch.put_raw(Keyspace::JobsByCreated, "x", Vec::new());
        batch.put_raw(Keyspace::JobsByFinished, "x", Vec::new());
        batch.put(Keyspace::Nodes, "n", &Node::default());
        batch.put_raw(Keyspace::NodeIdentities, "n", vec![9]);
        store.apply(batch).unwrap();
        for space in [
            Keyspace::Jobs,
            Keyspace::JobsByCreated,
            Keyspace::JobsByFinished,
        ] {
            assert_eq!(ids(store, space, IdRange::default()), ["x"], "{space:?}");
        }
        assert_eq!(ids(store, Keyspace::Nodes, IdRange::default()), ["n"]);
        assert!(ids(store, Keyspace::Usage, IdRange::default()).is_empty());
    });
}

#[test]
fn ranges_are_ordered_bounded_reversible_and_stoppable() {
    each_backend(|store| {
        let mut batch = WriteBatch::default();
        for id in ["a/1", "a/2", "b/1", "b/2", "c/1"] {
            batch.put_raw(Keyspace::Market, id, id.as_bytes().to_vec());
        }
        store.apply(batch).unwrap();
        let all = ids(store, Keyspace::Market, IdRange::default());
        assert_eq!(all, ["a/1", "a/2", "b/1", "b/2", "c/1"]);
        assert_eq!(
            ids(store, Keyspace::Market, IdRange::below("b/2")),
            ["a/1", "a/2", "b/1"]
        );
        assert_eq!(
            ids(store, Keyspace::Market, IdRange::prefixed("b/")),
            ["b/1", "b/2", "c/1"],
            "prefixed is a lower bound: callers stop at the prefix's end"
        );
        let reverse = IdRange {
            from: "a/2",
            to: Some("c/1"),
            reverse: true,
        };
        assert_eq!(ids(store, Keyspace::Market, reverse), ["b/2", "b/1", "a/2"]);
        let empty = IdRange {
            from: "c",
            to: Some("a"),
            reverse: false,
        };
        assert!(ids(store, Keyspace::Market, empty).is_empty());
        let mut seen = 0;
        store
            .visit_raw(Keyspace::Market, IdRange::default(), &mut |_, _| {
                seen += 1;
                seen < 2
            })
            .unwrap();
        assert_eq!(seen, 2, "false stops the walk");
    });
}

#[test]
fn corrupt_records_are_reported_with_their_key() {
    each_backend(|store| {
        let mut batch = WriteBatch::default();
        batch.put_raw(Keyspace::Jobs, "job-bad", vec![0xff, 0xff, 0xff]);
        store.apply(batch).unwrap();
        let err = get::<Job>(store, Keyspace::Jobs, "job-bad").unwrap_err();
        assert!(err.to_string().contains("job/job-bad"), "{err}");
        let walked = visit::<Job>(store, Keyspace::Jobs, IdRange::default(), |_, _| Ok(true));
        assert!(walked.is_err());
    });
}

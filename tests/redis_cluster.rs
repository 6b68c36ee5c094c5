//! The Redis Cluster harness itself (tests/common/redis.rs, `RedisCluster`): three masters with
//! a replica each on loopback ports, a slot moved by hand between masters while its keys are
//! written (as `redis-cli --cluster reshard` does), and a master killed (by its own pid) and
//! replaced by its replica. This is what the sharded cluster-mode tests stand on; the chatloop
//! scenarios on a Redis Cluster of one master are in tests/cluster.rs.
#[path = "common/redis.rs"]
mod redis;

use redis::RedisCluster;

#[test]
fn three_masters_with_replicas_move_a_slot_and_fail_over() {
    let mut c = RedisCluster::start(3, 1);
    assert!(
        c.url().starts_with("redis-cluster://127.0.0.1:"),
        "{}",
        c.url()
    );
    let key = "chatloop:{r:0123456789}:h";
    let slot = c.slot_of(key);
    assert_eq!(
        slot,
        c.slot_of("chatloop:{r:0123456789}:m"),
        "one slot per room"
    );
    let from = c.master_of(slot);
    for i in 0..10 {
        c.command(key, &["RPUSH", key, &i.to_string()]).unwrap();
    }
    // The slot moves to another master while its list keeps growing: during the move a
    // write answers MOVED (the key has left) or ASK, never loses what is there.
    let to = (0..c.nodes.len())
        .find(|&i| {
            i != from
                && c.nodes_view(&c.nodes[i])
                    .iter()
                    .any(|l| l.port == c.nodes[i].port && l.master)
        })
        .expect("another master");
    let m = c.begin_migration(slot, to);
    assert_eq!(
        c.nodes[from].command(0, &["RPUSH", key, "10"]),
        Ok("11".into()),
        "still served by the old master until the key moves"
    );
    assert_eq!(c.migrate_keys(&m, 100), 1);
    let redirect = c.nodes[from].command(0, &["RPUSH", key, "11"]).unwrap_err();
    assert!(redirect.starts_with("ASK "), "{redirect}");
    c.finish_migration(m);
    assert_eq!(c.master_of(slot), to);
    let moved = c.nodes[from].command(0, &["LLEN", key]).unwrap_err();
    assert!(moved.starts_with("MOVED "), "{moved}");
    assert_eq!(c.command(key, &["LLEN", key]), Ok("11".into()));

    // The new master dies; its replica takes over with the data it had replicated.
    c.wait_until("the replica caught up", |c| {
        c.nodes.iter().any(|n| {
            n.port != c.nodes[to].port
                && n.command(0, &["ROLE"])
                    .is_ok_and(|r| r.starts_with("slave"))
                && n.command(0, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
                    .is_ok_and(|k| k == "1")
        })
    });
    c.kill_master_and_wait_for_failover(to);
    let now = c.master_of(slot);
    assert_ne!(now, to);
    assert_eq!(c.command(key, &["LLEN", key]), Ok("11".into()));
}

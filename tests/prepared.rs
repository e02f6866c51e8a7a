//! Protocol-level prepared statements in transaction mode: statements follow their
//! client from server to server, and errors keep PostgreSQL's meaning.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

async fn setup(prefix: &str, general: &str) -> (String, pgmux::Running) {
    let clusters = cluster::shared();
    let db = fresh_db(&clusters.primary, prefix);
    let mux = start_pgmux(&config_text(&clusters.primary, &db, general, "")).await;
    (db, mux)
}

fn stats(mux: &pgmux::Running, db: &str) -> (u64, u64, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let registry = mux.app.prepared_stats(db, "app").expect("pool exists");
    let s = &registry.stats;
    (
        s.client_parses.load(Relaxed),
        s.server_parses.load(Relaxed),
        s.evictions.load(Relaxed),
        s.local_answers.load(Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_prepared_on_one_server_runs_on_another() {
    let (db, mux) = setup("prep_move", "default_pool_size = 2\nauth_type = \"trust\"").await;
    let a = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let stmt = a
        .prepare("SELECT pg_backend_pid(), $1::int + 1")
        .await
        .unwrap();
    // Another client takes the only open server and keeps it inside a transaction...
    let mut b = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let tx = b.transaction().await.unwrap();
    let held: i32 = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // ...so the statement runs on a second server, which never saw the client's Parse.
    let row = a.query_one(&stmt, &[&41i32]).await.unwrap();
    let ran_on: i32 = row.get(0);
    assert_eq!(row.get::<_, i32>(1), 42);
    assert_ne!(
        ran_on, held,
        "the statement ran on the server the other client holds"
    );
    tx.commit().await.unwrap();
    // And back on the first server, now free again, once the second is busy.
    let mut c = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.query_one("SELECT 1", &[]).await.unwrap();
    for n in 0..5 {
        let row = a.query_one(&stmt, &[&n]).await.unwrap();
        assert_eq!(row.get::<_, i32>(1), n + 1);
    }
    tx.commit().await.unwrap();
    let (client_parses, server_parses, _, _) = stats(&mux, &db);
    assert!(client_parses >= 1);
    assert!(
        server_parses >= 2,
        "prepared on both servers: {server_parses}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_from_many_clients_share_statements() {
    let (db, mux) = setup("prep_pipe", "default_pool_size = 2\nauth_type = \"trust\"").await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let db = db.clone();
        let addr = mux.addr;
        tasks.push(tokio::spawn(async move {
            let client = connect(addr, "app", "unused", &db).await?;
            for round in 0..10 {
                // Several queries in flight at once on one connection: tokio-postgres
                // pipelines them, so Parse, Describe, Bind and Execute interleave.
                let queries = (0..4).map(|k| {
                    let client = &client;
                    async move {
                        let v: i32 = client
                            .query_one("SELECT $1::int * 2", &[&(i * 100 + round * 4 + k)])
                            .await?
                            .get(0);
                        assert_eq!(v, (i * 100 + round * 4 + k) * 2);
                        let s: String = client
                            .query_one("SELECT $1::text || 'x'", &[&format!("{i}")])
                            .await?
                            .get(0);
                        assert_eq!(s, format!("{i}x"));
                        Ok::<_, tokio_postgres::Error>(())
                    }
                });
                futures_util::future::try_join_all(queries).await?;
                // A statement prepared, used and dropped (Close) every round.
                let stmt = client.prepare(&format!("SELECT {round} + $1::int")).await?;
                let v: i32 = client.query_one(&stmt, &[&i]).await?.get(0);
                assert_eq!(v, round + i);
                drop(stmt);
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("finishes in time")
            .unwrap()
            .expect("no prepared-statement error");
    }
    let (client_parses, server_parses, _, _) = stats(&mux, &db);
    assert!(
        server_parses < client_parses,
        "servers parse less than clients do: {server_parses} vs {client_parses}"
    );
}

/// Sends `messages` on a raw connection and reads up to the next ReadyForQuery.
async fn round_trip(stream: &mut tokio::net::TcpStream, messages: BytesMut) -> Vec<(u8, Vec<u8>)> {
    stream.write_all(&messages).await.unwrap();
    read_until_ready(stream).await
}

fn parse(buf: &mut BytesMut, name: &str, query: &str) {
    frontend::parse(name, query, std::iter::empty(), buf).unwrap();
}

fn bind_execute(buf: &mut BytesMut, name: &str) {
    frontend::bind(
        "",
        name,
        std::iter::empty::<i16>(),
        std::iter::empty::<i32>(),
        |_: i32,
         _: &mut BytesMut|
         -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
            unreachable!()
        },
        Some(0),
        buf,
    )
    .map_err(|_| ())
    .unwrap();
    frontend::execute("", 0, buf).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_keep_their_meaning() {
    let (db, mux) = setup("prep_err", "default_pool_size = 2\nauth_type = \"trust\"").await;
    let (mut s, _) = raw_login(mux.addr, 3 << 16, &[("user", "app"), ("database", &db)]).await;

    // Bind of a statement never prepared: 26000, as from PostgreSQL.
    let mut m = BytesMut::new();
    bind_execute(&mut m, "never");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(tags(&answer), "EZ");
    assert_eq!(error_code(&answer[0].1), "26000");

    // A duplicate name: 42P05, and the rest of the batch is skipped up to Sync.
    let mut m = BytesMut::new();
    parse(&mut m, "a", "SELECT 1");
    frontend::sync(&mut m);
    assert_eq!(tags(&round_trip(&mut s, m).await), "1Z");
    let mut m = BytesMut::new();
    parse(&mut m, "a", "SELECT 2");
    bind_execute(&mut m, "a");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(tags(&answer), "EZ");
    assert_eq!(error_code(&answer[0].1), "42P05");
    assert!(
        String::from_utf8_lossy(&answer[0].1).contains("prepared statement \"a\" already exists")
    );
    // The first definition stands.
    let mut m = BytesMut::new();
    bind_execute(&mut m, "a");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(tags(&answer), "2DCZ");
    assert_eq!(&answer[1].1[6..], b"1");

    // An error early in a pipeline: the statements after it were never created.
    let mut m = BytesMut::new();
    parse(&mut m, "bad", "SELEKT 1");
    parse(&mut m, "b", "SELECT 'b'");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(tags(&answer), "EZ");
    assert_eq!(error_code(&answer[0].1), "42601");
    let mut m = BytesMut::new();
    bind_execute(&mut m, "b");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(error_code(&answer[0].1), "26000", "{answer:?}");
    // So the name is free to be prepared now.
    let mut m = BytesMut::new();
    parse(&mut m, "b", "SELECT 'b2'");
    bind_execute(&mut m, "b");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(tags(&answer), "12DCZ");
    assert_eq!(&answer[2].1[6..], b"b2");

    // Inside a transaction block, a refused Parse fails the block as PostgreSQL would.
    let mut m = BytesMut::new();
    frontend::query("BEGIN", &mut m).unwrap();
    let answer = round_trip(&mut s, m).await;
    assert_eq!(answer.last().unwrap().1, b"T");
    let mut m = BytesMut::new();
    parse(&mut m, "a", "SELECT 3");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(error_code(&answer[0].1), "42P05");
    assert_eq!(answer.last().unwrap().1, b"E", "transaction failed");
    let mut m = BytesMut::new();
    frontend::query("ROLLBACK", &mut m).unwrap();
    let answer = round_trip(&mut s, m).await;
    assert_eq!(answer.last().unwrap().1, b"I");

    // Close, then the name may be reused; DEALLOCATE and DISCARD ALL drop names too.
    let mut m = BytesMut::new();
    frontend::close(b'S', "a", &mut m).unwrap();
    parse(&mut m, "a", "SELECT 'new a'");
    bind_execute(&mut m, "a");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(tags(&answer), "312DCZ");
    assert_eq!(&answer[3].1[6..], b"new a");
    let mut m = BytesMut::new();
    frontend::query("DEALLOCATE a", &mut m).unwrap();
    let answer = round_trip(&mut s, m).await;
    assert_eq!(tags(&answer), "CZ");
    assert_eq!(answer[0].1, b"DEALLOCATE\0");
    let mut m = BytesMut::new();
    bind_execute(&mut m, "a");
    frontend::sync(&mut m);
    assert_eq!(error_code(&round_trip(&mut s, m).await[0].1), "26000");
    let mut m = BytesMut::new();
    parse(&mut m, "c", "SELECT 'c'");
    frontend::sync(&mut m);
    frontend::query("DISCARD ALL", &mut m).unwrap();
    let answer = round_trip(&mut s, m).await;
    assert_eq!(tags(&answer), "1Z");
    let answer = read_until_ready(&mut s).await;
    assert_eq!(tags(&answer), "CZ");
    let mut m = BytesMut::new();
    bind_execute(&mut m, "c");
    frontend::sync(&mut m);
    assert_eq!(error_code(&round_trip(&mut s, m).await[0].1), "26000");

    // Every other client is unaffected, and the servers are clean.
    let other = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let v: i32 = other
        .query_one("SELECT $1::int", &[&5])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_evict_least_recently_used_statements() {
    let (db, mux) = setup(
        "prep_lru",
        "default_pool_size = 1\nauth_type = \"trust\"\nmax_prepared_statements = 2\nmax_client_prepared_statements = 5",
    )
    .await;
    let client = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let mut stmts = Vec::new();
    for i in 0..5 {
        stmts.push(
            client
                .prepare(&format!("SELECT {i} + $1::int"))
                .await
                .unwrap(),
        );
    }
    for round in 0..3 {
        for (i, stmt) in stmts.iter().enumerate() {
            let v: i32 = client.query_one(stmt, &[&round]).await.unwrap().get(0);
            assert_eq!(v, i as i32 + round);
        }
    }
    let (_, _, evictions, _) = stats(&mux, &db);
    assert!(evictions >= 3, "evictions: {evictions}");
    // A simple query, so that counting prepares no sixth statement.
    let held: i64 = simple_value(&client, "SELECT count(*) FROM pg_prepared_statements")
        .await
        .expect("a count")
        .parse()
        .unwrap();
    assert!(
        held <= 2,
        "the server holds {held} statements with a cap of 2"
    );

    // One statement past the client's own cap is refused with a clear error.
    let err = client.prepare("SELECT 'one too many'").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53400"), "{err}");
    assert!(message(&err).contains("max_client_prepared_statements"));
    // Dropping one makes room again.
    stmts.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.prepare("SELECT 'fits now'").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_while_idle_needs_no_server() {
    let (db, mux) = setup("prep_local", "default_pool_size = 1\nauth_type = \"trust\"").await;
    // Someone prepares the text once, so it is known to be valid.
    let first = connect(mux.addr, "app", "unused", &db).await.unwrap();
    // The statement is kept: the text stays known while some client holds it.
    let _kept = first.prepare("SELECT $1::int + 100").await.unwrap();
    // The only server is now held mid-transaction by another client...
    let mut holder = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.query_one("SELECT 1", &[]).await.unwrap();
    // ...and a Parse+Sync of the same text is still answered at once.
    let (mut s, _) = raw_login(mux.addr, 3 << 16, &[("user", "app"), ("database", &db)]).await;
    let mut m = BytesMut::new();
    parse(&mut m, "p", "SELECT $1::int + 100");
    frontend::sync(&mut m);
    let answer = tokio::time::timeout(Duration::from_secs(2), round_trip(&mut s, m))
        .await
        .expect("answered without waiting for a server");
    assert_eq!(tags(&answer), "1Z");
    let (_, _, _, local) = stats(&mux, &db);
    assert_eq!(local, 1);
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_prepared_again_after_a_schema_change_gets_a_fresh_statement() {
    let (db, mux) = setup("prep_ddl", "default_pool_size = 1\nauth_type = \"trust\"").await;
    let a = connect(mux.addr, "app", "unused", &db).await.unwrap();
    a.batch_execute("CREATE TABLE ddl_t(x int); INSERT INTO ddl_t VALUES (1)")
        .await
        .unwrap();
    let old_a = a.prepare("SELECT * FROM ddl_t").await.unwrap();
    assert_eq!(a.query_one(&old_a, &[]).await.unwrap().len(), 1);
    // Another client holds the same text, so the server-side statement lives on.
    let b = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let old_b = b.prepare("SELECT * FROM ddl_t").await.unwrap();
    assert_eq!(b.query_one(&old_b, &[]).await.unwrap().len(), 1);

    a.batch_execute("ALTER TABLE ddl_t ADD COLUMN y int DEFAULT 7")
        .await
        .unwrap();
    // As from PostgreSQL: the old statement refuses to run...
    let err = a.query_one(&old_a, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err}");
    // ...and preparing the text again, as drivers then do, gives the new result type.
    let new_a = a.prepare("SELECT * FROM ddl_t").await.unwrap();
    let row = a.query_one(&new_a, &[]).await.unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (1, 7));
    // The other client's old statement fails the same way, until it prepares again.
    let err = b.query_one(&old_b, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err}");
    let new_b = b.prepare("SELECT * FROM ddl_t").await.unwrap();
    assert_eq!(b.query_one(&new_b, &[]).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_in_an_extended_query_drops_the_client_name() {
    let (db, mux) = setup(
        "prep_xdealloc",
        "default_pool_size = 1\nauth_type = \"trust\"",
    )
    .await;
    // Another client holds the same text, so the server-side statement must survive.
    let other = connect(mux.addr, "app", "unused", &db).await.unwrap();
    let kept = other.prepare("SELECT 'shared'").await.unwrap();
    let (mut s, _) = raw_login(mux.addr, 3 << 16, &[("user", "app"), ("database", &db)]).await;
    let mut m = BytesMut::new();
    parse(&mut m, "s1", "SELECT 'shared'");
    bind_execute(&mut m, "s1");
    frontend::sync(&mut m);
    assert_eq!(tags(&round_trip(&mut s, m).await), "12DCZ");

    // What libpq's pipeline mode makes of a SQL DEALLOCATE: an unnamed statement.
    let mut m = BytesMut::new();
    parse(&mut m, "", "DEALLOCATE s1");
    bind_execute(&mut m, "");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(tags(&answer), "12CZ", "{answer:?}");
    assert_eq!(answer[2].1, b"DEALLOCATE\0");
    // The client's name is gone, as after DEALLOCATE in PostgreSQL...
    let mut m = BytesMut::new();
    bind_execute(&mut m, "s1");
    frontend::sync(&mut m);
    assert_eq!(error_code(&round_trip(&mut s, m).await[0].1), "26000");
    // ...and free again.
    let mut m = BytesMut::new();
    parse(&mut m, "s1", "SELECT 'again'");
    bind_execute(&mut m, "s1");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(tags(&answer), "12DCZ");
    assert_eq!(&answer[2].1[6..], b"again");
    // A name the client never prepared fails on the server, as it would without pgmux.
    let mut m = BytesMut::new();
    parse(&mut m, "", "DEALLOCATE never_prepared");
    bind_execute(&mut m, "");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(
        error_code(&answer[answer.len() - 2].1),
        "26000",
        "{answer:?}"
    );
    // The other client's statement was never touched.
    let row = other.query_one(&kept, &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "shared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_prepared_right_behind_a_deallocate_all_exist() {
    let (db, mux) = setup(
        "prep_dealloc_all",
        "default_pool_size = 1\nauth_type = \"trust\"",
    )
    .await;
    let (mut s, _) = raw_login(mux.addr, 3 << 16, &[("user", "app"), ("database", &db)]).await;
    let mut m = BytesMut::new();
    parse(&mut m, "s1", "SELECT 'one'");
    frontend::sync(&mut m);
    assert_eq!(tags(&round_trip(&mut s, m).await), "1Z");
    for (i, reset) in ["DEALLOCATE ALL", "DISCARD ALL"].iter().enumerate() {
        // The reset and what follows it go out at once, as a pipelining driver sends
        // them: the statements are prepared after the server dropped its own.
        let mut m = BytesMut::new();
        frontend::query(reset, &mut m).unwrap();
        let name = format!("s{}", i + 2);
        parse(&mut m, &name, "SELECT 'one'");
        bind_execute(&mut m, &name);
        frontend::sync(&mut m);
        s.write_all(&m).await.unwrap();
        let first = read_until_ready(&mut s).await;
        assert_eq!(tags(&first), "CZ", "{reset}: {first:?}");
        let second = read_until_ready(&mut s).await;
        assert_eq!(tags(&second), "12DCZ", "{reset}: {second:?}");
        assert_eq!(&second[2].1[6..], b"one");
        // The new name outlives the reset's answer; the old ones are gone.
        let mut m = BytesMut::new();
        bind_execute(&mut m, &name);
        frontend::sync(&mut m);
        assert_eq!(tags(&round_trip(&mut s, m).await), "2DCZ", "{reset}");
        let mut m = BytesMut::new();
        bind_execute(&mut m, "s1");
        frontend::sync(&mut m);
        assert_eq!(error_code(&round_trip(&mut s, m).await[0].1), "26000");
    }
    // The same through the extended protocol, as libpq's pipeline mode sends it.
    let mut m = BytesMut::new();
    parse(&mut m, "", "DEALLOCATE ALL");
    bind_execute(&mut m, "");
    parse(&mut m, "s4", "SELECT 'one'");
    bind_execute(&mut m, "s4");
    frontend::sync(&mut m);
    let answer = round_trip(&mut s, m).await;
    assert_eq!(tags(&answer), "12C12DCZ", "{answer:?}");
    let mut m = BytesMut::new();
    bind_execute(&mut m, "s4");
    frontend::sync(&mut m);
    assert_eq!(tags(&round_trip(&mut s, m).await), "2DCZ");
    let mut m = BytesMut::new();
    parse(&mut m, "s3", "SELECT 'three'");
    bind_execute(&mut m, "s3");
    frontend::sync(&mut m);
    assert_eq!(
        tags(&round_trip(&mut s, m).await),
        "12DCZ",
        "s3 was dropped"
    );

    // A reset that fails drops nothing: DISCARD ALL is refused inside a transaction.
    let mut m = BytesMut::new();
    frontend::query("BEGIN", &mut m).unwrap();
    frontend::query("DISCARD ALL", &mut m).unwrap();
    frontend::query("ROLLBACK", &mut m).unwrap();
    s.write_all(&m).await.unwrap();
    read_until_ready(&mut s).await;
    let refused = read_until_ready(&mut s).await;
    assert_eq!(error_code(&refused[0].1), "25001", "{refused:?}");
    read_until_ready(&mut s).await;
    let mut m = BytesMut::new();
    bind_execute(&mut m, "s3");
    frontend::sync(&mut m);
    assert_eq!(tags(&round_trip(&mut s, m).await), "2DCZ");
}

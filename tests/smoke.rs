mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    let clusters = cluster::shared();
    let db = fresh_db(&clusters.primary, "smoke");
    let mux = start_pgmux(&config_text(
        &clusters.primary,
        &db,
        "default_pool_size = 2",
        "",
    ))
    .await;
    let c = connect(mux.addr, "app", "app-secret", &db).await.unwrap();
    let row = c.query_one("SELECT 1 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    c.batch_execute("BEGIN; INSERT INTO items(v) VALUES ('x'); COMMIT")
        .await
        .unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

// node-postgres through pgmux with the driver's default settings.
//
// Usage: node pg_check.js CONNECTION_STRING CLIENTS
//
// A pg.Pool larger than pgmux's pool runs parameterized queries (unnamed statements,
// the default), named queries ({name, text, values}: pg prepares each name once per
// connection and reuses it), and transactions. Prints one JSON line; exits 1 on error.
"use strict";

const pg = require("pg");

function check(ok, what) {
  if (!ok) throw new Error(what);
}

async function worker(pool, i, pids) {
  for (let r = 0; r < 20; r++) {
    const plain = await pool.query("SELECT $1::int + 1 AS v", [i * 100 + r]);
    check(plain.rows[0].v === i * 100 + r + 1, `sum ${plain.rows[0].v}`);
    const named = await pool.query({
      name: "double-and-pid",
      text: "SELECT $1::int * 2 AS v, pg_backend_pid() AS pid",
      values: [r],
    });
    check(named.rows[0].v === r * 2, `product ${named.rows[0].v}`);
    pids.add(named.rows[0].pid);
  }
  const client = await pool.connect();
  try {
    for (let r = 0; r < 5; r++) {
      await client.query("BEGIN");
      await client.query({
        name: "insert-item",
        text: "INSERT INTO items(v) VALUES ($1)",
        values: [`node ${i} ${r}`],
      });
      const row = await client.query({
        name: "double-and-pid",
        text: "SELECT $1::int * 2 AS v, pg_backend_pid() AS pid",
        values: [r],
      });
      pids.add(row.rows[0].pid);
      await client.query(r === 4 ? "ROLLBACK" : "COMMIT");
    }
    const n = await client.query({
      name: "count-items",
      text: "SELECT count(*)::int AS n FROM items WHERE v LIKE $1",
      values: [`node ${i} %`],
    });
    check(n.rows[0].n === 4, `committed rows ${n.rows[0].n}`);
  } finally {
    client.release();
  }
}

async function main() {
  const [url, clients] = process.argv.slice(2);
  const pool = new pg.Pool({ connectionString: url, max: 8, connectionTimeoutMillis: 20000 });
  const pids = new Set();
  try {
    const workers = [];
    for (let i = 0; i < Number(clients); i++) workers.push(worker(pool, i, pids));
    await Promise.all(workers);
  } finally {
    await pool.end();
  }
  const version = require("pg/package.json").version;
  console.log(JSON.stringify({ pg: version, backend_pids: pids.size }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

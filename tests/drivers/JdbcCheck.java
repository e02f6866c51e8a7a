// pgjdbc through pgmux with the driver's default settings.
//
// Usage: java -cp CLASSES:postgresql.jar JdbcCheck URL USER PASSWORD THREADS
//
// pgjdbc switches a PreparedStatement to a named server-side statement (S_N) from its
// fifth execution on (prepareThreshold = 5), keeps it for the connection's life, and
// with autocommit off sends BEGIN in the same round trip as the first statement. Each
// thread has its own connection, more than pgmux has servers, and runs a statement 25
// times, batches, and transactions; then a schema change under named statements.
// Prints "ok backend_pids=N"; exits 1 on any error.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;

public class JdbcCheck {
    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    static void run(String url, String user, String password, int t, Set<Integer> pids)
            throws SQLException {
        try (Connection conn = DriverManager.getConnection(url, user, password)) {
            // The same PreparedStatement over and over: unnamed at first, then named.
            try (PreparedStatement ps =
                    conn.prepareStatement("SELECT ?::int + 1, pg_backend_pid()")) {
                for (int i = 0; i < 25; i++) {
                    ps.setInt(1, t * 1000 + i);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next(), "a row");
                        check(rs.getInt(1) == t * 1000 + i + 1, "sum " + rs.getInt(1));
                        pids.add(rs.getInt(2));
                    }
                }
            }
            // Batches: many Bind/Execute of one statement in one round trip.
            try (PreparedStatement ins =
                    conn.prepareStatement("INSERT INTO items(v) VALUES (?)")) {
                for (int b = 0; b < 8; b++) {
                    for (int k = 0; k < 20; k++) {
                        ins.setString(1, "jdbc " + t + " " + b + " " + k);
                        ins.addBatch();
                    }
                    int[] counts = ins.executeBatch();
                    check(counts.length == 20, "batch size " + counts.length);
                    for (int c : counts) {
                        check(c == 1, "batch count " + c);
                    }
                }
            }
            // Transactions: BEGIN goes out pipelined with the first statement.
            conn.setAutoCommit(false);
            try (PreparedStatement sel =
                            conn.prepareStatement("SELECT ?::int * 2, pg_backend_pid()");
                    PreparedStatement ins =
                            conn.prepareStatement("INSERT INTO items(v) VALUES (?)")) {
                for (int i = 0; i < 20; i++) {
                    sel.setInt(1, i);
                    try (ResultSet rs = sel.executeQuery()) {
                        check(rs.next(), "a row");
                        check(rs.getInt(1) == i * 2, "product " + rs.getInt(1));
                        pids.add(rs.getInt(2));
                    }
                    ins.setString(1, "jdbc tx " + t + " " + i);
                    check(ins.executeUpdate() == 1, "insert");
                    if (i % 5 == 4) {
                        conn.rollback();
                    } else {
                        conn.commit();
                    }
                }
            }
            conn.setAutoCommit(true);
            try (PreparedStatement count =
                    conn.prepareStatement("SELECT count(*) FROM items WHERE v LIKE ?")) {
                count.setString(1, "jdbc " + t + " %");
                try (ResultSet rs = count.executeQuery()) {
                    rs.next();
                    check(rs.getInt(1) == 160, "batched rows " + rs.getInt(1));
                }
                count.setString(1, "jdbc tx " + t + " %");
                try (ResultSet rs = count.executeQuery()) {
                    rs.next();
                    check(rs.getInt(1) == 16, "committed rows " + rs.getInt(1));
                }
            }
        }
    }

    // After ALTER TABLE, a named statement fails with "cached plan must not change result
    // type"; pgjdbc then prepares it again and retries by itself (autocommit on).
    static void schemaChange(String url, String user, String password) throws SQLException {
        try (Connection a = DriverManager.getConnection(url, user, password);
                Connection b = DriverManager.getConnection(url, user, password)) {
            a.createStatement().execute(
                    "CREATE TABLE jdbc_ddl(x int); INSERT INTO jdbc_ddl VALUES (1)");
            PreparedStatement pa = a.prepareStatement("SELECT * FROM jdbc_ddl");
            PreparedStatement pb = b.prepareStatement("SELECT * FROM jdbc_ddl");
            for (int i = 0; i < 6; i++) {
                pa.executeQuery().close();
                pb.executeQuery().close();
            }
            a.createStatement().execute("ALTER TABLE jdbc_ddl ADD COLUMN y int DEFAULT 7");
            for (PreparedStatement p : new PreparedStatement[] {pa, pb, pa, pb}) {
                try (ResultSet rs = p.executeQuery()) {
                    check(rs.next(), "a row");
                    check(rs.getMetaData().getColumnCount() == 2, "the new column");
                    check(rs.getInt(2) == 7, "its default");
                }
            }
        }
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        String user = args[1];
        String password = args[2];
        int threads = Integer.parseInt(args[3]);
        Set<Integer> pids = ConcurrentHashMap.newKeySet();
        List<Throwable> errors = new ArrayList<>();
        List<Thread> all = new ArrayList<>();
        for (int t = 0; t < threads; t++) {
            final int id = t;
            Thread th = new Thread(() -> {
                try {
                    run(url, user, password, id, pids);
                } catch (Throwable e) {
                    synchronized (errors) {
                        errors.add(e);
                    }
                }
            });
            th.start();
            all.add(th);
        }
        for (Thread th : all) {
            th.join();
        }
        if (!errors.isEmpty()) {
            for (Throwable e : errors) {
                e.printStackTrace();
            }
            System.exit(1);
        }
        schemaChange(url, user, password);
        System.out.println("ok backend_pids=" + pids.size());
    }
}

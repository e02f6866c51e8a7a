import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;

/**
 * pgjdbc's read-only transactions through pgmux with a replica. With autocommit off and
 * setReadOnly(true), pgjdbc sends BEGIN READ ONLY pipelined with the first statement of
 * each transaction. Usage: JdbcReadOnly URL USER PASSWORD ROUNDS. Prints
 * "ok replica=N primary=M": transactions that ran on the replica (read-only ones) and
 * on the primary (read-write ones).
 */
public class JdbcReadOnly {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        int rounds = Integer.parseInt(args[3]);
        int replica = 0;
        int primary = 0;
        try (Connection conn = DriverManager.getConnection(url, args[1], args[2])) {
            conn.setAutoCommit(false);
            conn.setReadOnly(true);
            try (PreparedStatement st = conn.prepareStatement("SELECT pg_is_in_recovery(), ?::int")) {
                for (int i = 0; i < rounds; i++) {
                    st.setInt(1, i);
                    try (ResultSet rs = st.executeQuery()) {
                        rs.next();
                        if (rs.getBoolean(1) && rs.getInt(2) == i) {
                            replica++;
                        }
                    }
                    conn.commit();
                }
            }
            conn.setReadOnly(false);
            try (PreparedStatement st = conn.prepareStatement("SELECT pg_is_in_recovery()")) {
                for (int i = 0; i < rounds; i++) {
                    try (ResultSet rs = st.executeQuery()) {
                        rs.next();
                        if (!rs.getBoolean(1)) {
                            primary++;
                        }
                    }
                    conn.commit();
                }
            }
        }
        System.out.println("ok replica=" + replica + " primary=" + primary);
    }
}

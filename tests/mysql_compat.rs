//! The MySQL front behaves as the server itself (issues 18 and 25): each test runs the same
//! client steps straight against MariaDB and through waitless (same server, pool_size 1 so
//! the next client gets the same server connection) and asserts that the two transcripts are
//! equal, never a value written down here. Clients are the ones applications use (mysql_async,
//! PyMySQL, PHP PDO and mysqli, the `mariadb` CLI) and packets by hand for what they hide
//! (login OK status flags, cursors fetched in batches). Every client call is bounded, so a
//! relay that loses a response's end fails the test instead of hanging it.

mod common;

use std::future::Future;
use std::time::Duration;

use common::mysql::*;
use common::*;
use mysql_async::prelude::*;
use mysql_async::{Conn, QueryResult};
use mysql_common::constants::CapabilityFlags as C;

/// The longest one client call or script may take; the server answers these in milliseconds.
const LIMIT: Duration = Duration::from_secs(15);

/// Tables and procedures the tests call, created once on each test's own server.
const SCHEMA: &[&str] = &[
    "CREATE TABLE nums (n INT PRIMARY KEY)",
    "INSERT INTO nums VALUES (1), (2), (3), (4), (5), (6), (7)",
    "CREATE TABLE log (tag VARCHAR(32))",
    "CREATE TABLE plain (x INT)",
    // Two result sets, then an OUT parameter (a result set of its own in the binary protocol).
    "CREATE PROCEDURE two_and_out(OUT o INT) BEGIN \
       SELECT n FROM nums WHERE n <= 2 ORDER BY n; SELECT 'b' AS b, 3 AS c; SET o = 42; END",
    // A SELECT inside an open cursor loop: MariaDB sets SERVER_STATUS_CURSOR_EXISTS on the
    // column EOF of each of these result sets although no cursor was asked for.
    "CREATE PROCEDURE cursor_loop() BEGIN \
       DECLARE done INT DEFAULT 0; DECLARE v INT; \
       DECLARE c CURSOR FOR SELECT n FROM nums WHERE n <= 3 ORDER BY n; \
       DECLARE CONTINUE HANDLER FOR NOT FOUND SET done = 1; \
       OPEN c; l: LOOP FETCH c INTO v; IF done THEN LEAVE l; END IF; SELECT v; END LOOP; \
       CLOSE c; END",
    // A transaction begun and committed inside a procedure, then a result set: the final
    // OK's status flags say whether the client's session is in a transaction.
    "CREATE PROCEDURE commit_inside() BEGIN START TRANSACTION; \
       INSERT INTO log VALUES ('in procedure'); COMMIT; SELECT 'committed' AS c; \
       DELETE FROM log WHERE tag = 'in procedure'; END",
    // An error in the middle of a multi-result response, and one on its own.
    "CREATE PROCEDURE signal_after_select() BEGIN SELECT 1 AS before_signal; \
       SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'signalled', MYSQL_ERRNO = 1644; END",
    "CREATE PROCEDURE signal_only() BEGIN \
       SIGNAL SQLSTATE '45001' SET MESSAGE_TEXT = 'only a signal'; END",
];

/// A test's server (with `server_extra` options) and waitless in front of it with one pooled
/// connection, so every client after the first gets a reused server connection.
async fn setup(server_extra: &[&str]) -> (MariaDb, MysqlProxy) {
    let db = MariaDb::start_with(server_extra).await;
    let mut c = connect(db.port, Some("appdb")).await;
    for sql in SCHEMA {
        c.query_drop(*sql).await.unwrap();
    }
    c.disconnect().await.unwrap();
    let proxy = MysqlProxy::start(db.port, "", "pool_size = 1\nmax_connections = 1").await;
    (db, proxy)
}

/// `f`, or a panic naming `what` if it takes longer than LIMIT.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {LIMIT:?} (a hang)"))
}

/// The comparisons of one test, each printed as it is made and all asserted at the end, so a
/// failing test names every client and case that differs, not only the first.
#[derive(Default)]
struct Verdict(Vec<String>);

impl Verdict {
    /// The transcript through waitless must equal the one straight from the server.
    fn same(&mut self, what: &str, direct: &[String], proxied: &[String]) {
        println!("{what}, direct:\n  {}", direct.join("\n  "));
        println!("{what}, through waitless:\n  {}", proxied.join("\n  "));
        if proxied != direct {
            self.0.push(format!(
                "{what}: through waitless differs from direct\n    direct:  {direct:?}\n    \
                 waitless: {proxied:?}"
            ));
        }
    }

    /// Every session through waitless ran on one server connection.
    fn one_connection<T: std::fmt::Debug + PartialEq>(&mut self, what: &str, ids: &[T]) {
        if !(ids.len() > 1 && ids.iter().all(|i| *i == ids[0])) {
            self.0.push(format!(
                "{what}: the sessions through waitless did not share one server connection: \
                 {ids:?}"
            ));
        }
    }

    /// The sessions through waitless ran on different server connections: state no reset
    /// clears made waitless close the first one.
    fn different_connections<T: std::fmt::Debug + PartialEq>(&mut self, what: &str, ids: &[T]) {
        if !(ids.len() == 2 && ids.first() != ids.get(1)) {
            self.0.push(format!(
                "{what}: the next session through waitless got the same server connection: \
                 {ids:?}"
            ));
        }
    }

    /// The sessions at each pair of indexes ran on one server connection: sessions that
    /// logged in alike, one after the other, with one pooled connection. (Sessions that
    /// logged in differently may get another: a pool keyed by login options is a valid
    /// design.)
    fn reused<T: std::fmt::Debug + PartialEq>(
        &mut self,
        what: &str,
        ids: &[T],
        pairs: &[(usize, usize)],
    ) {
        for &(a, b) in pairs {
            if !(ids.get(a).is_some() && ids.get(a) == ids.get(b)) {
                self.0.push(format!(
                    "{what}: sessions {a} and {b} through waitless did not share a server \
                     connection, so the reused case was not tested: {ids:?}"
                ));
            }
        }
    }

    fn end(self) {
        assert!(self.0.is_empty(), "{}", self.0.join("\n"));
    }
}

/// Splits a script's output into its transcript and the `id N` lines (CONNECTION_ID() of
/// each session, which differs between direct sessions and must not between pooled ones).
fn split_ids(out: &str) -> (Vec<String>, Vec<String>) {
    let (ids, lines): (Vec<&str>, Vec<&str>) = out.lines().partition(|l| l.starts_with("id "));
    (
        lines.into_iter().map(str::to_owned).collect(),
        ids.into_iter().map(str::to_owned).collect(),
    )
}

// ---------------------------------------------------------------------------------------
// mysql_async transcripts

/// Every result set of `result` (columns and rows, or the OK's affected rows), or the error
/// that ended it, as lines.
async fn sets<P: Protocol>(
    result: mysql_async::Result<QueryResult<'_, 'static, P>>,
) -> Vec<String> {
    let mut lines = Vec::new();
    let mut r = match result {
        Ok(r) => r,
        Err(e) => return vec![error_line(&e)],
    };
    loop {
        let columns: Vec<String> = r
            .columns_ref()
            .iter()
            .map(|c| c.name_str().into_owned())
            .collect();
        let affected = r.affected_rows();
        match r.collect::<mysql_async::Row>().await {
            Ok(_) if columns.is_empty() => lines.push(format!("ok affected={affected}")),
            Ok(rows) => {
                let rows: Vec<_> = rows.into_iter().map(|r| r.unwrap()).collect();
                lines.push(format!("set {columns:?} {rows:?}"));
            }
            Err(e) => {
                lines.push(error_line(&e));
                break;
            }
        }
        if r.is_empty() {
            break;
        }
    }
    lines
}

fn error_line(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => format!("error {} {} {}", s.code, s.state, s.message),
        other => format!("client error: {other}"),
    }
}

/// `sql` (text protocol) as transcript lines, bounded.
async fn text(c: &mut Conn, sql: &str) -> Vec<String> {
    bounded(sql, async { sets(c.query_iter(sql).await).await }).await
}

/// A session's CONNECTION_ID().
async fn connection_id(c: &mut Conn) -> u64 {
    bounded(
        "SELECT CONNECTION_ID()",
        c.query_first("SELECT CONNECTION_ID()"),
    )
    .await
    .unwrap()
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// Scripts for PyMySQL and PHP: a prelude that connects and prints what each statement gave.

const PY_PRELUDE: &str = r#"
import sys, pymysql
from pymysql.constants import CLIENT
HOST, PORT, USER, PW = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def connect(**kw):
    kw.setdefault('database', 'appdb')
    return pymysql.connect(host=HOST, port=PORT, user=USER, password=PW, **kw)
def show(cur):
    while True:
        if cur.description:
            print('set', [d[0] for d in cur.description], list(cur.fetchall()))
        else:
            print('ok affected', cur.rowcount)
        if not cur.nextset():
            break
def run(c, sql):
    try:
        cur = c.cursor()
        cur.execute(sql)
        show(cur)
        print('status', hex(c.server_status))
    except pymysql.MySQLError as e:
        print('error', e.args)
"#;

const PHP_PRELUDE: &str = r#"
[$_, $HOST, $PORT, $USER, $PW] = $argv;
$PORT = (int)$PORT;
mysqli_report(MYSQLI_REPORT_ERROR | MYSQLI_REPORT_STRICT);
function my($flags = 0) {
    global $HOST, $PORT, $USER, $PW;
    $m = mysqli_init();
    $m->real_connect($HOST, $USER, $PW, 'appdb', $PORT, null, $flags);
    return $m;
}
function my_run($m, $sql) {
    try {
        // real_query, not multi_query: mysqlnd turns multi-statements on for the latter with
        // COM_SET_OPTION, which makes waitless retire the server connection afterwards.
        $m->real_query($sql);
        do {
            if ($r = $m->store_result()) { echo 'set ', json_encode($r->fetch_all()), "\n"; $r->free(); }
            else { echo 'ok affected ', $m->affected_rows, "\n"; }
        } while ($m->more_results() && $m->next_result());
    } catch (mysqli_sql_exception $e) { echo 'error ', $e->getCode(), ' ', $e->getMessage(), "\n"; }
}
function pdo() {
    global $HOST, $PORT, $USER, $PW;
    return new PDO("mysql:host=$HOST;port=$PORT;dbname=appdb", $USER, $PW,
        [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);
}
function pdo_show($s) {
    do {
        if ($s->columnCount() > 0) { echo 'set ', json_encode($s->fetchAll(PDO::FETCH_NUM)), "\n"; }
        else { echo 'ok affected ', $s->rowCount(), "\n"; }
    } while ($s->nextRowset());
    $s->closeCursor();
}
function pdo_run($p, $sql) {
    try { pdo_show($p->query($sql)); }
    catch (PDOException $e) { echo 'error ', $e->getCode(), ' ', $e->getMessage(), "\n"; }
}
"#;

/// Runs `body` after the interpreter's prelude against `port` (see `Interpreter::run`).
async fn script(lang: Interpreter, body: &str, port: u16) -> String {
    let prelude = match lang {
        Interpreter::PyMySql => PY_PRELUDE,
        Interpreter::Php => PHP_PRELUDE,
    };
    lang.run(&format!("{prelude}\n{body}"), port, LIMIT).await
}

/// Runs `body` direct and through waitless and asserts the same transcript, and that the
/// sessions through waitless (when the script prints `id` lines) ran on one server connection,
/// or with `pairs`, that those pairs did. Skipped with a note when the interpreter is missing.
async fn same_script(
    v: &mut Verdict,
    what: &str,
    lang: Interpreter,
    body: &str,
    (db, proxy): (&MariaDb, &MysqlProxy),
    pairs: &[(usize, usize)],
) {
    if !lang.available().await {
        return;
    }
    let (direct, _) = split_ids(&script(lang, body, db.port).await);
    let (proxied, ids) = split_ids(&script(lang, body, proxy.port).await);
    v.same(what, &direct, &proxied);
    if ids.is_empty() {
    } else if pairs.is_empty() {
        v.one_connection(what, &ids);
    } else {
        v.reused(what, &ids, pairs);
    }
}

// ---------------------------------------------------------------------------------------
// Issue 25: stored procedures, cursors, errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procedure_result_sets_out_parameter_and_a_transaction_after_are_as_direct_with_mysql_async(
) {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    async fn steps(port: u16) -> Vec<String> {
        let mut c = connect(port, Some("appdb")).await;
        let mut lines = text(&mut c, "CALL two_and_out(@o)").await;
        lines.extend(text(&mut c, "SELECT @o").await);
        // The binary protocol: the OUT parameter comes back as a result set of its own
        // (SERVER_PS_OUT_PARAMS).
        lines.extend(
            bounded("prepared CALL", async {
                sets(c.exec_iter("CALL two_and_out(?)", (0,)).await).await
            })
            .await,
        );
        for sql in [
            "START TRANSACTION",
            "SELECT @@in_transaction",
            "INSERT INTO log VALUES ('mysql_async')",
            "COMMIT",
            "SELECT @@in_transaction, COUNT(*) FROM log WHERE tag = 'mysql_async'",
            "DELETE FROM log WHERE tag = 'mysql_async'",
            "CALL commit_inside()",
            "SELECT @@in_transaction",
        ] {
            lines.extend(text(&mut c, sql).await);
        }
        bounded("disconnect", c.disconnect()).await.unwrap();
        lines
    }
    let direct = steps(db.port).await;
    // Twice through waitless: on a fresh server connection, then on the reused one.
    for round in ["fresh", "reused"] {
        let proxied = steps(proxy.port).await;
        v.same(
            &format!("CALL with mysql_async ({round})"),
            &direct,
            &proxied,
        );
    }
    v.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procedure_result_sets_out_parameter_and_a_transaction_after_are_as_direct_with_pymysql() {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    let body = r#"
for round in ('fresh', 'reused'):
    c = connect()
    run(c, 'CALL two_and_out(@o)')
    run(c, 'SELECT @o')
    cur = c.cursor()
    try:
        cur.callproc('two_and_out', (0,))
        show(cur)
        run(c, 'SELECT @_two_and_out_0')
    except pymysql.MySQLError as e:
        print('error', e.args)
    c.begin()
    run(c, "INSERT INTO log VALUES ('pymysql')")
    c.commit()
    run(c, "SELECT @@in_transaction, COUNT(*) FROM log WHERE tag = 'pymysql'")
    run(c, "DELETE FROM log WHERE tag = 'pymysql'")
    c.commit()
    run(c, 'SELECT CONNECTION_ID()')
    c.close()
"#;
    // CONNECTION_ID() lines are the only ones that may differ: drop them from both.
    let body = body.replace(
        "run(c, 'SELECT CONNECTION_ID()')",
        "cur = c.cursor(); cur.execute('SELECT CONNECTION_ID()'); print('id', cur.fetchone()[0])",
    );
    same_script(
        &mut v,
        "CALL with PyMySQL",
        Interpreter::PyMySql,
        &body,
        (&db, &proxy),
        &[],
    )
    .await;
    v.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procedure_result_sets_out_parameter_and_a_transaction_after_are_as_direct_with_php_pdo() {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    let body = r#"
// A function per session: its statements go with it, and with them the connection (a
// statement left alive keeps PDO's connection open).
function session() {
    $p = pdo();
    pdo_run($p, 'CALL two_and_out(@o)');
    pdo_run($p, 'SELECT @o');
    // Server-side prepared statements (COM_STMT_EXECUTE), as with ATTR_EMULATE_PREPARES off.
    $p->setAttribute(PDO::ATTR_EMULATE_PREPARES, false);
    try { $s = $p->prepare('CALL two_and_out(@o2)'); $s->execute(); pdo_show($s); }
    catch (PDOException $e) { echo 'error ', $e->getCode(), ' ', $e->getMessage(), "\n"; }
    pdo_run($p, 'SELECT @o2');
    try {
        $p->beginTransaction();
        echo 'in transaction ', var_export($p->inTransaction(), true), "\n";
        $p->exec("INSERT INTO log VALUES ('pdo')");
        $p->commit();
        echo 'committed, in transaction ', var_export($p->inTransaction(), true), "\n";
    } catch (PDOException $e) { echo 'error ', $e->getCode(), ' ', $e->getMessage(), "\n"; }
    pdo_run($p, "SELECT @@in_transaction, COUNT(*) FROM log WHERE tag = 'pdo'");
    pdo_run($p, "DELETE FROM log WHERE tag = 'pdo'");
    pdo_run($p, 'CALL commit_inside()');
    try {
        $p->beginTransaction();
        echo 'after commit_inside, in transaction ', var_export($p->inTransaction(), true), "\n";
        $p->rollBack();
    } catch (PDOException $e) { echo 'error ', $e->getCode(), ' ', $e->getMessage(), "\n"; }
    echo 'id ', $p->query('SELECT CONNECTION_ID()')->fetchColumn(), "\n";
}
session(); // a fresh server connection through waitless
session(); // the reused one
"#;
    same_script(
        &mut v,
        "CALL with PHP PDO",
        Interpreter::Php,
        body,
        (&db, &proxy),
        &[],
    )
    .await;
    v.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procedure_result_sets_out_parameter_and_a_transaction_after_are_as_direct_with_php_mysqli()
{
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    let body = r#"
foreach (['fresh', 'reused'] as $round) {
    $m = my();
    my_run($m, 'CALL two_and_out(@o)');
    my_run($m, 'SELECT @o');
    try {
        $s = $m->prepare('CALL two_and_out(?)');
        $o = 0;
        $s->bind_param('i', $o);
        $s->execute();
        do {
            if ($r = $s->get_result()) { echo 'set ', json_encode($r->fetch_all()), "\n"; }
            else { echo 'ok affected ', $s->affected_rows, "\n"; }
        } while ($s->more_results() && $s->next_result());
        $s->close();
    } catch (mysqli_sql_exception $e) { echo 'error ', $e->getCode(), ' ', $e->getMessage(), "\n"; }
    try {
        $m->begin_transaction();
        $m->query("INSERT INTO log VALUES ('mysqli')");
        $m->commit();
    } catch (mysqli_sql_exception $e) { echo 'error ', $e->getCode(), ' ', $e->getMessage(), "\n"; }
    my_run($m, "SELECT @@in_transaction, COUNT(*) FROM log WHERE tag = 'mysqli'");
    my_run($m, "DELETE FROM log WHERE tag = 'mysqli'");
    echo 'id ', $m->query('SELECT CONNECTION_ID()')->fetch_row()[0], "\n";
    $m->close();
}
"#;
    same_script(
        &mut v,
        "CALL with PHP mysqli",
        Interpreter::Php,
        body,
        (&db, &proxy),
        &[],
    )
    .await;
    v.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_side_cursor_fetched_in_batches_is_as_direct() {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    let mut watch = db.watcher().await;
    async fn steps(port: u16) -> Vec<String> {
        let mut s = raw::Session::login(port, C::empty(), Some("appdb")).await;
        let mut lines = Vec::new();
        let id = s
            .prepare("SELECT n, n * 10 FROM nums ORDER BY n", &mut lines)
            .await;
        if let Some(id) = id {
            s.execute_with_cursor(id, &mut lines).await;
            // Batches of 3 over 7 rows: two full fetches, one short one with LAST_ROW_SENT.
            for _ in 0..3 {
                s.fetch(id, 3, &mut lines).await;
            }
            s.close_statement(id).await;
        }
        // The session goes on, and a transaction on it behaves.
        for sql in [
            "SELECT 1",
            "START TRANSACTION",
            "INSERT INTO log VALUES ('cursor')",
            "COMMIT",
            "SELECT COUNT(*) FROM log WHERE tag = 'cursor'",
            "DELETE FROM log WHERE tag = 'cursor'",
        ] {
            lines.extend(s.query(sql).await);
        }
        lines
    }
    let fetches = watch.status("Com_stmt_fetch").await;
    let direct = steps(db.port).await;
    assert_eq!(
        watch.status("Com_stmt_fetch").await - fetches,
        3,
        "the direct run fetched from a cursor three times"
    );
    for round in ["fresh", "reused"] {
        let proxied = steps(proxy.port).await;
        v.same(&format!("cursor by hand ({round})"), &direct, &proxied);
    }
    v.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_side_cursor_fetched_in_batches_is_as_direct_with_php_mysqli() {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    if !Interpreter::Php.available().await {
        return;
    }
    let mut watch = db.watcher().await;
    let body = r#"
foreach (['fresh', 'reused'] as $round) {
    $m = my();
    try {
        $s = $m->prepare('SELECT n, n * 10 FROM nums ORDER BY n');
        $s->attr_set(MYSQLI_STMT_ATTR_CURSOR_TYPE, MYSQLI_CURSOR_TYPE_READ_ONLY);
        $s->execute();
        $s->bind_result($n, $t);
        $rows = [];
        while ($s->fetch()) { $rows[] = "$n:$t"; }
        echo 'cursor ', implode(',', $rows), "\n";
        $s->close();
    } catch (mysqli_sql_exception $e) { echo 'error ', $e->getCode(), ' ', $e->getMessage(), "\n"; }
    my_run($m, 'SELECT 1');
    $m->begin_transaction();
    my_run($m, "INSERT INTO log VALUES ('mysqli cursor')");
    $m->commit();
    my_run($m, "SELECT @@in_transaction, COUNT(*) FROM log WHERE tag = 'mysqli cursor'");
    my_run($m, "DELETE FROM log WHERE tag = 'mysqli cursor'");
    echo 'id ', $m->query('SELECT CONNECTION_ID()')->fetch_row()[0], "\n";
    $m->close();
}
"#;
    let fetches = watch.status("Com_stmt_fetch").await;
    let (direct, _) = split_ids(&script(Interpreter::Php, body, db.port).await);
    // mysqlnd has no MYSQLI_STMT_ATTR_PREFETCH_ROWS ("Not implemented"): it fetches one row
    // per COM_STMT_FETCH.
    let fetched = watch.status("Com_stmt_fetch").await - fetches;
    assert!(
        fetched >= 7,
        "mysqli fetched from a cursor {fetched} times: not the case under test"
    );
    let (proxied, ids) = split_ids(&script(Interpreter::Php, body, proxy.port).await);
    v.same("cursor with PHP mysqli", &direct, &proxied);
    v.one_connection("cursor with PHP mysqli", &ids);
    v.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_select_inside_a_procedures_cursor_loop_does_not_end_the_response() {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    // By hand, without CLIENT_DEPRECATE_EOF: the column EOFs carry the flag.
    async fn by_hand(port: u16) -> Vec<String> {
        let mut s = raw::Session::login(port, C::empty(), Some("appdb")).await;
        let mut lines = s.query("CALL cursor_loop()").await;
        lines.extend(s.query("SELECT 'after'").await);
        lines
    }
    async fn with_mysql_async(port: u16) -> Vec<String> {
        let mut c = connect(port, Some("appdb")).await;
        let mut lines = text(&mut c, "CALL cursor_loop()").await;
        lines.extend(text(&mut c, "SELECT 'after'").await);
        lines
    }
    let direct = by_hand(db.port).await;
    for round in ["fresh", "reused"] {
        v.same(
            &format!("cursor loop by hand ({round})"),
            &direct,
            &by_hand(proxy.port).await,
        );
    }
    let direct = with_mysql_async(db.port).await;
    v.same(
        "cursor loop with mysql_async",
        &direct,
        &with_mysql_async(proxy.port).await,
    );
    let body = r#"
c = connect()
run(c, 'CALL cursor_loop()')
run(c, "SELECT 'after'")
"#;
    same_script(
        &mut v,
        "cursor loop with PyMySQL",
        Interpreter::PyMySql,
        body,
        (&db, &proxy),
        &[],
    )
    .await;
    // The stock client (killed by `timeout` if it hangs).
    let sql = ["appdb", "-e", "CALL cursor_loop(); SELECT 'after'"];
    let cli_run = |port| {
        let (ok, out, err) = cli_bounded(port, &sql);
        vec![format!("ok={ok}"), out, err]
    };
    v.same(
        "cursor loop with the mariadb CLI",
        &cli_run(db.port),
        &cli_run(proxy.port),
    );
    v.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_inside_a_procedure_reaches_the_client_and_the_session_goes_on() {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    async fn by_hand(port: u16) -> Vec<String> {
        let mut s = raw::Session::login(port, C::empty(), Some("appdb")).await;
        let mut lines = Vec::new();
        for sql in [
            "CALL signal_after_select()",
            "SELECT 'after the first'",
            "CALL signal_only()",
            "SELECT 'after the second'",
        ] {
            lines.extend(s.query(sql).await);
        }
        lines
    }
    async fn with_mysql_async(port: u16) -> Vec<String> {
        let mut c = connect(port, Some("appdb")).await;
        let mut lines = Vec::new();
        for sql in [
            "CALL signal_after_select()",
            "SELECT 'after the first'",
            "CALL signal_only()",
            "SELECT 'after the second'",
        ] {
            lines.extend(text(&mut c, sql).await);
        }
        lines
    }
    let direct = by_hand(db.port).await;
    for round in ["fresh", "reused"] {
        v.same(
            &format!("SIGNAL by hand ({round})"),
            &direct,
            &by_hand(proxy.port).await,
        );
    }
    let direct = with_mysql_async(db.port).await;
    v.same(
        "SIGNAL with mysql_async",
        &direct,
        &with_mysql_async(proxy.port).await,
    );
    let body = r#"
c = connect()
for sql in ('CALL signal_after_select()', "SELECT 'after the first'", 'CALL signal_only()', "SELECT 'after the second'"):
    run(c, sql)
"#;
    same_script(
        &mut v,
        "SIGNAL with PyMySQL",
        Interpreter::PyMySql,
        body,
        (&db, &proxy),
        &[],
    )
    .await;
    v.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_max_allowed_packet_gets_the_servers_error() {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    // Before waitless opens its connection, so every session starts with the small value.
    db.root_sql("SET GLOBAL max_allowed_packet = 16384");
    // One packet over the limit, and a command of several packets (over 16 MiB).
    let by_hand = |port: u16, size: usize| {
        let long = format!("SELECT LENGTH('{}')", "x".repeat(size));
        async move {
            let mut s = raw::Session::login(port, C::empty(), Some("appdb")).await;
            let mut lines = s.query("SELECT @@max_allowed_packet").await;
            lines.extend(s.query(&long).await);
            lines.extend(s.query("SELECT 'the same session'").await);
            // The server ends the session after that error; a new one works (the old one
            // gone first: waitless has one server connection to give).
            drop(s);
            settle().await;
            let mut again = raw::Session::login(port, C::empty(), Some("appdb")).await;
            lines.extend(again.query("SELECT 'a new session'").await);
            lines
        }
    };
    for size in [40_000, 17 << 20] {
        let direct = by_hand(db.port, size).await;
        for round in ["fresh", "after the error"] {
            v.same(
                &format!("{size}-byte query by hand ({round})"),
                &direct,
                &by_hand(proxy.port, size).await,
            );
        }
    }
    let body = r#"
c = connect()
run(c, 'SELECT @@max_allowed_packet')
run(c, "SELECT LENGTH('" + 'x' * 40000 + "')")
# Not the same session again: whether its next write meets a reset or an EOF is TCP's
# business (the server closes with unread data), not the protocol's.
c.close()
import time; time.sleep(0.3)
run(connect(), "SELECT 'a new session'")
"#;
    same_script(
        &mut v,
        "oversized query with PyMySQL",
        Interpreter::PyMySql,
        body,
        (&db, &proxy),
        &[],
    )
    .await;
    v.end();
}

// ---------------------------------------------------------------------------------------
// Issue 25: what a client asks for at login

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_client_sees_interactive_timeout_on_fresh_and_reused_connections() {
    let (db, proxy) = setup(&["--interactive-timeout=1234"]).await;
    let mut v = Verdict::default();
    // Interactive twice (fresh, then reused), plain twice, interactive again.
    let i = C::CLIENT_INTERACTIVE;
    let flags = [i, i, C::empty(), C::empty(), i];
    async fn by_hand(port: u16, flags: &[C]) -> (Vec<String>, Vec<String>) {
        let (mut lines, mut ids) = (Vec::new(), Vec::new());
        for f in flags {
            let mut s = raw::Session::login(port, *f, Some("appdb")).await;
            lines.push(format!("interactive={}", f.contains(C::CLIENT_INTERACTIVE)));
            lines.extend(
                s.query("SELECT @@wait_timeout, @@interactive_timeout")
                    .await,
            );
            ids.push(s.id().await);
        }
        (lines, ids)
    }
    let (direct, _) = by_hand(db.port, &flags).await;
    let (proxied, ids) = by_hand(proxy.port, &flags).await;
    v.same("CLIENT_INTERACTIVE by hand", &direct, &proxied);
    v.reused("CLIENT_INTERACTIVE by hand", &ids, &[(0, 1), (2, 3)]);

    let body = r#"
for flag in (CLIENT.INTERACTIVE, CLIENT.INTERACTIVE, 0, 0, CLIENT.INTERACTIVE):
    c = connect(client_flag=flag)
    print('interactive', flag != 0)
    run(c, 'SELECT @@wait_timeout, @@interactive_timeout')
    cur = c.cursor(); cur.execute('SELECT CONNECTION_ID()'); print('id', cur.fetchone()[0])
    c.close()
"#;
    same_script(
        &mut v,
        "CLIENT_INTERACTIVE with PyMySQL",
        Interpreter::PyMySql,
        body,
        (&db, &proxy),
        &[(0, 1), (2, 3)],
    )
    .await;
    let body = r#"
foreach ([MYSQLI_CLIENT_INTERACTIVE, MYSQLI_CLIENT_INTERACTIVE, 0, 0, MYSQLI_CLIENT_INTERACTIVE] as $f) {
    $m = my($f);
    echo 'interactive ', $f != 0 ? 'yes' : 'no', "\n";
    my_run($m, 'SELECT @@wait_timeout, @@interactive_timeout');
    echo 'id ', $m->query('SELECT CONNECTION_ID()')->fetch_row()[0], "\n";
    $m->close();
}
"#;
    same_script(
        &mut v,
        "CLIENT_INTERACTIVE with PHP mysqli",
        Interpreter::Php,
        body,
        (&db, &proxy),
        &[(0, 1), (2, 3)],
    )
    .await;
    v.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_ok_autocommit_flag_and_autocommit_follow_the_server_global() {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    // Before waitless opens its connection: a fresh server session starts with autocommit off.
    db.root_sql("SET GLOBAL autocommit = 0");
    async fn by_hand(port: u16) -> (Vec<String>, Vec<String>) {
        let (mut lines, mut ids) = (Vec::new(), Vec::new());
        for round in ["fresh", "reused"] {
            let mut s = raw::Session::login(port, C::empty(), Some("appdb")).await;
            lines.push(format!(
                "{round}: greeting autocommit={} login OK autocommit={} in transaction={}",
                s.greeting_status & raw::AUTOCOMMIT != 0,
                s.login_status & raw::AUTOCOMMIT != 0,
                s.login_status & raw::IN_TRANS != 0,
            ));
            lines.extend(s.query("SELECT @@autocommit, @@in_transaction").await);
            // The status of an OK after a write says whether a transaction is now open.
            lines.extend(s.query("INSERT INTO log VALUES ('autocommit')").await);
            lines.extend(s.query("ROLLBACK").await);
            lines.extend(s.query("SELECT COUNT(*) FROM log").await);
            ids.push(s.id().await);
        }
        (lines, ids)
    }
    let (direct, _) = by_hand(db.port).await;
    let (proxied, ids) = by_hand(proxy.port).await;
    v.same("autocommit off globally", &direct, &proxied);
    v.one_connection("autocommit off globally", &ids);

    // PyMySQL reads autocommit from the handshake; autocommit=None leaves the session as the
    // server made it.
    let body = r#"
for round in ('fresh', 'reused'):
    c = connect(autocommit=None)
    print(round, 'get_autocommit', c.get_autocommit())
    run(c, 'SELECT @@autocommit')
    cur = c.cursor(); cur.execute('SELECT CONNECTION_ID()'); print('id', cur.fetchone()[0])
    c.close()
"#;
    same_script(
        &mut v,
        "autocommit off globally with PyMySQL",
        Interpreter::PyMySql,
        body,
        (&db, &proxy),
        &[],
    )
    .await;
    v.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_space_from_the_client_flag_holds_on_fresh_and_reused_connections() {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    // The stock client's --ignore-spaces sets CLIENT_IGNORE_SPACE at login: with it twice
    // (fresh, then reused), without twice, with again.
    let with: &[&str] = &["--ignore-spaces"];
    let runs: [&[&str]; 5] = [with, with, &[], &[], with];
    let cli_runs = |port: u16| {
        let mut lines = Vec::new();
        let mut ids = Vec::new();
        for extra in runs {
            let mut args = extra.to_vec();
            args.extend(["appdb", "-e", "SELECT @@sql_mode; SELECT CONNECTION_ID()"]);
            let (ok, out, err) = cli_bounded(port, &args);
            let mut out = out.lines().map(str::to_owned).collect::<Vec<_>>();
            ids.extend(out.pop());
            lines.push(format!("{extra:?} ok={ok} {out:?} {err}"));
        }
        (lines, ids)
    };
    let (direct, _) = cli_runs(db.port);
    let (proxied, ids) = cli_runs(proxy.port);
    v.same("--ignore-spaces", &direct, &proxied);
    v.reused("--ignore-spaces", &ids, &[(0, 1), (2, 3)]);

    // By hand, and a function call with a space before its parenthesis, which only parses
    // with IGNORE_SPACE.
    async fn by_hand(port: u16) -> (Vec<String>, Vec<String>) {
        let (mut lines, mut ids) = (Vec::new(), Vec::new());
        let i = C::CLIENT_IGNORE_SPACE;
        for f in [i, i, C::empty(), C::empty(), i] {
            let mut s = raw::Session::login(port, f, Some("appdb")).await;
            lines.extend(s.query("SELECT @@sql_mode, COUNT (*) FROM nums").await);
            ids.push(s.id().await);
        }
        (lines, ids)
    }
    let (direct, _) = by_hand(db.port).await;
    let (proxied, ids) = by_hand(proxy.port).await;
    v.same("CLIENT_IGNORE_SPACE by hand", &direct, &proxied);
    v.reused("CLIENT_IGNORE_SPACE by hand", &ids, &[(0, 1), (2, 3)]);
    v.end();
}

/// The stock client, killed if it runs past LIMIT (a hang then shows as a failed run).
fn cli_bounded(port: u16, args: &[&str]) -> (bool, String, String) {
    let mut out = std::process::Command::new("timeout")
        .arg(format!("{}", LIMIT.as_secs()))
        .args(["mariadb", "--no-defaults", "-h127.0.0.1", "-N", "-B"])
        .arg(format!("-P{port}"))
        .arg(format!("-u{USER}"))
        .arg(format!("-p{PASSWORD}"))
        .args(args)
        .output()
        .expect("run mariadb");
    out.stdout.truncate(64 << 10);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------
// Issue 25: state that must not reach the next client

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_xa_transaction_left_by_a_client_is_detached_as_direct() {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    async fn steps(port: u16) -> (Vec<String>, Vec<u64>) {
        let mut a = connect(port, Some("appdb")).await;
        let mut ids = vec![connection_id(&mut a).await];
        let mut lines = Vec::new();
        for sql in [
            "XA START 'left'",
            "INSERT INTO log VALUES ('xa')",
            "XA END 'left'",
            "XA PREPARE 'left'",
        ] {
            lines.extend(text(&mut a, sql).await);
        }
        bounded("disconnect", a.disconnect()).await.unwrap();
        settle().await;
        let mut b = connect(port, Some("appdb")).await;
        ids.push(connection_id(&mut b).await);
        for sql in [
            "SELECT @@in_transaction",
            "INSERT INTO log VALUES ('next client')",
            "XA RECOVER",
            // Cleans up, so the next run starts from the same state.
            "XA ROLLBACK 'left'",
            "SELECT tag FROM log ORDER BY tag",
            "DELETE FROM log",
        ] {
            lines.extend(text(&mut b, sql).await);
        }
        bounded("disconnect", b.disconnect()).await.unwrap();
        (lines, ids)
    }
    let (direct, _) = steps(db.port).await;
    let (proxied, ids) = steps(proxy.port).await;
    v.same("prepared XA transaction left behind", &direct, &proxied);
    // No reset detaches a prepared XA transaction: waitless closes that server connection
    // (which detaches it, as a quitting client's does) rather than lend it again.
    v.different_connections("prepared XA transaction left behind", &ids);
    v.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiling_history_does_not_show_in_the_next_clients_show_profiles() {
    let (db, proxy) = setup(&[]).await;
    let mut v = Verdict::default();
    async fn steps(port: u16) -> (Vec<String>, Vec<u64>) {
        let mut a = connect(port, Some("appdb")).await;
        let mut ids = vec![connection_id(&mut a).await];
        for sql in [
            "SET profiling = 1",
            "SELECT 'profiled one'",
            "SELECT 'profiled two'",
        ] {
            text(&mut a, sql).await;
        }
        bounded("disconnect", a.disconnect()).await.unwrap();
        let mut b = connect(port, Some("appdb")).await;
        ids.push(connection_id(&mut b).await);
        let mut lines = text(&mut b, "SELECT @@profiling").await;
        // Durations differ run to run; the queries listed are what must match.
        let listed: Vec<String> = bounded(
            "SHOW PROFILES",
            b.query_map("SHOW PROFILES", |r: mysql_async::Row| {
                r.get::<String, _>(2).unwrap_or_default()
            }),
        )
        .await
        .unwrap();
        lines.push(format!("SHOW PROFILES: {listed:?}"));
        bounded("disconnect", b.disconnect()).await.unwrap();
        (lines, ids)
    }
    let (direct, _) = steps(db.port).await;
    let (proxied, ids) = steps(proxy.port).await;
    v.same("profiling history", &direct, &proxied);
    // The history outlives COM_RESET_CONNECTION: waitless closes that server connection.
    v.different_connections("profiling history", &ids);
    v.end();
}

// ---------------------------------------------------------------------------------------
// Issue 18: isolation of every state kind, a bounded pool, no reset after plain SELECTs

/// What a session does to leave state behind: SQL, or a binary-protocol statement left
/// prepared (COM_STMT_PREPARE, never closed).
#[derive(Clone, Copy, Debug)]
enum Leave {
    Sql(&'static str),
    Prepared(&'static str),
}

/// Each state kind: what leaves it, and what the next client runs to see it.
const STATE_KINDS: &[(&str, &[Leave], &str)] = &[
    (
        "user variable",
        &[Leave::Sql("SET @leak = 42")],
        "SELECT @leak",
    ),
    (
        "session variable session tracking does not report by default",
        &[Leave::Sql("SET SESSION wait_timeout = 77")],
        "SELECT @@session.wait_timeout",
    ),
    (
        "session variable session tracking reports",
        &[Leave::Sql("SET SESSION time_zone = '+03:00'")],
        "SELECT @@session.time_zone",
    ),
    (
        "autocommit",
        &[Leave::Sql("SET autocommit = 0")],
        "SELECT @@autocommit",
    ),
    (
        "isolation level",
        &[Leave::Sql(
            "SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        )],
        "SELECT @@session.tx_isolation",
    ),
    (
        "sql_mode",
        &[Leave::Sql("SET SESSION sql_mode = 'ANSI_QUOTES'")],
        "SELECT @@session.sql_mode",
    ),
    (
        "SET NAMES",
        &[Leave::Sql("SET NAMES latin1")],
        "SELECT @@character_set_client, @@character_set_connection, \
         @@character_set_results, @@collation_connection",
    ),
    (
        "temporary table",
        &[Leave::Sql("CREATE TEMPORARY TABLE scratch (x INT)")],
        "SELECT COUNT(*) FROM scratch",
    ),
    (
        "SQL PREPARE",
        &[Leave::Sql("PREPARE leak_stmt FROM 'SELECT 1'")],
        "EXECUTE leak_stmt",
    ),
    (
        "COM_STMT_PREPARE left open",
        &[Leave::Prepared("SELECT ? + 1")],
        "SHOW GLOBAL STATUS LIKE 'Prepared_stmt_count'",
    ),
    (
        "GET_LOCK",
        &[Leave::Sql("SELECT GET_LOCK('leak_lock', 0)")],
        "SELECT IS_FREE_LOCK('leak_lock')",
    ),
    (
        "open transaction with a write",
        &[
            Leave::Sql("START TRANSACTION"),
            Leave::Sql("INSERT INTO log VALUES ('uncommitted')"),
        ],
        "SELECT @@in_transaction, (SELECT COUNT(*) FROM log WHERE tag = 'uncommitted')",
    ),
    (
        "open read-only transaction",
        &[Leave::Sql("START TRANSACTION READ ONLY")],
        "SELECT @@in_transaction",
    ),
    (
        "LAST_INSERT_ID from an insert",
        &[Leave::Sql("INSERT INTO items (v) VALUES ('id')")],
        "SELECT LAST_INSERT_ID()",
    ),
    (
        "LAST_INSERT_ID set by a SELECT",
        &[Leave::Sql("SELECT LAST_INSERT_ID(99)")],
        "SELECT LAST_INSERT_ID()",
    ),
    (
        "USE other_db",
        &[Leave::Sql("USE other_db")],
        "SELECT DATABASE()",
    ),
    (
        "LOCK TABLES",
        &[Leave::Sql("LOCK TABLES plain READ")],
        "SELECT COUNT(*) FROM nums",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_state_kind_reaches_the_next_client_after_a_session_of_plain_selects() {
    let (db, proxy) = setup(&[]).await;
    // One session that leaves `leave` among plain SELECTs, then the next client's `probe`;
    // with the two CONNECTION_ID()s.
    async fn pair(port: u16, leave: &[Leave], probe: &str) -> (Vec<String>, [u64; 2]) {
        let mut a = connect(port, Some("appdb")).await;
        text(&mut a, "SELECT 1").await;
        let first = connection_id(&mut a).await;
        for l in leave {
            match l {
                Leave::Sql(sql) => {
                    let out = text(&mut a, sql).await;
                    assert!(!out.iter().any(|l| l.contains("error")), "{sql}: {out:?}");
                }
                Leave::Prepared(sql) => {
                    let stmt = bounded(sql, a.prep(*sql)).await.unwrap();
                    let _: Vec<mysql_async::Row> = bounded(sql, a.exec(&stmt, (1,))).await.unwrap();
                }
            }
        }
        text(&mut a, "SELECT 2").await;
        bounded("disconnect", a.disconnect()).await.unwrap();
        // A direct server ends the session after the client's COM_QUIT, in its own time.
        settle().await;
        let mut b = connect(port, Some("appdb")).await;
        let second = connection_id(&mut b).await;
        let seen = text(&mut b, probe).await;
        bounded("disconnect", b.disconnect()).await.unwrap();
        (seen, [first, second])
    }
    let mut leaks = Vec::new();
    for (kind, leave, probe) in STATE_KINDS {
        let (direct, _) = pair(db.port, leave, probe).await;
        let (proxied, ids) = pair(proxy.port, leave, probe).await;
        println!("{kind}: direct {direct:?}, through waitless {proxied:?}, ids {ids:?}");
        if ids[0] != ids[1] {
            leaks.push(format!(
                "{kind}: the next client got another server connection {ids:?}"
            ));
        } else if proxied != direct {
            leaks.push(format!(
                "{kind}: the next client saw {proxied:?}, direct {direct:?}"
            ));
        }
    }
    assert!(
        leaks.is_empty(),
        "state reached the next client:\n{}",
        leaks.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_connect_per_query_clients_open_at_most_pool_size_connections() {
    const POOL: u64 = 4;
    let db = MariaDb::start().await;
    let mut watch = db.watcher().await;
    // No max_connections: the pool alone must keep the count at pool_size, also while the
    // last session's connection is still being cleaned for the next.
    let proxy = MysqlProxy::start(db.port, "", &format!("pool_size = {POOL}")).await;
    // The first session also reads the server's greeting over a connection of its own; it
    // and the pool's first connection are not counted.
    assert_eq!(short_sessions(proxy.port, 1, 1).await, 0);
    let before = watch.status("Connections").await;
    let failed = bounded(
        "400 sessions",
        short_sessions(proxy.port, 400, POOL as usize),
    )
    .await;
    assert_eq!(failed, 0);
    settle().await;
    let opened = watch.status("Connections").await - before;
    println!("400 sessions, 4 at a time, pool_size {POOL}: server Connections +{opened}");
    assert!(
        opened <= POOL,
        "the server saw {opened} connections for pool_size = {POOL}"
    );
}

/// Issue 18's reset skipping: fails until waitless lends a clean session without a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_of_plain_selects_is_lent_again_without_a_reset() {
    let db = MariaDb::start().await;
    let mut v = Verdict::default();
    let mut watch = db.watcher().await;
    let proxy = MysqlProxy::start(db.port, "", "pool_size = 1\nmax_connections = 1").await;
    async fn plain(port: u16) -> u64 {
        let mut c = connect(port, Some("appdb")).await;
        text(&mut c, "SELECT 1").await;
        let id = connection_id(&mut c).await;
        bounded("disconnect", c.disconnect()).await.unwrap();
        id
    }
    // The first session opens the pooled connection.
    plain(proxy.port).await;
    settle().await;
    // MariaDB 10.11 has no Com_reset_connection: COM_RESET_CONNECTION (like COM_CHANGE_USER
    // and COM_PING) counts in Com_admin_commands; the COM_INIT_DB after it in Com_change_db.
    async fn resets(w: &mut Watcher) -> (u64, u64) {
        (
            w.status("Com_admin_commands").await,
            w.status("Com_change_db").await,
        )
    }
    let (reset0, change0) = resets(&mut watch).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(plain(proxy.port).await);
    }
    settle().await;
    let (reset1, change1) = resets(&mut watch).await;
    println!(
        "20 sessions of plain SELECTs: Com_admin_commands +{}, Com_change_db +{}",
        reset1 - reset0,
        change1 - change0
    );
    v.one_connection("plain SELECT sessions", &ids);
    assert_eq!(
        (reset1 - reset0, change1 - change0),
        (0, 0),
        "sessions that left nothing behind were reset (admin commands, COM_INIT_DB)"
    );

    // The counter does see the reset a session with state needs (or the connection is
    // replaced), so the zero above is not a counter that never moves.
    let mut c = connect(proxy.port, Some("appdb")).await;
    text(&mut c, "SET @state = 1").await;
    bounded("disconnect", c.disconnect()).await.unwrap();
    let connections = watch.status("Connections").await;
    let id = plain(proxy.port).await;
    settle().await;
    let (reset2, change2) = resets(&mut watch).await;
    let replaced = watch.status("Connections").await - connections;
    assert!(
        reset2 - reset1 + change2 - change1 + replaced > 0 || id != ids[0],
        "a session with a user variable was neither reset nor replaced"
    );
    v.end();
}

// ---------------------------------------------------------------------------------------

/// Packets by hand: a login whose OK and greeting status flags the test reads, and commands
/// no client library sends on request (a cursor fetched in batches). Transcripts record every
/// packet's status flags as the server sent them. Capabilities are fixed (no
/// CLIENT_DEPRECATE_EOF, no session tracking), so direct and proxied sessions get the same.
mod raw {
    use super::{LIMIT, PASSWORD, USER};
    use mysql_common::constants::CapabilityFlags as C;
    use mysql_common::io::ParseBuf;
    use mysql_common::packets::{
        AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse,
    };
    use mysql_common::proto::MySerialize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub const IN_TRANS: u16 = 0x0001;
    pub const AUTOCOMMIT: u16 = 0x0002;
    const MORE_RESULTS: u16 = 0x0008;
    const CURSOR_EXISTS: u16 = 0x0040;

    /// A logged-in session.
    pub struct Session {
        s: Option<TcpStream>,
        /// Status flags of the server greeting (what PyMySQL reads as autocommit).
        pub greeting_status: u16,
        /// Status flags of the login OK.
        pub login_status: u16,
    }

    /// A packet, or how reading one ended.
    enum Got {
        Packet(Vec<u8>),
        Closed,
        Hung,
    }

    impl Session {
        /// Logs in as the test account with the usual capabilities plus `extra`.
        pub async fn login(port: u16, extra: C, db: Option<&str>) -> Session {
            let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let mut me = Session {
                s: Some(s),
                greeting_status: 0,
                login_status: 0,
            };
            let Got::Packet(greeting) = me.read().await else {
                panic!("no greeting from port {port}");
            };
            let hs: HandshakePacket<'_> = ParseBuf(&greeting).parse(()).unwrap();
            me.greeting_status = hs.status_flags().bits();
            let mut caps = C::CLIENT_LONG_PASSWORD
                | C::CLIENT_PROTOCOL_41
                | C::CLIENT_SECURE_CONNECTION
                | C::CLIENT_PLUGIN_AUTH
                | C::CLIENT_TRANSACTIONS
                | C::CLIENT_MULTI_STATEMENTS
                | C::CLIENT_MULTI_RESULTS
                | C::CLIENT_PS_MULTI_RESULTS
                | extra;
            if db.is_some() {
                caps |= C::CLIENT_CONNECT_WITH_DB;
            }
            let scramble =
                mysql_common::scramble::scramble_native(&hs.nonce(), PASSWORD.as_bytes()).unwrap();
            let resp = HandshakeResponse::new(
                Some(&scramble[..]),
                (10, 11, 0),
                Some(USER.as_bytes()),
                db.map(str::as_bytes),
                Some(AuthPlugin::MysqlNativePassword),
                caps & hs.capabilities() | extra,
                None,
                1 << 24,
            );
            let mut buf = Vec::new();
            resp.serialize(&mut buf);
            me.write(1, &buf).await;
            let Got::Packet(mut answer) = me.read().await else {
                panic!("no answer to the login on port {port}");
            };
            if answer.first() == Some(&0xFE) {
                let req: AuthSwitchRequest<'_> = ParseBuf(&answer).parse(()).unwrap();
                let again =
                    mysql_common::scramble::scramble_native(req.plugin_data(), PASSWORD.as_bytes())
                        .unwrap();
                me.write(3, &again).await;
                let Got::Packet(next) = me.read().await else {
                    panic!("no answer to the auth switch on port {port}");
                };
                answer = next;
            }
            assert_eq!(answer.first(), Some(&0x00), "login refused: {answer:?}");
            me.login_status = ok_status(&answer);
            me
        }

        /// A text-protocol query: every result set (column names, rows, the EOF or OK status
        /// flags) until the response ends, or an error, or the connection closing or hanging.
        pub async fn query(&mut self, sql: &str) -> Vec<String> {
            let mut payload = vec![0x03];
            payload.extend_from_slice(sql.as_bytes());
            if self.s.is_none() {
                return vec!["closed before the query".into()];
            }
            self.write(0, &payload).await;
            let mut lines = Vec::new();
            loop {
                let first = match self.read().await {
                    Got::Packet(p) => p,
                    other => {
                        lines.push(ending(&other));
                        return lines;
                    }
                };
                match first.first() {
                    Some(0xFF) => {
                        lines.push(err_line(&first));
                        return lines;
                    }
                    Some(0x00) => {
                        let status = ok_status(&first);
                        lines.push(format!(
                            "ok affected={} status={status:#06x}",
                            lenenc(&first[1..]).0
                        ));
                        if status & MORE_RESULTS == 0 {
                            return lines;
                        }
                    }
                    _ => {
                        let (n, _) = lenenc(&first);
                        let Some(status) = self.columns(n, &mut lines).await else {
                            return lines;
                        };
                        if status & CURSOR_EXISTS != 0 {
                            lines.push(format!("cursor status={status:#06x}"));
                        }
                        match self.rows(false, &mut lines).await {
                            Some(status) if status & MORE_RESULTS != 0 => {}
                            _ => return lines,
                        }
                    }
                }
            }
        }

        /// The session's CONNECTION_ID(), as its transcript line.
        pub async fn id(&mut self) -> String {
            let lines = self.query("SELECT CONNECTION_ID()").await;
            lines
                .into_iter()
                .find(|l| l.starts_with("rows"))
                .unwrap_or_default()
        }

        /// COM_STMT_PREPARE; the statement id, or None after an error (in `lines`).
        pub async fn prepare(&mut self, sql: &str, lines: &mut Vec<String>) -> Option<u32> {
            let mut payload = vec![0x16];
            payload.extend_from_slice(sql.as_bytes());
            self.write(0, &payload).await;
            let p = match self.read().await {
                Got::Packet(p) if p.first() == Some(&0x00) && p.len() >= 12 => p,
                Got::Packet(p) => {
                    lines.push(err_line(&p));
                    return None;
                }
                other => {
                    lines.push(ending(&other));
                    return None;
                }
            };
            let id = u32::from_le_bytes([p[1], p[2], p[3], p[4]]);
            let columns = u16::from_le_bytes([p[5], p[6]]) as u64;
            let params = u16::from_le_bytes([p[7], p[8]]) as u64;
            // The id is the server session's own count: not part of the transcript.
            lines.push(format!("prepared columns={columns} params={params}"));
            if params > 0 {
                self.columns(params, lines).await?;
            }
            if columns > 0 {
                self.columns(columns, lines).await?;
            }
            Some(id)
        }

        /// COM_STMT_EXECUTE with CURSOR_TYPE_READ_ONLY (a statement without parameters).
        pub async fn execute_with_cursor(&mut self, id: u32, lines: &mut Vec<String>) {
            let mut payload = vec![0x17];
            payload.extend_from_slice(&id.to_le_bytes());
            payload.push(0x01);
            payload.extend_from_slice(&1u32.to_le_bytes());
            self.write(0, &payload).await;
            let first = match self.read().await {
                Got::Packet(p) => p,
                other => return lines.push(ending(&other)),
            };
            match first.first() {
                Some(0xFF) => lines.push(err_line(&first)),
                Some(0x00) => lines.push(format!("ok status={:#06x}", ok_status(&first))),
                _ => {
                    let (n, _) = lenenc(&first);
                    let Some(status) = self.columns(n, lines).await else {
                        return;
                    };
                    // With a cursor open no rows follow; without one they do.
                    if status & CURSOR_EXISTS == 0 {
                        self.rows(true, lines).await;
                    }
                }
            }
        }

        /// COM_STMT_FETCH of up to `n` rows.
        pub async fn fetch(&mut self, id: u32, n: u32, lines: &mut Vec<String>) {
            let mut payload = vec![0x1C];
            payload.extend_from_slice(&id.to_le_bytes());
            payload.extend_from_slice(&n.to_le_bytes());
            self.write(0, &payload).await;
            lines.push(format!("fetch {n}"));
            self.rows(true, lines).await;
        }

        /// COM_STMT_CLOSE (the server does not answer it).
        pub async fn close_statement(&mut self, id: u32) {
            let mut payload = vec![0x19];
            payload.extend_from_slice(&id.to_le_bytes());
            self.write(0, &payload).await;
        }

        /// `n` column definitions and the EOF after them; the EOF's status flags.
        async fn columns(&mut self, n: u64, lines: &mut Vec<String>) -> Option<u16> {
            let mut names = Vec::new();
            for _ in 0..n {
                match self.read().await {
                    Got::Packet(p) => names.push(column_name(&p)),
                    other => {
                        lines.push(ending(&other));
                        return None;
                    }
                }
            }
            match self.read().await {
                Got::Packet(p) if is_eof(&p) => {
                    let status = eof_status(&p);
                    lines.push(format!("columns {names:?} status={status:#06x}"));
                    Some(status)
                }
                Got::Packet(p) => {
                    lines.push(format!("columns {names:?} then not an EOF: {p:?}"));
                    None
                }
                other => {
                    lines.push(ending(&other));
                    None
                }
            }
        }

        /// Rows up to their EOF (text rows as values, binary rows as bytes); the EOF's status.
        async fn rows(&mut self, binary: bool, lines: &mut Vec<String>) -> Option<u16> {
            let mut rows = Vec::new();
            loop {
                match self.read().await {
                    Got::Packet(p) if is_eof(&p) => {
                        let status = eof_status(&p);
                        lines.push(format!("rows {rows:?} status={status:#06x}"));
                        return Some(status);
                    }
                    Got::Packet(p) if p.first() == Some(&0xFF) => {
                        lines.push(format!("rows {rows:?}"));
                        lines.push(err_line(&p));
                        return None;
                    }
                    Got::Packet(p) if binary => rows.push(format!("{p:02x?}")),
                    Got::Packet(p) => rows.push(text_row(&p)),
                    other => {
                        lines.push(format!("rows {rows:?}"));
                        lines.push(ending(&other));
                        return None;
                    }
                }
            }
        }

        async fn read(&mut self) -> Got {
            let Some(s) = self.s.as_mut() else {
                return Got::Closed;
            };
            let got = tokio::time::timeout(LIMIT, async {
                let mut head = [0u8; 4];
                s.read_exact(&mut head).await?;
                let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
                let mut payload = vec![0u8; len];
                s.read_exact(&mut payload).await?;
                Ok::<_, std::io::Error>(payload)
            })
            .await;
            match got {
                Ok(Ok(p)) => Got::Packet(p),
                Ok(Err(_)) => {
                    self.s = None;
                    Got::Closed
                }
                Err(_) => {
                    self.s = None;
                    Got::Hung
                }
            }
        }

        async fn write(&mut self, seq: u8, payload: &[u8]) {
            let Some(s) = self.s.as_mut() else {
                return;
            };
            // Split at 16 MiB - 1 as the protocol says, an empty packet ending a payload of
            // a whole number of chunks.
            const CHUNK: usize = 0xFF_FFFF;
            let mut packets = Vec::with_capacity(payload.len() + 8);
            let mut chunks: Vec<&[u8]> = payload.chunks(CHUNK).collect();
            if payload.len().is_multiple_of(CHUNK) {
                chunks.push(&[]);
            }
            for (i, chunk) in chunks.into_iter().enumerate() {
                let len = (chunk.len() as u32).to_le_bytes();
                packets.extend_from_slice(&[len[0], len[1], len[2], seq.wrapping_add(i as u8)]);
                packets.extend_from_slice(chunk);
            }
            // A server that closed on us shows at the next read.
            let _ = s.write_all(&packets).await;
        }
    }

    fn ending(got: &Got) -> String {
        match got {
            Got::Closed => "connection closed".into(),
            Got::Hung => format!("no answer within {LIMIT:?}"),
            Got::Packet(p) => format!("packet {p:?}"),
        }
    }

    fn is_eof(p: &[u8]) -> bool {
        p.first() == Some(&0xFE) && p.len() < 9
    }

    fn eof_status(p: &[u8]) -> u16 {
        u16::from_le_bytes([p[3], p[4]])
    }

    fn ok_status(p: &[u8]) -> u16 {
        let (_, a) = lenenc(&p[1..]);
        let (_, b) = lenenc(&p[1 + a..]);
        let at = 1 + a + b;
        u16::from_le_bytes([p[at], p[at + 1]])
    }

    fn err_line(p: &[u8]) -> String {
        if p.first() != Some(&0xFF) || p.len() < 3 {
            return format!("unexpected packet {p:?}");
        }
        let code = u16::from_le_bytes([p[1], p[2]]);
        format!("error {code} {}", String::from_utf8_lossy(&p[3..]))
    }

    /// A length-encoded integer at the start of `p`, and how many bytes it took.
    fn lenenc(p: &[u8]) -> (u64, usize) {
        let le = |n: usize| {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&p[1..1 + n]);
            (u64::from_le_bytes(b), 1 + n)
        };
        match p[0] {
            0xFC => le(2),
            0xFD => le(3),
            0xFE => le(8),
            n => (n as u64, 1),
        }
    }

    /// A length-encoded string at the start of `p` (None for NULL), and the bytes it took.
    fn lenenc_str(p: &[u8]) -> (Option<String>, usize) {
        if p[0] == 0xFB {
            return (None, 1);
        }
        let (n, at) = lenenc(p);
        let end = at + n as usize;
        (Some(String::from_utf8_lossy(&p[at..end]).into_owned()), end)
    }

    fn text_row(p: &[u8]) -> String {
        let mut at = 0;
        let mut cells = Vec::new();
        while at < p.len() {
            let (v, n) = lenenc_str(&p[at..]);
            cells.push(v.unwrap_or_else(|| "NULL".into()));
            at += n;
        }
        cells.join("|")
    }

    /// The name of a Protocol::ColumnDefinition41 (after catalog, schema, table, org_table).
    fn column_name(p: &[u8]) -> String {
        let mut at = 0;
        for _ in 0..4 {
            at += lenenc_str(&p[at..]).1;
        }
        lenenc_str(&p[at..]).0.unwrap_or_default()
    }
}

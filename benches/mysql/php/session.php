<?php
// (4) the app session: connect, a SELECT, a prepared SELECT (prepare, bind, execute, fetch,
// close), `SELECT @@sql_mode` (as frameworks read it at connect), close.
require __DIR__ . '/common.php';

$a = args();
measure($a, function () use ($a) {
    $db = open($a);
    $r = $db->query('SELECT id, name FROM items WHERE id = 1');
    $ok = $r->fetch_row()[1] === 'one';
    $r->free();
    $st = $db->prepare('SELECT name FROM items WHERE id = ?');
    $id = 2;
    $st->bind_param('i', $id);
    $st->execute();
    $st->bind_result($name);
    $ok = $st->fetch() && $name === 'two' && $ok;
    $st->close();
    $r = $db->query('SELECT @@sql_mode');
    $ok = $r->fetch_row() !== null && $ok;
    $r->free();
    $db->close();
    return $ok;
});

<?php
// (3) connect + `SELECT 1` + close: the shortest session that does something.
require __DIR__ . '/common.php';

$a = args();
measure($a, function () use ($a) {
    $db = open($a);
    $r = $db->query('SELECT 1');
    $ok = $r->fetch_row()[0] == 1;
    $r->free();
    $db->close();
    return $ok;
});

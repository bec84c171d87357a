<?php
// (1) `SELECT 1` on one open connection: what the relay adds to a statement.
require __DIR__ . '/common.php';

$a = args();
$db = open($a);
measure($a, function () use ($db) {
    $r = $db->query('SELECT 1');
    $ok = $r->fetch_row()[0] == 1;
    $r->free();
    return $ok;
});
$db->close();

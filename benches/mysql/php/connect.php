<?php
// (2) connect + close: a session's fixed cost, login and goodbye.
require __DIR__ . '/common.php';

$a = args();
measure($a, function () use ($a) {
    $db = open($a);
    return $db->close();
});
